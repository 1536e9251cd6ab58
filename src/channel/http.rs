//! What every HTTP channel shares: reading `Retry-After`, classifying a status, and an error
//! with its causes on one line.

use crate::delivery::{DeliveryError, FailureKind};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use std::time::Duration;

/// The longest wait a provider's `Retry-After` is taken at its word for. Beyond it the value is
/// a mistake or hostile, and counts as absent.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Reads a `Retry-After` value: a positive whole number of seconds, or an HTTP date in the
/// future, up to [`LONGEST_RETRY_AFTER`]. Anything else (negative, a fraction, garbage, empty,
/// zero, a date already past, a wait beyond a day) counts as absent, so the delivery backs off
/// as usual instead of coming back at once.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: however many, never an overflow.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let date = DateTime::parse_from_rfc2822(value).ok()?;
        crate::clock::until(now, date.with_timezone(&Utc))
    };
    (!wait.is_zero() && wait <= LONGEST_RETRY_AFTER).then_some(wait)
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

/// What a non-success status means for the delivery: 408 and 5xx (but 501) are worth
/// retrying, 429 slows the whole channel, 410 says the endpoint is gone, any other 4xx (and a
/// 501, which a retry will not implement) will never succeed.
pub fn failure_for_status(status: StatusCode) -> FailureKind {
    match status {
        StatusCode::TOO_MANY_REQUESTS => FailureKind::Throttled,
        StatusCode::REQUEST_TIMEOUT => FailureKind::Transient,
        StatusCode::GONE => FailureKind::EndpointGone,
        StatusCode::NOT_IMPLEMENTED => FailureKind::Permanent,
        status if status.is_server_error() => FailureKind::Transient,
        _ => FailureKind::Permanent,
    }
}

/// The failure for a provider's non-success answer, with its status kept as data and the
/// wait it asks for (`Retry-After`, or `X-RateLimit-Reset` when nothing remains). 401 and 403
/// say the credentials were refused, so the reason says so.
pub fn failure_for_response(response: &reqwest::Response, what: &str) -> DeliveryError {
    let status = response.status();
    let reason = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            format!("{what} refused the credentials ({status}): check the channel's secret")
        }
        _ => format!("{what} answered {status}"),
    };
    DeliveryError::new(failure_for_status(status), reason)
        .with_status(status.as_u16())
        .with_retry_after(retry_after(response).or_else(|| rate_limit_reset(response)))
}

/// The wait until `X-RateLimit-Reset` when `X-RateLimit-Remaining` says nothing is left:
/// the reset as Unix seconds or an RFC 3339 time (Mastodon), capped like `Retry-After`.
pub fn rate_limit_reset(response: &reqwest::Response) -> Option<Duration> {
    let header = |name: &str| response.headers().get(name)?.to_str().ok();
    let remaining: u64 = header("x-ratelimit-remaining")?.trim().parse().ok()?;
    if remaining > 0 {
        return None;
    }
    let reset = header("x-ratelimit-reset")?.trim();
    let now = Utc::now();
    let at = match reset.parse::<i64>() {
        Ok(seconds) => DateTime::from_timestamp(seconds, 0)?,
        Err(_) => DateTime::parse_from_rfc3339(reset)
            .ok()?
            .with_timezone(&Utc),
    };
    Some(crate::clock::until(now, at).min(LONGEST_RETRY_AFTER))
}

