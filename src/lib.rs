//! crier: one customer update, typed once, delivered consistently to every channel.
//!
//! `domain` holds the parsed values (order numbers, contacts, subscribers, incidents, updates,
//! signed tokens) and `delivery` the unit of work (one update to one recipient on one channel)
//! with its outcome and receipt. `config` reads the main file; each channel kind in `channel`
//! reads its own file, registered once in `channel::registry`. `store` is the interface every
//! other module reads and writes through (durable when a call returns, never blocking the
//! runtime), with the embedded backend and an in-memory one. `render` owns the handlebars
//! templates, `links` the public URLs and signed tokens, and `status_view` the public status
//! projection. `dispatch` plans an update into deliveries and runs one worker per channel;
//! `runtime` runs it for a command, and `web` serves the status page for `crier serve`; `app` wires everything for the commands in `cli`. Errors
//! are classified once, in `error`.

pub mod app;
pub mod channel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod files;
pub mod import;
pub mod links;
pub mod remote;
pub mod render;
pub mod reports;
pub mod runtime;
pub mod status_view;
pub mod store;
pub mod watchdog;
pub mod web;

pub use error::{Error, ErrorKind, Result};
