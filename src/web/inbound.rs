//! Inbound SMS, per SMS channel: `STOP` and its synonyms unsubscribe the phone from every
//! order, `START` and `YES` confirm it. Only the provider may call: Twilio's calls are checked
//! against `X-Twilio-Signature` (HMAC-SHA1 keyed by the auth token over the public URL and the
//! POST parameters sorted by name), Kannel's carry the secret the channel file names. A call
//! that fails the check gets 403 and changes nothing. Delivery reports (Twilio's status
//! callbacks, Kannel's `dlr-url`) are checked the same way and recorded on their delivery.

use super::Shared;
use crate::channel::sms::{Provider, SmsSettings};
use crate::config::Config;
use crate::delivery::{DeliveryKey, ProviderReport, Recipient, ReportedOutcome};
use crate::domain::{Contact, PhoneNumber};
use crate::store::StoreError;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use std::collections::HashMap;

/// How a channel's inbound calls prove they come from its provider.
enum Proof {
    /// Twilio's signature, keyed by the account's auth token.
    TwilioSignature(SecretString),
    /// Kannel's sms-service, with the shared secret; none configured refuses every call.
    KannelSecret(Option<SecretString>),
}

impl Proof {
    /// Whether a call to `path` (under the public URL, with `query`) comes from the provider:
    /// Twilio signs the full URL it called and the POST parameters; Kannel sends the secret,
    /// in the query (get-url, dlr-url) or the body (post-url).
    fn admits(
        &self,
        inbound: &Inbound,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        query_params: &[(String, String)],
        body_params: &[(String, String)],
    ) -> bool {
        match self {
            Proof::TwilioSignature(token) => {
                let mut url = format!("{}{path}", inbound.public_url);
                if let Some(query) = query {
                    url.push('?');
                    url.push_str(query);
                }
                let signature = headers
                    .get("x-twilio-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                twilio_signed(token.expose_secret(), &url, body_params, signature)
            }
            Proof::KannelSecret(secret) => {
                let given = param(query_params, "secret")
                    .or_else(|| param(body_params, "secret"))
                    .unwrap_or_default();
                secret.as_ref().is_some_and(|secret| {
                    super::same_secret(secret.expose_secret().as_bytes(), given.as_bytes())
                })
            }
        }
    }
}

/// The SMS channels that take inbound messages, and the public base URL providers call.
pub struct Inbound {
    channels: HashMap<String, Proof>,
    public_url: String,
}

impl Inbound {
    pub fn new(config: &Config) -> Self {
        let channels = config
            .channels
            .iter()
            .filter_map(|channel| {
                let settings = channel.settings.as_any().downcast_ref::<SmsSettings>()?;
                let proof = match &settings.provider {
                    Provider::Twilio(twilio) => Proof::TwilioSignature(twilio.auth_token.clone()),
                    Provider::Kannel(kannel) => Proof::KannelSecret(kannel.inbound_secret.clone()),
                };
                Some((channel.id.clone(), proof))
            })
            .collect();
        Self {
            channels,
            public_url: config.brand.public_url.clone(),
        }
    }
}

/// What an inbound message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyword {
    Stop,
    Start,
}

/// The keyword a message is, case and spaces ignored; anything else is no keyword.
fn keyword(text: &str) -> Option<Keyword> {
    // "Stop.", "STOP!" and "stop all" all mean it: only letters count.
    let word: String = text
        .chars()
        .filter(|c| c.is_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "END" | "QUIT" | "CANCEL" => Some(Keyword::Stop),
        "START" | "YES" => Some(Keyword::Start),
        _ => None,
    }
}

/// Twilio's signature of a request: base64 of HMAC-SHA1 over the URL Twilio called followed
/// by every POST parameter, sorted by name, as name then value.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> Vec<u8> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac.finalize().into_bytes().to_vec()
}

/// Whether `header` (base64) is Twilio's signature of the request, compared in constant time.
fn twilio_signed(auth_token: &str, url: &str, params: &[(String, String)], header: &str) -> bool {
    let Ok(given) = STANDARD.decode(header.trim()) else {
        return false;
    };
    let expected = twilio_signature(auth_token, url, params);
    super::same_secret(&expected, &given)
}

