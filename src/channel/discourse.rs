//! The Discourse channel: one forum topic per incident. The first update of an incident opens
//! the topic (its `external_id` is the incident's id) and every later one replies in it. It
//! owns its settings (the forum, the API key and user, the category) and the forum's limits:
//! a title of at most 255 characters and a post of at least `min_post_length`.

use super::http::{
    api_base, client, endpoint, failure_for_request, failure_for_response, provider_text,
    read_capped, redact_url,
};
use super::limits::Overflow;
use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy, Rate};
use crate::delivery::{DeliveryError, Receipt, RemoteThread};
use crate::render::{MessageContext, Renderer};
use reqwest::Url;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub static KIND: ChannelKind = ChannelKind {
    name: "discourse",
    templates: &[TITLE_TEMPLATE, POST_TEMPLATE],
    // One at a time: the first update opens the topic the next ones reply in. The rate is
    // Discourse's default for an admin API key (60 requests a minute).
    default_policy: DeliveryPolicy::with_concurrency(1)
        .with_timeout(Duration::from_secs(15))
        .with_rate(Rate::new(60, Duration::from_secs(60))),
    parse: DiscourseSettings::parse,
};

const TITLE_TEMPLATE: &str = "discourse.title";
const POST_TEMPLATE: &str = "discourse.md";

/// Discourse's `max_topic_title_length` cannot be set above 255.
pub const TITLE_LIMIT: usize = 255;

/// Discourse's default `min_post_length`.
const DEFAULT_MIN_POST_LENGTH: usize = 20;

/// The most of the forum's answer that is read: a created post is a few kilobytes.
const ANSWER_LIMIT: usize = 1024 * 1024;

/// A channel file of kind `discourse`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscourseFile {
    /// The forum's base URL, like `https://forum.example.com`.
    base_url: String,
    /// The environment variable holding the forum's API key.
    api_key_env: String,
    /// The forum user the posts are made as.
    api_username: String,
    /// The id of the category new topics are opened in.
    category: u64,
    /// The forum's `min_post_length`: a shorter post is refused before anything is stored.
    #[serde(default = "default_min_post_length")]
    min_post_length: usize,
    /// What to do with a title over 255 characters: `refuse` (the default) or `truncate`.
    #[serde(default)]
    overflow: Overflow,
}

fn default_min_post_length() -> usize {
    DEFAULT_MIN_POST_LENGTH
}

#[derive(Clone)]
pub struct DiscourseSettings {
    /// The forum's base URL, without a trailing slash in its path.
    pub base_url: Url,
    pub api_key: SecretString,
    pub api_username: String,
    pub category: u64,
    pub min_post_length: usize,
    pub overflow: Overflow,
}

impl std::fmt::Debug for DiscourseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscourseSettings")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_username", &self.api_username)
            .field("category", &self.category)
            .field("min_post_length", &self.min_post_length)
            .field("overflow", &self.overflow)
            .finish_non_exhaustive()
    }
}

impl DiscourseSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let file = input.file;
        let raw: DiscourseFile = input.parse()?;
        let base_url =
            api_base(&raw.base_url).map_err(|reason| ConfigError::at(file, "base_url", reason))?;
        let api_username = raw.api_username.trim().to_owned();
        if api_username.is_empty() {
            return Err(ConfigError::at(file, "api_username", "must not be empty"));
        }
        if HeaderValue::from_str(&api_username).is_err() {
            return Err(ConfigError::at(
                file,
                "api_username",
                "must be printable ASCII: it is sent as the Api-Username header",
            ));
        }
        if raw.category == 0 {
            return Err(ConfigError::at(
                file,
                "category",
                "must be a category id (a number above zero)",
            ));
        }
        if raw.min_post_length == 0 {
            return Err(ConfigError::at(
                file,
                "min_post_length",
                "must be at least 1",
            ));
        }
        let api_key = config::secret(file, "api_key_env", &raw.api_key_env, input.secrets)?;
        if api_key_header(&api_key).is_err() {
            return Err(ConfigError::at(
                file,
                "api_key_env",
                format!(
                    "the key in {} has characters an HTTP header cannot carry (a stray newline?)",
                    raw.api_key_env
                ),
            ));
        }
        Ok(Arc::new(DiscourseSettings {
            base_url,
            api_key,
            api_username,
            category: raw.category,
            min_post_length: raw.min_post_length,
            overflow: raw.overflow,
        }))
    }
}

