//! SMS: to a Twilio stand-in on 127.0.0.1 that checks each request as Twilio documents it, to
//! real Kannel (bearerbox and smsbox, with Kannel's own fakesmsc as the SMSC), and the limits
//! of GSM-7 and UCS-2 at their exact boundaries.

use crate::support::{Crier, FAST_RETRIES, Output, unused_url, wait_until};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::{BTreeMap, VecDeque};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
const AUTH_TOKEN: &str = "fedcba9876543210fedcba9876543210";
const FROM: &str = "+447700900000";
const MESSAGES_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";
const STATUS_LINK: &str = "https://status.example.com/";
/// Many attempts a second, so tests are not paced by Twilio's default of one a second.
const QUICK_RATE: &str = "rate = \"50/s\"\n";

// ---- a Twilio stand-in ----------------------------------------------------------------------

/// What the stand-in answers one request with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TwilioAnswer {
    /// 201 with a new message sid.
    Created,
    /// Twilio's JSON error body with this status, code and message.
    Error(u16, u64, &'static str),
    /// A bare status, perhaps with `Retry-After`.
    Status(u16, Option<u64>),
    /// 201, but only after this long: a provider that times out.
    Slow(Duration),
}

/// One request the stand-in received, with the form fields of its body in order.
#[derive(Debug, Clone)]
pub(crate) struct TwilioRequest {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    form: Vec<(String, String)>,
    pub(crate) at: Instant,
    /// The sid answered, for a message it took.
    sid: Option<String>,
}

impl TwilioRequest {
    pub(crate) fn field(&self, name: &str) -> &str {
        self.form
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .unwrap_or_default()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Asserts the request is the one Twilio documents for sending a message: POST to the
    /// account's Messages.json, HTTP Basic with the account SID and auth token, a form body of
    /// exactly To, From, Body and StatusCallback.
    #[track_caller]
    pub(crate) fn assert_documented(&self, to: &str) {
        assert_eq!(self.method, "POST");
        assert_eq!(self.path, MESSAGES_PATH);
        let credentials = STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
        assert_eq!(self.header("authorization"), format!("Basic {credentials}"));
        assert_eq!(
            self.header("content-type"),
            "application/x-www-form-urlencoded"
        );
        let names: Vec<&str> = self.form.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(names, ["To", "From", "Body", "StatusCallback"]);
        assert_eq!(self.field("To"), to);
        assert_eq!(self.field("From"), FROM);
        let callback = self.field("StatusCallback");
        let update = callback
            .strip_prefix("https://status.example.com/inbound/sms/sms/status?update=")
            .unwrap_or_else(|| panic!("the receipt route with the update: {callback}"));
        assert!(update.parse::<ulid::Ulid>().is_ok(), "{callback}");
    }
}

#[derive(Default)]
struct TwilioState {
    received: Vec<TwilioRequest>,
    /// Answers to give, in order; once empty, every request is Created.
    script: VecDeque<TwilioAnswer>,
    /// Numbers Twilio calls invalid (21211), whatever the script says.
    invalid: Vec<String>,
    sids: u32,
}

/// An axum server on 127.0.0.1 that records every request and answers as Twilio does.
pub(crate) struct TwilioSink {
    pub(crate) url: String,
    state: Arc<Mutex<TwilioState>>,
    stop: Option<oneshot::Sender<()>>,
}

impl TwilioSink {
    pub(crate) async fn start(script: &[TwilioAnswer], invalid: &[&str]) -> Self {
        let state = Arc::new(Mutex::new(TwilioState {
            script: script.iter().copied().collect(),
            invalid: invalid.iter().map(|n| (*n).to_owned()).collect(),
            ..TwilioState::default()
        }));
        let handler_state = state.clone();
        // Every method and path is recorded, so a wrong one fails the test's assertions
        // rather than vanishing into a 404.
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = handler_state.clone();
                async move { answer(&state, method, uri, headers, body).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            state,
            stop: Some(stop),
        }
    }

    pub(crate) fn received(&self) -> Vec<TwilioRequest> {
        self.state.lock().unwrap().received.clone()
    }

