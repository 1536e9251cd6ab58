//! Crash safety: `kill -9` in the middle of a send loses nothing, and duplicates at most what
//! was in flight; Ctrl-C stops cleanly and `crier dispatch` finishes the job.

use crate::support::{Crier, SmtpSink, wait_until};
use chrono::Utc;
use crier::domain::{Contact, OrderNumber, OrderPattern};
use std::time::Duration;

const SUBSCRIBERS: usize = 2_000;
const CONCURRENCY: usize = 8;

async fn seed_subscribers(crier: &Crier, count: usize) {
    let store = crier.store().await;
    let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4,10}").unwrap();
    for i in 0..count {
        let contact = Contact::parse(&format!("customer{i}@example.com")).unwrap();
        let order = OrderNumber::parse(&format!("AB-{}", 100_000 + i), &pattern).unwrap();
        store
            .subscribe(
                &contact,
                &order,
                true,
                crier::domain::FollowVia::Operator,
                Utc::now(),
            )
            .await
            .unwrap();
    }
}

fn slow_email(crier: Crier, port: u16) -> Crier {
    crier.email(port, &format!("[delivery]\nconcurrency = {CONCURRENCY}\n"))
}

/// Starts `crier send` to `count` seeded subscribers against a slow SMTP sink, and returns
/// once a quarter of them have their email, with the send still running.
async fn send_until_a_quarter_is_out(count: usize) -> (Crier, SmtpSink, tokio::process::Child) {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 15);
    let crier = slow_email(crier, smtp.port);
    seed_subscribers(&crier, count).await;

    let mut send = crier
        .command(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "We're working on it.",
        ])
        .spawn()
        .unwrap();
    let midway = wait_until(Duration::from_secs(120), || {
        assert!(
            send.try_wait().unwrap().is_none(),
            "send ended before it was stopped"
        );
        smtp.count() >= count / 4
    })
    .await;
    assert!(midway, "the send got a quarter of the way");
    (crier, smtp, send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_killed_mid_way_loses_nothing_and_duplicates_at_most_what_was_in_flight() {
    let (crier, smtp, mut send) = send_until_a_quarter_is_out(SUBSCRIBERS).await;
    send.start_kill().unwrap(); // SIGKILL: no chance to tidy up
    let status = send.wait().await.unwrap();
    assert!(!status.success());
    let at_kill = smtp.count();
    assert!(
        at_kill < SUBSCRIBERS,
        "killed before it finished ({at_kill} sent)"
    );

    let dispatch = crier.run(&["dispatch", "--json"]).await;
    dispatch.assert_ok();
    assert_eq!(
        dispatch.json()["channels"]["email"]["sent"],
        SUBSCRIBERS as u64
    );

    let per_recipient = smtp.per_recipient();
    assert_eq!(
        per_recipient.len(),
        SUBSCRIBERS,
        "every subscriber got the update"
    );
    let duplicates: usize = per_recipient.values().map(|n| n - 1).sum();
    println!("killed after {at_kill} emails; {duplicates} duplicate(s) after dispatch");
    assert!(
        duplicates <= CONCURRENCY,
        "{duplicates} duplicates, but at most {CONCURRENCY} were in flight"
    );
}

/// Starts a send to `count` subscribers, sends it `signal` a quarter of the way through, and
/// checks that it stops cleanly and that `crier dispatch` delivers the rest exactly once.
async fn stop_midway_then_dispatch(signal: &str, count: usize) {
    let (crier, smtp, mut send) = send_until_a_quarter_is_out(count).await;
    let pid = send.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(60), send.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130), "a clean stop exits with 130");
    assert!(smtp.count() < count, "it stopped early");

    let counts = crier.run(&["deliveries", "--json"]).await.json();
    assert_eq!(
        counts["channels"]["email"]["in_flight"], 0,
        "in-flight work finished: {counts}"
    );

    crier.run(&["dispatch"]).await.assert_ok();
    let per_recipient = smtp.per_recipient();
    assert_eq!(per_recipient.len(), count);
    assert!(
        per_recipient.values().all(|n| *n == 1),
        "a clean stop duplicates nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_send_cleanly_and_dispatch_delivers_the_rest_without_duplicates() {
    stop_midway_then_dispatch("-INT", SUBSCRIBERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_send_as_cleanly_as_ctrl_c() {
    stop_midway_then_dispatch("-TERM", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_killed_mid_way_with_sms_configured_too_loses_no_email_and_no_sms() {
    const COUNT: usize = 600;
    let twilio = crate::sms::TwilioSink::start(&[], &[]).await;
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 15);
    let crier = slow_email(crier, smtp.port)
        .channel(
            "sms",
            &format!(
                "kind = \"sms\"\nprovider = \"twilio\"\nbase_url = \"{}\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"+447700900000\"\n[delivery]\nconcurrency = 4\nrate = \"1000/s\"\n",
                twilio.url
            ),
        )
        .with_env("TWILIO_AUTH_TOKEN", "fedcba9876543210fedcba9876543210");
    {
        let store = crier.store().await;
        let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4,10}").unwrap();
        for i in 0..COUNT {
            let order = OrderNumber::parse(&format!("AB-{}", 100_000 + i), &pattern).unwrap();
            for contact in [
                format!("customer{i}@example.com"),
                format!("+4477009{:05}", i),
            ] {
                let contact = Contact::parse(&contact).unwrap();
                store
                    .subscribe(
                        &contact,
                        &order,
                        true,
                        crier::domain::FollowVia::Operator,
                        Utc::now(),
                    )
                    .await
                    .unwrap();
            }
        }
    }
    let mut send = crier
        .command(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "On it.",
        ])
        .spawn()
        .unwrap();
    let midway = wait_until(Duration::from_secs(120), || smtp.count() >= COUNT / 4).await;
    assert!(midway, "the send got a quarter of the way");
    send.start_kill().unwrap();
    send.wait().await.unwrap();

    crier.run(&["dispatch"]).await.assert_ok();
    let emails = smtp.per_recipient();
    assert_eq!(emails.len(), COUNT, "every email subscriber got the update");
    let mut texts: std::collections::BTreeMap<String, usize> = Default::default();
    for request in twilio.received() {
        *texts.entry(request.field("To").to_owned()).or_default() += 1;
    }
    assert_eq!(texts.len(), COUNT, "every phone got its SMS");
    let duplicates: usize = emails.values().map(|n| n - 1).sum::<usize>()
        + texts.values().map(|n| n - 1).sum::<usize>();
    println!("{duplicates} duplicate(s) after the kill");
    assert!(
        duplicates <= CONCURRENCY + 4,
        "{duplicates} duplicates, but at most {} were in flight",
        CONCURRENCY + 4
    );
}