/// The `Api-Key` header, marked sensitive so it never prints.
fn api_key_header(key: &SecretString) -> Result<HeaderValue, reqwest::header::InvalidHeaderValue> {
    let mut value = HeaderValue::from_str(key.expose_secret())?;
    value.set_sensitive(true);
    Ok(value)
}

#[async_trait::async_trait]
impl ChannelSettings for DiscourseSettings {
    async fn build(
        &self,
        _id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        let api_key = api_key_header(&self.api_key).map_err(|_| {
            crate::Error::user("the API key has characters an HTTP header cannot carry")
        })?;
        let api_username = HeaderValue::from_str(&self.api_username)
            .map_err(|_| crate::Error::user("api_username cannot be sent as a header"))?;
        Ok(Arc::new(DiscourseChannel {
            posts: endpoint(&self.base_url, "/posts.json"),
            api_key,
            api_username,
            category: self.category,
            min_post_length: self.min_post_length,
            overflow: self.overflow,
            renderer: context.renderer.clone(),
            client: client(policy.timeout)?,
        }))
    }
}

/// The topic an earlier update of the incident opened, from the thread the dispatcher kept.
fn topic_of(thread: Option<&RemoteThread>) -> Result<Option<u64>, DeliveryError> {
    let Some(thread) = thread else {
        return Ok(None);
    };
    thread
        .get("topic_id")
        .and_then(serde_json::Value::as_u64)
        .map(Some)
        .ok_or_else(|| {
            DeliveryError::permanent(format!(
                "the incident's thread on this channel is not a topic ({thread})"
            ))
        })
}

/// A title cut at a word within the limit and ended with `…`. Unlike a post, a title gets no
/// link: the post under it carries the status page's.
fn shorten_title(title: &str) -> String {
    let Some((at, next)) = title.char_indices().nth(TITLE_LIMIT - 1) else {
        return title.to_owned();
    };
    let head = &title[..at];
    let cut = if next.is_whitespace() {
        head
    } else {
        match head.rfind(char::is_whitespace) {
            Some(space) if !head[..space].trim().is_empty() => &head[..space],
            // One word longer than the limit: cut inside it.
            _ => head,
        }
    };
    format!("{}…", cut.trim_end())
}

/// The part of a created post crier keeps.
#[derive(Deserialize)]
struct CreatedPost {
    id: Option<u64>,
    topic_id: Option<u64>,
}

/// Discourse's error answer: `{"errors": ["…"], "error_type": "…"}`.
#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    errors: Vec<String>,
}

pub struct DiscourseChannel {
    posts: Url,
    api_key: HeaderValue,
    api_username: HeaderValue,
    category: u64,
    min_post_length: usize,
    overflow: Overflow,
    renderer: Arc<Renderer>,
    client: reqwest::Client,
}

/// A topic's title and its post, within the forum's limits.
struct Post {
    title: String,
    raw: String,
}

impl DiscourseChannel {
    fn post(&self, message: &MessageContext) -> Result<Post, Rejection> {
        let title = self.renderer.render(TITLE_TEMPLATE, message)?;
        // A title is one line: the template's line breaks and runs of spaces become one space.
        let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
        if title.is_empty() {
            return Err(Rejection::Invalid("the topic title renders empty".into()));
        }
        let length = title.chars().count();
        let title = if length <= TITLE_LIMIT {
            title
        } else if self.overflow == Overflow::Truncate {
            shorten_title(&title)
        } else {
            return Err(Rejection::OverLimit(format!(
                "the topic title is {length} characters; the limit is {TITLE_LIMIT} characters"
            )));
        };
        let raw = self.renderer.render(POST_TEMPLATE, message)?;
        let raw = raw.trim().to_owned();
        let length = raw.chars().count();
        if length < self.min_post_length {
            return Err(Rejection::OverLimit(format!(
                "the post is {length} characters; the forum needs at least {} (min_post_length)",
                self.min_post_length
            )));
        }
        Ok(Post { title, raw })
    }