    fn received_by(&self, to: &str) -> Vec<TwilioRequest> {
        self.received()
            .into_iter()
            .filter(|request| request.field("To") == to)
            .collect()
    }
}

impl Drop for TwilioSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn answer(
    state: &Mutex<TwilioState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let form = form_fields(&body);
    let (answer, sid) = {
        let mut state = state.lock().unwrap();
        let to = form
            .iter()
            .find(|(key, _)| key == "To")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        let answer = if state.invalid.contains(&to) {
            TwilioAnswer::Error(400, 21211, "The 'To' number is not a valid phone number.")
        } else {
            state.script.pop_front().unwrap_or(TwilioAnswer::Created)
        };
        let sid = match answer {
            TwilioAnswer::Created | TwilioAnswer::Slow(_) => {
                state.sids += 1;
                Some(format!("SM{:032x}", state.sids))
            }
            _ => None,
        };
        state.received.push(TwilioRequest {
            method: method.to_string(),
            path: uri.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            form,
            at: Instant::now(),
            sid: sid.clone(),
        });
        (answer, sid)
    };
    let created = |sid: Option<String>| {
        let body =
            serde_json::json!({ "sid": sid, "status": "queued", "account_sid": ACCOUNT_SID });
        (StatusCode::CREATED, axum::Json(body)).into_response()
    };
    match answer {
        TwilioAnswer::Created => created(sid),
        TwilioAnswer::Slow(delay) => {
            tokio::time::sleep(delay).await;
            created(sid)
        }
        TwilioAnswer::Error(status, code, message) => {
            let status = StatusCode::from_u16(status).unwrap();
            let body = serde_json::json!({
                "code": code,
                "message": message,
                "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
                "status": status.as_u16(),
            });
            (status, axum::Json(body)).into_response()
        }
        TwilioAnswer::Status(status, retry_after) => {
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            response
        }
    }
}

/// The fields of an `application/x-www-form-urlencoded` body, in order.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&format!(
        "http://form.invalid/?{}",
        String::from_utf8_lossy(body)
    ))
    .unwrap();
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

// ---- crier with an SMS channel --------------------------------------------------------------

/// crier with one Twilio channel, `sms`, sending to `base_url`.
pub(crate) fn twilio_crier(base_url: &str, extra: &str) -> Crier {
    let toml = format!(
        "kind = \"sms\"\nprovider = \"twilio\"\nbase_url = \"{base_url}\"\naccount_sid = \"{ACCOUNT_SID}\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"{FROM}\"\n{extra}"
    );
    Crier::new()
        .channel("sms", &toml)
        .with_env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
}

/// The SMS crier renders for an update to everyone with this headline and body.
fn sms_text(headline: &str, body: &str) -> String {
    format!("Example Mobile: {headline}\n{body}\n{STATUS_LINK}")
}

async fn provider_id(crier: &Crier, update: &str, phone: &str) -> Option<String> {
    use crier::delivery::{DeliveryKey, Recipient};
    let recipient = Recipient::Contact(crier::domain::Contact::parse(phone).unwrap());
    let key = DeliveryKey::new(update.parse().unwrap(), "sms", &recipient);
    let store = crier.store().await;
    let record = store
        .delivery(&key)
        .await
        .unwrap()
        .expect("the delivery is stored");
    record.provider_id
}

