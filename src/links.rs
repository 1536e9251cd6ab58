//! Links: the public URLs crier's messages point at, and the signed tokens inside them. Every
//! surface that makes a link (messages, support snippets, web pages) makes it here, and every
//! link that names a contact names it sealed: an opaque id, never an address or a number in a
//! URL, a browser's history or an access log.

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
            &self.signer.seal(contact.as_str()),
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
        let subject = LinkSubject::subject(&self.signer, order, Some(contact), now);
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
        let subject = LinkSubject::subject(&self.signer, order, contact, Utc::now());
        let token = self
            .signer
            .issue(TokenPurpose::SupportLink, &subject, expires);
        format!("{}/s/{token}", self.public_url)
    }
}

/// What a confirm or support link names: an order and, for a confirm link or a support link
/// made for one customer, the contact and when the link was made. Signed as `order`, or
/// `order\nsealed contact\nissued` (Unix seconds): an order number never holds a line break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSubject {
    pub order: OrderNumber,
    pub contact: Option<Contact>,
    /// When the link was made: an opt-out after it voids it. A link made before links said
    /// when reads as made at the beginning of time, so any opt-out voids it.
    pub issued: DateTime<Utc>,
}

impl LinkSubject {
    fn subject(
        signer: &TokenSigner,
        order: &OrderNumber,
        contact: Option<&Contact>,
        issued: DateTime<Utc>,
    ) -> String {
        match contact {
            Some(contact) => format!(
                "{order}\n{}\n{}",
                signer.seal(contact.as_str()),
                issued.timestamp()
            ),
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
        let mut parts = subject.splitn(3, '\n');
        let order = parts.next().unwrap_or_default();
        let contact = parts.next();
        let issued = match parts.next() {
            Some(seconds) => seconds
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .ok_or(TokenError::Malformed)?,
            None => DateTime::<Utc>::MIN_UTC,
        };
        let order = OrderNumber::parse(order, orders).map_err(|_| TokenError::Malformed)?;
        let contact = contact
            .map(|contact| signed_contact(signer, contact))
            .transpose()?;
        Ok(Self {
            order,
            contact,
            issued,
        })
    }
}

/// The contact a genuine, unexpired unsubscribe token names.
pub fn verify_unsubscribe(
    signer: &TokenSigner,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Contact, TokenError> {
    let subject = signer.verify(TokenPurpose::Unsubscribe, token, now)?;
    signed_contact(signer, &subject)
}

/// The contact in a verified subject: sealed, or readable in a link made before contacts were
/// sealed. Both are genuine, because the signature covers them; the readable form is accepted so
/// that the unsubscribe links already in customers' inboxes keep working until they expire.
fn signed_contact(signer: &TokenSigner, subject: &str) -> Result<Contact, TokenError> {
    let text = signer.unseal(subject);
    Contact::parse(text.as_deref().unwrap_or(subject)).map_err(|_| TokenError::Malformed)
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

    /// What a link shows to anyone who reads it: the token's payload, decoded.
    fn readable(url: &str) -> String {
        use base64::Engine;
        let payload = token(url).split('.').next().unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn no_link_shows_the_contact_it_names() {
        let (links, now) = (maker(), Utc::now());
        let orders = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        let order = OrderNumber::parse("AB-1001", &orders).unwrap();
        for contact in ["ann@example.com", "+447700900123"] {
            let contact = Contact::parse(contact).unwrap();
            let urls = [
                links.unsubscribe_url(&contact, now),
                links.confirm_url(&contact, &order, now, Duration::from_secs(60)),
                links.support_url(&order, Some(&contact), now + chrono::Duration::days(1)),
            ];
            for url in urls {
                // The link as it is, whose signature half is random enough to hold a short
                // word by chance, and its payload decoded, which is deterministic.
                assert!(!token(&url).contains(contact.as_str()), "{url}");
                let decoded = readable(&url);
                assert!(!decoded.contains("ann"), "{decoded}");
                assert!(!decoded.contains("example"), "{decoded}");
                assert!(!decoded.contains("7700900"), "{decoded}");
            }
            let unsubscribe = links.unsubscribe_url(&contact, now);
            assert_eq!(
                verify_unsubscribe(links.signer(), token(&unsubscribe), now),
                Ok(contact)
            );
        }
    }

    #[test]
    fn an_unsubscribe_link_made_before_contacts_were_sealed_still_works() {
        let (links, now) = (maker(), Utc::now());
        let readable_link = links.signer().issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + chrono::Duration::days(1),
        );
        assert_eq!(
            verify_unsubscribe(links.signer(), &readable_link, now),
            Ok(Contact::parse("ann@example.com").unwrap())
        );
        let not_a_contact = links.signer().issue(
            TokenPurpose::Unsubscribe,
            "nobody",
            now + chrono::Duration::days(1),
        );
        assert_eq!(
            verify_unsubscribe(links.signer(), &not_a_contact, now),
            Err(TokenError::Malformed)
        );
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
                contact: Some(ann),
                issued: DateTime::from_timestamp(now.timestamp(), 0).unwrap(),
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
                contact: None,
                issued: DateTime::<Utc>::MIN_UTC,
            })
        );
    }
}
