//! Links: the public URLs crier's messages point at, and the signed tokens inside them. Every
//! surface that makes a link (messages, support snippets, web pages) makes it here.

use crate::config::Config;
use crate::domain::token::{TokenError, TokenPurpose, TokenSigner};
use crate::domain::{Contact, OrderNumber, OrderPattern};
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

    /// The link a customer follows to confirm `contact` for `order`: it works for `ttl`.
    pub fn confirm_url(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        now: DateTime<Utc>,
        ttl: std::time::Duration,
    ) -> String {
        let subject = LinkSubject::subject(order, Some(contact));
        let token = self.signer.issue(
            TokenPurpose::Confirm,
            &subject,
            crate::clock::after(now, ttl),
        );
        format!("{}/confirm/{token}", self.public_url)
    }

    /// The link support sends a customer: the subscribe page for `order`, or, when it names
    /// the contact support wrote to, one button that subscribes it.
    pub fn support_url(
        &self,
        order: &OrderNumber,
        contact: Option<&Contact>,
        expires: DateTime<Utc>,
    ) -> String {
        let subject = LinkSubject::subject(order, contact);
        let token = self
            .signer
            .issue(TokenPurpose::SupportLink, &subject, expires);
        format!("{}/s/{token}", self.public_url)
    }
}

/// What a confirm or support link names: an order and, for a confirm link or a support link
/// made for one customer, the contact. Signed as `order` or `order\ncontact`: an order number
/// never holds a line break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSubject {
    pub order: OrderNumber,
    pub contact: Option<Contact>,
}

impl LinkSubject {
    fn subject(order: &OrderNumber, contact: Option<&Contact>) -> String {
        match contact {
            Some(contact) => format!("{order}\n{contact}"),
            None => order.to_string(),
        }
    }

    /// The subject of a genuine, unexpired token made for `purpose`. A subject that no longer
    /// parses (the order pattern changed since) is as good as malformed.
    pub fn verify(
        signer: &TokenSigner,
        purpose: TokenPurpose,
        token: &str,
        orders: &OrderPattern,
        now: DateTime<Utc>,
    ) -> Result<Self, TokenError> {
        let subject = signer.verify(purpose, token, now)?;
        let (order, contact) = match subject.split_once('\n') {
            Some((order, contact)) => (order, Some(contact)),
            None => (subject.as_str(), None),
        };
        let order = OrderNumber::parse(order, orders).map_err(|_| TokenError::Malformed)?;
        let contact = contact
            .map(Contact::parse)
            .transpose()
            .map_err(|_| TokenError::Malformed)?;
        Ok(Self { order, contact })
    }
}

/// A support link's lifetime: at least an hour (a customer reads support's reply later), at
/// most 90 days (a link in an old ticket should not work forever).
pub fn parse_link_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let wait = humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like 7d or 12h: {e}"))?;
    if !(std::time::Duration::from_secs(3600)..=std::time::Duration::from_secs(90 * 24 * 3600))
        .contains(&wait)
    {
        return Err(format!("'{text}' is not between an hour and 90 days"));
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn maker() -> LinkMaker {
        LinkMaker::for_site(
            "https://status.example.com",
            TokenSigner::new(b"a test secret that is long enough"),
            Duration::from_secs(3600),
        )
    }

    fn token(url: &str) -> &str {
        url.rsplit('/').next().unwrap_or_default()
    }

    #[test]
    fn a_confirm_link_names_its_contact_and_order_and_works_for_nothing_else() {
        let (links, now) = (maker(), Utc::now());
        let orders = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        let order = OrderNumber::parse("ab-1001", &orders).unwrap();
        let ann = Contact::parse("ann@example.com").unwrap();
        let url = links.confirm_url(&ann, &order, now, Duration::from_secs(60));
        assert!(
            url.starts_with("https://status.example.com/confirm/"),
            "{url}"
        );
        let read = LinkSubject::verify(
            links.signer(),
            TokenPurpose::Confirm,
            token(&url),
            &orders,
            now,
        );
        assert_eq!(
            read,
            Ok(LinkSubject {
                order: order.clone(),
                contact: Some(ann)
            })
        );
        assert_eq!(
            LinkSubject::verify(
                links.signer(),
                TokenPurpose::SupportLink,
                token(&url),
                &orders,
                now
            ),
            Err(TokenError::WrongPurpose)
        );
    }

    #[test]
    fn a_support_link_may_name_only_an_order() {
        let (links, now) = (maker(), Utc::now());
        let orders = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        let order = OrderNumber::parse("AB-1001", &orders).unwrap();
        let url = links.support_url(&order, None, now + chrono::Duration::days(7));
        assert!(url.starts_with("https://status.example.com/s/"), "{url}");
        let read = LinkSubject::verify(
            links.signer(),
            TokenPurpose::SupportLink,
            token(&url),
            &orders,
            now,
        );
        assert_eq!(
            read,
            Ok(LinkSubject {
                order,
                contact: None
            })
        );
    }
}
