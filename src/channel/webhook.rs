//! The webhook channel: signed POSTs to a partner, to the Standard Webhooks specification.

use super::{Channel, DeliveryError, Reach, RejectError, RenderedPart};
use crate::config::{DeliveryPolicy, WebhookSettings};
use crate::render::MessageContext;
use crate::store::DeliveryRecord;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::Serialize;
use sha2::Sha256;
use std::time::Duration;

/// The largest body a partner is sent.
pub const BODY_LIMIT: usize = 20 * 1024;

/// The JSON body: `{type, timestamp, data}` as the specification recommends.
#[derive(Debug, Serialize)]
pub struct WebhookPayload<'a> {
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub timestamp: String,
    pub data: WebhookData<'a>,
}

#[derive(Debug, Serialize)]
pub struct WebhookData<'a> {
    pub update: &'a crate::render::UpdateView,
    pub incident: &'a crate::render::IncidentView,
    pub targeted: bool,
    /// The orders a targeted update concerns; empty for everyone.
    pub orders: &'a [String],
    pub status_page: &'a str,
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign_webhook(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

pub struct WebhookChannel {
    name: String,
    settings: WebhookSettings,
    policy: DeliveryPolicy,
    client: reqwest::Client,
}

impl WebhookChannel {
    pub fn build(
        name: &str,
        settings: &WebhookSettings,
        policy: DeliveryPolicy,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .user_agent(concat!("crier/", env!("CARGO_PKG_VERSION")))
            // A redirect would move a signed payload somewhere the operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            name: name.to_owned(),
            settings: settings.clone(),
            policy,
            client,
        })
    }

    fn body(&self, message: &MessageContext) -> Vec<u8> {
        let payload = WebhookPayload {
            event_type: if message.update.targeted {
                "update.targeted"
            } else {
                "update.published"
            },
            timestamp: message.update.created_at.clone(),
            data: WebhookData {
                update: &message.update,
                incident: &message.incident,
                targeted: message.update.targeted,
                orders: &message.update.orders,
                status_page: &message.links.status_page,
            },
        };
        serde_json::to_vec(&payload).expect("the payload always serializes")
    }

    fn check(&self, body: &[u8]) -> Result<(), RejectError> {
        if body.len() > BODY_LIMIT {
            return Err(RejectError::OverLimit {
                channel: self.name.clone(),
                reason: format!(
                    "the JSON body is {} bytes; the limit is {BODY_LIMIT}",
                    body.len()
                ),
            });
        }
        Ok(())
    }
}

/// An error and its causes on one line: reqwest's own message leaves out the useful part
/// ("connection refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

/// Reads `Retry-After` as seconds or as an HTTP date.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (date.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

#[async_trait::async_trait]
impl Channel for WebhookChannel {
    fn name(&self) -> &str {
        &self.name
    }

    fn reach(&self) -> Reach {
        Reach::Broadcast { targeted: true }
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, RejectError> {
        let body = self.body(message);
        self.check(&body)?;
        Ok(vec![RenderedPart {
            part: "body".into(),
            text: String::from_utf8_lossy(&body).into_owned(),
        }])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        delivery: &DeliveryRecord,
    ) -> Result<(), DeliveryError> {
        let body = self.body(message);
        self.check(&body)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let id = delivery.key();
        let timestamp = Utc::now().timestamp();
        let signature = sign_webhook(&self.settings.secret, &id, timestamp, &body);
        let response = self
            .client
            .post(self.settings.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                DeliveryError::transient(format!("{what}: {}", with_causes(&e)))
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let reason = format!("the endpoint answered {status}");
        match status {
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
                Err(DeliveryError::Transient {
                    retry_after: retry_after(&response),
                    reason,
                })
            }
            status if status.is_server_error() => Err(DeliveryError::Transient {
                retry_after: retry_after(&response),
                reason,
            }),
            StatusCode::GONE => Err(DeliveryError::Gone { reason }),
            _ => Err(DeliveryError::Permanent { reason }),
        }
    }
}
