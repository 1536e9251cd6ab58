//! `GET /metrics` of `crier serve`: behind an admin token, in Prometheus's text format, read
//! back with a Prometheus text parser after a send with one transient failure.

use crate::serve::serve;
use crate::subscribe::{client, stop};
use crate::support::{
    Answer, Crier, FAST_RETRIES, SmtpSink, WebhookSink, wait_until, webhook_secret,
};
use prometheus_parse::{Sample, Scrape, Value};
use std::time::Duration;

const TOKEN: &str = "metrics-token-0123456789abcdefgh";

fn sample<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape.samples.iter().find(|sample| {
        sample.metric == name
            && labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
    })
}

fn number(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).map(|sample| &sample.value) {
        Some(Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_send_with_one_transient_failure_by_channel_and_outcome() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    // The partner's endpoint fails once with 503, then takes the retry.
    let hooks = WebhookSink::start(&[Answer::status(503)]).await;
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str("[api]\ntokens = { lead = \"CRIER_API_TOKEN\" }\n");
    std::fs::write(&crier.config, config).unwrap();
    let crier = crier
        .email(smtp.port, "")
        .webhook(&hooks.url, FAST_RETRIES)
        .with_env("CRIER_WEBHOOK_SECRET", &webhook_secret())
        .with_env("CRIER_API_TOKEN", TOKEN);
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    let server = serve(&crier).await;

    // Without the token: 401, and nothing to read.
    let refused = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "--next-update-in",
            "2h",
            "We are on it.",
        ])
        .await
        .assert_ok();
    assert!(
        wait_until(Duration::from_secs(20), || smtp.count() == 2
            && hooks.received().len() == 2)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = client()
        .get(format!("{}/metrics", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    stop(server).await;
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap();

    let outcomes = "crier_delivery_outcomes_total";
    assert_eq!(
        number(
            &scrape,
            outcomes,
            &[("channel", "email"), ("outcome", "sent")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        number(
            &scrape,
            outcomes,
            &[("channel", "partners"), ("outcome", "sent")]
        ),
        1.0
    );
    assert_eq!(
        number(
            &scrape,
            outcomes,
            &[("channel", "partners"), ("outcome", "retry")]
        ),
        1.0
    );
    assert!(
        sample(
            &scrape,
            outcomes,
            &[("channel", "email"), ("outcome", "retry")]
        )
        .is_none()
    );
    assert_eq!(
        number(
            &scrape,
            "crier_delivery_retries_total",
            &[("channel", "partners")]
        ),
        1.0
    );

    // State from the store's counters: everything settled, no dead letter.
    assert_eq!(
        number(
            &scrape,
            "crier_deliveries",
            &[("channel", "email"), ("state", "sent")]
        ),
        2.0
    );
    assert_eq!(
        number(&scrape, "crier_queue_depth", &[("channel", "partners")]),
        0.0
    );
    assert_eq!(
        number(&scrape, "crier_dead_letters", &[("channel", "partners")]),
        0.0
    );

    // Two attempts at the partner's endpoint in the latency histogram.
    let histogram = sample(
        &scrape,
        "crier_delivery_attempt_seconds",
        &[("channel", "partners")],
    )
    .unwrap_or_else(|| panic!("no histogram in:\n{text}"));
    match &histogram.value {
        Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 2.0, "{buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }

    // HTTP requests by route pattern and status: the refused scrape and the API's send.
    assert_eq!(
        number(
            &scrape,
            "crier_http_requests_total",
            &[("route", "/metrics"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        number(
            &scrape,
            "crier_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/updates"),
                ("status", "202")
            ]
        ),
        1.0
    );

    // The update promised the next in 2 hours: one open promise, about 120 minutes away.
    assert_eq!(number(&scrape, "crier_promises_open", &[]), 1.0);
    assert_eq!(number(&scrape, "crier_promises_overdue", &[]), 0.0);
    let next = number(&scrape, "crier_promise_next_due_minutes", &[]);
    assert!((118.0..=120.0).contains(&next), "{next}");
    assert!(
        !text.contains("ann@example.com"),
        "no contact in the metrics"
    );
}
