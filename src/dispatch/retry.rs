//! Retry policy: exponential backoff with full jitter, bounded by attempts and age, and never
//! sooner than a provider's `Retry-After`.

use crate::channel::DeliveryError;
use crate::config::DeliveryPolicy;
use crate::store::{DeliveryRecord, Outcome};
use chrono::{DateTime, Utc};
use rand::Rng;
use std::time::Duration;

/// Decides what happens after a failed attempt. `delivery.attempts` counts the one that failed.
pub fn after_failure(
    policy: &DeliveryPolicy,
    delivery: &DeliveryRecord,
    error: &DeliveryError,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Outcome {
    let (reason, retry_after) = match error {
        DeliveryError::Transient {
            reason,
            retry_after,
        } => (reason, *retry_after),
        DeliveryError::Permanent { reason } | DeliveryError::Gone { reason } => {
            return Outcome::Dead {
                error: reason.clone(),
            };
        }
    };
    if delivery.attempts >= policy.max_attempts {
        return Outcome::Dead {
            error: format!("gave up after {} attempts: {reason}", delivery.attempts),
        };
    }
    let ceiling = backoff_ceiling(policy, delivery.attempts);
    let jittered = Duration::from_millis(rng.random_range(0..=ceiling.as_millis() as u64));
    let wait = retry_after.map_or(jittered, |asked| asked.max(jittered));
    let at = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
    let deadline = delivery.queued_at
        + chrono::Duration::from_std(policy.max_age).unwrap_or(chrono::Duration::MAX);
    if at > deadline {
        return Outcome::Dead {
            error: format!(
                "gave up: the next attempt would be more than {} after it was queued: {reason}",
                humantime::format_duration(policy.max_age)
            ),
        };
    }
    Outcome::Retry {
        at,
        error: reason.clone(),
    }
}

/// `min(backoff_max, backoff_base * 2^(attempt - 1))`.
fn backoff_ceiling(policy: &DeliveryPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(31);
    policy
        .backoff_base
        .checked_mul(1u32 << exponent)
        .unwrap_or(policy.backoff_max)
        .min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use ulid::Ulid;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            concurrency: 1,
            max_attempts: 5,
            max_age: Duration::from_secs(600),
            timeout: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    fn delivery(attempts: u32, now: DateTime<Utc>) -> DeliveryRecord {
        let mut record = DeliveryRecord::new(Ulid::new(), "partners", "-", vec![], now);
        record.attempts = attempts;
        record
    }

    #[test]
    fn the_backoff_ceiling_doubles_per_attempt_up_to_the_maximum() {
        let ceilings: Vec<u64> = (1..=8)
            .map(|a| backoff_ceiling(&policy(), a).as_secs())
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn full_jitter_spreads_retries_between_now_and_the_ceiling() {
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(7);
        let waits: Vec<i64> = (0..200)
            .map(|_| {
                match after_failure(
                    &policy(),
                    &delivery(4, now),
                    &DeliveryError::transient("503"),
                    now,
                    &mut rng,
                ) {
                    Outcome::Retry { at, .. } => (at - now).num_milliseconds(),
                    other => panic!("expected a retry, got {other:?}"),
                }
            })
            .collect();
        assert!(waits.iter().all(|w| (0..=8_000).contains(w)));
        assert!(waits.iter().any(|w| *w < 2_000) && waits.iter().any(|w| *w > 6_000));
    }

    #[test]
    fn retry_after_is_honoured_even_when_longer_than_the_backoff() {
        let now = Utc::now();
        let error = DeliveryError::Transient {
            reason: "429".into(),
            retry_after: Some(Duration::from_secs(120)),
        };
        let outcome = after_failure(
            &policy(),
            &delivery(1, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        let Outcome::Retry { at, .. } = outcome else {
            panic!("expected a retry, got {outcome:?}")
        };
        assert!((at - now).num_seconds() >= 120);
    }

    #[test]
    fn a_permanent_failure_goes_to_dead_letters_at_once() {
        let now = Utc::now();
        let outcome = after_failure(
            &policy(),
            &delivery(1, now),
            &DeliveryError::permanent("400"),
            now,
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(
            outcome,
            Outcome::Dead {
                error: "400".into()
            }
        );
    }

    #[test]
    fn the_attempt_limit_and_the_age_limit_end_retries() {
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(1);
        let out_of_attempts = after_failure(
            &policy(),
            &delivery(5, now),
            &DeliveryError::transient("503"),
            now,
            &mut rng,
        );
        assert!(matches!(out_of_attempts, Outcome::Dead { .. }));

        let mut old = delivery(1, now);
        old.queued_at = now - chrono::Duration::seconds(599);
        let error = DeliveryError::Transient {
            reason: "503".into(),
            retry_after: Some(Duration::from_secs(30)),
        };
        assert!(matches!(
            after_failure(&policy(), &old, &error, now, &mut rng),
            Outcome::Dead { .. }
        ));
    }
}
