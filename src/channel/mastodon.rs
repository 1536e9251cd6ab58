//! The Mastodon channel: one status per update, each later update of an incident a reply to
//! the one before, so an incident reads as one thread. It owns its settings (the instance,
//! the token, the visibility and language), asks the instance for its character limit when
//! it is built, and counts a text as Mastodon does: every URL as the instance's reserved
//! length, whatever its own.

use super::http::{
    api_base, client, endpoint, failure_for_request, failure_for_response, provider_text,
    read_capped, redact_url,
};
use super::limits::{Measure, Overflow, fit};
use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy, Rate};
use crate::delivery::{DeliveryError, Receipt, RemoteThread};
use crate::render::{MessageContext, Renderer};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub static KIND: ChannelKind = ChannelKind {
    name: "mastodon",
    templates: &[TEMPLATE],
    // One at a time: each status replies to the incident's latest, so two in flight would
    // both answer the same one and fork the thread. The rate is Mastodon's default limit
    // per account (300 calls in 5 minutes).
    default_policy: DeliveryPolicy::with_concurrency(1)
        .with_timeout(Duration::from_secs(15))
        .with_rate(Rate::new(300, Duration::from_secs(5 * 60))),
    parse: MastodonSettings::parse,
};

const TEMPLATE: &str = "mastodon.txt";

/// What Mastodon allows when the instance does not say: its defaults since version 1.
const FALLBACK_LIMITS: StatusLimits = StatusLimits {
    max_characters: 500,
    characters_reserved_per_url: 23,
};

/// How long building waits for the instance's limits. Every command that opens the store
/// builds its channels, and a slow instance should not hold it up for the whole timeout.
const LIMITS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of an instance's answer that is read: a status or the instance's description is
/// a few kilobytes.
const ANSWER_LIMIT: usize = 1024 * 1024;

/// A channel file of kind `mastodon`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MastodonFile {
    /// The instance's base URL, like `https://mastodon.social`.
    instance: String,
    /// The environment variable holding the account's access token (scope `write:statuses`).
    token_env: String,
    /// Who sees the statuses: `public` (the default), `unlisted`, `private` or `direct`.
    visibility: Option<String>,
    /// The statuses' language, as an ISO 639-1 code like `en`.
    language: Option<String>,
    /// What to do with a text over the instance's limit: `refuse` (the default) or `truncate`.
    #[serde(default)]
    overflow: Overflow,
}

/// Who sees a status, in Mastodon's words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Public,
    Unlisted,
    Private,
    Direct,
}

impl Visibility {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "public" => Some(Self::Public),
            "unlisted" => Some(Self::Unlisted),
            "private" => Some(Self::Private),
            "direct" => Some(Self::Direct),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct MastodonSettings {
    /// The instance's base URL, without a trailing slash in its path.
    pub instance: Url,
    pub token: SecretString,
    pub visibility: Visibility,
    /// Lower-case ISO 639-1.
    pub language: Option<String>,
    pub overflow: Overflow,
}

impl std::fmt::Debug for MastodonSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MastodonSettings")
            .field("instance", &redact_url(&self.instance))
            .field("visibility", &self.visibility)
            .field("language", &self.language)
            .field("overflow", &self.overflow)
            .finish_non_exhaustive()
    }
}

impl MastodonSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let file = input.file;
        let raw: MastodonFile = input.parse()?;
        let instance =
            api_base(&raw.instance).map_err(|reason| ConfigError::at(file, "instance", reason))?;
        let visibility = match raw.visibility.as_deref() {
            None => Visibility::default(),
            Some(text) => Visibility::parse(text).ok_or_else(|| {
                ConfigError::at(
                    file,
                    "visibility",
                    format!(
                        "'{text}' is not a visibility: use public, unlisted, private or direct"
                    ),
                )
            })?,
        };
        let language = raw
            .language
            .map(|code| {
                let lower = code.trim().to_ascii_lowercase();
                if lower.len() == 2 && lower.bytes().all(|b| b.is_ascii_lowercase()) {
                    Ok(lower)
                } else {
                    Err(ConfigError::at(
                        file,
                        "language",
                        format!("'{code}' is not an ISO 639-1 code like en or de"),
                    ))
                }
            })
            .transpose()?;
        let token = config::secret(file, "token_env", &raw.token_env, input.secrets)?;
        if bearer(&token).is_err() {
            return Err(ConfigError::at(
                file,
                "token_env",
                format!(
                    "the token in {} has characters an HTTP header cannot carry (a stray newline?)",
                    raw.token_env
                ),
            ));
        }
        Ok(Arc::new(MastodonSettings {
            instance,
            token,
            visibility,
            language,
            overflow: raw.overflow,
        }))
    }
}

