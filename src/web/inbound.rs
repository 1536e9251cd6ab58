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
use crate::domain::{Contact, OrderNumber, PhoneNumber};
use crate::store::{FollowChange, StoreError};
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
    /// Whether texts sent to `channel`'s numbers come back to crier: only then may a message
    /// ask for a reply.
    pub fn hears(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }
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

/// Words that end the texts when a short message starts with them: "stop", "STOP STOP",
/// "stop please", "Unsubscribe me", "revoke", "opt out", and the usual words of the languages a
/// carrier serves (French "arrêt", German and Nordic "stopp", Spanish "baja", "alto", "parar").
/// The FCC's 2024 rule on revoking consent names "revoke" and "opt out" and any reasonable
/// wording.
const STOP_WORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "REVOKE",
    "OPTOUT",
    "ARRET",
    "ARRETER",
    "STOPP",
    "BAJA",
    "ALTO",
    "PARAR",
];

/// Words that end the texts only when the message is nothing else: "cancel my order" or "the
/// end of the queue?" asks something else.
const STOP_ALONE: &[&str] = &["END", "QUIT", "CANCEL"];

/// Words that confirm, when the message is nothing else.
const START_WORDS: &[&str] = &["START", "YES", "UNSTOP"];

/// The longest message still read as a keyword: beyond it, it is a conversation.
const KEYWORD_WORDS: usize = 6;

/// The keyword a message is; anything else is no keyword. Case, accents, full-width letters,
/// punctuation and spaces are ignored.
fn keyword(text: &str) -> Option<Keyword> {
    let words = words_of(text);
    let (first, rest) = words.split_first()?;
    if words.len() > KEYWORD_WORDS {
        return None;
    }
    let only = |set: &[&str]| set.contains(&first.as_str()) && rest.iter().all(|w| w == first);
    let opt_out = first == "OPT" && rest.first().is_some_and(|w| w == "OUT");
    if STOP_WORDS.contains(&first.as_str()) || opt_out || only(STOP_ALONE) {
        Some(Keyword::Stop)
    } else if only(START_WORDS) {
        Some(Keyword::Start)
    } else {
        None
    }
}

/// The order a "YES AB-1001" names: a confirming word, then an order number and nothing else.
fn yes_to_order(text: &str, orders: &crate::domain::OrderPattern) -> Option<OrderNumber> {
    let (first, rest) = text.trim().split_once(char::is_whitespace)?;
    let word = words_of(first);
    if word.len() != 1 || !START_WORDS.contains(&word[0].as_str()) {
        return None;
    }
    let named = rest.trim().trim_end_matches(['.', '!']).trim();
    OrderNumber::parse(named, orders)
        .ok()
        .or_else(|| OrderNumber::parse(&named.to_uppercase(), orders).ok())
}

/// The message's words, upper-cased, of letters only: "Ｓｔｏｐ, please!" is STOP PLEASE,
/// "Arrêt" is ARRET, "opt-out" is OPT OUT.
fn words_of(text: &str) -> Vec<String> {
    use unicode_normalization::UnicodeNormalization;
    use unicode_normalization::char::is_combining_mark;
    let plain: String = text
        .chars()
        .take(500)
        .nfkd()
        .filter(|c| !is_combining_mark(*c))
        .collect();
    plain
        .split(|c: char| !c.is_alphabetic())
        .filter(|word| !word.is_empty())
        .map(str::to_uppercase)
        .collect()
}

/// The keywords Twilio answers itself (its standard opt-out handling, which takes a message
/// that is exactly one of them, case and surrounding spaces aside): crier adds no reply to
/// them, so the customer is not told twice. Any other wording is crier's to confirm.
fn twilio_answers_itself(text: &str) -> bool {
    matches!(
        text.trim().to_ascii_uppercase().as_str(),
        "STOP"
            | "STOPALL"
            | "UNSUBSCRIBE"
            | "CANCEL"
            | "END"
            | "QUIT"
            | "REVOKE"
            | "OPTOUT"
            | "OPT OUT"
    )
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
    let text = text.as_deref().unwrap_or_default();
    let acted = match act(&shared, &contact, text).await {
        Ok(acted) => acted,
        Err(error) => {
            tracing::error!(%error, "cannot act on an inbound SMS");
            return (StatusCode::SERVICE_UNAVAILABLE, "not done: try again\n").into_response();
        }
    };
    let reply = reply_to(&shared, &acted, text, twilio);
    if twilio {
        // TwiML: a <Message> is sent back as the reply; an empty answer sends nothing.
        let message = reply
            .map(|reply| format!("<Message>{}</Message>", handlebars::html_escape(&reply)))
            .unwrap_or_default();
        (
            [(header::CONTENT_TYPE, "text/xml")],
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>{message}</Response>"),
        )
            .into_response()
    } else {
        // Kannel sends a non-empty answer back as the reply SMS.
        match reply {
            Some(reply) => {
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], reply).into_response()
            }
            None => StatusCode::OK.into_response(),
        }
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

/// What a text from a phone did to its follows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Acted {
    /// STOP: it follows nothing now.
    Stopped,
    /// YES or START: these orders, which the last text that asked named, are confirmed.
    Confirmed(Vec<OrderNumber>),
    /// YES or START with nothing asked (or the question expired).
    NothingToConfirm,
    /// A bare YES while texts asked about several orders: it is not clear which.
    WhichOrder(Vec<OrderNumber>),
    /// Not a keyword.
    NoKeyword,
}

