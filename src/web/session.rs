//! The console's sessions: a signed, expiring cookie naming the admin token it was opened with,
//! the CSRF token bound to each session, and the same-origin check every change must pass.
//!
//! A session is stateless (the cookie is a token signed with the link secret), so it survives a
//! restart and works on every node. It carries a fingerprint of the admin token it was opened
//! with: rotating or removing that token ends its sessions. Logging out ends the session at
//! once on this server; the cookie is also cleared in the browser.

use crate::domain::token::{TokenPurpose, TokenSigner};
use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How long a console session lasts: a working day on a bad day.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const SESSION_COOKIE: &str = "crier_session";
/// The same cookie on an https site: `Secure`, `Path=/` and no `Domain`, so no subdomain or
/// plain-http page can plant one.
const HOST_SESSION_COOKIE: &str = "__Host-crier_session";

/// One signed-in comms lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Random, and the subject of the session's CSRF token.
    pub nonce: String,
    /// The admin token's name: the author of what the session sends.
    pub name: String,
    /// Which secret the token had when the session opened.
    pub fingerprint: String,
    pub expires: DateTime<Utc>,
}

/// Opens, reads and ends sessions.
pub struct Sessions {
    signer: TokenSigner,
    secure: bool,
    /// The public site's origin, `https://status.example.com`, as a browser writes `Origin`.
    origin: String,
    /// Sessions logged out before they expired, by nonce, until they would have expired.
    closed: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl Sessions {
    pub fn new(signer: TokenSigner, public_url: &str) -> Self {
        Self {
            signer,
            secure: public_url.starts_with("https://"),
            origin: origin_of(public_url),
            closed: Mutex::new(HashMap::new()),
        }
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure {
            HOST_SESSION_COOKIE
        } else {
            SESSION_COOKIE
        }
    }

    /// A new session for the token named `name`, and the cookie that carries it.
    pub fn open(
        &self,
        name: &str,
        fingerprint: &str,
        now: DateTime<Utc>,
    ) -> (Session, HeaderValue) {
        let session = Session {
            nonce: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>()),
            name: name.to_owned(),
            fingerprint: fingerprint.to_owned(),
            // Whole seconds, as the token carries it.
            expires: DateTime::from_timestamp(crate::clock::after(now, SESSION_TTL).timestamp(), 0)
                .unwrap_or(now),
        };
        let token = self.signer.issue(
            TokenPurpose::AdminSession,
            &format!("{}:{}:{}", session.nonce, session.fingerprint, session.name),
            session.expires,
        );
        let cookie = self.cookie(&token, SESSION_TTL.as_secs());
        (session, cookie)
    }

    /// The cookie that ends the session in the browser.
    pub fn clearing_cookie(&self) -> HeaderValue {
        self.cookie("", 0)
    }

    fn cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        super::strict_cookie(self.cookie_name(), value, max_age, self.secure)
    }

    /// The session a request's cookie carries: genuine, unexpired and not logged out.
    pub fn current(&self, headers: &HeaderMap, now: DateTime<Utc>) -> Option<Session> {
        let token = super::subscribe::cookie(headers, self.cookie_name())?;
        let subject = self
            .signer
            .verify(TokenPurpose::AdminSession, token, now)
            .ok()?;
        let mut fields = subject.splitn(3, ':');
        let (nonce, fingerprint, name) = (fields.next()?, fields.next()?, fields.next()?);
        let expires = self.expiry(token)?;
        if self.is_closed(nonce, now) {
            return None;
        }
        Some(Session {
            nonce: nonce.to_owned(),
            name: name.to_owned(),
            fingerprint: fingerprint.to_owned(),
            expires,
        })
    }

    /// A verified token's expiry, read from its payload (`purpose\nexpiry\nsubject`).
    fn expiry(&self, token: &str) -> Option<DateTime<Utc>> {
        let payload = URL_SAFE_NO_PAD.decode(token.split_once('.')?.0).ok()?;
        let payload = String::from_utf8(payload).ok()?;
        let seconds: i64 = payload.split('\n').nth(1)?.parse().ok()?;
        DateTime::from_timestamp(seconds, 0)
    }

    /// Ends a session before its expiry.
    pub fn close(&self, session: &Session, now: DateTime<Utc>) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        // Expired sessions fail verification anyway: only the live ones need remembering.
        closed.retain(|_, expires| *expires > now);
        closed.insert(session.nonce.clone(), session.expires);
    }

    fn is_closed(&self, nonce: &str, now: DateTime<Utc>) -> bool {
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.get(nonce).is_some_and(|expires| *expires > now)
    }

    /// The CSRF token of every form the session's pages show.
    pub fn csrf(&self, session: &Session) -> String {
        self.signer.issue(
            TokenPurpose::Csrf,
            &format!("session:{}", session.nonce),
            session.expires,
        )
    }

    /// Whether `presented` is this session's CSRF token.
    pub fn csrf_holds(&self, session: &Session, presented: &str, now: DateTime<Utc>) -> bool {
        self.signer
            .verify(TokenPurpose::Csrf, presented, now)
            .is_ok_and(|subject| {
                super::same_secret(
                    subject.as_bytes(),
                    format!("session:{}", session.nonce).as_bytes(),
                )
            })
    }

    /// Whether a state-changing request comes from the console's own pages. A browser says
    /// where a request comes from in `Sec-Fetch-Site` (or, older ones, `Origin`); a request
    /// with neither comes from no browser (curl, a script) and still needs the CSRF token.
    pub fn same_origin(&self, headers: &HeaderMap) -> bool {
        if let Some(site) = headers.get("sec-fetch-site") {
            return matches!(site.as_bytes(), b"same-origin" | b"none");
        }
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        if origin == self.origin {
            return true;
        }
        // Reached on its own address (a lead on the server's port, before the proxy).
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        host.is_some_and(|host| {
            origin.strip_prefix("http://") == Some(host)
                || origin.strip_prefix("https://") == Some(host)
        })
    }
}

