//! Inbound SMS through `crier serve`: STOP unsubscribes and START confirms, only when the
//! provider's proof holds (Twilio's signature, Kannel's shared secret); otherwise 403 and
//! nothing changes.

use crate::serve::serve;
use crate::support::{ApiRequest, Crier, FakeApi, Reply, unused_url};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crier::delivery::{DeliveryKey, Recipient, ReportedOutcome};
use crier::domain::Contact;
use std::time::Duration;

const AUTH_TOKEN: &str = "fedcba9876543210fedcba9876543210";
const KANNEL_SECRET: &str = "kannel-inbound-secret-0123";
const PHONE: &str = "+447700900123";

fn twilio(crier: Crier) -> Crier {
    let base = unused_url();
    twilio_at(crier, base.trim_end_matches("/hooks"))
}

/// A Twilio SMS channel whose API is at `base`.
fn twilio_at(crier: Crier, base: &str) -> Crier {
    crier
        .channel(
            "sms",
            &format!(
                "kind = \"sms\"\nprovider = \"twilio\"\nbase_url = \"{base}\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"+447700900001\"\n"
            ),
        )
        .with_env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
}

fn kannel(crier: Crier) -> Crier {
    let base = unused_url();
    let base = base.trim_end_matches("/hooks");
    crier
        .channel(
            "texts",
            &format!(
                "kind = \"sms\"\nprovider = \"kannel\"\nbase_url = \"{base}\"\nusername = \"crier\"\npassword_env = \"KANNEL_PASSWORD\"\nfrom = \"ExampleMob\"\ninbound_secret_env = \"KANNEL_INBOUND\"\n"
            ),
        )
        .with_env("KANNEL_PASSWORD", "kannel-password")
        .with_env("KANNEL_INBOUND", KANNEL_SECRET)
}

/// Twilio's form POST, signed as Twilio signs it for the public URL crier is configured with.
async fn twilio_post(
    client: &reqwest::Client,
    base: &str,
    body: &str,
    token: &str,
) -> reqwest::Response {
    let params: Vec<(String, String)> = vec![
        ("MessageSid".into(), "SM0123".into()),
        ("From".into(), PHONE.into()),
        ("To".into(), "+447700900001".into()),
        ("Body".into(), body.into()),
    ];
    let signed_url = "https://status.example.com/inbound/sms/sms";
    let signature = STANDARD.encode(crier::web::inbound::twilio_signature(
        token, signed_url, &params,
    ));
    client
        .post(format!("{base}/inbound/sms/sms"))
        .header("x-twilio-signature", signature)
        .form(&params)
        .send()
        .await
        .unwrap()
}

