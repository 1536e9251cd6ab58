//! Prometheus metrics: the recorder `crier serve` installs and `GET /metrics`, behind an admin
//! token. Counters and histograms are counted where things happen (the `metrics` facade, a
//! no-op in the CLI, which installs no recorder); gauges of state (the queue per channel,
//! the promises) are read when scraped, so they are never stale.

use super::Shared;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Attempt latencies, from a fast webhook to a provider at its timeout.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder once, and returns what renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("the buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder was installed first; /metrics shows only the gauges"
                );
            }
            handle
        })
        .clone()
}

/// GET /metrics: the text format, version 0.0.4.
pub(super) async fn scrape(State(shared): State<Shared>) -> Response {
    let counts = match shared.store.counts(None).await {
        Ok(counts) => counts,
        Err(error) => {
            tracing::error!(%error, "metrics: cannot read the delivery counters");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store does not answer\n",
            )
                .into_response();
        }
    };
    for (channel, counts) in counts {
        let states = [
            ("queued", counts.queued),
            ("in_flight", counts.in_flight),
            ("retrying", counts.retrying),
            ("dead", counts.dead),
            ("sent", counts.sent),
            ("skipped", counts.skipped),
        ];
        for (state, count) in states {
            metrics::gauge!("crier_deliveries", "channel" => channel.clone(), "state" => state)
                .set(count as f64);
        }
        metrics::gauge!("crier_queue_depth", "channel" => channel.clone())
            .set((counts.queued + counts.retrying + counts.in_flight) as f64);
        metrics::gauge!("crier_dead_letters", "channel" => channel).set(counts.dead as f64);
    }
    let promises = shared.promises.borrow().clone();
    let now = Utc::now();
    let overdue = promises.iter().filter(|p| now >= p.promise.due).count();
    metrics::gauge!("crier_promises_open").set(promises.len() as f64);
    metrics::gauge!("crier_promises_overdue").set(overdue as f64);
    // Negative once overdue; +Inf with no promise open, so an alert rule on "< 15" stays quiet.
    let next_due = promises
        .iter()
        .map(|p| (p.promise.due - now).num_seconds() as f64 / 60.0)
        .reduce(f64::min)
        .unwrap_or(f64::INFINITY);
    metrics::gauge!("crier_promise_next_due_minutes").set(next_due);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}