/// `https://status.example.com` of `https://status.example.com/path/`.
fn origin_of(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.trim_end_matches('/').to_owned();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderName;

    fn sessions() -> Sessions {
        Sessions::new(
            TokenSigner::new("a link secret of some length"),
            "http://status.example.com/",
        )
    }

    fn with_cookie(cookie: &HeaderValue) -> HeaderMap {
        let pair = cookie
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        headers
    }

    #[test]
    fn an_opened_session_is_read_back_until_it_expires_or_is_closed() {
        let sessions = sessions();
        let now = Utc::now();
        let (session, cookie) = sessions.open("lead", "f1", now);
        let cookie_text = cookie.to_str().unwrap();
        assert!(cookie_text.contains("HttpOnly") && cookie_text.contains("SameSite=Strict"));
        let headers = with_cookie(&cookie);
        assert_eq!(sessions.current(&headers, now), Some(session.clone()));
        let later = crate::clock::after(now, SESSION_TTL + Duration::from_secs(1));
        assert_eq!(sessions.current(&headers, later), None);
        sessions.close(&session, now);
        assert_eq!(sessions.current(&headers, now), None);
    }

    #[test]
    fn a_forged_or_foreign_session_cookie_is_nobody() {
        let sessions = sessions();
        let now = Utc::now();
        let other = Sessions::new(TokenSigner::new("another secret entirely"), "http://x/");
        let (_, cookie) = other.open("lead", "f1", now);
        assert_eq!(sessions.current(&with_cookie(&cookie), now), None);
        // A CSRF token is signed by the same key but made for another purpose.
        let (session, _) = sessions.open("lead", "f1", now);
        let csrf = sessions.csrf(&session);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("crier_session={csrf}")).unwrap(),
        );
        assert_eq!(sessions.current(&headers, now), None);
    }

    #[test]
    fn a_csrf_token_holds_only_for_its_own_session() {
        let sessions = sessions();
        let now = Utc::now();
        let (mine, _) = sessions.open("lead", "f1", now);
        let (theirs, _) = sessions.open("lead", "f1", now);
        let token = sessions.csrf(&mine);
        assert!(sessions.csrf_holds(&mine, &token, now));
        assert!(!sessions.csrf_holds(&theirs, &token, now));
        assert!(!sessions.csrf_holds(&mine, "", now));
        assert!(!sessions.csrf_holds(&mine, "garbage.token", now));
    }

    #[test]
    fn a_cross_site_request_is_told_from_a_same_origin_one() {
        let sessions = sessions();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            headers
        };
        assert!(sessions.same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!sessions.same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!sessions.same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(sessions.same_origin(&headers(&[("origin", "http://status.example.com")])));
        assert!(!sessions.same_origin(&headers(&[("origin", "https://evil.example")])));
        assert!(!sessions.same_origin(&headers(&[("origin", "null")])));
        assert!(sessions.same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(sessions.same_origin(&headers(&[])));
    }

    #[test]
    fn the_origin_is_the_scheme_and_authority() {
        assert_eq!(
            origin_of("https://status.example.com/crier/"),
            "https://status.example.com"
        );
        assert_eq!(origin_of("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    }
}
