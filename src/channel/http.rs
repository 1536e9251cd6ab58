//! What every HTTP channel shares: reading `Retry-After`, classifying a status, and an error
//! with its causes on one line.

use crate::delivery::{DeliveryError, FailureKind};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use std::time::Duration;

/// The longest wait a provider's `Retry-After` is taken at its word for. Beyond it the value is
/// a mistake or hostile; the delivery's own `max_age` ends it sooner anyway.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Reads a `Retry-After` value, as seconds or as an HTTP date, capped at
/// [`LONGEST_RETRY_AFTER`]. Anything unreadable counts as absent.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: however many, never an overflow.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let date = DateTime::parse_from_rfc2822(value).ok()?;
        crate::clock::until(now, date.with_timezone(&Utc))
    };
    Some(wait.min(LONGEST_RETRY_AFTER))
}

/// `Retry-After` of a response, if it has a readable one.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, Utc::now())
}

/// What a non-success status means for the delivery: 408 and 5xx are worth retrying, 429 slows
/// the whole channel, 410 says the endpoint is gone, any other 4xx will never succeed.
pub fn failure_for_status(status: StatusCode) -> FailureKind {
    match status {
        StatusCode::TOO_MANY_REQUESTS => FailureKind::Throttled,
        StatusCode::REQUEST_TIMEOUT => FailureKind::Transient,
        StatusCode::GONE => FailureKind::EndpointGone,
        status if status.is_server_error() => FailureKind::Transient,
        _ => FailureKind::Permanent,
    }
}

/// The failure for a request that got no answer.
pub fn failure_for_request(error: &reqwest::Error) -> DeliveryError {
    let what = if error.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    DeliveryError::transient(format!("{what}: {}", with_causes(error)))
}

/// An error and its causes on one line: reqwest's own message leaves out the useful part
/// ("connection refused").
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

/// A URL as it may be shown or stored: without its query string, user or password, which
/// often carry tokens.
pub fn redact_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if shown.query().is_some() {
        shown.set_query(Some("…"));
    }
    shown.set_fragment(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_retry_after_is_capped_instead_of_overflowing() {
        let now = Utc::now();
        assert_eq!(
            parse_retry_after("99999999999999999", now),
            Some(LONGEST_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("999999999999999999999999999999", now),
            Some(LONGEST_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn a_retry_after_date_in_the_past_means_now_and_garbage_means_absent() {
        let now = Utc::now();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn a_url_is_shown_without_its_query_or_credentials() {
        let url = reqwest::Url::parse("https://user:pw@hooks.example.com/in?token=s3cret").unwrap();
        let shown = redact_url(&url);
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw"),
            "{shown}"
        );
        assert!(shown.starts_with("https://hooks.example.com/in"), "{shown}");
    }
}
