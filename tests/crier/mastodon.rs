//! The Mastodon channel against a fake instance that checks each request as Mastodon's API
//! documents it: `POST /api/v1/statuses` with a bearer token, a JSON body and an
//! `Idempotency-Key`, and the instance's limits from `GET /api/v2/instance`.

use crate::support::{ApiRequest, Crier, FakeApi, Output, Reply};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const TOKEN: &str = "mastodon-access-token-0123456789";
const STATUSES: &str = "/api/v1/statuses";
const INSTANCE: &str = "/api/v2/instance";
/// Quick retries, and no pacing between attempts, so a retry test measures the retry.
const FAST: &str =
    "[delivery]\nrate = \"100/s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n";

/// A fake instance: its limit is `max_characters` (changeable while it runs), and
/// `statuses(n)` answers the n-th status posted (from 0), `None` meaning: create it, with the
/// id `100 + n`.
async fn instance(
    max_characters: Arc<AtomicUsize>,
    statuses: impl Fn(usize) -> Option<Reply> + Send + Sync + 'static,
) -> FakeApi {
    FakeApi::start(move |request: &ApiRequest, earlier| {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", INSTANCE) => Reply::json(
                200,
                json!({
                    "domain": "social.example",
                    "configuration": {
                        "statuses": {
                            "max_characters": max_characters.load(Ordering::SeqCst),
                            "max_media_attachments": 4,
                            "characters_reserved_per_url": 23
                        }
                    }
                }),
            ),
            ("POST", STATUSES) => statuses(earlier).unwrap_or_else(|| {
                let body = request.json();
                Reply::json(
                    200,
                    json!({
                        "id": (100 + earlier).to_string(),
                        "content": body["status"],
                        "visibility": body["visibility"],
                        "in_reply_to_id": body["in_reply_to_id"],
                    }),
                )
            }),
            _ => Reply::json(404, json!({"error": "Record not found"})),
        }
    })
    .await
}

fn limit(max: usize) -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(max))
}

fn channel(crier: Crier, url: &str, extra: &str) -> Crier {
    crier.with_env("CRIER_MASTODON_TOKEN", TOKEN).channel(
        "social",
        &format!(
            "kind = \"mastodon\"\ninstance = \"{url}\"\ntoken_env = \"CRIER_MASTODON_TOKEN\"\n{extra}"
        ),
    )
}

/// Every assertion about a status that holds on every attempt.
#[track_caller]
fn assert_documented(request: &ApiRequest, update: &str) {
    assert_eq!(
        request.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.header("idempotency-key"),
        Some(&*format!("{update}/social/-")),
        "the delivery key is the Idempotency-Key"
    );
}

async fn preview(crier: &Crier, body: &str) -> Output {
    crier
        .run(&[
            "preview",
            "--json",
            "--headline",
            "Activations delayed",
            body,
        ])
        .await
}

