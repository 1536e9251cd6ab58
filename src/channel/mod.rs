//! Channels: the contract every adapter implements (render, then deliver one attempt and hand
//! back a receipt), the registry of kinds, and the configured channels the dispatcher drives.
//!
//! An adapter knows its provider and nothing else: not its own name, not its retry policy,
//! not the store. The dispatcher owns those (see [`ConfiguredChannel`]).

mod bluesky;
mod discourse;
mod email;
pub mod http;
pub mod limits;
mod mastodon;
mod network;
pub mod registry;
pub mod sms;
mod smtp_pool;
pub mod status_page;
pub mod webhook;

use crate::config::{Config, DeliveryPolicy};
use crate::delivery::{DeliveryError, DeliveryKey, Receipt, Recipient, RemoteThread};
use crate::domain::{Contact, ContactKind};
use crate::render::{Composer, MessageContext, RenderError, Renderer};
use crate::status_view::StatusProjection;
use std::sync::Arc;
use ulid::Ulid;

/// Whom one channel reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// One message per subscriber that has a contact of this kind.
    Subscribers(ContactKind),
    /// One post for the public or a partner. Targeted updates reach it only if it
    /// `accepts_targeted` (webhooks do; the status page, microblog and forum never do).
    Broadcast { accepts_targeted: bool },
}

/// One named part of a rendered message, as shown by `crier preview`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RenderedPart {
    pub part: String,
    pub text: String,
    /// What the text is, so a preview can show it as its recipient will see it.
    #[serde(default)]
    pub format: PartFormat,
}

/// What a rendered part holds. The channel that renders it knows; a preview shows an HTML
/// document rendered, JSON laid out, and a measure beside the text it measures.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PartFormat {
    /// Text as the recipient reads it.
    #[default]
    Text,
    /// A whole HTML document, as a mail program or a browser shows it.
    Html,
    /// A JSON document, as a partner's system receives it.
    Json,
    /// How the text measures against the channel's limit, not part of the message.
    Measure,
}

/// Why an adapter will not carry an update, found before anything is stored.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Over one of the channel's limits.
    #[error("{0}")]
    OverLimit(String),
    /// The message renders into something the channel cannot send (an empty subject).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// A rejection, with the channel that made it. The rejection is shown in the message, so it
/// is not also a `source` (that would print its reason twice).
#[derive(Debug, thiserror::Error)]
#[error("channel {channel}: {rejection}")]
pub struct RejectError {
    pub channel: String,
    pub rejection: Rejection,
}

/// One attempt at one delivery: what an adapter needs to know about it, and no more.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The deterministic key providers see as the idempotency key.
    pub key: &'a DeliveryKey,
    pub update: Ulid,
    /// 1 for the first attempt.
    pub number: u32,
    pub recipient: &'a Recipient,
    /// The thread an earlier update of the same incident started on this channel.
    pub thread: Option<&'a RemoteThread>,
}

#[async_trait::async_trait]
pub trait Channel: Send + Sync {
    fn reach(&self) -> Reach;

    /// Renders every part of the message and checks the channel's limits.
    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection>;

    /// Makes one attempt at delivering the message, and says what the provider gave back.
    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError>;

    /// Sends one message that is not an update (a confirmation a customer asked for) to one
    /// contact, once: it is not an update, so it has no delivery, no outbox and no retry.
    async fn notify(&self, _contact: &Contact, _notice: &Notice) -> Result<Receipt, DeliveryError> {
        Err(DeliveryError::permanent("this channel cannot send notices"))
    }
}

/// A message to one contact that is not an update, rendered: an SMS sends only `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// What building a channel may need besides its own settings.
pub struct BuildContext {
    pub renderer: Arc<Renderer>,
    pub composer: Composer,
    pub status: Arc<StatusProjection>,
}

/// A channel as configured: its stable id, its kind and policy (owned here, by the caller of
/// the adapter), and the adapter itself.
#[derive(Clone)]
pub struct ConfiguredChannel {
    /// Recorded with every update and delivery; defaults to the channel file's name.
    pub id: String,
    pub kind: &'static str,
    pub policy: DeliveryPolicy,
    pub adapter: Arc<dyn Channel>,
}

impl ConfiguredChannel {
    pub fn reach(&self) -> Reach {
        self.adapter.reach()
    }

    pub fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, RejectError> {
        self.adapter
            .render(message)
            .map_err(|rejection| RejectError {
                channel: self.id.clone(),
                rejection,
            })
    }
}

impl std::fmt::Debug for ConfiguredChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfiguredChannel")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Checks the templates every configured channel's kind needs. Pure apart from reading them.
pub fn check_templates(config: &Config, renderer: &Renderer) -> Result<(), RenderError> {
    for channel in &config.channels {
        renderer.require(channel.kind.templates)?;
    }
    Ok(())
}

/// Builds every configured channel. This may do I/O: it creates output folders, and may ask
/// a provider for its limits.
pub async fn build_channels(
    config: &Config,
    context: &BuildContext,
) -> crate::Result<Vec<ConfiguredChannel>> {
    let mut channels = Vec::with_capacity(config.channels.len());
    for channel in &config.channels {
        let adapter = channel
            .settings
            .build(&channel.id, &channel.policy, context)
            .await
            .map_err(|e| e.context(format!("channel {}", channel.id)))?;
        channels.push(ConfiguredChannel {
            id: channel.id.clone(),
            kind: channel.kind.name,
            policy: channel.policy.clone(),
            adapter,
        });
    }
    Ok(channels)
}