    /// The failure for a non-success answer, with the forum's own `errors` ("Body is too
    /// similar to what you recently posted"). A 422 is the forum refusing the post itself:
    /// it is permanent, as every other 4xx but 408 and 429.
    async fn refused(response: reqwest::Response) -> DeliveryError {
        let failure = failure_for_response(&response, "the forum");
        let said = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<ErrorAnswer>(&body).ok())
            .map(|answer| provider_text(&answer.errors.join("; ")))
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
impl Channel for DiscourseChannel {
    fn reach(&self) -> Reach {
        Reach::Broadcast {
            accepts_targeted: false,
        }
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let Post { title, raw } = self.post(message)?;
        let length = RenderedPart {
            part: "length".into(),
            text: format!(
                "title {} of {TITLE_LIMIT} characters; body {} characters (at least {})",
                title.chars().count(),
                raw.chars().count(),
                self.min_post_length
            ),
            format: PartFormat::Measure,
        };
        Ok(vec![
            RenderedPart {
                part: "title".into(),
                text: title,
                format: PartFormat::Text,
            },
            RenderedPart {
                part: "body".into(),
                text: raw,
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
        let post = self
            .post(message)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let topic = topic_of(attempt.thread)?;
        let body = match topic {
            Some(topic_id) => serde_json::json!({ "topic_id": topic_id, "raw": post.raw }),
            // The incident's id as the topic's external id: the forum refuses a second topic
            // for the same incident, and the topic can be found again by it.
            None => serde_json::json!({
                "title": post.title,
                "raw": post.raw,
                "category": self.category,
                "external_id": message.incident.id,
            }),
        };
        let response = self
            .client
            .post(self.posts.clone())
            .header("api-key", self.api_key.clone())
            .header("api-username", self.api_username.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| failure_for_request(&e))?;
        if !response.status().is_success() {
            return Err(Self::refused(response).await);
        }
        // The post is made: whatever the body holds, this attempt succeeded.
        let created = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<CreatedPost>(&body).ok());
        let (post_id, topic_id) = match created {
            Some(created) => (created.id, created.topic_id.or(topic)),
            None => (None, topic),
        };
        if topic_id.is_none() {
            tracing::warn!(delivery = %attempt.key, "the forum opened the topic but gave no topic id");
        }
        Ok(Receipt {
            provider_id: post_id.map(|id| id.to_string()),
            thread: topic_id.map(|id| serde_json::json!({ "topic_id": id })),
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

    fn parse(table: &str) -> Result<(), String> {
        let table: toml::Value = toml::from_str(table).unwrap();
        DiscourseSettings::parse(&SettingsInput {
            file: std::path::Path::new("channels/forum.toml"),
            base: std::path::Path::new("."),
            table,
            secrets: &Env("0123456789abcdef"),
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "base_url = \"https://forum.example.com\"\napi_key_env = \"K\"\napi_username = \"status\"\ncategory = 7\n";

    #[test]
    fn a_title_over_the_limit_is_cut_at_a_word_and_stays_within_it() {
        let title = format!("{} tail", "word ".repeat(60).trim_end());
        assert!(title.chars().count() > TITLE_LIMIT);
        let short = shorten_title(&title);
        assert!(short.chars().count() <= TITLE_LIMIT, "{short}");
        assert!(short.ends_with("word…"), "{short}");
        let one_word = "x".repeat(300);
        assert_eq!(shorten_title(&one_word).chars().count(), TITLE_LIMIT);
        assert_eq!(shorten_title("Short"), "Short");
    }

    #[test]
    fn settings_are_checked_with_their_key() {
        assert!(parse(MINIMAL).is_ok());
        let error = parse(&MINIMAL.replace("category = 7", "category = 0")).unwrap_err();
        assert!(error.contains("category"), "{error}");
        let error = parse(&MINIMAL.replace("\"status\"", "\"\"")).unwrap_err();
        assert!(error.contains("api_username"), "{error}");
        let error = parse(&format!("{MINIMAL}min_post_length = 0\n")).unwrap_err();
        assert!(error.contains("min_post_length"), "{error}");
        let error = parse(&MINIMAL.replace("https://forum.example.com", "forum")).unwrap_err();
        assert!(error.contains("base_url"), "{error}");
        let error = parse(&format!("{MINIMAL}tags = [\"x\"]\n")).unwrap_err();
        assert!(error.contains("tags"), "{error}");
    }

    #[test]
    fn a_thread_that_is_not_a_topic_is_a_permanent_failure() {
        let good = serde_json::json!({"topic_id": 42});
        assert_eq!(topic_of(Some(&good)).unwrap(), Some(42));
        let bad = serde_json::json!({"status_id": "42"});
        assert!(topic_of(Some(&bad)).is_err());
        assert_eq!(topic_of(None).unwrap(), None);
    }
}
