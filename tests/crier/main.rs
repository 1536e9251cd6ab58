//! crier's integration tests: the real binary, run against a real SMTP server (aiosmtpd), real
//! HTTP receivers (axum), Kannel, a real status page folder and a headless chromium, all on
//! 127.0.0.1.

mod api;
mod audience;
mod bad_input;
mod bluesky;
mod browser;
mod console;
mod crash;
mod demo;
mod discourse;
mod email;
mod hardening;
mod import;
mod inbound;
mod mastodon;
mod metrics;
mod order;
mod postgres;
mod serve;
mod sms;
mod status_page;
mod subscribe;
mod support;
mod watchdog;
mod webdriver;
mod webhook;