/// The `Authorization` header for the token, marked sensitive so it never prints.
fn bearer(token: &SecretString) -> Result<HeaderValue, reqwest::header::InvalidHeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[async_trait::async_trait]
impl ChannelSettings for MastodonSettings {
    async fn build(
        &self,
        id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        let client = client(policy.timeout)?;
        let limits = StatusLimits::fetch(&client, &self.instance, policy.timeout)
            .await
            .unwrap_or_else(|reason| {
                tracing::warn!(
                    channel = id,
                    instance = %redact_url(&self.instance),
                    "cannot read the instance's limits ({reason}); assuming {} characters and {} per URL",
                    FALLBACK_LIMITS.max_characters,
                    FALLBACK_LIMITS.characters_reserved_per_url,
                );
                FALLBACK_LIMITS
            });
        let authorization = bearer(&self.token).map_err(|_| {
            crate::Error::user("the token has characters an HTTP header cannot carry")
        })?;
        Ok(Arc::new(MastodonChannel {
            statuses: endpoint(&self.instance, "/api/v1/statuses"),
            authorization,
            visibility: self.visibility,
            language: self.language.clone(),
            overflow: self.overflow,
            limits,
            renderer: context.renderer.clone(),
            client,
        }))
    }
}

/// An instance's limits on a status, as `GET /api/v2/instance` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct StatusLimits {
    pub max_characters: usize,
    pub characters_reserved_per_url: usize,
}

#[derive(Deserialize)]
struct InstanceAnswer {
    configuration: InstanceConfiguration,
}

#[derive(Deserialize)]
struct InstanceConfiguration {
    statuses: StatusLimits,
}

impl StatusLimits {
    /// Asks the instance (a public endpoint: no token is sent), or says why it could not.
    async fn fetch(
        client: &reqwest::Client,
        instance: &Url,
        timeout: Duration,
    ) -> Result<Self, String> {
        let response = client
            .get(endpoint(instance, "/api/v2/instance"))
            .timeout(timeout.min(LIMITS_LOOKUP_TIMEOUT))
            .send()
            .await
            .map_err(|e| failure_for_request(&e).reason)?;
        if !response.status().is_success() {
            return Err(format!("it answered {}", response.status()));
        }
        let body = read_capped(response, ANSWER_LIMIT)
            .await
            .map_err(|e| failure_for_request(&e).reason)?;
        Self::from_answer(&body)
    }

    fn from_answer(body: &[u8]) -> Result<Self, String> {
        let answer: InstanceAnswer = serde_json::from_slice(body)
            .map_err(|e| format!("its answer has no configuration.statuses: {e}"))?;
        let limits = answer.configuration.statuses;
        if limits.max_characters == 0 || limits.characters_reserved_per_url > limits.max_characters
        {
            return Err(format!(
                "its limits make no sense ({} characters, {} per URL)",
                limits.max_characters, limits.characters_reserved_per_url
            ));
        }
        Ok(limits)
    }
}

impl Measure for StatusLimits {
    fn measure(&self, text: &str) -> usize {
        status_length(text, self.characters_reserved_per_url)
    }

    fn limit(&self) -> usize {
        self.max_characters
    }

    fn unit(&self) -> &str {
        "characters"
    }
}

/// The length Mastodon gives a status: its characters, with every URL counted as
/// `per_url` whatever its own length.
///
/// Mastodon counts grapheme clusters, which are never more than characters, so this never
/// counts less than the instance does. A URL is only discounted when Mastodon would see one
/// too: `http(s)://`, not glued to a word before it, with a domain that has a top-level
/// domain; anything doubtful is counted in full.
pub fn status_length(text: &str, per_url: usize) -> usize {
    let mut length = text.chars().count();
    for word in text.split_whitespace() {
        if let Some(url) = url_in(word) {
            length = length - url.chars().count() + per_url;
        }
    }
    length
}

