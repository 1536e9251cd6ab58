//! Inbound SMS through `crier serve`: STOP unsubscribes and START confirms, only when the
//! provider's proof holds (Twilio's signature, Kannel's shared secret); otherwise 403 and
//! nothing changes.

use crate::serve::serve;
use crate::support::{Crier, unused_url};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crier::domain::Contact;
use std::time::Duration;

const AUTH_TOKEN: &str = "fedcba9876543210fedcba9876543210";
const KANNEL_SECRET: &str = "kannel-inbound-secret-0123";
const PHONE: &str = "+447700900123";

fn twilio(crier: Crier) -> Crier {
    let base = unused_url();
    let base = base.trim_end_matches("/hooks");
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
            .contains("<Response></Response>")
    );
    stop(server).await;
    assert!(
        !phone_state(&crier).await.receives_updates(),
        "STOP unsubscribed the phone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yes_from_twilio_confirms_a_pending_phone() {
    let crier = twilio(Crier::new());
    crier
        .run(&["subscribe", "--order", "AB-1001", "--phone", PHONE])
        .await
        .assert_ok();
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let answer = twilio_post(&client, &server.base, "Yes", AUTH_TOKEN).await;
    assert_eq!(answer.status(), 200);
    stop(server).await;
    assert!(
        phone_state(&crier).await.receives_updates(),
        "YES confirmed it"
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
        "",
        "an empty answer: no reply SMS"
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