async fn failures(crier: &Crier) -> Vec<serde_json::Value> {
    let output = crier.run(&["deliveries", "--failed", "--json"]).await;
    output.assert_ok();
    output.json()["failures"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

// ---- Twilio ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_subscriber_of_two_orders_gets_one_sms_as_twilio_documents_and_its_sid_is_kept() {
    let twilio = TwilioSink::start(&[], &[]).await;
    let crier = twilio_crier(&twilio.url, "");
    crier.subscribe("AB-1001", "+447700900123").await;
    crier.subscribe("AB-1002", "+447700900123").await;
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["sms"]["sent"], 1, "{summary}");

    let received = twilio.received();
    assert_eq!(received.len(), 1, "one SMS, however many orders it follows");
    let request = &received[0];
    request.assert_documented("+447700900123");
    assert_eq!(
        request.field("Body"),
        sms_text("Activations delayed", "We're working on it.")
    );
    let update = summary["update"].as_str().unwrap();
    assert_eq!(
        provider_id(&crier, update, "+447700900123").await,
        request.sid,
        "Twilio's sid is the delivery's provider id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targeted_sms_names_the_order_it_concerns_and_the_promised_next_update() {
    let twilio = TwilioSink::start(&[], &[]).await;
    let crier = twilio_crier(&twilio.url, "");
    crier.subscribe("AB-1001", "+447700900123").await;
    crier.subscribe("AB-1002", "+447700900123").await;
    crier
        .send(
            &["--orders", "AB-1002", "--next-update-in", "2h"],
            "Your SIM is on its way.",
        )
        .await;
    let received = twilio.received();
    assert_eq!(received.len(), 1);
    let body = received[0].field("Body");
    assert!(
        body.starts_with("Example Mobile: Activations delayed\nYour order AB-1002:\nYour SIM is on its way.\nNext update by "),
        "{body}"
    );
    assert!(body.ends_with(&format!(".\n{STATUS_LINK}")), "{body}");

    crier
        .send(&["--orders", "AB-1001,AB-1002"], "Both are on their way.")
        .await;
    let received = twilio.received();
    assert_eq!(received.len(), 2, "still one SMS for two orders");
    assert_eq!(
        received[1].field("Body"),
        format!(
            "Example Mobile: Activations delayed\nYour orders AB-1001, AB-1002:\nBoth are on their way.\n{STATUS_LINK}"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_21211_is_dead_with_its_code_at_once_and_that_number_gets_no_more_sms() {
    let gone = "+447700900111";
    let kept = "+447700900222";
    let twilio = TwilioSink::start(&[], &[gone]).await;
    let crier = twilio_crier(&twilio.url, &format!("{FAST_RETRIES}{QUICK_RATE}"));
    crier.subscribe("AB-1001", gone).await;
    crier.subscribe("AB-1001", kept).await;

    let first = crier.send_partly(&[], "First.").await;
    assert_eq!(first["channels"]["sms"]["sent"], 1, "{first}");
    assert_eq!(first["channels"]["sms"]["dead"], 1, "{first}");
    assert_eq!(twilio.received_by(gone).len(), 1, "no retry");
    let failures = failures(&crier).await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    let failure = &failures[0];
    assert_eq!(failure["recipient"], gone);
    assert_eq!(failure["state"], "dead");
    assert_eq!(failure["attempts"], 1);
    assert_eq!(failure["last_code"], "21211");
    assert_eq!(failure["last_status"], 400);
    let reason = failure["last_error"].as_str().unwrap();
    assert!(reason.contains("error 21211: The 'To' number"), "{reason}");

    let second = crier.send(&[], "Second.").await;
    assert_eq!(second["channels"]["sms"]["sent"], 1, "{second}");
    assert_eq!(
        twilio.received_by(gone).len(),
        1,
        "a number Twilio called invalid gets nothing more"
    );
    assert_eq!(twilio.received_by(kept).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_retried_once_after_the_wait() {
    let twilio = TwilioSink::start(&[TwilioAnswer::Status(429, Some(1))], &[]).await;
    let crier = twilio_crier(&twilio.url, &format!("{FAST_RETRIES}{QUICK_RATE}"));
    crier.subscribe("AB-1001", "+447700900123").await;
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["sms"]["sent"], 1, "{summary}");
    let received = twilio.received();
    assert_eq!(received.len(), 2, "one retry");
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "the retry waited for Retry-After: {:?}",
        received[1].at - received[0].at
    );
    assert_eq!(received[0].form, received[1].form);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503s_are_retried_until_twilio_takes_the_message() {
    let twilio = TwilioSink::start(&[TwilioAnswer::Status(503, None); 3], &[]).await;
    let crier = twilio_crier(&twilio.url, &format!("{FAST_RETRIES}{QUICK_RATE}"));
    crier.subscribe("AB-1001", "+447700900123").await;
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["sms"]["sent"], 1, "{summary}");
    let received = twilio.received();
    assert_eq!(received.len(), 4);
    let update = summary["update"].as_str().unwrap();
    assert_eq!(
        provider_id(&crier, update, "+447700900123").await,
        received[3].sid
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_permanent_names_the_credentials_and_is_not_retried() {
    let twilio = TwilioSink::start(&[TwilioAnswer::Error(401, 20003, "Authenticate")], &[]).await;
    let crier = twilio_crier(&twilio.url, &format!("{FAST_RETRIES}{QUICK_RATE}"));
    crier.subscribe("AB-1001", "+447700900123").await;
    let summary = crier.send_to_no_avail("We're on it.").await;
    assert_eq!(summary["channels"]["sms"]["dead"], 1, "{summary}");
    assert_eq!(twilio.received().len(), 1, "no retry");
    let failures = failures(&crier).await;
    let reason = failures[0]["last_error"].as_str().unwrap();
    assert!(reason.contains("credentials"), "{reason}");
    assert_eq!(failures[0]["last_code"], "20003");
    assert_eq!(failures[0]["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_that_times_out_is_retried() {
    let twilio = TwilioSink::start(&[TwilioAnswer::Slow(Duration::from_secs(3))], &[]).await;
    let crier = twilio_crier(
        &twilio.url,
        &format!(
            "[delivery]\ntimeout = \"300ms\"\nbackoff_base = \"50ms\"\nbackoff_max = \"100ms\"\n{QUICK_RATE}"
        ),
    );
    crier.subscribe("AB-1001", "+447700900123").await;
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["sms"]["sent"], 1, "{summary}");
    let received = twilio.received();
    assert_eq!(
        received.len(),
        2,
        "one attempt timed out, the retry went through"
    );
    assert_eq!(received[0].form, received[1].form);
}

// ---- limits ---------------------------------------------------------------------------------

/// `crier preview --json` of an update to everyone with headline `H`.
async fn preview(crier: &Crier, body: &str) -> Output {
    crier
        .run(&["preview", "--json", "--headline", "H", body])
        .await
}

/// The SMS text and its encoding line, from a successful preview.
async fn previewed(crier: &Crier, body: &str) -> (String, String) {
    let output = preview(crier, body).await;
    output.assert_ok();
    let parts = output.json()["channels"]["sms"].clone();
    let part = |name: &str| {
        parts
            .as_array()
            .unwrap()
            .iter()
            .find(|part| part["part"] == name)
            .and_then(|part| part["text"].as_str())
            .unwrap_or_else(|| panic!("no {name} part: {parts}"))
            .to_owned()
    };
    (part("text"), part("encoding"))
}

/// How much the template adds around a body, in characters of GSM-7.
async fn overhead(crier: &Crier) -> usize {
    let (text, _) = previewed(crier, "x").await;
    text.chars().count() - 1
}

fn limits_crier(extra: &str) -> Crier {
    twilio_crier(&unused_url(), extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gsm7_fits_160_characters_in_one_segment_and_161_take_two() {
    let crier = limits_crier("");
    let room = 160 - overhead(&crier).await;
    let (text, encoding) = previewed(&crier, &"a".repeat(room)).await;
    assert_eq!(text.chars().count(), 160);
    assert_eq!(encoding, "GSM-7: 160 characters in 1 segment (at most 3)");
    let (_, encoding) = previewed(&crier, &"a".repeat(room + 1)).await;
    assert_eq!(encoding, "GSM-7: 161 characters in 2 segments (at most 3)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_full_segments_fit_and_one_character_more_is_refused_by_preview_and_send() {
    let twilio = TwilioSink::start(&[], &[]).await;
    let crier = twilio_crier(&twilio.url, "");
    crier.subscribe("AB-1001", "+447700900123").await;
    let room = 3 * 153 - overhead(&crier).await;
    let (text, encoding) = previewed(&crier, &"a".repeat(room)).await;
    assert_eq!(text.chars().count(), 459);
    assert_eq!(encoding, "GSM-7: 459 characters in 3 segments (at most 3)");

    let over = "a".repeat(room + 1);
    let expected = "channel sms: the SMS takes 4 segments, 460 characters in GSM-7; the limit is 3 \
                    segments (459 characters in GSM-7)";
    preview(&crier, &over).await.assert_user_error(expected);
    let sent = crier
        .run(&["send", "--yes", "--json", "--headline", "H", &over])
        .await;
    sent.assert_user_error(expected);
    let deliveries = crier.run(&["deliveries", "--json"]).await;
    assert_eq!(
        deliveries.json()["update"],
        serde_json::Value::Null,
        "nothing stored"
    );
    assert!(twilio.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_euro_sign_costs_two_septets() {
    let crier = limits_crier("");
    let room = 160 - overhead(&crier).await;
    let body = format!("{}€", "a".repeat(room - 2));
    let (text, encoding) = previewed(&crier, &body).await;
    assert_eq!(text.chars().count(), 159);
    assert_eq!(encoding, "GSM-7: 160 characters in 1 segment (at most 3)");
    let body = format!("{}€", "a".repeat(room - 1));
    let (text, encoding) = previewed(&crier, &body).await;
    assert_eq!(text.chars().count(), 160, "160 characters…");
    assert_eq!(
        encoding, "GSM-7: 161 characters in 2 segments (at most 3)",
        "…but 161 septets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_emoji_forces_ucs2_with_70_in_one_message_and_67_per_segment() {
    let crier = limits_crier("");
    let overhead = overhead(&crier).await;
    // The emoji is two UTF-16 units.
    let body = |units: usize| format!("{}🙂", "a".repeat(units - overhead - 2));
    let (_, encoding) = previewed(&crier, &body(70)).await;
    assert_eq!(
        encoding,
        "UCS-2 (because of 🙂 U+1F642): 70 characters in 1 segment (at most 3)"
    );
    let (_, encoding) = previewed(&crier, &body(71)).await;
    assert_eq!(
        encoding,
        "UCS-2 (because of 🙂 U+1F642): 71 characters in 2 segments (at most 3)"
    );
    let (_, encoding) = previewed(&crier, &body(134)).await;
    assert!(
        encoding.ends_with("134 characters in 2 segments (at most 3)"),
        "{encoding}"
    );
    let (_, encoding) = previewed(&crier, &body(201)).await;
    assert!(
        encoding.ends_with("201 characters in 3 segments (at most 3)"),
        "{encoding}"
    );
    preview(&crier, &body(202)).await.assert_user_error(
        "the SMS takes 4 segments, 202 characters in UCS-2 (because of 🙂 U+1F642)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_cuts_at_a_word_and_appends_the_status_link_within_one_segment() {
    let twilio = TwilioSink::start(&[], &[]).await;
    let crier = twilio_crier(&twilio.url, "max_segments = 1\noverflow = \"truncate\"\n");
    crier.subscribe("AB-1001", "+447700900123").await;
    let body = "We found the fault in the activation system and are fixing it now. ".repeat(5);
    let (text, encoding) = previewed(&crier, body.trim()).await;
    assert!(text.ends_with(&format!("... {STATUS_LINK}")), "{text}");
    assert!(
        text.starts_with("Example Mobile: H\nWe found the fault"),
        "{text}"
    );
    assert!(text.chars().count() <= 160, "{text}");
    assert!(encoding.starts_with("GSM-7: "), "{encoding}");
    assert!(
        encoding.ends_with(" in 1 segment (at most 1)"),
        "{encoding}"
    );

    crier
        .run(&["send", "--yes", "--headline", "H", body.trim()])
        .await
        .assert_ok();
    let received = twilio.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].field("Body"), text);
}

// ---- real Kannel ----------------------------------------------------------------------------

/// Where Debian's kannel-extras puts Kannel's fake SMSC client.
const FAKESMSC: &str = "/usr/lib/kannel/test/fakesmsc";
const KANNEL_USER: &str = "crier";
const KANNEL_PASSWORD: &str = "kannel-test-password";

/// A Kannel program: on the PATH, or where Debian puts it (/usr/sbin, which a CI user's PATH
/// may lack).
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: .ci/run installs Debian's kannel and kannel-extras")
        })
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// bearerbox, smsbox and fakesmsc, configured in a folder of their own on free ports of
/// 127.0.0.1; all three are killed when this is dropped.
struct Kannel {
    children: Vec<Child>,
    sendsms_port: u16,
    /// What fakesmsc logs, including every message the SMSC received.
    fakesmsc_log: PathBuf,
}

impl Kannel {
    async fn start(dir: &Path) -> Self {
        let bearerbox = program("bearerbox");
        let smsbox = program("smsbox");
        assert!(
            Path::new(FAKESMSC).exists(),
            "{FAKESMSC} is missing: .ci/run installs Debian's kannel-extras"
        );
        std::fs::create_dir_all(dir).unwrap();
        let (admin, boxes, smsc, sendsms) = (free_port(), free_port(), free_port(), free_port());
        let config = dir.join("kannel.conf");
        let log = |name: &str| dir.join(name).display().to_string();
        std::fs::write(
            &config,
            format!(
                r#"group = core
admin-port = {admin}
admin-password = kannel-admin
admin-interface = 127.0.0.1
smsbox-port = {boxes}
box-allow-ip = "127.0.0.1"
log-file = "{bearerbox_log}"
log-level = 1

group = smsc
smsc = fake
smsc-id = fake
port = {smsc}
connect-allow-ip = 127.0.0.1

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {boxes}
sendsms-port = {sendsms}
sendsms-interface = 127.0.0.1
log-file = "{smsbox_log}"
log-level = 1

group = sendsms-user
username = {KANNEL_USER}
password = {KANNEL_PASSWORD}
concatenation = true
max-messages = 10
"#,
                bearerbox_log = log("bearerbox.log"),
                smsbox_log = log("smsbox.log"),
            ),
        )
        .unwrap();
        let spawn = |program: &Path, args: &[&str], output: &str| {
            let output = std::fs::File::create(dir.join(output)).unwrap();
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(output.try_clone().unwrap())
                .stderr(output)
                .spawn()
                .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()))
        };
        let config = config.display().to_string();
        let mut kannel = Self {
            children: Vec::new(),
            sendsms_port: sendsms,
            fakesmsc_log: dir.join("fakesmsc.out"),
        };
        kannel
            .children
            .push(spawn(&bearerbox, &[&config], "bearerbox.out"));
        kannel.wait_for_port(admin, "bearerbox").await;
        kannel
            .children
            .push(spawn(&smsbox, &[&config], "smsbox.out"));
        kannel.wait_for_port(sendsms, "smsbox").await;
        // -v 0: fakesmsc logs every message it receives at debug level.
        let smsc = smsc.to_string();
        kannel.children.push(spawn(
            Path::new(FAKESMSC),
            &[
                "-H",
                "127.0.0.1",
                "-r",
                &smsc,
                "-m",
                "0",
                "-v",
                "0",
                "0 0 text unused",
            ],
            "fakesmsc.out",
        ));
        // Ready once bearerbox sees both the smsbox and the SMSC on line.
        let status_url = format!("http://127.0.0.1:{admin}/status.txt?password=kannel-admin");
        let client = reqwest::Client::new();
        let started = Instant::now();
        while !on_line(&client, &status_url).await {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Kannel did not come on line within 20 s; see {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        kannel
    }

    async fn wait_for_port(&mut self, port: u16, name: &str) {
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(child) = self.children.last_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{name} exited at start-up: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} did not listen on {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages the SMSC received so far, each reassembled from its lines and parts.
    fn received(&self) -> Vec<SmscMessage> {
        let log = std::fs::read_to_string(&self.fakesmsc_log).unwrap_or_default();
        parse_fakesmsc(&log)
    }

    /// Waits (at most 20 s) until the SMSC has received `count` messages.
    async fn wait_for(&self, count: usize) -> Vec<SmscMessage> {
        wait_until(Duration::from_secs(20), || self.received().len() >= count).await;
        self.received()
    }
}

/// Whether bearerbox's status page shows a box connection on-line and the SMSC online.
async fn on_line(client: &reqwest::Client, status_url: &str) -> bool {
    let Ok(response) = client.get(status_url).send().await else {
        return false;
    };
    let status = response.text().await.unwrap_or_default();
    status.contains("(on-line") && status.contains("(online")
}

impl Drop for Kannel {
    fn drop(&mut self) {
        // The clients first, so bearerbox stops without waiting for them.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One SMS as the SMSC received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SmscMessage {
    from: String,
    to: String,
    /// `text` (GSM-7 as text), `ucs-2`, or `udh` for a concatenated message's parts.
    kind: String,
    text: String,
    /// How many SMS it arrived as.
    parts: usize,
}

/// Reads fakesmsc's log: `Got message N: <from to type data>`, one per line the SMSC sent.
///
/// A `text` message's newlines split it over several log entries, so an entry that does not
/// start with a sender and a receiver continues the one before. A `udh` entry is one part of
/// a concatenated message (reference, total, sequence in its UDH); its parts are joined in
/// order. `ucs-2` data is UTF-16BE, URL-encoded.
fn parse_fakesmsc(log: &str) -> Vec<SmscMessage> {
    let mut messages: Vec<SmscMessage> = Vec::new();
    // Parts of concatenated messages not yet complete, by reference.
    let mut concatenated: BTreeMap<u8, Concatenated> = BTreeMap::new();
    for entry in log.lines().filter_map(|line| {
        let start = line.find("Got message ")?;
        let rest = &line[start..];
        let open = rest.find(": <")?;
        rest[open + 3..].strip_suffix('>')
    }) {
        let fields: Vec<&str> = entry.splitn(4, ' ').collect();
        let starts_message = fields.len() >= 3
            && fields[1].starts_with('+')
            && ["text", "ucs-2", "udh", "data"].contains(&fields[2]);
        if !starts_message {
            if let Some(last) = messages.last_mut() {
                last.text.push('\n');
                last.text.push_str(entry);
            }
            continue;
        }
        let (from, to, kind) = (fields[0].to_owned(), fields[1].to_owned(), fields[2]);
        let data = fields.get(3).copied().unwrap_or_default();
        match kind {
            "ucs-2" => messages.push(SmscMessage {
                from,
                to,
                kind: kind.into(),
                text: utf16be(&url_decode(data)),
                parts: 1,
            }),
            "udh" => {
                let (udh, rest) = data.split_once(" data ").expect("udh ... data ...");
                let udh = url_decode(udh);
                // 05 00 03 reference total sequence
                assert_eq!(&udh[..3], &[5, 0, 3], "a concatenation UDH: {udh:?}");
                let (reference, total, sequence) = (udh[3], udh[4], udh[5]);
                let entry = concatenated
                    .entry(reference)
                    .or_insert_with(|| Concatenated {
                        from,
                        to,
                        total,
                        parts: Vec::new(),
                    });
                entry.parts.push((sequence, url_decode(rest)));
                if entry.parts.len() == usize::from(entry.total)
                    && let Some(mut done) = concatenated.remove(&reference)
                {
                    done.parts.sort();
                    let bytes: Vec<u8> = done.parts.into_iter().flat_map(|(_, b)| b).collect();
                    messages.push(SmscMessage {
                        from: done.from,
                        to: done.to,
                        kind: kind.into(),
                        text: decode_parts(&bytes),
                        parts: usize::from(done.total),
                    });
                }
            }
            _ => messages.push(SmscMessage {
                from,
                to,
                kind: kind.into(),
                text: data.to_owned(),
                parts: 1,
            }),
        }
    }
    messages
}

/// The parts of one concatenated message received so far.
struct Concatenated {
    from: String,
    to: String,
    total: u8,
    /// (sequence, data), in the order they arrived.
    parts: Vec<(u8, Vec<u8>)>,
}

/// A concatenated message's data: UTF-16BE when it is UCS-2 (every other byte of ASCII is a
/// zero), else the text as Kannel keeps it.
fn decode_parts(bytes: &[u8]) -> String {
    if bytes.len().is_multiple_of(2) && bytes.first() == Some(&0) {
        utf16be(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

fn utf16be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks(2)
        .map(|pair| u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// Kannel's URL encoding: `%XX` bytes and `+` for a space.
fn url_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => decoded.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => decoded.push(b),
        }
        i += 1;
    }
    decoded
}

/// A receiver on 127.0.0.1 for the delivery reports Kannel sends back: it records each
/// request's path and query.
struct ReceiptSink {
    url: String,
    received: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl ReceiptSink {
    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = received.clone();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(uri.to_string());
                StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            received,
            stop: Some(stop),
        }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for ReceiptSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn kannel_channel(sendsms_port: u16, password_env: &str) -> String {
    format!(
        "kind = \"sms\"\nprovider = \"kannel\"\nbase_url = \"http://127.0.0.1:{sendsms_port}\"\nusername = \"{KANNEL_USER}\"\npassword_env = \"{password_env}\"\nfrom = \"ExampleMob\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kannel_delivers_gsm7_ucs2_and_three_segment_texts_and_reports_back() {
    let receipts = ReceiptSink::start().await;
    let crier = Crier::new()
        .with_env("KANNEL_PASSWORD", KANNEL_PASSWORD)
        .with_env("KANNEL_WRONG_PASSWORD", "not-the-password");
    // Kannel calls the receipt URL back, so the public URL is a receiver on 127.0.0.1.
    let config = std::fs::read_to_string(&crier.config).unwrap();
    std::fs::write(
        &crier.config,
        config.replace("https://status.example.com", &receipts.url),
    )
    .unwrap();
    let kannel = Kannel::start(&crier.path("kannel")).await;
    let crier = crier.channel(
        "sms",
        &kannel_channel(kannel.sendsms_port, "KANNEL_PASSWORD"),
    );
    let phone = "+447700900123";
    crier.subscribe("AB-1001", phone).await;
    let link = format!("{}/", receipts.url);
    let text = |headline: &str, body: &str| format!("Example Mobile: {headline}\n{body}\n{link}");

    // GSM-7, one SMS: its lines arrive as they are.
    let gsm = crier.send(&[], "We're working on it.").await;
    assert_eq!(gsm["channels"]["sms"]["sent"], 1, "{gsm}");
    let received = kannel.wait_for(1).await;
    assert_eq!(
        received[0],
        SmscMessage {
            from: "ExampleMob".into(),
            to: phone.into(),
            kind: "text".into(),
            text: text("Activations delayed", "We're working on it."),
            parts: 1,
        }
    );

    // UCS-2: coding=2, so the SMSC gets UTF-16.
    let ucs2 = crier
        .run(&["send", "--yes", "--json", "--headline", "Sorry", "Bald 🙂"])
        .await;
    ucs2.assert_ok();
    let ucs2 = ucs2.json();
    assert_eq!(ucs2["channels"]["sms"]["sent"], 1, "{ucs2}");
    let received = kannel.wait_for(2).await;
    assert_eq!(received[1].kind, "ucs-2", "{received:?}");
    assert_eq!(received[1].text, text("Sorry", "Bald 🙂"));

    // Three segments, joined again by their UDH.
    let long = "We found the fault in the activation system and are fixing it now. ".repeat(5);
    let long = long.trim();
    let (preview, encoding) = {
        let output = crier
            .run(&[
                "preview",
                "--json",
                "--headline",
                "Activations delayed",
                long,
            ])
            .await;
        output.assert_ok();
        let parts = output.json()["channels"]["sms"].clone();
        (
            parts[0]["text"].as_str().unwrap().to_owned(),
            parts[1]["text"].as_str().unwrap().to_owned(),
        )
    };
    assert!(encoding.contains("in 3 segments"), "{encoding}");
    let segmented = crier.send(&[], long).await;
    assert_eq!(segmented["channels"]["sms"]["sent"], 1, "{segmented}");
    let received = kannel.wait_for(3).await;
    assert_eq!(received[2].kind, "udh", "{received:?}");
    assert_eq!(received[2].parts, 3, "Kannel split it as crier counted");
    assert_eq!(received[2].text, preview);

    // Kannel calls back with a delivery report for each, through its escape codes.
    let update = gsm["update"].as_str().unwrap();
    let expected = format!("/inbound/sms/sms/status?update={update}&to=%2B447700900123&status=");
    assert!(
        wait_until(Duration::from_secs(20), || receipts
            .received()
            .iter()
            .any(|uri| uri.starts_with(&expected)))
        .await,
        "no delivery report like {expected}: {:?}",
        receipts.received()
    );

    // Wrong credentials: Kannel's 403, dead at once, and the reason says why.
    let crier = crier.channel(
        "sms",
        &kannel_channel(kannel.sendsms_port, "KANNEL_WRONG_PASSWORD"),
    );
    let refused = crier.send_to_no_avail("Fourth.").await;
    assert_eq!(refused["channels"]["sms"]["dead"], 1, "{refused}");
    let failures = failures(&crier).await;
    assert_eq!(failures[0]["last_status"], 403);
    let reason = failures[0]["last_error"].as_str().unwrap();
    assert!(reason.contains("credentials"), "{reason}");
    assert_eq!(kannel.received().len(), 3, "nothing more reached the SMSC");
}
