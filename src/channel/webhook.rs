//! The webhook channel: signed POSTs to a partner, to the Standard Webhooks specification.
//! It owns its settings (the URL and the `whsec_` secret), and the payload, which is a
//! versioned contract of its own, never the template context.

use super::http::{failure_for_request, failure_for_status, redact_url, retry_after};
use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy};
use crate::delivery::{DeliveryError, FailureKind, Receipt};
use crate::render::MessageContext;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use hmac::{Hmac, Mac};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretSlice};
use serde::Deserialize;
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

pub static KIND: ChannelKind = ChannelKind {
    name: "webhook",
    templates: &[],
    default_policy: DeliveryPolicy::with_concurrency(4)
        .with_timeout(Duration::from_secs(15))
        .with_schedule(RETRY_SCHEDULE, Duration::from_secs(28 * 3600)),
    parse: WebhookSettings::parse,
};

/// The waits between attempts that Svix publishes for its webhooks: the first attempt at
/// once, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h (about 27.5 hours in all), so a
/// partner that fixes its endpoint within the day still gets the message.
const RETRY_SCHEDULE: &[Duration] = &[
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// The largest body a partner is sent.
pub const BODY_LIMIT: usize = 20 * 1024;

/// The shortest secret accepted, decoded: the Standard Webhooks specification asks for 24 to
/// 64 random bytes.
const SHORTEST_SECRET: usize = 24;

/// A channel file of kind `webhook`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    /// The partner's endpoint.
    url: String,
    /// The environment variable holding the Standard Webhooks secret (`whsec_<base64>`).
    secret_env: String,
}

#[derive(Clone)]
pub struct WebhookSettings {
    pub url: Url,
    /// The decoded `whsec_` secret.
    pub secret: SecretSlice<u8>,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl WebhookSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let file = input.file;
        let raw: WebhookFile = input.parse()?;
        let url = Url::parse(&raw.url).map_err(|e| {
            ConfigError::at(file, "url", format!("'{}' is not a URL: {e}", raw.url))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::at(file, "url", "must be an http or https URL"));
        }
        let secret = signing_secret(file, "secret_env", &raw.secret_env, input.secrets)?;
        Ok(Arc::new(WebhookSettings { url, secret }))
    }
}

/// The Standard Webhooks signing secret (`whsec_` and base64 of at least
/// `SHORTEST_SECRET` bytes) in the variable `variable`, which the setting `key` names.
pub fn signing_secret(
    file: &std::path::Path,
    key: &str,
    variable: &str,
    secrets: &dyn config::SecretSource,
) -> Result<SecretSlice<u8>, ConfigError> {
    let encoded = config::secret(file, key, variable, secrets)?;
    let problem =
        |what: &str| ConfigError::at(file, key, format!("the secret in {variable} {what}"));
    let bytes = encoded
        .expose_secret()
        .strip_prefix("whsec_")
        .ok_or_else(|| problem("must start with whsec_"))?;
    let bytes = STANDARD
        .decode(bytes.trim_end())
        .map_err(|_| problem("must be whsec_ followed by base64"))?;
    if bytes.len() < SHORTEST_SECRET {
        return Err(problem(&format!(
            "decodes to {} bytes; it needs at least {SHORTEST_SECRET} random bytes",
            bytes.len()
        )));
    }
    Ok(SecretSlice::from(bytes))
}

#[async_trait::async_trait]
impl ChannelSettings for WebhookSettings {
    async fn build(
        &self,
        _id: &str,
        policy: &DeliveryPolicy,
        _context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        Ok(Arc::new(WebhookChannel::build(self, policy)?))
    }
}

/// The partner payload, version 1. A contract: fields are added, never renamed or removed,
/// and nothing private (the sender's login, a subscriber's contact) is ever in it.
pub mod payload {
    use crate::domain::{Audience, Incident, Update};
    use crate::render::rfc3339;
    use serde::Serialize;

    /// `{type, timestamp, data}`, as the Standard Webhooks specification recommends.
    #[derive(Debug, Serialize)]
    pub struct Event {
        /// `update.published`, or `update.targeted` for an update to some orders only.
        #[serde(rename = "type")]
        pub event_type: &'static str,
        pub timestamp: String,
        pub data: EventData,
    }

