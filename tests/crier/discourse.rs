//! The Discourse channel against a fake forum that checks each request as Discourse's API
//! documents it: `POST /posts.json` with `Api-Key` and `Api-Username` headers and a JSON body
//! that opens a topic (`title`, `raw`, `category`, `external_id`) or replies in one
//! (`topic_id`, `raw`).

use crate::support::{ApiRequest, Crier, FakeApi, Output, Reply};
use serde_json::json;
use std::time::Duration;

const API_KEY: &str = "discourse-api-key-0123456789abcdef";
const USERNAME: &str = "status-bot";
const POSTS: &str = "/posts.json";
/// The topic the fake forum opens.
const TOPIC: u64 = 77;
/// Quick retries, and no pacing between attempts, so a retry test measures the retry.
const FAST: &str =
    "[delivery]\nrate = \"100/s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n";

/// A fake forum: `posts(n)` answers the n-th post (from 0), `None` meaning: accept it, as
/// post `200 + n`, in topic 77 or the topic it replies to.
async fn forum(posts: impl Fn(usize) -> Option<Reply> + Send + Sync + 'static) -> FakeApi {
    FakeApi::start(move |request: &ApiRequest, earlier| {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", POSTS) => posts(earlier).unwrap_or_else(|| {
                let topic = request.json()["topic_id"].as_u64().unwrap_or(TOPIC);
                Reply::json(
                    200,
                    json!({
                        "id": 200 + earlier,
                        "topic_id": topic,
                        "post_number": earlier + 1,
                        "username": USERNAME,
                    }),
                )
            }),
            _ => Reply::json(
                404,
                json!({"errors": ["The requested URL or resource could not be found."]}),
            ),
        }
    })
    .await
}

fn channel_file(url: &str, extra: &str) -> String {
    format!(
        "kind = \"discourse\"\nbase_url = \"{url}\"\napi_key_env = \"CRIER_DISCOURSE_KEY\"\napi_username = \"{USERNAME}\"\ncategory = 7\n{extra}"
    )
}

fn channel(crier: Crier, url: &str, extra: &str) -> Crier {
    crier
        .with_env("CRIER_DISCOURSE_KEY", API_KEY)
        .channel("forum", &channel_file(url, extra))
}

/// Every assertion about a post that holds on every attempt.
#[track_caller]
fn assert_documented(request: &ApiRequest) {
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(request.header("api-username"), Some(USERNAME));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("authorization"), None);
}

async fn preview(crier: &Crier, headline: &str, body: &str) -> Output {
    crier
        .run(&["preview", "--json", "--headline", headline, body])
        .await
}