/// The URL a whitespace-free `word` holds, as Mastodon would link it, if any.
fn url_in(word: &str) -> Option<&str> {
    let start = ["https://", "http://"]
        .iter()
        .filter_map(|scheme| word.find(scheme))
        .min()?;
    // Glued to a letter, digit or @ (`xhttps://…`), it is not a link.
    if word[..start]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '@' | '$' | '#'))
    {
        return None;
    }
    // Punctuation that ends a sentence is not part of the link.
    let url = word[start..].trim_end_matches(['.', ',', ':', ';', '!', '?', ')', ']', '\'', '"']);
    let parsed = Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    let top_level = host.rsplit_once('.')?.1;
    let has_top_level_domain = top_level.len() >= 2
        && (top_level.chars().all(|c| c.is_alphabetic()) || top_level.starts_with("xn--"));
    has_top_level_domain.then_some(url)
}

/// The previous status of the incident on this channel, from the thread the dispatcher kept.
fn previous_status(thread: Option<&RemoteThread>) -> Result<Option<String>, DeliveryError> {
    let Some(thread) = thread else {
        return Ok(None);
    };
    match thread.get("status_id") {
        Some(serde_json::Value::String(id)) => Ok(Some(id.clone())),
        Some(serde_json::Value::Number(id)) => Ok(Some(id.to_string())),
        _ => Err(DeliveryError::permanent(format!(
            "the incident's thread on this channel is not a status ({thread})"
        ))),
    }
}

/// `POST /api/v1/statuses`, as JSON.
#[derive(Debug, Serialize)]
struct NewStatus<'a> {
    status: &'a str,
    visibility: Visibility,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to_id: Option<&'a str>,
}

/// The part of a created status crier keeps. Mastodon's ids are strings; some compatible
/// servers send numbers.
#[derive(Deserialize)]
struct CreatedStatus {
    id: serde_json::Value,
}

/// Mastodon's error answer: `{"error": "…"}`.
#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

pub struct MastodonChannel {
    statuses: Url,
    authorization: HeaderValue,
    visibility: Visibility,
    language: Option<String>,
    overflow: Overflow,
    limits: StatusLimits,
    renderer: Arc<Renderer>,
    client: reqwest::Client,
}

impl MastodonChannel {
    /// The status text, within the instance's limit (or cut to it, if the file says so).
    fn text(&self, message: &MessageContext) -> Result<String, Rejection> {
        let rendered = self.renderer.render(TEMPLATE, message)?;
        let text = rendered.trim();
        if text.is_empty() {
            return Err(Rejection::Invalid("the status renders empty".into()));
        }
        fit(
            text,
            self.overflow,
            &message.links.status_page,
            &self.limits,
        )
    }

    /// The failure for a non-success answer, with Mastodon's own error message when it gave
    /// one ("Validation failed: Text character limit of 500 exceeded").
    async fn refused(response: reqwest::Response) -> DeliveryError {
        let failure = failure_for_response(&response, "the instance");
        let said = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<ErrorAnswer>(&body).ok())
            .map(|answer| provider_text(&answer.error))
            .filter(|text| !text.is_empty());
        match said {
            Some(text) => {
                let reason = format!("{}: {text}", failure.reason);
                failure.with_reason(reason)
            }
            None => failure,
        }
    }
}

