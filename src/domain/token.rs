//! Signed tokens for confirm, unsubscribe and support links (and web forms' CSRF tokens): HMAC-SHA256 over purpose,
//! subject and expiry, base64url-encoded, verified in constant time. A contact inside a subject
//! is sealed first (AES-SIV), so a link never shows whom it was made for.

use aes_siv::KeyInit as _;
use aes_siv::siv::Aes128Siv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What the sealing key is derived for; changing it makes every sealed id unreadable.
const SEALING_KEY_LABEL: &[u8] = b"crier: the key that seals contacts in links";
/// Associated data of every sealed text, binding it to its use.
const SEALED_HEADER: &[u8] = b"crier sealed contact";

/// What a token allows. It is part of the signed payload, so a token never works for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    Confirm,
    Unsubscribe,
    SupportLink,
    /// The double-submit token of a web form: its cookie and its hidden field.
    Csrf,
    /// The console's session cookie: who signed in, with which admin token, until when.
    AdminSession,
}

impl TokenPurpose {
    fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::Confirm => "confirm",
            TokenPurpose::Unsubscribe => "unsubscribe",
            TokenPurpose::SupportLink => "support-link",
            TokenPurpose::Csrf => "csrf",
            TokenPurpose::AdminSession => "admin-session",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the link is malformed")]
    Malformed,
    #[error("the link's signature is not valid")]
    BadSignature,
    #[error("the link was made for something else")]
    WrongPurpose,
    #[error("the link expired on {0}")]
    Expired(DateTime<Utc>),
}

/// Issues and verifies tokens with one secret key, and seals what a token must carry but not
/// show with a key derived from it.
#[derive(Clone)]
pub struct TokenSigner {
    key: Vec<u8>,
    sealing_key: [u8; 32],
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

impl TokenSigner {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        let key = secret.as_ref().to_vec();
        // A separate key for sealing, so the cipher and the MAC never share one.
        let mut derive =
            <HmacSha256 as Mac>::new_from_slice(&key).expect("HMAC accepts keys of any length");
        derive.update(SEALING_KEY_LABEL);
        Self {
            key,
            sealing_key: derive.finalize().into_bytes().into(),
        }
    }

    /// `text` made unreadable: base64url of its AES-SIV encryption. Deterministic, so one
    /// contact always seals to the same opaque id; authenticated, so only this key made it.
    pub fn seal(&self, text: &str) -> String {
        let sealed = self
            .siv()
            .encrypt([SEALED_HEADER], text.as_bytes())
            .expect("one header and any plaintext are within AES-SIV's limits");
        URL_SAFE_NO_PAD.encode(sealed)
    }

    /// What `seal` sealed, or `None` for anything this key did not seal.
    pub fn unseal(&self, sealed: &str) -> Option<String> {
        let sealed = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        let text = self.siv().decrypt([SEALED_HEADER], &sealed).ok()?;
        String::from_utf8(text).ok()
    }