/// The rendered title and body of the forum channel in a preview.
fn parts(output: &Output) -> (String, String) {
    output.assert_ok();
    let parts = output.json()["channels"]["forum"].clone();
    assert_eq!(parts[0]["part"], "title");
    assert_eq!(parts[1]["part"], "body");
    (
        parts[0]["text"].as_str().unwrap().to_owned(),
        parts[1]["text"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_update_opens_a_topic_and_later_ones_reply_in_it() {
    let api = forum(|_| None).await;
    let crier = channel(Crier::new(), &api.url, "");
    let first = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    assert_eq!(first["channels"]["forum"]["sent"], 1, "{first}");
    let incident = first["incident"].as_str().unwrap();
    let second = crier
        .send(&["--incident", incident], "We found the cause.")
        .await;
    assert_eq!(second["channels"]["forum"]["sent"], 1, "{second}");
    crier
        .send(&["--incident", incident, "--state", "resolved"], "Fixed.")
        .await;

    let posts = api.requests("POST", POSTS);
    assert_eq!(posts.len(), 3);
    for post in &posts {
        assert_documented(post);
    }
    assert_eq!(
        posts[0].json_keys(),
        ["category", "external_id", "raw", "title"]
    );
    let topic = posts[0].json();
    assert_eq!(topic["category"], 7);
    assert_eq!(topic["external_id"], incident);
    let title = topic["title"].as_str().unwrap();
    assert!(title.starts_with("Activations delayed ("), "{title}");
    let raw = topic["raw"].as_str().unwrap();
    assert!(
        raw.starts_with("**Investigating: Activations delayed**"),
        "{raw}"
    );
    assert!(raw.contains("We're working on it."), "{raw}");
    assert!(raw.contains("Next update by"), "{raw}");
    assert!(raw.contains("https://status.example.com/"), "{raw}");

    for reply in &posts[1..] {
        assert_eq!(reply.json_keys(), ["raw", "topic_id"]);
        assert_eq!(reply.json()["topic_id"], TOPIC);
    }
    assert!(posts[2].json()["raw"].as_str().unwrap().contains("Fixed."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_once_after_its_retry_after_with_the_same_post() {
    let api = forum(|n| {
        (n == 0).then(|| {
            Reply::json(
                429,
                json!({
                    "errors": ["You've performed this action too many times. Please wait 1 second before trying again."],
                    "error_type": "rate_limit",
                    "extras": {"wait_seconds": 1}
                }),
            )
            .with_header("retry-after", "1")
        })
    })
    .await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["forum"]["sent"], 1, "{summary}");

    let posts = api.requests("POST", POSTS);
    assert_eq!(posts.len(), 2, "one throttled attempt, one retry");
    for post in &posts {
        assert_documented(post);
    }
    let waited = posts[1].at - posts[0].at;
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
    assert_eq!(
        posts[0].body, posts[1].body,
        "the same topic, the same external_id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503s_are_retried_until_the_topic_is_opened() {
    let api = forum(|n| (n < 3).then(|| Reply::status(503))).await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["forum"]["sent"], 1, "{summary}");
    let posts = api.requests("POST", POSTS);
    assert_eq!(posts.len(), 4);
    for post in &posts {
        assert_documented(post);
        assert_eq!(post.body, posts[0].body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_is_a_dead_letter_at_once_that_says_so() {
    let api = forum(|_| {
        Some(Reply::json(
            403,
            json!({
                "errors": ["You are not permitted to view the requested resource. The API username or key is invalid."],
                "error_type": "invalid_access"
            }),
        ))
    })
    .await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send_to_no_avail("We're working on it.").await;
    assert_eq!(summary["channels"]["forum"]["dead"], 1, "{summary}");
    assert_eq!(api.requests("POST", POSTS).len(), 1, "no retry loop");

    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    let failure = &failed["failures"][0];
    let reason = failure["last_error"].as_str().unwrap();
    assert!(reason.contains("refused the credentials"), "{failure}");
    assert!(
        reason.contains("The API username or key is invalid"),
        "{failure}"
    );
    assert!(!reason.contains(API_KEY), "{failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forum_that_answers_too_late_is_retried() {
    let api = forum(|n| {
        (n == 0).then(|| {
            Reply::json(200, json!({"id": 999, "topic_id": TOPIC})).after(Duration::from_secs(3))
        })
    })
    .await;
    let crier = channel(
        Crier::new(),
        &api.url,
        &format!("{FAST}timeout = \"300ms\"\n"),
    );
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["forum"]["sent"], 1, "{summary}");
    let posts = api.requests("POST", POSTS);
    assert_eq!(
        posts.len(),
        2,
        "one attempt timed out, the retry went through"
    );
    assert_eq!(posts[0].body, posts[1].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_forum_refuses_as_too_similar_is_dead_with_the_forums_words() {
    let api = forum(|_| {
        Some(Reply::json(
            422,
            json!({
                "action": "create_post",
                "errors": ["Body is too similar to what you recently posted"]
            }),
        ))
    })
    .await;
    let crier = channel(Crier::new(), &api.url, FAST);
    let summary = crier.send_to_no_avail("We're working on it.").await;
    assert_eq!(summary["channels"]["forum"]["dead"], 1, "{summary}");
    assert_eq!(api.requests("POST", POSTS).len(), 1, "a 422 is not retried");
    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    let failure = &failed["failures"][0];
    assert_eq!(failure["last_status"], 422, "{failure}");
    assert!(
        failure["last_error"]
            .as_str()
            .unwrap()
            .contains("Body is too similar to what you recently posted"),
        "{failure}"
    );
}

/// A title template an operator might write, long enough around the headline for a title to
/// reach the forum's limit.
const LONG_TITLE: &str = "{{brand.name}} service notice for every customer on every plan and in every region: {{incident.title}}\n";

/// How many characters the long title template adds around the headline.
async fn title_overhead(crier: &Crier) -> usize {
    let (title, _) = parts(&preview(crier, "Activations delayed", "We're working on it.").await);
    title.chars().count() - "Activations delayed".len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_title_of_256_characters_is_refused_by_preview_and_send_and_nothing_is_stored() {
    let api = forum(|_| None).await;
    let crier =
        channel(Crier::new(), &api.url, "").with_template("discourse.title.hbs", LONG_TITLE);
    let overhead = title_overhead(&crier).await;
    let at_limit = "x".repeat(255 - overhead);
    let over = "x".repeat(256 - overhead);

    let (title, _) = parts(&preview(&crier, &at_limit, "We're working on it.").await);
    assert_eq!(title.chars().count(), 255);
    let expected = "channel forum: the topic title is 256 characters; the limit is 255 characters";
    preview(&crier, &over, "We're working on it.")
        .await
        .assert_user_error(expected);
    crier
        .run(&["send", "--yes", "--headline", &over, "We're working on it."])
        .await
        .assert_user_error(expected);
    assert!(api.requests("POST", POSTS).is_empty());
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
async fn a_title_of_exactly_255_characters_opens_the_topic() {
    let api = forum(|_| None).await;
    let crier =
        channel(Crier::new(), &api.url, "").with_template("discourse.title.hbs", LONG_TITLE);
    let at_limit = "x".repeat(255 - title_overhead(&crier).await);
    let summary = crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--headline",
            &at_limit,
            "We're working on it.",
        ])
        .await;
    summary.assert_ok();
    let posts = api.requests("POST", POSTS);
    assert_eq!(
        posts[0].json()["title"].as_str().unwrap().chars().count(),
        255
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_truncate_a_long_title_is_cut_at_a_word_within_the_limit() {
    let api = forum(|_| None).await;
    let crier = channel(Crier::new(), &api.url, "overflow = \"truncate\"\n")
        .with_template("discourse.title.hbs", LONG_TITLE);
    let headline = "Activations delayed ".repeat(10);
    let (title, _) = parts(&preview(&crier, &headline, "We're working on it.").await);
    assert!(title.chars().count() <= 255, "{title}");
    assert!(
        title.ends_with("delayed…") || title.ends_with("Activations…"),
        "{title}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_one_below_min_post_length_is_refused_clearly_and_at_it_is_posted() {
    let api = forum(|_| None).await;
    let crier = channel(Crier::new(), &api.url, "");
    let (_, body) = parts(&preview(&crier, "Activations delayed", "We're on it.").await);
    let length = body.chars().count();

    let file = crier.path("channels/forum.toml");
    std::fs::write(
        &file,
        channel_file(&api.url, &format!("min_post_length = {}\n", length + 1)),
    )
    .unwrap();
    let expected = format!(
        "channel forum: the post is {length} characters; the forum needs at least {} (min_post_length)",
        length + 1
    );
    preview(&crier, "Activations delayed", "We're on it.")
        .await
        .assert_user_error(&expected);
    crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "We're on it.",
        ])
        .await
        .assert_user_error(&expected);
    assert!(api.requests("POST", POSTS).is_empty());

    std::fs::write(
        &file,
        channel_file(&api.url, &format!("min_post_length = {length}\n")),
    )
    .unwrap();
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["forum"]["sent"], 1, "{summary}");
    assert_eq!(api.requests("POST", POSTS)[0].json()["raw"], body);
}