async fn stop(mut server: crate::serve::Server) {
    let pid = server.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

async fn phone_state(crier: &Crier) -> crier::domain::Subscriber {
    crier
        .store()
        .await
        .subscriber(&Contact::parse(PHONE).unwrap())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_stop_from_twilio_unsubscribes_and_a_forged_one_changes_nothing() {
    let crier = twilio(Crier::new());
    crier.subscribe("AB-1001", PHONE).await;
    let server = serve(&crier).await;
    let client = reqwest::Client::new();

    let forged = twilio_post(
        &client,
        &server.base,
        "STOP",
        "0000000000000000000000000000000f",
    )
    .await;
    assert_eq!(forged.status(), 403);
    let unsigned = client
        .post(format!("{}/inbound/sms/sms", server.base))
        .form(&[("From", PHONE), ("Body", "STOP")])
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 403);

    let genuine = twilio_post(&client, &server.base, " stop ", AUTH_TOKEN).await;
    assert_eq!(genuine.status(), 200);
    assert_eq!(genuine.headers()["content-type"], "text/xml");
    assert!(
        genuine
            .text()
            .await
            .unwrap()
            .contains("<Response></Response>"),
        "Twilio answers its own STOP: crier adds no second reply"
    );
    stop(server).await;
    assert!(
        !phone_state(&crier).await.receives_updates(),
        "STOP unsubscribed the phone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_in_other_words_unsubscribes_and_is_confirmed_once() {
    for words in ["stop please", "ＳＴＯＰ", "revoke", "Arrêt", "STOP STOP"] {
        let crier = twilio(Crier::new());
        crier.subscribe("AB-1001", PHONE).await;
        let server = serve(&crier).await;
        let client = reqwest::Client::new();
        let answer = twilio_post(&client, &server.base, words, AUTH_TOKEN).await;
        assert_eq!(answer.status(), 200);
        let twiml = answer.text().await.unwrap();
        let replies = twiml.matches("<Message>").count();
        // Twilio's own handling answers its standard keywords (REVOKE among them); crier
        // answers the rest.
        let expected = if words == "revoke" { 0 } else { 1 };
        assert_eq!(replies, expected, "{words:?}: {twiml}");
        if expected == 1 {
            assert!(
                twiml.contains("<Message>Example Mobile: you will get no more texts from us. Reply START to get them again.</Message>"),
                "{twiml}"
            );
        }
        stop(server).await;
        assert!(
            !phone_state(&crier).await.receives_updates(),
            "{words:?} unsubscribed the phone"
        );
    }
    // A question is not an opt-out: nothing changes and nothing is answered.
    let crier = twilio(Crier::new());
    crier.subscribe("AB-1001", PHONE).await;
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let answer = twilio_post(&client, &server.base, "cancel my order", AUTH_TOKEN).await;
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains("<Response></Response>")
    );
    stop(server).await;
    assert!(phone_state(&crier).await.receives_updates());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yes_confirms_exactly_the_order_its_text_asked_about_never_one_a_stranger_added() {
    use crate::subscribe::{MESSAGES_PATH, sms_crier, submit};
    use crier::domain::FollowState;
    let (crier, twilio) = sms_crier().await;
    // A phone pending through the CLI was never asked anything by text: YES confirms nothing.
    crier
        .run(&["subscribe", "--order", "AB-1009", "--phone", PHONE])
        .await
        .assert_ok();
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let nothing = twilio_post(&client, &server.base, "Yes", AUTH_TOKEN).await;
    assert!(
        nothing
            .text()
            .await
            .unwrap()
            .contains("there is nothing to confirm"),
        "and says so"
    );
    // The owner asks for AB-1001; a stranger adds AB-1002 and AB-1003 for the same number.
    for order in ["AB-1001", "AB-1002", "AB-1003"] {
        let answer = submit(&server, &[("order", order), ("phone", PHONE)]).await;
        assert_eq!(answer.status(), 200);
        let texts = match order {
            "AB-1001" => 1,
            "AB-1002" => 2,
            _ => 3,
        };
        assert!(
            crate::support::wait_until(Duration::from_secs(20), || twilio
                .requests("POST", MESSAGES_PATH)
                .len()
                == texts)
            .await
        );
    }
    let first =
        String::from_utf8_lossy(&twilio.requests("POST", MESSAGES_PATH)[0].body).into_owned();
    let first: Vec<(String, String)> = form_urlencoded::parse(first.as_bytes())
        .into_owned()
        .collect();
    let text = &first.iter().find(|(k, _)| k == "Body").unwrap().1;
    assert!(
        text.contains("reply YES to get updates on order AB-1001"),
        "the text names its order and asks for a YES: {text}"
    );
    // Each question is recorded once its text is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Three texts asked: a bare YES does not say which, and confirms none.
    let which = twilio_post(&client, &server.base, "YES", AUTH_TOKEN).await;
    let which = which.text().await.unwrap();
    assert!(
        which.contains("we asked about orders AB-1001, AB-1002 and AB-1003. Reply YES and the order you want updates on, like YES AB-1001."),
        "{which}"
    );
    let mine = twilio_post(&client, &server.base, "yes ab-1001", AUTH_TOKEN).await;
    let mine = mine.text().await.unwrap();
    assert!(
        mine.contains("you will get updates on order AB-1001 by text. Reply STOP to stop them."),
        "{mine}"
    );
    stop(server).await;
    let phone = phone_state(&crier).await;
    let state = |order: &str| {
        phone
            .follow_of(&crate::support::order(order))
            .map(|f| f.state)
    };
    assert_eq!(state("AB-1001"), Some(FollowState::Confirmed));
    assert_eq!(
        state("AB-1002"),
        Some(FollowState::Pending),
        "the stranger's stays pending"
    );
    assert_eq!(state("AB-1003"), Some(FollowState::Pending));
    assert_eq!(state("AB-1009"), Some(FollowState::Pending));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_after_stop_brings_back_what_the_phone_had_confirmed() {
    let crier = twilio(Crier::new());
    crier.subscribe("AB-1001", PHONE).await;
    crier
        .run(&["subscribe", "--order", "AB-1002", "--phone", PHONE])
        .await
        .assert_ok();
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    twilio_post(&client, &server.base, "STOP", AUTH_TOKEN).await;
    let start = twilio_post(&client, &server.base, "START", AUTH_TOKEN).await;
    assert!(
        start
            .text()
            .await
            .unwrap()
            .contains("you will get updates on order AB-1001 by text"),
        "the reply names what came back"
    );
    stop(server).await;
    let phone = phone_state(&crier).await;
    assert!(phone.receives(&crate::support::order("AB-1001")));
    assert!(
        !phone.receives(&crate::support::order("AB-1002")),
        "an order the phone never confirmed stays unconfirmed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannels_forwarded_stop_needs_the_channels_secret() {
    let crier = kannel(Crier::new());
    crier.subscribe("AB-1001", PHONE).await;
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let url = |secret: &str| {
        format!(
            "{}/inbound/sms/texts?from=%2B447700900123&text=STOP&secret={secret}",
            server.base
        )
    };
    assert_eq!(client.get(url("wrong")).send().await.unwrap().status(), 403);
    let answer = client.get(url(KANNEL_SECRET)).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        "Example Mobile: you will get no more texts from us. Reply START to get them again.",
        "Kannel sends the answer back as the one confirmation of the opt-out"
    );
    assert_eq!(
        client
            .get(format!(
                "{}/inbound/sms/nosuch?from=%2B1&text=STOP",
                server.base
            ))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    stop(server).await;
    assert!(!phone_state(&crier).await.receives_updates());
}

/// Twilio's status callback for `update`'s message `sid`, signed for the callback URL crier
/// gave Twilio (the public URL, with the update in its query).
async fn twilio_status(
    client: &reqwest::Client,
    base: &str,
    update: &str,
    sid: &str,
    status: &str,
    token: &str,
) -> reqwest::Response {
    let params: Vec<(String, String)> = vec![
        (
            "AccountSid".into(),
            "AC0123456789abcdef0123456789abcdef".into(),
        ),
        ("ErrorCode".into(), "30003".into()),
        ("From".into(), "+447700900001".into()),
        ("MessageSid".into(), sid.into()),
        ("MessageStatus".into(), status.into()),
        ("To".into(), PHONE.into()),
    ];
    let signed_url = format!("https://status.example.com/inbound/sms/sms/status?update={update}");
    let signature = STANDARD.encode(crier::web::inbound::twilio_signature(
        token,
        &signed_url,
        &params,
    ));
    client
        .post(format!("{base}/inbound/sms/sms/status?update={update}"))
        .header("x-twilio-signature", signature)
        .form(&params)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_delivery_reports_are_recorded_and_three_undelivered_in_a_row_stop_the_phone() {
    let api = FakeApi::start(|_: &ApiRequest, earlier| {
        Reply::json(201, serde_json::json!({ "sid": format!("SM{earlier}") }))
    })
    .await;
    let crier = twilio_at(Crier::new(), &api.url);
    crier.subscribe("AB-1001", PHONE).await;
    let mut updates = Vec::new();
    for n in 0..3 {
        let sent = crier.send(&[], &format!("Update {n}.")).await;
        assert_eq!(sent["channels"]["sms"]["sent"], 1, "{sent}");
        updates.push(sent["update"].as_str().unwrap().to_owned());
    }
    let callbacks: Vec<String> = api
        .received()
        .iter()
        .map(|request| {
            form_urlencoded::parse(&request.body)
                .find(|(key, _)| key == "StatusCallback")
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let expected: Vec<String> = updates
        .iter()
        .map(|update| format!("https://status.example.com/inbound/sms/sms/status?update={update}"))
        .collect();
    assert_eq!(callbacks, expected, "each message says where to report");

    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let forged = twilio_status(
        &client,
        &server.base,
        &updates[0],
        "SM0",
        "delivered",
        "not-the-auth-token-0000000000000",
    )
    .await;
    assert_eq!(forged.status(), 403);
    for (n, update) in updates.iter().enumerate() {
        let sid = format!("SM{n}");
        for status in ["sent", "undelivered"] {
            let answer =
                twilio_status(&client, &server.base, update, &sid, status, AUTH_TOKEN).await;
            assert_eq!(answer.status(), 200, "{status}");
        }
    }
    let stray = twilio_status(
        &client,
        &server.base,
        &updates[0],
        "SMelse",
        "undelivered",
        AUTH_TOKEN,
    )
    .await;
    assert_eq!(
        stray.status(),
        200,
        "a report about no message of ours is ignored, not retried"
    );
    stop(server).await;

    let store = crier.store().await;
    let recipient = Recipient::Contact(Contact::parse(PHONE).unwrap());
    for update in &updates {
        let key = DeliveryKey::new(update.parse().unwrap(), "sms", &recipient);
        let record = store.delivery(&key).await.unwrap().unwrap();
        let report = record.report.expect("the report is on the delivery");
        assert_eq!(report.outcome, ReportedOutcome::Undelivered, "{update}");
        assert_eq!(report.status, "undelivered");
        assert_eq!(report.code.as_deref(), Some("30003"));
    }
    drop(store);
    let phone = phone_state(&crier).await;
    assert_eq!(phone.undelivered.get("sms"), Some(&3));
    assert!(
        phone.stopped_on.contains("sms"),
        "three undelivered in a row: no more texts to that number"
    );
    crier.send(&[], "Update 3.").await;
    assert_eq!(api.received().len(), 3, "no fourth text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kannel_delivery_report_without_the_channels_secret_is_refused() {
    let crier = kannel(Crier::new());
    let server = serve(&crier).await;
    let report = |secret: &str| {
        format!(
            "{}/inbound/sms/texts/status?update=01JDQ8Y1Z8X0000000000000BB&to=%2B447700900123&secret={secret}&status=2",
            server.base
        )
    };
    let client = reqwest::Client::new();
    let forged = client.get(report("guess")).send().await.unwrap();
    assert_eq!(forged.status(), 403);
    let genuine = client.get(report(KANNEL_SECRET)).send().await.unwrap();
    assert_eq!(
        genuine.status(),
        200,
        "genuine, about no message crier sent: ignored"
    );
    stop(server).await;
}