fn form(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// The first value of the parameter `name`.
fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

fn refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "refused: the call is not signed by this channel's provider\n",
    )
        .into_response()
}

/// `POST` (Twilio, or Kannel's post-url) and `GET` (Kannel's get-url) of
/// `/inbound/sms/{channel}`.
pub(super) async fn inbound_sms(
    State(shared): State<Shared>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inbound = &shared.inbound;
    let Some(proof) = inbound.channels.get(&channel) else {
        return (StatusCode::NOT_FOUND, "no SMS channel has this id\n").into_response();
    };
    let (query_params, body_params) = (
        form(query.as_deref().unwrap_or_default().as_bytes()),
        form(&body),
    );
    let path = format!("/inbound/sms/{channel}");
    if !proof.admits(
        inbound,
        &path,
        query.as_deref(),
        &headers,
        &query_params,
        &body_params,
    ) {
        tracing::warn!(
            channel,
            "an inbound SMS the provider did not sign was refused"
        );
        return refused();
    }
    let (from, text, twilio) = match proof {
        Proof::TwilioSignature(_) => (
            param(&body_params, "From"),
            param(&body_params, "Body"),
            true,
        ),
        Proof::KannelSecret(_) => {
            // Kannel's get-url carries them in the query, its post-url in the body.
            let mut params = query_params;
            params.extend(body_params);
            (param(&params, "from"), param(&params, "text"), false)
        }
    };
    let Some(phone) = from
        .as_deref()
        .and_then(|from| PhoneNumber::parse(from).ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "the sender is not a phone number\n",
        )
            .into_response();
    };
    let contact = Contact::Phone(phone);
    if let Err(error) = act(&shared, &contact, text.as_deref().unwrap_or_default()).await {
        tracing::error!(%error, "cannot act on an inbound SMS");
        return (StatusCode::SERVICE_UNAVAILABLE, "not done: try again\n").into_response();
    }
    if twilio {
        // An empty TwiML answer: Twilio sends no reply (its own STOP handling answers).
        (
            [(header::CONTENT_TYPE, "text/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
        )
            .into_response()
    } else {
        // Kannel would send a non-empty answer back as a reply SMS.
        StatusCode::OK.into_response()
    }
}

/// What Twilio's `MessageStatus` means for the message.
fn twilio_outcome(status: &str) -> ReportedOutcome {
    match status {
        "delivered" | "read" => ReportedOutcome::Delivered,
        "undelivered" | "failed" => ReportedOutcome::Undelivered,
        _ => ReportedOutcome::Pending,
    }
}

/// What Kannel's report type (its `%d`) means: 1 delivered, 2 failed, 16 rejected by the
/// SMSC; 4 (buffered) and 8 (submitted) are on the way.
fn kannel_outcome(kind: &str) -> ReportedOutcome {
    match kind.trim().parse::<u32>() {
        Ok(1) => ReportedOutcome::Delivered,
        Ok(2 | 16) => ReportedOutcome::Undelivered,
        _ => ReportedOutcome::Pending,
    }
}

/// `POST` (Twilio's status callback) and `GET` (Kannel's `dlr-url`) of
/// `/inbound/sms/{channel}/status`: the provider's later word on a message, recorded on its
/// delivery. Checked as inbound messages are; a report about no delivery crier sent is
/// answered 200 and ignored, so the provider does not retry it.
pub(super) async fn delivery_report(
    State(shared): State<Shared>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inbound = &shared.inbound;
    let Some(proof) = inbound.channels.get(&channel) else {
        return (StatusCode::NOT_FOUND, "no SMS channel has this id\n").into_response();
    };
    let (query_params, body_params) = (
        form(query.as_deref().unwrap_or_default().as_bytes()),
        form(&body),
    );
    let path = format!("/inbound/sms/{channel}/status");
    if !proof.admits(
        inbound,
        &path,
        query.as_deref(),
        &headers,
        &query_params,
        &body_params,
    ) {
        tracing::warn!(
            channel,
            "a delivery report the provider did not sign was refused"
        );
        return refused();
    }
    let (to, provider_id, outcome, status, code) = match proof {
        Proof::TwilioSignature(_) => {
            let status = param(&body_params, "MessageStatus").unwrap_or_default();
            (
                param(&body_params, "To"),
                param(&body_params, "MessageSid"),
                twilio_outcome(&status),
                status,
                param(&body_params, "ErrorCode").filter(|code| !code.is_empty()),
            )
        }
        Proof::KannelSecret(_) => {
            let kind = param(&query_params, "status").unwrap_or_default();
            (
                param(&query_params, "to"),
                None,
                kannel_outcome(&kind),
                format!("kannel report type {}", kind.trim()),
                None,
            )
        }
    };
    let update = param(&query_params, "update").and_then(|id| ulid::Ulid::from_string(&id).ok());
    let phone = to.as_deref().and_then(|to| PhoneNumber::parse(to).ok());
    let (Some(update), Some(phone)) = (update, phone) else {
        return (
            StatusCode::BAD_REQUEST,
            "a delivery report names its update and phone number\n",
        )
            .into_response();
    };
    let contact = Contact::Phone(phone);
    let key = DeliveryKey::new(update, &channel, &Recipient::Contact(contact.clone()));
    let report = ProviderReport {
        outcome,
        status: status.chars().take(64).collect(),
        code: code.map(|code| code.chars().take(32).collect()),
        at: Utc::now(),
    };
    match shared
        .store
        .record_report(&key, provider_id.as_deref(), &report)
        .await
    {
        Ok(Some(_)) => {
            tracing::info!(channel, %update, phone = %contact.masked(), outcome = ?report.outcome, code = report.code.as_deref().unwrap_or("-"), "delivery report");
            StatusCode::OK.into_response()
        }
        Ok(None) => {
            tracing::info!(channel, %update, phone = %contact.masked(), "a delivery report about no message crier sent was ignored");
            StatusCode::OK.into_response()
        }
        Err(error) => {
            tracing::error!(%error, "cannot record a delivery report");
            (StatusCode::SERVICE_UNAVAILABLE, "not recorded: try again\n").into_response()
        }
    }
}

/// Does what the message asks of the phone's subscription, if it is a keyword.
async fn act(shared: &Shared, contact: &Contact, text: &str) -> Result<(), StoreError> {
    let now = Utc::now();
    match keyword(text) {
        Some(Keyword::Stop) => match shared.store.unsubscribe(contact, None, now).await {
            Ok(_) | Err(StoreError::UnknownSubscriber(_)) => {
                tracing::info!(phone = %contact.masked(), "unsubscribed by SMS");
                Ok(())
            }
            Err(error) => Err(error),
        },
        Some(Keyword::Start) => {
            // Confirms (or takes back) every order the phone still follows; after a STOP it
            // follows none, and subscribing again starts from the subscribe page.
            if let Some(subscriber) = shared.store.subscriber(contact).await? {
                for order in &subscriber.orders {
                    shared.store.subscribe(contact, order, true, now).await?;
                }
                tracing::info!(phone = %contact.masked(), "confirmed by SMS");
            }
            Ok(())
        }
        None => {
            tracing::info!(phone = %contact.masked(), "an inbound SMS that is no keyword was ignored");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twilio's published example: auth token 12345, this URL and these parameters.
    #[test]
    fn the_signature_matches_twilios_published_test_vector() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(twilio_signed(
            "12345",
            url,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!twilio_signed(
            "12346",
            url,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        let mut tampered = params.clone();
        tampered[2].1 = "9999".into();
        assert!(!twilio_signed(
            "12345",
            url,
            &tampered,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!twilio_signed("12345", url, &params, "not base64!"));
    }

    #[test]
    fn keywords_ignore_case_and_spaces_and_nothing_else_is_one() {
        assert_eq!(keyword(" stop "), Some(Keyword::Stop));
        assert_eq!(keyword("Stop All"), Some(Keyword::Stop));
        assert_eq!(keyword("unsubscribe"), Some(Keyword::Stop));
        assert_eq!(keyword("yes"), Some(Keyword::Start));
        assert_eq!(keyword("START"), Some(Keyword::Start));
        assert_eq!(keyword("Stop."), Some(Keyword::Stop));
        assert_eq!(keyword("stop please"), None);
        assert_eq!(keyword(""), None);
    }
}