/// The length Mastodon gives a text, computed here independently of crier: every word that
/// is an http(s) URL counts 23.
fn counted(text: &str) -> usize {
    let mut length = text.chars().count();
    for word in text.split_whitespace() {
        if word.starts_with("https://") {
            length = length - word.chars().count() + 23;
        }
    }
    length
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_update_of_an_incident_replies_to_the_status_before_it() {
    let api = instance(limit(500), |_| None).await;
    let crier = channel(Crier::new(), &api.url, "language = \"en\"\n");
    let first = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    assert_eq!(first["channels"]["social"]["sent"], 1, "{first}");
    let incident = first["incident"].as_str().unwrap();
    let second = crier
        .send(&["--incident", incident], "We found the cause.")
        .await;
    let third = crier
        .send(&["--incident", incident, "--state", "resolved"], "Fixed.")
        .await;
    assert_eq!(third["channels"]["social"]["sent"], 1, "{third}");

    let lookups = api.requests("GET", INSTANCE);
    assert!(!lookups.is_empty(), "the limits are read from the instance");
    assert_eq!(
        lookups[0].header("authorization"),
        None,
        "the instance endpoint is public: the token is not sent to it"
    );

    let statuses = api.requests("POST", STATUSES);
    assert_eq!(statuses.len(), 3);
    for (status, summary) in statuses.iter().zip([&first, &second, &third]) {
        assert_documented(status, summary["update"].as_str().unwrap());
    }
    assert_eq!(
        statuses[0].json_keys(),
        ["language", "status", "visibility"]
    );
    let body = statuses[0].json();
    assert_eq!(body["visibility"], "public");
    assert_eq!(body["language"], "en");
    let text = body["status"].as_str().unwrap();
    assert!(
        text.starts_with("Investigating: Activations delayed"),
        "{text}"
    );
    assert!(text.contains("We're working on it."), "{text}");
    assert!(text.contains("Next update by"), "{text}");
    assert!(text.ends_with("https://status.example.com/"), "{text}");

    assert_eq!(
        statuses[1].json_keys(),
        ["in_reply_to_id", "language", "status", "visibility"]
    );
    assert_eq!(statuses[1].json()["in_reply_to_id"], "100");
    assert_eq!(
        statuses[2].json()["in_reply_to_id"],
        "101",
        "each status replies to the latest, so the incident is one chain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_once_after_its_retry_after_with_the_same_idempotency_key() {
    let api = instance(limit(500), |n| {
        (n == 0).then(|| {
            Reply::json(429, json!({"error": "Too many requests"})).with_header("retry-after", "1")
        })
    })
    .await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");

    let statuses = api.requests("POST", STATUSES);
    assert_eq!(statuses.len(), 2, "one throttled attempt, one retry");
    let update = summary["update"].as_str().unwrap();
    for status in &statuses {
        assert_documented(status, update);
    }
    let waited = statuses[1].at - statuses[0].at;
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
    assert_eq!(statuses[0].body, statuses[1].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503s_are_retried_until_the_status_is_posted() {
    let api = instance(limit(500), |n| (n < 3).then(|| Reply::status(503))).await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    let statuses = api.requests("POST", STATUSES);
    assert_eq!(statuses.len(), 4);
    let update = summary["update"].as_str().unwrap();
    for status in &statuses {
        assert_documented(status, update);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_a_dead_letter_at_once_that_says_so() {
    let api = instance(limit(500), |_| {
        Some(Reply::json(
            401,
            json!({"error": "The access token is invalid"}),
        ))
    })
    .await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send_to_no_avail("We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["dead"], 1, "{summary}");
    assert_eq!(api.requests("POST", STATUSES).len(), 1, "no retry loop");

    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    let failure = &failed["failures"][0];
    let reason = failure["last_error"].as_str().unwrap();
    assert!(reason.contains("refused the credentials"), "{failure}");
    assert!(reason.contains("The access token is invalid"), "{failure}");
    assert!(!reason.contains(TOKEN), "{failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_answers_too_late_is_retried() {
    let api = instance(limit(500), |n| {
        (n == 0).then(|| Reply::json(200, json!({"id": "999"})).after(Duration::from_secs(3)))
    })
    .await;
    let crier = channel(
        Crier::new(),
        &api.url,
        &format!("{FAST}timeout = \"300ms\"\n"),
    );
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    let statuses = api.requests("POST", STATUSES);
    assert_eq!(
        statuses.len(),
        2,
        "one attempt timed out, the retry went through"
    );
    assert_eq!(
        statuses[0].header("idempotency-key"),
        statuses[1].header("idempotency-key")
    );
}

/// An update whose two long URLs make its characters far more than its length.
const LINKED_BODY: &str = "Activations are delayed in the north. Details at \
    https://status.example.com/incidents/2026-11-24/activations-delayed-in-the-north-region \
    and what to do meanwhile at \
    https://help.example.com/articles/what-to-do-while-your-activation-is-delayed";

/// The status `LINKED_BODY` renders to, and its length as Mastodon counts it, from a preview
/// while the instance allows plenty.
async fn linked_status(crier: &Crier, max: &AtomicUsize) -> (String, usize) {
    max.store(5000, Ordering::SeqCst);
    let shown = preview(crier, LINKED_BODY).await;
    shown.assert_ok();
    let parts = &shown.json()["channels"]["social"];
    assert_eq!(parts[0]["part"], "text");
    let text = parts[0]["text"].as_str().unwrap().to_owned();
    assert!(text.contains(LINKED_BODY), "{text}");
    let length = counted(&text);
    assert!(
        text.chars().count() > length + 60,
        "the long URLs count less than their characters"
    );
    (text, length)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_one_over_the_instances_limit_is_refused_and_nothing_is_stored() {
    let max = limit(5000);
    let api = instance(max.clone(), |_| None).await;
    let crier = channel(Crier::new(), &api.url, "");
    let (_, length) = linked_status(&crier, &max).await;

    max.store(length - 1, Ordering::SeqCst);
    let expected = format!(
        "channel social: the text is {length} characters; the limit is {} characters",
        length - 1
    );
    preview(&crier, LINKED_BODY)
        .await
        .assert_user_error(&expected);
    crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            LINKED_BODY,
        ])
        .await
        .assert_user_error(&expected);
    assert!(api.requests("POST", STATUSES).is_empty());
    assert!(
        crier
            .store()
            .await
            .recent_updates(1)
            .await
            .unwrap()
            .is_empty(),
        "nothing was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_exactly_at_the_instances_limit_is_posted_as_previewed() {
    let max = limit(5000);
    let api = instance(max.clone(), |_| None).await;
    let crier = channel(Crier::new(), &api.url, "");
    let (text, length) = linked_status(&crier, &max).await;

    max.store(length, Ordering::SeqCst);
    let shown = preview(&crier, LINKED_BODY).await;
    shown.assert_ok();
    assert_eq!(shown.json()["channels"]["social"][0]["text"], text);
    assert_eq!(
        shown.json()["channels"]["social"][1],
        serde_json::json!({ "part": "length", "text": format!("{length} of {length} characters"), "format": "measure" }),
        "the preview shows the length against the limit"
    );
    let summary = crier.send(&[], LINKED_BODY).await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    let statuses = api.requests("POST", STATUSES);
    assert_eq!(statuses[0].json()["status"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_truncate_a_long_text_is_cut_at_a_word_and_links_the_status_page() {
    let api = instance(limit(80), |_| None).await;
    let crier = channel(Crier::new(), &api.url, "overflow = \"truncate\"\n");
    let body = "We're working on it. ".repeat(10);
    let shown = crier
        .run(&[
            "preview",
            "--json",
            "--headline",
            "Activations delayed",
            &body,
        ])
        .await;
    shown.assert_ok();
    let text = shown.json()["channels"]["social"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.ends_with("… https://status.example.com/"), "{text}");
    assert!(counted(&text) <= 80, "{text}");
    assert!(
        counted(&text) > 80 - 10,
        "cut at the last word that fits: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_does_not_say_its_limits_gets_mastodons_defaults_and_a_warning() {
    let api = FakeApi::start(|_: &ApiRequest, _| Reply::status(500)).await;
    let crier = channel(Crier::new(), &api.url, "");
    let fits = "x".repeat(400);
    let shown = crier
        .run(&[
            "preview",
            "--json",
            "--headline",
            "Activations delayed",
            &fits,
        ])
        .await;
    shown.assert_ok();
    assert!(
        shown.stderr.contains("cannot read the instance's limits"),
        "{}",
        shown.stderr
    );
    let over = "x".repeat(500);
    let refused = crier
        .run(&["preview", "--headline", "Activations delayed", &over])
        .await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("the limit is 500 characters"),
        "{}",
        refused.stderr
    );
}