#[async_trait::async_trait]
impl Channel for MastodonChannel {
    fn reach(&self) -> Reach {
        Reach::Broadcast {
            accepts_targeted: false,
        }
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let text = self.text(message)?;
        let length = crate::channel::limits::figure(&text, &self.limits);
        Ok(vec![
            RenderedPart {
                part: "text".into(),
                text,
                format: PartFormat::Text,
            },
            length,
        ])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let text = self
            .text(message)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let reply_to = previous_status(attempt.thread)?;
        // Mastodon keeps an Idempotency-Key for an hour: a retry of a status it did post
        // returns that status instead of posting it twice.
        let key = HeaderValue::from_str(attempt.key.as_str()).map_err(|_| {
            DeliveryError::permanent("the delivery key cannot be sent as Idempotency-Key")
        })?;
        let status = NewStatus {
            status: &text,
            visibility: self.visibility,
            language: self.language.as_deref(),
            in_reply_to_id: reply_to.as_deref(),
        };
        let response = self
            .client
            .post(self.statuses.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header("idempotency-key", key)
            .json(&status)
            .send()
            .await
            .map_err(|e| failure_for_request(&e))?;
        if !response.status().is_success() {
            return Err(Self::refused(response).await);
        }
        // The status is posted: whatever the body holds, this attempt succeeded. Without its
        // id the next update replies to the incident's previous status instead.
        let id = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<CreatedStatus>(&body).ok())
            .and_then(|created| match created.id {
                serde_json::Value::String(id) if !id.is_empty() => Some(id),
                serde_json::Value::Number(id) => Some(id.to_string()),
                _ => None,
            });
        let Some(id) = id else {
            tracing::warn!(delivery = %attempt.key, "the instance posted the status but gave no id");
            return Ok(Receipt::none());
        };
        Ok(Receipt {
            thread: Some(serde_json::json!({ "status_id": id })),
            provider_id: Some(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env(&'static str);

    impl crate::config::SecretSource for Env {
        fn get(&self, _: &str) -> Option<String> {
            Some(self.0.to_owned())
        }
    }

    fn parse(table: &str, token: &'static str) -> Result<(), String> {
        let table: toml::Value = toml::from_str(table).unwrap();
        MastodonSettings::parse(&SettingsInput {
            file: std::path::Path::new("channels/mastodon.toml"),
            base: std::path::Path::new("."),
            table,
            secrets: &Env(token),
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "instance = \"https://mastodon.example\"\ntoken_env = \"T\"\n";

    #[test]
    fn a_url_counts_as_the_reserved_length_whatever_its_own() {
        let long = "https://status.example.com/incidents/01JDQ8Y1Z8X0000000000000AA";
        let text = format!("Delayed. See {long} and {long}.");
        // "Delayed. See " (13) + 23 + " and " (5) + 23 + "." (1)
        assert_eq!(status_length(&text, 23), 65);
        assert_eq!(status_length("https://a.io", 23), 23);
        assert_eq!(status_length("(https://a.io/x).", 23), 1 + 23 + 2);
    }

    #[test]
    fn what_mastodon_would_not_link_is_counted_in_full() {
        for word in [
            "xhttps://status.example.com/a",
            "https://localhost/a",
            "https://10.0.0.1/a",
            "ftp://status.example.com/a",
        ] {
            assert_eq!(status_length(word, 23), word.chars().count(), "{word}");
        }
    }

    #[test]
    fn the_instance_limits_are_read_from_its_configuration() {
        let body = br#"{"domain":"m.example","configuration":{"urls":{},"statuses":{"max_characters":1000,"max_media_attachments":4,"characters_reserved_per_url":23}}}"#;
        assert_eq!(
            StatusLimits::from_answer(body).unwrap(),
            StatusLimits {
                max_characters: 1000,
                characters_reserved_per_url: 23
            }
        );
        assert!(StatusLimits::from_answer(b"<html>").is_err());
        assert!(
            StatusLimits::from_answer(
                br#"{"configuration":{"statuses":{"max_characters":0,"characters_reserved_per_url":23}}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn visibility_language_and_instance_are_checked_with_their_key() {
        assert!(parse(MINIMAL, "token").is_ok());
        let error = parse(&format!("{MINIMAL}visibility = \"friends\"\n"), "token").unwrap_err();
        assert!(
            error.contains("visibility") && error.contains("unlisted"),
            "{error}"
        );
        let error = parse(&format!("{MINIMAL}language = \"eng\"\n"), "token").unwrap_err();
        assert!(
            error.contains("language") && error.contains("ISO 639-1"),
            "{error}"
        );
        assert!(parse(&format!("{MINIMAL}language = \"DE\"\n"), "token").is_ok());
        let error = parse(
            "instance = \"mastodon.example\"\ntoken_env = \"T\"\n",
            "token",
        )
        .unwrap_err();
        assert!(error.contains("instance"), "{error}");
        let error = parse(&format!("{MINIMAL}colour = \"red\"\n"), "token").unwrap_err();
        assert!(error.contains("colour"), "{error}");
    }

    #[test]
    fn a_token_a_header_cannot_carry_is_refused_without_showing_it() {
        let error = parse(MINIMAL, "s3cret\n").unwrap_err();
        assert!(error.contains("token_env"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn a_thread_that_is_not_a_status_is_a_permanent_failure() {
        let good = serde_json::json!({"status_id": "109"});
        assert_eq!(
            previous_status(Some(&good)).unwrap().as_deref(),
            Some("109")
        );
        let bad = serde_json::json!({"topic_id": 4});
        assert!(previous_status(Some(&bad)).is_err());
        assert_eq!(previous_status(None).unwrap(), None);
    }
}
