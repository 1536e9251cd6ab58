//! Subscribing from the web: the form and its confirmation email or SMS, the confirm link
//! (a GET asks, a POST confirms), the CSRF token, the honeypot, the limit on confirmation
//! SMS, and support's links from `crier link`.

use crate::serve::{Server, serve};
use crate::support::{ApiRequest, Crier, FakeApi, LINK_SECRET, Reply, SmtpSink, wait_until};
use crier::domain::Contact;
use crier::domain::SubscriberState;
use crier::domain::token::{TokenPurpose, TokenSigner};
use mail_parser::MessageParser;
use std::collections::BTreeSet;
use std::time::Duration;

const PUBLIC_URL: &str = "https://status.example.com";

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub async fn stop(mut server: Server) {
    let pid = server.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("crier serve stopped within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Presses a link page's button: POSTs `confirm=yes` to the link, on the test's server.
pub async fn press_yes(server: &Server, link: &str) -> reqwest::Response {
    client()
        .post(local(server, link))
        .form(&[("confirm", "yes")])
        .send()
        .await
        .unwrap()
}

/// A page's link, on the test's server instead of the public site.
pub fn local(server: &Server, url: &str) -> String {
    let path = url
        .strip_prefix(PUBLIC_URL)
        .expect("a link to the public site");
    format!("{}{path}", server.base)
}

/// The CSRF token a form page carries, in its cookie and its hidden field.
pub struct FormToken {
    pub cookie: String,
    pub field: String,
}

fn form_token(response_headers: &reqwest::header::HeaderMap, html: &str) -> FormToken {
    let set_cookie = response_headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    // The public site is https, so the cookie is a __Host- one: Secure, Path=/, no Domain.
    assert!(
        set_cookie.starts_with("__Host-crier_csrf=")
            && set_cookie.contains("; Secure")
            && set_cookie.contains("; Path=/;")
            && !set_cookie.contains("Domain"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let field = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the form carries a CSRF field")
        .to_owned();
    FormToken { cookie, field }
}

pub async fn open_form(server: &Server, query: &str) -> (FormToken, String) {
    let page = client()
        .get(format!("{}/subscribe{query}", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let html = page.text().await.unwrap();
    (form_token(&headers, &html), html)
}

/// POSTs the form with these fields, and the cookie if given.
pub async fn post_form(
    server: &Server,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/subscribe", server.base))
        .form(fields);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

/// Opens the form and sends it with `fields` and its own CSRF token.
pub async fn submit(server: &Server, fields: &[(&str, &str)]) -> reqwest::Response {
    let (token, _) = open_form(server, "").await;
    let mut fields = fields.to_vec();
    fields.push(("csrf", &token.field));
    post_form(server, Some(&token.cookie), &fields).await
}

/// The confirm link in the text part of a confirmation email.
pub fn confirm_link(data: &str) -> String {
    let message = MessageParser::default().parse(data.as_bytes()).unwrap();
    let text = message.body_text(0).unwrap();
    text.split_whitespace()
        .find(|word| word.starts_with(&format!("{PUBLIC_URL}/confirm/")))
        .unwrap_or_else(|| panic!("no confirm link in:\n{text}"))
        .to_owned()
}

async fn subscriber(crier: &Crier, contact: &str) -> Option<crier::domain::Subscriber> {
    crier
        .store()
        .await
        .subscriber(&Contact::parse(contact).unwrap())
        .await
        .unwrap()
}

fn email_crier() -> (Crier, SmtpSink) {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    (crier.email(smtp.port, ""), smtp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_subscribes_confirms_with_a_post_and_then_receives_updates() {
    let (crier, smtp) = email_crier();
    let server = serve(&crier).await;
    let (token, html) = open_form(&server, "?order=AB-1001").await;
    assert!(
        html.contains("value=\"AB-1001\""),
        "the order is filled in: {html}"
    );
    let answer = post_form(
        &server,
        Some(&token.cookie),
        &[
            ("order", "ab-1001"),
            ("email", "Ann@Example.com"),
            ("phone", ""),
            ("website", ""),
            ("csrf", &token.field),
        ],
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert!(wait_until(Duration::from_secs(20), || smtp.count() == 1).await);
    let mail = smtp.messages().remove(0);
    assert_eq!(mail.rcpt_tos, ["ann@example.com"]);
    let link = confirm_link(&mail.data);
    let text = MessageParser::default()
        .parse(mail.data.as_bytes())
        .unwrap()
        .body_text(0)
        .unwrap()
        .into_owned();
    assert!(
        text.lines().any(|line| line
            .ends_with("If you did not ask, ignore this email: you get nothing more from us.")),
        "a sentence is not broken across lines: {text}"
    );

    // A mail scanner follows the link: that changes nothing.
    let page = client().get(local(&server, &link)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("a***@example.com") && html.contains("AB-1001"),
        "{html}"
    );
    assert!(
        !html.contains("ann@example.com"),
        "never the contact itself"
    );
    assert!(
        html.contains("<form method=\"post\""),
        "a button, not an action"
    );
    stop(server).await;
    let ann = subscriber(&crier, "ann@example.com").await.unwrap();
    assert_eq!(
        ann.state(),
        SubscriberState::Pending,
        "the GET confirmed nothing"
    );

    let server = serve(&crier).await;
    let done = press_yes(&server, &link).await;
    assert_eq!(done.status(), 200);
    stop(server).await;
    let ann = subscriber(&crier, "ann@example.com").await.unwrap();
    assert_eq!(ann.state(), SubscriberState::Confirmed);
    assert!(ann.orders().iter().any(|o| o.as_str() == "AB-1001"));

    crier.send(&[], "We're on it.").await;
    assert_eq!(
        smtp.per_recipient()["ann@example.com"],
        2,
        "the update reached ann"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_thanked_by_the_form_survives_a_kill_9_right_after_the_answer() {
    let (crier, _smtp) = email_crier();
    let mut server = serve(&crier).await;
    let answer = submit(
        &server,
        &[("order", "AB-1001"), ("email", "ann@example.com")],
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("Thank you"));
    // No grace: the process dies the moment the answer is read.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let ann = subscriber(&crier, "ann@example.com")
        .await
        .expect("the email was stored before the answer");
    assert_eq!(ann.state(), SubscriberState::Pending);
    assert_eq!(ann.orders().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_the_same_whether_or_not_the_order_and_contact_are_known() {
    let (crier, _smtp) = email_crier();
    crier.subscribe("AB-1001", "ann@example.com").await;
    let server = serve(&crier).await;
    let known = submit(
        &server,
        &[("order", "AB-1001"), ("email", "ann@example.com")],
    )
    .await;
    let unknown = submit(
        &server,
        &[("order", "ZZ-9999"), ("email", "zed@example.com")],
    )
    .await;
    assert_eq!(known.status(), unknown.status());
    let headers = |response: &reqwest::Response| {
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(name, _)| *name != "date")
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        headers
    };
    assert_eq!(headers(&known), headers(&unknown));
    assert_eq!(
        known.bytes().await.unwrap(),
        unknown.bytes().await.unwrap(),
        "byte for byte"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_a_matching_csrf_token_is_refused_with_403_and_stores_nothing() {
    let (crier, smtp) = email_crier();
    let server = serve(&crier).await;
    let fields = [("order", "AB-1001"), ("email", "ann@example.com")];
    let (first, _) = open_form(&server, "").await;
    let (second, _) = open_form(&server, "").await;
    let forged = TokenSigner::new(b"not the link secret at all").issue(
        TokenPurpose::Csrf,
        "nonce",
        chrono::Utc::now() + chrono::Duration::hours(1),
    );
    let forged_cookie = format!("__Host-crier_csrf={forged}");
    // A genuine token, planted without the prefix (as a plain-http page or a subdomain could).
    let unprefixed_cookie = format!("crier_csrf={}", first.field);
    for (cookie, field) in [
        (Some(unprefixed_cookie.as_str()), Some(first.field.as_str())),
        (None, None),
        (Some(first.cookie.as_str()), None),
        (None, Some(first.field.as_str())),
        (Some(first.cookie.as_str()), Some(second.field.as_str())),
        (Some(forged_cookie.as_str()), Some(forged.as_str())),
    ] {
        let mut fields = fields.to_vec();
        if let Some(field) = field {
            fields.push(("csrf", field));
        }
        let refused = post_form(&server, cookie, &fields).await;
        assert_eq!(refused.status(), 403, "{cookie:?} {field:?}");
        let html = refused.text().await.unwrap();
        assert!(html.contains("nothing was stored"), "{html}");
        assert!(
            html.contains("value=\"ann@example.com\""),
            "what was typed stays"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(server).await;
    assert_eq!(smtp.count(), 0);
    assert!(subscriber(&crier, "ann@example.com").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_order_email_or_phone_is_422_and_keeps_what_was_typed() {
    let (crier, twilio) = sms_crier().await;
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    let server = serve(&crier).await;
    let refused = submit(
        &server,
        &[
            ("order", "nope <1>"),
            ("email", "ann@example.com"),
            ("phone", "+44 7700 900123"),
        ],
    )
    .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert!(
        html.contains("value=\"nope &lt;1&gt;\""),
        "escaped, and kept: {html}"
    );
    assert!(html.contains("value=\"ann@example.com\""), "{html}");
    assert!(html.contains("value=\"+44 7700 900123\""), "{html}");
    assert!(html.contains("not an order number"), "{html}");

    let refused = submit(
        &server,
        &[("order", "AB-1001"), ("email", "ann@"), ("phone", "12")],
    )
    .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert!(html.contains("not an email address"), "{html}");
    assert!(html.contains("not a mobile number"), "{html}");
    assert!(html.contains("value=\"AB-1001\""), "{html}");

    let refused = submit(&server, &[("order", "AB-1001")]).await;
    assert_eq!(refused.status(), 422, "a contact is needed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(server).await;
    assert_eq!(smtp.count(), 0);
    assert!(twilio.received().is_empty());
    assert!(subscriber(&crier, "ann@example.com").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_form_offers_only_what_a_channel_can_confirm_and_never_promises_a_message_it_cannot_send()
 {
    // Email only: no mobile number on the form, and one given anyway is refused, not thanked.
    let (crier, smtp) = email_crier();
    let server = serve(&crier).await;
    let (_, form) = open_form(&server, "").await;
    assert!(form.contains("id=\"email\""), "{form}");
    assert!(!form.contains("id=\"phone\""), "{form}");
    assert!(
        form.contains("Every email has a link to stop them."),
        "{form}"
    );
    assert!(
        !form.contains("STOP"),
        "no texts, so no word about replying STOP: {form}"
    );
    let refused = submit(
        &server,
        &[("order", "AB-1001"), ("phone", "+44 7700 900123")],
    )
    .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert!(
        html.contains("We cannot send text messages yet: give an email address instead."),
        "{html}"
    );
    assert!(!html.contains("on its way"), "{html}");
    stop(server).await;
    assert!(subscriber(&crier, "+447700900123").await.is_none());
    assert_eq!(smtp.count(), 0);

    // SMS only: no email field, and the note says how to stop texts.
    let (crier, twilio) = sms_crier().await;
    let server = serve(&crier).await;
    let (_, form) = open_form(&server, "").await;
    assert!(!form.contains("id=\"email\""), "{form}");
    assert!(form.contains("id=\"phone\""), "{form}");
    assert!(
        form.contains("by text message, as soon as we post it"),
        "{form}"
    );
    assert!(form.contains("reply STOP to any text"), "{form}");
    let refused = submit(
        &server,
        &[("order", "AB-1001"), ("email", "ann@example.com")],
    )
    .await;
    assert_eq!(refused.status(), 422);
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("We cannot send email updates yet: give a mobile number instead.")
    );
    stop(server).await;
    assert!(twilio.received().is_empty());

    // Neither: no form at all, and a post is refused.
    let crier = Crier::new().status_page();
    let server = serve(&crier).await;
    let page = client()
        .get(format!("{}/subscribe", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(!page.contains("<form"), "{page}");
    assert!(page.contains("You cannot subscribe here yet."), "{page}");
    let refused = post_form(
        &server,
        None,
        &[("order", "AB-1001"), ("email", "ann@example.com")],
    )
    .await;
    assert!(refused.status().is_client_error());
    assert!(!refused.text().await.unwrap().contains("on its way"));
    stop(server).await;
    assert!(subscriber(&crier, "ann@example.com").await.is_none());

    // A note of one's own replaces crier's.
    let (crier, _smtp) = email_crier();
    let config = std::fs::read_to_string(&crier.config).unwrap().replace(
        "[brand]\n",
        "[brand]\nsubscribe_note = \"We keep it for 90 days. Write to privacy@example.com to stop.\"\n",
    );
    std::fs::write(&crier.config, config).unwrap();
    let server = serve(&crier).await;
    let (_, form) = open_form(&server, "").await;
    assert!(
        form.contains("We keep it for 90 days. Write to privacy@example.com to stop."),
        "{form}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_wrong_purpose_confirm_links_are_400_and_change_nothing() {
    let (crier, _smtp) = email_crier();
    crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "ann@example.com",
        ])
        .await
        .assert_ok();
    let server = serve(&crier).await;
    let now = chrono::Utc::now();
    let signer = TokenSigner::new(LINK_SECRET);
    let subject = "AB-1001\nann@example.com";
    let tokens = [
        TokenSigner::new(b"another secret, not crier's").issue(
            TokenPurpose::Confirm,
            subject,
            now + chrono::Duration::days(1),
        ),
        signer.issue(
            TokenPurpose::Confirm,
            subject,
            now - chrono::Duration::seconds(1),
        ),
        signer.issue(
            TokenPurpose::SupportLink,
            subject,
            now + chrono::Duration::days(1),
        ),
        signer.issue(
            TokenPurpose::Unsubscribe,
            "ann@example.com",
            now + chrono::Duration::days(1),
        ),
        "garbage".to_owned(),
    ];
    for token in &tokens {
        let url = format!("{}/confirm/{token}", server.base);
        let page = client().get(&url).send().await.unwrap();
        assert_eq!(page.status(), 400);
        assert!(page.text().await.unwrap().contains("Nothing was changed"));
        let posted = client()
            .post(&url)
            .form(&[("confirm", "yes")])
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 400);
    }
    stop(server).await;
    let ann = subscriber(&crier, "ann@example.com").await.unwrap();
    assert_eq!(ann.state(), SubscriberState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filled_in_honeypot_gets_the_usual_answer_and_nothing_is_done() {
    let (crier, smtp) = email_crier();
    let server = serve(&crier).await;
    let fine = submit(
        &server,
        &[("order", "AB-1001"), ("email", "bob@example.com")],
    )
    .await;
    assert_eq!(fine.status(), 200);
    let fine = fine.text().await.unwrap();
    let bot = submit(
        &server,
        &[
            ("order", "AB-1001"),
            ("email", "ann@example.com"),
            ("website", "https://spam.example"),
        ],
    )
    .await;
    assert_eq!(bot.status(), 200);
    assert_eq!(bot.text().await.unwrap(), fine, "the bot cannot tell");
    assert!(wait_until(Duration::from_secs(20), || smtp.count() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(server).await;
    assert_eq!(smtp.per_recipient().get("ann@example.com"), None);
    assert!(subscriber(&crier, "ann@example.com").await.is_none());
}

const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const MESSAGES_PATH: &str =
    "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";

/// crier with one Twilio SMS channel, against a stand-in that accepts every message.
pub async fn sms_crier() -> (Crier, FakeApi) {
    sms_crier_with("").await
}

/// The same, with `extra` lines in the channel's file.
async fn sms_crier_with(extra: &str) -> (Crier, FakeApi) {
    let twilio = FakeApi::start(|_: &ApiRequest, earlier| {
        Reply::json(
            201,
            serde_json::json!({ "sid": format!("SM{earlier:032x}"), "status": "queued" }),
        )
    })
    .await;
    let toml = format!(
        "kind = \"sms\"\nprovider = \"twilio\"\nbase_url = \"{}\"\naccount_sid = \"{ACCOUNT_SID}\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"+447700900000\"\n{extra}",
        twilio.url
    );
    let crier = Crier::new()
        .channel("sms", &toml)
        .with_env("TWILIO_AUTH_TOKEN", "fedcba9876543210fedcba9876543210");
    (crier, twilio)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phone_gets_at_most_three_confirmation_sms_an_hour() {
    let (crier, twilio) = sms_crier().await;
    let server = serve(&crier).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        let answer = submit(
            &server,
            &[("order", "AB-1001"), ("phone", "+44 7700 900123")],
        )
        .await;
        assert_eq!(answer.status(), 200);
        answers.push(answer.text().await.unwrap());
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "over the limit, the same page"
    );
    assert!(
        wait_until(Duration::from_secs(20), || twilio
            .requests("POST", MESSAGES_PATH)
            .len()
            == 3)
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = twilio.requests("POST", MESSAGES_PATH);
    assert_eq!(sent.len(), 3, "the fourth and fifth were not sent");
    let body = String::from_utf8_lossy(&sent[0].body).into_owned();
    assert!(body.contains("To=%2B447700900123"), "{body}");
    assert!(
        body.contains("%2Fconfirm%2F"),
        "the SMS carries the confirm link: {body}"
    );
    stop(server).await;
    let phone = subscriber(&crier, "+447700900123").await.unwrap();
    assert_eq!(phone.state(), SubscriberState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_link_for_an_order_opens_the_form_with_the_order_filled_in() {
    let (crier, _smtp) = email_crier();
    let output = crier.run(&["link", "--order", "ab-1001"]).await;
    output.assert_ok();
    let link = output.stdout.trim().to_owned();
    assert!(link.starts_with(&format!("{PUBLIC_URL}/s/")), "{link}");
    crier
        .run(&["link", "--order", "AB-1001", "--expires", "1000d"])
        .await
        .assert_user_error("90 days");
    let both = crier
        .run(&[
            "link",
            "--order",
            "AB-1001",
            "--email",
            "a@example.com",
            "--phone",
            "+447700900123",
        ])
        .await;
    assert_ne!(both.code, 0, "one contact at most");

    let server = serve(&crier).await;
    let page = client().get(local(&server, &link)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let html = page.text().await.unwrap();
    assert!(html.contains("value=\"AB-1001\""), "{html}");
    let token = form_token(&headers, &html);
    assert!(!token.field.is_empty());
    let not_a_button = press_yes(&server, &link).await;
    assert_eq!(
        not_a_button.status(),
        400,
        "a link without a contact subscribes nobody"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_link_for_a_contact_subscribes_it_confirmed_with_one_button() {
    let (crier, smtp) = email_crier();
    let output = crier
        .run(&[
            "link",
            "--order",
            "AB-1001",
            "--email",
            "bob@example.com",
            "--expires",
            "2d",
        ])
        .await;
    output.assert_ok();
    let link = output.stdout.trim().to_owned();

    let server = serve(&crier).await;
    let page = client().get(local(&server, &link)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("b***@example.com") && html.contains("<form method=\"post\""),
        "{html}"
    );
    let done = press_yes(&server, &link).await;
    assert_eq!(done.status(), 200);
    stop(server).await;
    let bob = subscriber(&crier, "bob@example.com").await.unwrap();
    assert_eq!(
        bob.state(),
        SubscriberState::Confirmed,
        "no second confirmation"
    );
    assert_eq!(smtp.count(), 0, "and no confirmation email");
}

/// A support link for AB-1001 that names `email`, as `crier link` prints it.
async fn support_link(crier: &Crier, email: &str) -> String {
    let output = crier
        .run(&["link", "--order", "AB-1001", "--email", email])
        .await;
    output.assert_ok();
    output.stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_link_made_before_an_opt_out_no_longer_subscribes_anyone() {
    let (crier, _smtp) = email_crier();
    let old = support_link(&crier, "bob@example.com").await;
    crier.subscribe("AB-1001", "bob@example.com").await;
    // Links carry their time to the second: the opt-out comes in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crier
        .run(&["unsubscribe", "--email", "bob@example.com"])
        .await
        .assert_ok();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let server = serve(&crier).await;
    let page = client().get(local(&server, &old)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("You stopped these updates after this link was sent")
            && !html.contains("<form method=\"post\""),
        "{html}"
    );
    let replayed = press_yes(&server, &old).await;
    assert_eq!(
        replayed.status(),
        410,
        "a link from before the opt-out is void"
    );
    stop(server).await;
    let bob = subscriber(&crier, "bob@example.com").await.unwrap();
    assert_eq!(
        bob.state(),
        SubscriberState::Unsubscribed,
        "nothing changed"
    );
    // A new link is a new request: it brings the order back.
    let new = support_link(&crier, "bob@example.com").await;
    let server = serve(&crier).await;
    let done = press_yes(&server, &new).await;
    assert_eq!(done.status(), 200);
    stop(server).await;
    let bob = subscriber(&crier, "bob@example.com").await.unwrap();
    assert!(bob.receives(&crate::support::order("AB-1001")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirming_ones_own_order_does_not_confirm_orders_someone_else_added_meanwhile() {
    use base64::Engine as _;
    let (crier, smtp) = email_crier();
    let server = serve(&crier).await;
    let fields = |order: &'static str| {
        [
            ("order", order),
            ("email", "ann@example.com"),
            ("phone", ""),
            ("website", ""),
        ]
    };
    // Ann asks for AB-1001; someone else, knowing her address, adds AB-2002.
    assert_eq!(submit(&server, &fields("AB-1001")).await.status(), 200);
    assert!(wait_until(Duration::from_secs(20), || smtp.count() == 1).await);
    assert_eq!(submit(&server, &fields("AB-2002")).await.status(), 200);
    assert!(wait_until(Duration::from_secs(20), || smtp.count() == 2).await);
    let own = smtp
        .messages()
        .into_iter()
        .map(|mail| confirm_link(&mail.data))
        .find(|link| {
            let token = link.rsplit('/').next().unwrap();
            String::from_utf8_lossy(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(token.split('.').next().unwrap())
                    .unwrap(),
            )
            .contains("AB-1001")
        })
        .expect("the confirmation for AB-1001");
    let done = press_yes(&server, &own).await;
    assert_eq!(done.status(), 200);
    stop(server).await;
    let ann = subscriber(&crier, "ann@example.com").await.unwrap();
    assert_eq!(ann.state(), SubscriberState::Confirmed);
    let orders: Vec<String> = ann
        .confirmed_orders()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(orders, ["AB-1001"], "only the order she confirmed");
    let added = ann.follow_of(&crate::support::order("AB-2002")).unwrap();
    assert_eq!(
        added.state,
        crier::domain::FollowState::Pending,
        "the other waits for its own link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_that_unsubscribed_gets_no_text_from_the_form() {
    let (crier, twilio) = sms_crier().await;
    crier.subscribe("AB-1001", "+447700900123").await;
    crier
        .run(&["unsubscribe", "--phone", "+447700900123"])
        .await
        .assert_ok();
    let server = serve(&crier).await;
    let answer = submit(
        &server,
        &[("order", "AB-1001"), ("phone", "+44 7700 900123")],
    )
    .await;
    assert_eq!(answer.status(), 200, "the usual answer");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        twilio.requests("POST", MESSAGES_PATH).is_empty(),
        "a phone that said STOP is not texted by a form anyone can fill in"
    );
    stop(server).await;
}

/// POSTs the form for `phone` as if a proxy on 127.0.0.1 had forwarded it from `forwarded_for`.
async fn submit_forwarded(server: &Server, phone: &str, forwarded_for: &str) -> reqwest::Response {
    let (token, _) = open_form(server, "").await;
    client()
        .post(format!("{}/subscribe", server.base))
        .header("cookie", &token.cookie)
        .header("x-forwarded-for", forwarded_for)
        .form(&[
            ("order", "AB-1001"),
            ("phone", phone),
            ("csrf", &token.field),
        ])
        .send()
        .await
        .unwrap()
}

/// The numbers the SMS stand-in was asked to text.
fn texted(twilio: &FakeApi) -> BTreeSet<String> {
    twilio
        .requests("POST", MESSAGES_PATH)
        .iter()
        .filter_map(|request| {
            form_urlencoded::parse(&request.body)
                .find(|(key, _)| key == "To")
                .map(|(_, to)| to.into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_limit_counts_each_forwarded_client_and_texts_stay_in_the_listed_countries()
 {
    let (crier, twilio) = sms_crier_with("countries = [\"GB\"]\n").await;
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str("[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1\"]\n");
    std::fs::write(&crier.config, config).unwrap();
    let server = serve(&crier).await;

    // 21 numbers from one client behind the proxy: the 21st is over the client's 20 an hour.
    let numbers: Vec<String> = (0..21).map(|n| format!("+44770090{n:04}")).collect();
    for number in &numbers {
        let answer = submit_forwarded(&server, number, "203.0.113.66, 198.51.100.1").await;
        assert_eq!(answer.status(), 200);
    }
    // Another client behind the same proxy has its own allowance, whatever it prepends.
    let other = "+447700901999";
    let answer = submit_forwarded(&server, other, "198.51.100.1, 198.51.100.2").await;
    assert_eq!(answer.status(), 200);
    // A US number: the form answers as ever, and the channel, which texts only GB, sends nothing.
    let abroad = "+12015550123";
    let answer = submit_forwarded(&server, abroad, "198.51.100.3").await;
    assert_eq!(answer.status(), 200);

    assert!(
        wait_until(Duration::from_secs(30), || texted(&twilio).len() == 21).await,
        "texted {:?}",
        texted(&twilio)
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut expected: BTreeSet<String> = numbers[..20].iter().cloned().collect();
    expected.insert(other.to_owned());
    assert_eq!(texted(&twilio), expected);
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("over the limit"), "{log}");
    assert!(
        log.contains("confirmation not sent contact=+12******123"),
        "{log}"
    );
    assert!(!log.contains("5550123"), "no number in the log: {log}");
    stop(server).await;
}
