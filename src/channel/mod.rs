//! Channels: the `Channel` trait every adapter implements, the outcome of one attempt, and
//! building the configured channels.

mod email;
mod status_page;
mod webhook;

pub use email::EmailChannel;
pub use status_page::StatusPageChannel;
pub use webhook::WebhookChannel;

use crate::config::{ChannelKind, Config, DeliveryPolicy};
use crate::domain::ContactKind;
use crate::render::{Composer, MessageContext, RenderError, Renderer};
use crate::store::{DeliveryRecord, Store};
use std::sync::Arc;
use std::time::Duration;

/// Whom one channel reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// One message per subscriber that has a contact of this kind.
    Subscribers(ContactKind),
    /// One post for the public or a partner. Targeted updates reach it only if `targeted`.
    Broadcast { targeted: bool },
}

/// One named part of a rendered message, as shown by `crier preview`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RenderedPart {
    pub part: String,
    pub text: String,
}

/// Why a channel will not carry an update; found before anything is stored.
#[derive(Debug, thiserror::Error)]
pub enum RejectError {
    #[error("channel {channel}: {reason}")]
    OverLimit { channel: String, reason: String },
    #[error("channel {channel}: {source}")]
    Render {
        channel: String,
        #[source]
        source: RenderError,
    },
}

/// The outcome of a failed attempt, classified so the dispatcher knows whether to retry.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("{reason}")]
    Permanent { reason: String },
    /// The endpoint says it is gone for good (HTTP 410): stop sending to it.
    #[error("{reason}")]
    Gone { reason: String },
}

impl DeliveryError {
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.into(),
        }
    }
}

#[async_trait::async_trait]
pub trait Channel: Send + Sync {
    fn name(&self) -> &str;
    fn reach(&self) -> Reach;
    fn policy(&self) -> &DeliveryPolicy;
    /// Renders every part of the message and checks the channel's limits.
    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, RejectError>;
    /// Makes one attempt at delivering the message.
    async fn deliver(
        &self,
        message: &MessageContext,
        delivery: &DeliveryRecord,
    ) -> Result<(), DeliveryError>;
}

/// Checks the templates every configured channel needs. Pure apart from reading templates.
pub fn check_templates(config: &Config, renderer: &Renderer) -> Result<(), RenderError> {
    for channel in &config.channels {
        match channel.kind {
            ChannelKind::Email(_) => renderer.require(email::TEMPLATES)?,
            ChannelKind::StatusPage(_) => renderer.require(status_page::TEMPLATES)?,
            ChannelKind::Webhook(_) => {}
        }
    }
    Ok(())
}

/// Builds every configured channel. This may do I/O: it creates output folders.
pub fn build_channels(
    config: &Config,
    renderer: &Arc<Renderer>,
    store: &Arc<Store>,
    composer: &Composer,
) -> anyhow::Result<Vec<Arc<dyn Channel>>> {
    config
        .channels
        .iter()
        .map(|channel| -> anyhow::Result<Arc<dyn Channel>> {
            Ok(match &channel.kind {
                ChannelKind::Email(settings) => Arc::new(EmailChannel::build(
                    &channel.name,
                    settings,
                    channel.policy.clone(),
                    renderer.clone(),
                )?),
                ChannelKind::Webhook(settings) => Arc::new(WebhookChannel::build(
                    &channel.name,
                    settings,
                    channel.policy.clone(),
                )?),
                ChannelKind::StatusPage(settings) => Arc::new(StatusPageChannel::build(
                    &channel.name,
                    settings,
                    channel.policy.clone(),
                    renderer.clone(),
                    store.clone(),
                    composer,
                )?),
            })
        })
        .collect()
}