    #[derive(Debug, Serialize)]
    pub struct EventData {
        pub update: UpdateData,
        pub incident: IncidentData,
        pub targeted: bool,
        /// The orders a targeted update concerns; empty for everyone.
        pub orders: Vec<String>,
        pub status_page: String,
    }

    #[derive(Debug, Serialize)]
    pub struct UpdateData {
        pub id: String,
        pub state: &'static str,
        pub headline: String,
        pub body: String,
        pub next_update_by: Option<String>,
        pub created_at: String,
    }

    #[derive(Debug, Serialize)]
    pub struct IncidentData {
        pub id: String,
        pub title: String,
        pub state: &'static str,
    }

    impl Event {
        pub fn new(update: &Update, incident: &Incident, status_page: &str) -> Self {
            let orders: Vec<String> = match &update.audience {
                Audience::Everyone => Vec::new(),
                Audience::Orders(orders) => orders.iter().map(ToString::to_string).collect(),
            };
            let targeted = update.audience.is_targeted();
            Self {
                event_type: if targeted {
                    "update.targeted"
                } else {
                    "update.published"
                },
                timestamp: rfc3339(update.created_at),
                data: EventData {
                    update: UpdateData {
                        id: update.id.to_string(),
                        state: update.state.as_str(),
                        headline: update.headline.as_str().to_owned(),
                        body: update.body.as_str().to_owned(),
                        next_update_by: update.next_update_by.map(rfc3339),
                        created_at: rfc3339(update.created_at),
                    },
                    incident: IncidentData {
                        id: incident.id.to_string(),
                        title: incident.title.clone(),
                        state: incident.state.as_str(),
                    },
                    targeted,
                    orders,
                    status_page: status_page.to_owned(),
                },
            }
        }
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign_webhook(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// A JSON POST of `body` to `url`, signed now the Standard Webhooks way under message `id`.
pub fn signed_post(
    client: &reqwest::Client,
    url: &Url,
    secret: &[u8],
    id: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let timestamp = Utc::now().timestamp();
    let signature = sign_webhook(secret, id, timestamp, &body);
    client
        .post(url.clone())
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
}

pub struct WebhookChannel {
    settings: WebhookSettings,
    client: reqwest::Client,
}

impl WebhookChannel {
    pub fn build(settings: &WebhookSettings, policy: &DeliveryPolicy) -> crate::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .user_agent(concat!("crier/", env!("CARGO_PKG_VERSION")))
            // A redirect would move a signed payload somewhere the operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::internal(anyhow::anyhow!("HTTP client: {e}")))?;
        Ok(Self {
            settings: settings.clone(),
            client,
        })
    }

    fn body(message: &MessageContext) -> Result<Vec<u8>, Rejection> {
        let event = payload::Event::new(
            &message.source.update,
            &message.source.incident,
            &message.links.status_page,
        );
        let body = serde_json::to_vec(&event)
            .map_err(|e| Rejection::Invalid(format!("cannot encode the payload: {e}")))?;
        if body.len() > BODY_LIMIT {
            return Err(Rejection::OverLimit(format!(
                "the JSON body is {} bytes; the limit is {BODY_LIMIT}",
                body.len()
            )));
        }
        Ok(body)
    }
}

#[async_trait::async_trait]
impl Channel for WebhookChannel {
    fn reach(&self) -> Reach {
        Reach::Broadcast {
            accepts_targeted: true,
        }
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let body = Self::body(message)?;
        Ok(vec![RenderedPart {
            part: "body".into(),
            text: String::from_utf8_lossy(&body).into_owned(),
            format: PartFormat::Json,
        }])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let body = Self::body(message).map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let id = attempt.key.as_str();
        let secret = self.settings.secret.expose_secret();
        let response = signed_post(&self.client, &self.settings.url, secret, id, body)
            .send()
            .await
            .map_err(|e| failure_for_request(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Receipt::none());
        }
        // The Standard Webhooks way for a receiver to steer the sender.
        let steer = response
            .headers()
            .get("webhook-delivery")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let (kind, reason) = match steer.as_deref() {
            Some("abort-message") => (
                FailureKind::Permanent,
                format!("the endpoint answered {status} and asked to abort this message"),
            ),
            Some("disable") => (
                FailureKind::EndpointGone,
                format!("the endpoint answered {status} and asked to be disabled"),
            ),
            // A redirect is not followed (it would move a signed payload elsewhere) but, as
            // Svix treats it, it is a failed attempt on the schedule, not a dead letter.
            _ if status.is_redirection() => (
                FailureKind::Transient,
                format!("the endpoint answered {status}; redirects are not followed"),
            ),
            _ => (
                failure_for_status(status),
                format!("the endpoint answered {status}"),
            ),
        };
        Err(DeliveryError::new(kind, reason)
            .with_status(status.as_u16())
            .with_retry_after(retry_after(&response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Audience, Body, Headline, Incident, IncidentState, Update};
    use chrono::TimeZone;

    /// The payload partners receive is a contract: this test fails when it changes by accident.
    #[test]
    fn the_version_1_payload_matches_its_snapshot_and_carries_no_author() {
        let created = Utc.with_ymd_and_hms(2026, 11, 24, 14, 0, 0).unwrap();
        let incident = Incident {
            id: "01JDQ8Y1Z8X0000000000000AA".parse().unwrap(),
            title: "Activations delayed".into(),
            state: IncidentState::Identified,
            created_at: created,
            updated_at: created,
            updates: vec![],
            remote_threads: Default::default(),
        };
        let update = Update {
            id: "01JDQ8Y1Z8X0000000000000BB".parse().unwrap(),
            incident: incident.id,
            state: IncidentState::Identified,
            headline: Headline::parse("Activations delayed").unwrap(),
            body: Body::parse("We found it.").unwrap(),
            next_update_by: Some(created + chrono::Duration::hours(2)),
            audience: Audience::Everyone,
            author: "jsmith".into(),
            created_at: created,
            channels: vec!["partners".into()],
        };
        let event = payload::Event::new(&update, &incident, "https://status.example.com/");
        let json = serde_json::to_string_pretty(&event).unwrap();
        let snapshot = r#"{
  "type": "update.published",
  "timestamp": "2026-11-24T14:00:00.000Z",
  "data": {
    "update": {
      "id": "01JDQ8Y1Z8X0000000000000BB",
      "state": "identified",
      "headline": "Activations delayed",
      "body": "We found it.",
      "next_update_by": "2026-11-24T16:00:00.000Z",
      "created_at": "2026-11-24T14:00:00.000Z"
    },
    "incident": {
      "id": "01JDQ8Y1Z8X0000000000000AA",
      "title": "Activations delayed",
      "state": "identified"
    },
    "targeted": false,
    "orders": [],
    "status_page": "https://status.example.com/"
  }
}"#;
        assert_eq!(json, snapshot);
        assert!(!json.contains("jsmith"));
    }

    #[test]
    fn a_short_or_malformed_secret_is_refused_with_what_is_wrong() {
        struct Env(&'static str);
        impl crate::config::SecretSource for Env {
            fn get(&self, _: &str) -> Option<String> {
                Some(self.0.to_owned())
            }
        }
        let table: toml::Value = toml::from_str(
            "url = \"https://hooks.example.com/in\"\nsecret_env = \"HOOK_SECRET\"\n",
        )
        .unwrap();
        let parse = |secret: &'static str| {
            WebhookSettings::parse(&SettingsInput {
                file: std::path::Path::new("channels/partners.toml"),
                base: std::path::Path::new("."),
                table: table.clone(),
                secrets: &Env(secret),
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(
            parse("whsec_AQ==")
                .unwrap_err()
                .contains("decodes to 1 bytes")
        );
        assert!(
            parse("s3cret")
                .unwrap_err()
                .contains("must start with whsec_")
        );
        assert!(parse("whsec_!!!").unwrap_err().contains("base64"));
        assert!(parse("whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").is_ok());
    }
}
