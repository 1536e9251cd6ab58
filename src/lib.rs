//! crier: one customer update, typed once, delivered consistently to every channel.
//!
//! The `domain` module holds the parsed values (order numbers, contacts, subscribers,
//! incidents, updates, signed tokens). `config` reads the main file and one file per channel.
//! `store` keeps everything in sled: subscribers, incidents, updates and the delivery outbox.
//! `render` owns the handlebars templates and the context every message is rendered from.
//! `channel` holds the `Channel` trait and one adapter per kind (email, webhook, status page).
//! `dispatch` fans an update out into deliveries and runs one worker per channel. `app` wires
//! these together for the commands in `cli`.

pub mod app;
pub mod channel;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod render;
pub mod store;

/// A mistake in what the user asked for, as opposed to crier failing: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

/// A failure of crier itself, whatever caused it further down: exit code 2. It hides its
/// causes from [`is_user_error`], which would otherwise find, say, a parse error deep inside a
/// delivery and blame the user for it.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct InternalError(pub anyhow::Error);

/// Whether `error` was caused by the user's input or configuration rather than by crier.
pub fn is_user_error(error: &anyhow::Error) -> bool {
    if error.chain().any(|cause| cause.is::<InternalError>()) {
        return false;
    }
    error.chain().any(|cause| {
        cause.is::<UserError>()
            || cause.is::<config::ConfigError>()
            || cause.is::<domain::DomainError>()
            || cause.is::<domain::token::TokenError>()
            || cause.is::<channel::RejectError>()
            || cause.is::<render::RenderError>()
            || cause
                .downcast_ref::<store::StoreError>()
                .is_some_and(store::StoreError::is_user_error)
    })
}