    fn siv(&self) -> Aes128Siv {
        Aes128Siv::new_from_slice(&self.sealing_key).expect("AES-128-SIV takes a 32-byte key")
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    pub fn issue(&self, purpose: TokenPurpose, subject: &str, expires: DateTime<Utc>) -> String {
        let payload = format!("{}\n{}\n{}", purpose.as_str(), expires.timestamp(), subject);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    /// Returns the subject of a genuine, unexpired token made for `purpose`.
    ///
    /// `token` may also be the whole link the token came in, as pasted from a message or its
    /// List-Unsubscribe header: see `token_in`.
    pub fn verify(
        &self,
        purpose: TokenPurpose,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<String, TokenError> {
        let (payload, signature) = token_in(token)
            .split_once('.')
            .ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(&payload);
        // verify_slice compares in constant time.
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;

        let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let mut parts = payload.splitn(3, '\n');
        let (Some(token_purpose), Some(expiry), Some(subject)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if token_purpose != purpose.as_str() {
            return Err(TokenError::WrongPurpose);
        }
        let expiry: i64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let expires = Utc
            .timestamp_opt(expiry, 0)
            .single()
            .ok_or(TokenError::Malformed)?;
        if expires <= now {
            return Err(TokenError::Expired(expires));
        }
        Ok(subject.to_owned())
    }
}

/// The token in what was pasted: the token itself, or the end of the link it came in
/// (`https://status.example.com/unsubscribe/<token>`), taken from the first `<…>` of a
/// List-Unsubscribe header, without a trailing slash, query or fragment, or the full stop of
/// the sentence it was in.
///
/// Only the signature decides what is genuine; this just finds the candidate: the last run of
/// characters a token can have (base64url, and the dot between its two halves).
fn token_in(pasted: &str) -> &str {
    let mut text = pasted;
    if let Some((_, bracketed)) = text.split_once('<') {
        text = bracketed.split('>').next().unwrap_or(bracketed);
    }
    let in_token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    // A token has neither ? nor #, so in a link they start what comes after it.
    let text = text.split(['?', '#']).next().unwrap_or(text);
    // A token never ends in its dot, so a trailing one is the sentence's.
    let text = text.trim_end_matches(|c: char| !in_token(c) || c == '.');
    text.rsplit(|c: char| !in_token(c)).next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::super::update::hostile;
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    fn signer() -> TokenSigner {
        TokenSigner::new(b"a test secret that is long enough")
    }

    #[test]
    fn a_token_verifies_for_its_own_purpose_and_returns_its_subject() {
        let now = Utc::now();
        let token = signer().issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + Duration::days(1),
        );
        let subject = signer()
            .verify(TokenPurpose::Unsubscribe, &token, now)
            .unwrap();
        assert_eq!(subject, "ann@example.com");
    }

    #[test]
    fn a_token_made_for_one_purpose_never_works_for_another() {
        let now = Utc::now();
        let token = signer().issue(
            TokenPurpose::Confirm,
            "ann@example.com",
            now + Duration::days(1),
        );
        assert_eq!(
            signer().verify(TokenPurpose::Unsubscribe, &token, now),
            Err(TokenError::WrongPurpose)
        );
    }

    #[test]
    fn an_expired_token_is_rejected() {
        let now = Utc::now();
        let token = signer().issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now - Duration::seconds(1),
        );
        assert!(matches!(
            signer().verify(TokenPurpose::Unsubscribe, &token, now),
            Err(TokenError::Expired(_))
        ));
    }

    #[test]
    fn a_forged_or_altered_token_is_rejected() {
        let now = Utc::now();
        let token = signer().issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + Duration::days(1),
        );
        let other_key = TokenSigner::new(b"another secret");
        assert_eq!(
            other_key.verify(TokenPurpose::Unsubscribe, &token, now),
            Err(TokenError::BadSignature)
        );
        let (_, signature) = token.split_once('.').unwrap();
        let altered_payload = URL_SAFE_NO_PAD.encode(format!(
            "unsubscribe\n{}\nbob@example.com",
            (now + Duration::days(1)).timestamp()
        ));
        assert_eq!(
            signer().verify(
                TokenPurpose::Unsubscribe,
                &format!("{altered_payload}.{signature}"),
                now
            ),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer().verify(TokenPurpose::Unsubscribe, "garbage", now),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_sealed_text_is_unreadable_stable_and_opens_only_with_its_own_key() {
        let sealed = signer().seal("ann@example.com");
        assert!(!sealed.contains("ann"), "{sealed}");
        assert_eq!(sealed, signer().seal("ann@example.com"));
        assert_ne!(sealed, signer().seal("bob@example.com"));
        assert_eq!(signer().unseal(&sealed).as_deref(), Some("ann@example.com"));
        let stranger = TokenSigner::new(b"another secret that is long enough");
        assert_eq!(stranger.unseal(&sealed), None);
    }

    #[test]
    fn an_altered_sealed_text_opens_to_nothing() {
        let sealed = signer().seal("+447700900123");
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        for at in 0..bytes.len() {
            bytes[at] ^= 1;
            assert_eq!(
                signer().unseal(&URL_SAFE_NO_PAD.encode(&bytes)),
                None,
                "byte {at}"
            );
            bytes[at] ^= 1;
        }
        assert_eq!(signer().unseal("ann@example.com"), None);
        assert_eq!(signer().unseal(""), None);
    }

    fn unsubscribe_token(now: DateTime<Utc>) -> String {
        signer().issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + Duration::days(1),
        )
    }

    #[test]
    fn the_whole_unsubscribe_link_verifies_as_its_token() {
        let now = Utc::now();
        let token = unsubscribe_token(now);
        let link = format!("https://status.example.com/unsubscribe/{token}");
        for pasted in [
            link.clone(),
            format!("<{link}>"),
            format!("{link}/"),
            format!("  {link}\r\n"),
            format!("{link}?utm_source=email"),
            format!("{link}/#top"),
            format!("<{link}>, <mailto:unsubscribe@example.com?subject=stop>"),
            format!("List-Unsubscribe: <{link}>"),
            format!("Unsubscribe here: {link}."),
            format!("\"{token}\""),
            format!("/unsubscribe/{token}"),
            format!("See {link}/."),
            format!("Unsubscribe:\u{a0}→{token}"),
        ] {
            assert_eq!(
                signer().verify(TokenPurpose::Unsubscribe, &pasted, now),
                Ok("ann@example.com".to_owned()),
                "{pasted}"
            );
        }
    }

    #[test]
    fn a_link_does_not_make_a_forged_expired_or_misused_token_good() {
        let now = Utc::now();
        let link = |token: &str| format!("<https://status.example.com/unsubscribe/{token}>");
        let forged = TokenSigner::new(b"another secret").issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + Duration::days(1),
        );
        assert_eq!(
            signer().verify(TokenPurpose::Unsubscribe, &link(&forged), now),
            Err(TokenError::BadSignature)
        );
        let expired = signer().issue(TokenPurpose::Unsubscribe, "ann@example.com", now);
        assert!(matches!(
            signer().verify(TokenPurpose::Unsubscribe, &link(&expired), now),
            Err(TokenError::Expired(_))
        ));
        let confirm = signer().issue(
            TokenPurpose::Confirm,
            "ann@example.com",
            now + Duration::days(1),
        );
        assert_eq!(
            signer().verify(TokenPurpose::Unsubscribe, &link(&confirm), now),
            Err(TokenError::WrongPurpose)
        );
        for empty in ["https://status.example.com/unsubscribe/", "<>", "/", ""] {
            assert_eq!(
                signer().verify(TokenPurpose::Unsubscribe, empty, now),
                Err(TokenError::Malformed),
                "{empty}"
            );
        }
    }

    /// A token with a genuine signature over `payload`, however odd the payload.
    fn signed(payload: &str) -> String {
        let mut mac = signer().mac();
        mac.update(payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn an_expiry_no_date_can_hold_is_malformed_not_a_panic() {
        let now = Utc::now();
        for expiry in [
            i64::MAX.to_string(),
            i64::MIN.to_string(),
            "8210266876800".to_owned(),
            "-8334601228801".to_owned(),
            "99999999999999999999".to_owned(),
            "".to_owned(),
        ] {
            let token = signed(&format!("unsubscribe\n{expiry}\nann@example.com"));
            assert_eq!(
                signer().verify(TokenPurpose::Unsubscribe, &token, now),
                Err(TokenError::Malformed),
                "{expiry}"
            );
        }
    }

    const PASTES: &[&str] = &[
        "https://status.example.com/unsubscribe/",
        "<",
        ">",
        "/",
        ".",
        "?",
        "#",
        "dW5zdWJzY3JpYmUKMQphbm5AZXhhbXBsZS5jb20",
        "AAAA",
        "_-",
    ];

    proptest! {
        #![proptest_config(hostile::config())]

        #[test]
        fn no_pasted_text_verifies_without_a_genuine_token(input in hostile::text(PASTES)) {
            let result = signer().verify(TokenPurpose::Unsubscribe, &input, Utc::now());
            prop_assert!(result.is_err(), "{result:?}");
        }

        #[test]
        fn a_genuine_token_verifies_however_its_link_is_pasted(
            subject in any::<String>(),
            before in "[ \t\r\n]{0,2}(<)?(https://status\\.example\\.com/unsubscribe/)?",
            after in "/?([?#][a-z=]{0,6})?(>)?[ \t\r\n.]{0,2}",
        ) {
            let now = Utc::now();
            let token = signer().issue(TokenPurpose::Unsubscribe, &subject, now + Duration::days(1));
            let pasted = format!("{before}{token}{after}");
            prop_assert_eq!(
                signer().verify(TokenPurpose::Unsubscribe, &pasted, now),
                Ok(subject)
            );
        }

        #[test]
        fn any_signed_expiry_is_read_without_a_panic(expiry in any::<i64>(), subject in any::<String>()) {
            let token = signed(&format!("unsubscribe\n{expiry}\n{subject}"));
            match signer().verify(TokenPurpose::Unsubscribe, &token, Utc::now()) {
                Ok(verified) => prop_assert_eq!(verified, subject),
                Err(err) => prop_assert!(
                    matches!(err, TokenError::Expired(_) | TokenError::Malformed),
                    "{err:?}"
                ),
            }
        }
    }
}
