//! Signed webhooks to a real HTTP receiver, checked to the Standard Webhooks specification.

use crate::support::{
    Answer, Crier, FAST_RETRIES, ReceivedHook, WEBHOOK_KEY, WebhookSink, unused_url, webhook_secret,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Checks the signature against one recomputed from the specification, independently of
/// crier's code.
#[track_caller]
fn assert_signed(hook: &ReceivedHook) {
    let (id, timestamp) = (hook.header("webhook-id"), hook.header("webhook-timestamp"));
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_KEY).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&hook.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(hook.header("webhook-signature"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_gets_one_post_signed_to_the_standard_webhooks_spec() {
    let sink = WebhookSink::start(&[]).await;
    let crier = Crier::new().webhook(&sink.url, "");
    let summary = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    assert_eq!(summary["channels"]["partners"]["sent"], 1);

    let received = sink.received();
    assert_eq!(received.len(), 1);
    let hook = &received[0];
    let update = summary["update"].as_str().unwrap();
    assert_eq!(hook.header("webhook-id"), format!("{update}/partners/-"));
    assert_eq!(hook.header("content-type"), "application/json");
    let timestamp: i64 = hook
        .header("webhook-timestamp")
        .parse()
        .expect("unix seconds");
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 120);
    assert_signed(hook);

    // The official Standard Webhooks library accepts it too.
    let verifier = standardwebhooks::Webhook::new(&webhook_secret()).unwrap();
    let mut headers = http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        headers.insert(name, hook.header(name).parse().unwrap());
    }
    verifier
        .verify(&hook.body, &headers)
        .expect("the official library verifies the signature");

    let body = hook.json();
    assert_eq!(body["type"], "update.published");
    assert!(body["timestamp"].as_str().is_some());
    assert_eq!(body["data"]["update"]["id"], update);
    assert_eq!(body["data"]["update"]["headline"], "Activations delayed");
    assert_eq!(body["data"]["update"]["body"], "We're working on it.");
    assert!(body["data"]["update"]["next_update_by"].as_str().is_some());
    assert_eq!(body["data"]["incident"]["id"], summary["incident"]);
    assert_eq!(body["data"]["targeted"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_or_503_is_retried_after_retry_after_with_the_same_webhook_id() {
    let sink = WebhookSink::start(&[Answer::retry_after(503, 1), Answer::status(429)]).await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);
    let started = std::time::Instant::now();
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["partners"]["sent"], 1);

    let received = sink.received();
    let answers: Vec<u16> = received.iter().map(|h| h.answered).collect();
    assert_eq!(answers, [503, 429, 204]);
    let ids: Vec<&str> = received.iter().map(|h| h.header("webhook-id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    for hook in &received {
        assert_signed(hook);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_endpoint_until_retry_enables_it_again() {
    let sink = WebhookSink::start(&[Answer::status(410)]).await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);
    let first = crier.send_to_no_avail("First.").await;
    assert_eq!(first["channels"]["partners"]["dead"], 1);
    let second = crier.send_to_no_avail("Second.").await;
    assert_eq!(second["channels"]["partners"]["dead"], 1);
    assert_eq!(
        sink.received().len(),
        1,
        "nothing is sent to an endpoint that is gone"
    );

    let retried = crier.run(&["retry", "--json"]).await;
    retried.assert_ok();
    assert_eq!(retried.json()["requeued"], 2);
    assert_eq!(sink.received().len(), 3);
    assert!(
        retried.stderr.contains("channel partners is enabled again"),
        "{}",
        retried.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_dead_lettered_at_once_and_retry_delivers_it() {
    let sink = WebhookSink::start(&[Answer::status(400)]).await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);
    let summary = crier.send_to_no_avail("We're on it.").await;
    assert_eq!(summary["channels"]["partners"]["dead"], 1);
    assert_eq!(sink.received().len(), 1);

    let failed = crier.run(&["deliveries", "--failed"]).await;
    failed.assert_ok();
    assert!(
        failed.stdout.contains("400 Bad Request"),
        "{}",
        failed.stdout
    );

    let retried = crier.run(&["retry", "--json"]).await;
    assert_eq!(retried.json()["channels"]["partners"]["sent"], 1);
    assert_eq!(sink.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_is_down_is_retried_then_dead_lettered_without_blocking_other_channels() {
    let sink = WebhookSink::start(&[]).await;
    let crier = Crier::new().webhook(&unused_url(), FAST_RETRIES).channel(
        "backup",
        &format!(
            "kind = \"webhook\"\nurl = \"{}\"\nsecret_env = \"CRIER_WEBHOOK_SECRET\"\n",
            sink.url
        ),
    );
    let summary = crier.send_partly(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["partners"]["dead"], 1, "{summary}");
    assert_eq!(summary["channels"]["backup"]["sent"], 1, "{summary}");
    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    let failure = &failed["failures"][0];
    assert_eq!(failure["attempts"], 4);
    assert!(
        failure["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 4 attempts"),
        "{failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_times_out_is_retried_with_the_same_webhook_id() {
    let sink = WebhookSink::start(&[Answer::slow(std::time::Duration::from_secs(3))]).await;
    let crier = Crier::new().webhook(
        &sink.url,
        "[delivery]\ntimeout = \"300ms\"\nbackoff_base = \"50ms\"\nbackoff_max = \"100ms\"\n",
    );
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["partners"]["sent"], 1, "{summary}");
    let received = sink.received();
    assert_eq!(
        received.len(),
        2,
        "one attempt timed out, the retry went through"
    );
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_but_retried_as_a_failed_attempt() {
    let sink = WebhookSink::start(&[
        Answer::status(302).with_header("location", "http://127.0.0.1:9/elsewhere")
    ])
    .await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["partners"]["sent"], 1, "{summary}");
    let received = sink.received();
    let answers: Vec<u16> = received.iter().map(|h| h.answered).collect();
    assert_eq!(answers, [302, 204], "retried at the same endpoint");
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_can_abort_one_message_or_disable_itself() {
    let sink = WebhookSink::start(&[
        Answer::status(500).with_header("webhook-delivery", "abort-message"),
        Answer::status(500).with_header("webhook-delivery", "disable"),
    ])
    .await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);
    let first = crier.send_to_no_avail("First.").await;
    assert_eq!(first["channels"]["partners"]["dead"], 1);
    assert_eq!(
        sink.received().len(),
        1,
        "an aborted message is not retried"
    );
    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    assert!(
        failed["failures"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("asked to abort this message"),
        "{failed}"
    );

    crier.send_to_no_avail("Second.").await;
    crier.send_to_no_avail("Third.").await;
    assert_eq!(
        sink.received().len(),
        2,
        "after asking to be disabled, the endpoint gets nothing more"
    );
    let retried = crier.run(&["retry", "--json"]).await;
    assert!(retried.stderr.contains("channel partners is enabled again"));
    assert_eq!(
        sink.received().len(),
        5,
        "retry delivers the three dead letters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_serve_runs_retry_queues_dead_letters_through_its_api_and_the_server_delivers_them() {
    let sink = WebhookSink::start(&[Answer::status(400)]).await;
    let crier = Crier::new()
        .webhook(&sink.url, FAST_RETRIES)
        .with_env("CRIER_API_TOKEN", "lead-token-0123456789abcdefghij");
    let mut main = std::fs::read_to_string(&crier.config).unwrap();
    main.push_str("[api]\ntokens = { lead = \"CRIER_API_TOKEN\" }\n");
    std::fs::write(&crier.config, main).unwrap();
    let summary = crier.send_to_no_avail("We're on it.").await;
    assert_eq!(summary["channels"]["partners"]["dead"], 1);

    let server = crate::serve::serve(&crier).await;
    let retried = crier.run(&["retry", "--json"]).await;
    retried.assert_ok();
    assert_eq!(retried.json()["requeued"], 1, "{}", retried.stdout);
    assert!(
        retried.json()["enabled"].is_array(),
        "the server's answer, not a retry of its own: {}",
        retried.stdout
    );
    assert!(
        crate::support::wait_until(std::time::Duration::from_secs(20), || {
            sink.received().len() == 2
        })
        .await,
        "the server delivered the requeued letter"
    );
    crate::subscribe::stop(server).await;
    let after = crier.run(&["deliveries", "--json"]).await;
    assert_eq!(after.json()["channels"]["partners"]["sent"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_where_some_deliveries_went_to_dead_letters_says_so_and_exits_4() {
    let crier = Crier::new();
    let smtp = crate::support::SmtpSink::start(crier.dir.path(), 0);
    // The partner refuses the request for good (400): its one delivery goes to dead letters,
    // while the email is delivered.
    let partner = WebhookSink::start(&[Answer::status(400)]).await;
    let crier = crier.email(smtp.port, "").webhook(&partner.url, "");
    crier.subscribe("AB-1001", "ann@example.com").await;
    let output = crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--headline",
            "Activations delayed",
            "We're working on it.",
        ])
        .await;
    assert_eq!(
        output.code, 4,
        "stdout: {}\nstderr: {}",
        output.stdout, output.stderr
    );
    assert!(
        output.stderr.contains(
            "1 deliveries went to dead letters (1 delivered); see `crier deliveries --failed`"
        ),
        "{}",
        output.stderr
    );
    assert_eq!(smtp.count(), 1);
    let report = output.json();
    assert_eq!(report["channels"]["partners"]["dead"], 1, "{report}");
}
