//! Links: the public URLs crier's messages point at, and the signed tokens inside them. Every
//! surface that makes a link (messages, support snippets, web pages) makes it here.

use crate::config::Config;
use crate::domain::Contact;
use crate::domain::token::{TokenPurpose, TokenSigner};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;

/// The public pages, as templates see them.
#[derive(Debug, Clone, Serialize)]
pub struct Links {
    pub status_page: String,
    pub subscribe: String,
}

/// Makes links, signing the tokens they carry.
#[derive(Clone)]
pub struct LinkMaker {
    public_url: String,
    links: Links,
    signer: TokenSigner,
    unsubscribe_ttl: std::time::Duration,
}

impl LinkMaker {
    pub fn new(config: &Config) -> Self {
        Self::for_site(
            &config.brand.public_url,
            TokenSigner::new(config.link_secret.expose_secret()),
            config.unsubscribe_ttl,
        )
    }

    /// Links under `public_url` (without a trailing slash), signed by `signer`.
    pub fn for_site(
        public_url: &str,
        signer: TokenSigner,
        unsubscribe_ttl: std::time::Duration,
    ) -> Self {
        Self {
            public_url: public_url.to_owned(),
            links: Links {
                status_page: format!("{public_url}/"),
                subscribe: format!("{public_url}/subscribe"),
            },
            signer,
            unsubscribe_ttl,
        }
    }

    pub fn links(&self) -> &Links {
        &self.links
    }

    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    pub fn signer(&self) -> &TokenSigner {
        &self.signer
    }

    /// The one-click unsubscribe link of a message to `contact`.
    pub fn unsubscribe_url(&self, contact: &Contact, now: DateTime<Utc>) -> String {
        let token = self.signer.issue(
            TokenPurpose::Unsubscribe,
            contact.as_str(),
            crate::clock::after(now, self.unsubscribe_ttl),
        );
        format!("{}/unsubscribe/{token}", self.public_url)
    }
}