/// Does what the message asks of the phone's follows, if it is a keyword, and says what.
/// A YES confirms exactly the orders the last text that asked for it named, never another
/// order someone added for the number.
async fn act(shared: &Shared, contact: &Contact, text: &str) -> Result<Acted, StoreError> {
    let now = Utc::now();
    let change = match (
        keyword(text),
        yes_to_order(text, &shared.subscriptions.orders),
    ) {
        (Some(Keyword::Stop), _) => FollowChange::StopByText,
        (Some(Keyword::Start), _) => FollowChange::AnsweredByText { order: None },
        (None, Some(order)) => FollowChange::AnsweredByText { order: Some(order) },
        (None, None) => {
            tracing::info!(phone = %contact.masked(), "an inbound SMS that is no keyword was ignored");
            return Ok(Acted::NoKeyword);
        }
    };
    let (orders, still_asked) = match shared.store.change_follows(contact, &change, now).await {
        Ok(followed) => (followed.orders, followed.subscriber.asked_by_text(now)),
        Err(StoreError::UnknownSubscriber(_)) => Default::default(),
        Err(error) => return Err(error),
    };
    Ok(match change {
        FollowChange::StopByText => {
            tracing::info!(phone = %contact.masked(), "unsubscribed by SMS");
            Acted::Stopped
        }
        FollowChange::AnsweredByText { order: None }
            if orders.is_empty() && still_asked.len() > 1 =>
        {
            tracing::info!(phone = %contact.masked(), "a YES by SMS did not say which of several orders");
            Acted::WhichOrder(still_asked.into_iter().collect())
        }
        _ if orders.is_empty() => {
            tracing::info!(phone = %contact.masked(), "a YES by SMS found nothing asked to confirm");
            Acted::NothingToConfirm
        }
        _ => {
            tracing::info!(phone = %contact.masked(), orders = orders.len(), "confirmed by SMS");
            Acted::Confirmed(orders)
        }
    })
}

/// The reply to a keyword, if one is due.
fn reply_to(shared: &Shared, acted: &Acted, text: &str, twilio: bool) -> Option<String> {
    let brand = &shared.pages.brand.name;
    match acted {
        // One confirmation of an opt-out, as the rules ask: unless Twilio's own handling of
        // its standard keywords already sent one.
        Acted::Stopped if !(twilio && twilio_answers_itself(text)) => Some(format!(
            "{brand}: you will get no more texts from us. Reply START to get them again."
        )),
        Acted::Confirmed(orders) => Some(format!(
            "{brand}: you will get updates on {} {} by text. Reply STOP to stop them.",
            if orders.len() == 1 { "order" } else { "orders" },
            crate::render::and_list(&orders.iter().map(ToString::to_string).collect::<Vec<_>>())
        )),
        Acted::WhichOrder(orders) => Some(format!(
            "{brand}: we asked about orders {}. Reply YES and the order you want updates on, like YES {}.",
            crate::render::and_list(&orders.iter().map(ToString::to_string).collect::<Vec<_>>()),
            orders.first().map(OrderNumber::as_str).unwrap_or_default()
        )),
        Acted::NothingToConfirm => Some(format!(
            "{brand}: there is nothing to confirm. To get updates on an order, ask on {}",
            shared.pages.links.subscribe
        )),
        _ => None,
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
        assert_eq!(keyword(""), None);
    }

    #[test]
    fn the_usual_ways_of_saying_stop_are_heard_and_questions_are_not() {
        for stop in [
            "stop please",
            "STOP STOP",
            "Stop texting me",
            "ＳＴＯＰ",
            "ｓｔｏｐ ｐｌｅａｓｅ",
            "REVOKE",
            "revoke consent",
            "OPT OUT",
            "opt-out",
            "optout",
            "Unsubscribe me",
            "Arrêt",
            "ARRET",
            "Stopp",
            "baja",
            "cancel",
            "CANCEL CANCEL",
            "end.",
            "Quit!",
        ] {
            assert_eq!(keyword(stop), Some(Keyword::Stop), "{stop:?}");
        }
        for not_stop in [
            "cancel my order",
            "When does it end?",
            "I quit my old provider, when does my SIM work?",
            "Is there a way to stop the updates for my other order but keep this one working please",
            "yes but when?",
            "hello",
            "stopped working again",
        ] {
            assert_ne!(keyword(not_stop), Some(Keyword::Stop), "{not_stop:?}");
        }
        assert_eq!(keyword("Yes!"), Some(Keyword::Start));
        assert_eq!(keyword("YES YES"), Some(Keyword::Start));
        assert_eq!(keyword("yes but when?"), None);
        assert!(twilio_answers_itself(" Stop "));
        assert!(twilio_answers_itself("OPT OUT"));
        assert!(!twilio_answers_itself("stop please"));
        assert!(!twilio_answers_itself("Arrêt"));
        assert!(!twilio_answers_itself("ＳＴＯＰ"));
    }

    proptest::proptest! {
        /// A stop word in any case, full-width or not, with any punctuation or spaces around
        /// it, alone or followed by a few words, ends the texts.
        #[test]
        fn a_stop_word_however_written_is_heard(
            word in proptest::sample::select(STOP_WORDS),
            upper in proptest::collection::vec(proptest::bool::ANY, 12),
            full_width in proptest::bool::ANY,
            before in "[ .,!?\\-]{0,3}",
            after in "[ .,!?\\-]{0,3}",
            tail in proptest::sample::select(&["", " please", " now", " stop", " me", " thanks"][..]),
        ) {
            let mut typed: String = word
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, up)| if *up { c } else { c.to_ascii_lowercase() })
                .collect();
            if full_width {
                typed = typed
                    .chars()
                    .map(|c| char::from_u32(u32::from(c) - 0x21 + 0xFF01).unwrap_or(c))
                    .collect();
            }
            let text = format!("{before}{typed}{after}{tail}");
            proptest::prop_assert_eq!(keyword(&text), Some(Keyword::Stop), "{:?}", text);
        }
    }
}