/// The failure for a request that got no answer, in plain words: "could not connect to
/// api.example.com:443 (it refused the connection)". Only the URL's host and port are named:
/// its path and query, which may carry a token, never appear.
pub fn failure_for_request(error: &reqwest::Error) -> DeliveryError {
    let place = error
        .url()
        .map(super::network::place_of)
        .unwrap_or_else(|| "the provider".to_owned());
    DeliveryError::transient(super::network::unreachable(&place, error))
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

/// The HTTP client of one channel: the policy's timeout, crier's user agent, and no redirects
/// (a redirect would carry the channel's credentials or payload somewhere the operator did
/// not configure).
pub fn client(timeout: Duration) -> crate::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("crier/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| crate::Error::internal(anyhow::anyhow!("HTTP client: {e}")))
}

/// A response's body, cut at `limit` bytes: no honest answer is larger, and a hostile one
/// must not fill the memory.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

/// A provider's base URL, as a channel file gives it, to append API paths to (it may live in
/// a subfolder): http or https, no query or fragment, its path without a trailing slash.
pub fn api_base(text: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(text).map_err(|e| format!("'{text}' is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must be the service's address, without a query or fragment".into());
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// `base` with the absolute `path` appended to its own path.
pub fn endpoint(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let joined = format!("{}{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

/// The most of a provider's own words kept in a failure's reason.
const PROVIDER_TEXT_LIMIT: usize = 300;

/// A provider's own words (an error message from its answer), fit for a one-line reason:
/// control characters and runs of whitespace become one space, and it is cut short.
pub fn provider_text(text: &str) -> String {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect();
    let line = words.join(" ");
    match line.char_indices().nth(PROVIDER_TEXT_LIMIT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_retry_after_is_capped_instead_of_overflowing() {
        let now = Utc::now();
        assert_eq!(parse_retry_after("99999999999999999", now), None);
        assert_eq!(
            parse_retry_after("999999999999999999999999999999", now),
            None
        );
        assert_eq!(parse_retry_after("86400", now), Some(LONGEST_RETRY_AFTER));
        assert_eq!(parse_retry_after("86401", now), None);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn a_retry_after_that_is_not_a_wait_to_come_counts_as_absent() {
        let now = Utc::now();
        for absent in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "-5",
            "1.5",
            "0",
            "soon",
            "",
            "  ",
            "+30",
            "30s",
        ] {
            assert_eq!(parse_retry_after(absent, now), None, "{absent:?}");
        }
        let in_an_hour = (now + chrono::Duration::hours(1)).to_rfc2822();
        let wait = parse_retry_after(&in_an_hour, now).expect("a date to come");
        assert!(wait > Duration::from_secs(3590) && wait <= Duration::from_secs(3600));
        assert_eq!(
            parse_retry_after(" 30 ", now),
            Some(Duration::from_secs(30))
        );
    }

    proptest::proptest! {
        /// Nothing but a positive whole number of seconds, at most a day, or a date to come
        /// within a day is a wait: negative numbers, fractions and words never are.
        #[test]
        fn a_malformed_retry_after_is_never_a_wait(
            negative in -1_000_000i64..0,
            fraction in 0.0f64..100_000.0,
            word in "[a-zA-Z !,:-]{1,30}",
        ) {
            let now = Utc::now();
            proptest::prop_assert_eq!(parse_retry_after(&negative.to_string(), now), None);
            proptest::prop_assert_eq!(parse_retry_after(&format!("{fraction:.3}"), now), None);
            proptest::prop_assert_eq!(parse_retry_after(&word, now), None);
            let past = now - chrono::Duration::seconds(negative.abs());
            proptest::prop_assert_eq!(parse_retry_after(&past.to_rfc2822(), now), None);
        }
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

    #[test]
    fn a_providers_words_become_one_short_line() {
        assert_eq!(
            provider_text("Body is too similar\n\tto what\u{1b}[31m you posted"),
            "Body is too similar to what [31m you posted"
        );
        let long = provider_text(&"word ".repeat(200));
        assert_eq!(long.chars().count(), PROVIDER_TEXT_LIMIT + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn api_paths_are_appended_to_a_base_in_a_subfolder_or_not() {
        let root = api_base("https://social.example/").unwrap();
        assert_eq!(
            endpoint(&root, "/api/v1/statuses").as_str(),
            "https://social.example/api/v1/statuses"
        );
        let nested = api_base("https://example.com/forum/").unwrap();
        assert_eq!(
            endpoint(&nested, "/posts.json").as_str(),
            "https://example.com/forum/posts.json"
        );
        assert!(api_base("forum.example.com").is_err());
        assert!(api_base("https://forum.example.com/?key=1").is_err());
    }
}
