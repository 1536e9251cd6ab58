//! Time: the clock the dispatcher reads, and arithmetic on times that saturates instead of
//! panicking, whatever a provider's `Retry-After` or a config's `max_age` says.

use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;

/// Where "now" comes from. The system clock in production; in tests, a clock that follows
/// tokio's (pausable) time, so a test can move time without sleeping.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    /// `start` plus the tokio time elapsed since `origin`.
    Tokio {
        start: DateTime<Utc>,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that starts at `start` and advances with tokio's time.
    pub fn following_tokio(start: DateTime<Utc>) -> Self {
        Clock::Tokio {
            start,
            origin: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { start, origin } => after(*start, origin.elapsed()),
        }
    }
}

/// `time + wait`, or the latest representable time when that would overflow.
pub fn after(time: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(wait)
        .ok()
        .and_then(|delta| time.checked_add_signed(delta))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `time - wait`, or the earliest representable time when that would overflow.
pub fn before(time: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(wait)
        .ok()
        .and_then(|delta| time.checked_sub_signed(delta))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How long from `now` until `time`: zero if it has passed.
pub fn until(now: DateTime<Utc>, time: DateTime<Utc>) -> Duration {
    time.signed_duration_since(now).to_std().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_an_absurd_wait_saturates_instead_of_panicking() {
        let now = Utc::now();
        assert_eq!(after(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            after(now, Duration::from_secs(99_999_999_999_999_999)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            after(now, Duration::from_secs(1)) - now,
            TimeDelta::seconds(1)
        );
    }

    #[test]
    fn the_wait_until_a_past_time_is_zero() {
        let now = Utc::now();
        assert_eq!(until(now, now - TimeDelta::seconds(5)), Duration::ZERO);
        assert!(until(now, DateTime::<Utc>::MAX_UTC) > Duration::from_secs(1 << 40));
    }
}
