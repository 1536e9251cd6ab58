//! The Bluesky channel against a fake PDS that checks each request as the AT Protocol's XRPC
//! API documents it: `com.atproto.server.createSession` with a JSON `identifier` and
//! `password`, `com.atproto.server.refreshSession` with the refresh token as the bearer, posts
//! through `com.atproto.repo.createRecord` with the access token (a TID record key, link facets
//! at UTF-8 byte offsets, `reply` refs), and `com.atproto.repo.getRecord` to find a post whose
//! answer was lost. The fake accepts only the access token it issued last, and answers an
//! expired one with `ExpiredToken`, as a PDS does.

use crate::support::{ApiRequest, Crier, FakeApi, Output, Reply};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HANDLE: &str = "status.example.com";
const APP_PASSWORD: &str = "abcd-efgh-ijkl-mnop";
const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
const CREATE_SESSION: &str = "/xrpc/com.atproto.server.createSession";
const REFRESH_SESSION: &str = "/xrpc/com.atproto.server.refreshSession";
const CREATE_RECORD: &str = "/xrpc/com.atproto.repo.createRecord";
const GET_RECORD: &str = "/xrpc/com.atproto.repo.getRecord";
const POST: &str = "app.bsky.feed.post";
const STATUS_PAGE: &str = "https://status.example.com/";
/// Quick retries, and no pacing between attempts, so a retry test measures the retry.
const FAST: &str =
    "[delivery]\nrate = \"100/s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n";

/// How the fake PDS answers the n-th `createRecord`.
enum PostAnswer {
    /// Makes the post and answers its uri and cid.
    Make,
    /// Makes nothing, and answers this.
    Refuse(Reply),
    /// Makes the post, then answers this: a 500, or an answer that comes too late.
    MakeThen(Reply),
}

struct Script {
    /// The n-th login's answer, when it is not a session.
    logins: fn(usize) -> Option<Reply>,
    /// Whether a login's access token has expired already when it is given.
    expired_logins: bool,
    /// Whether every refresh token is refused as spent.
    spent_refreshes: bool,
    posts: fn(usize) -> PostAnswer,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            logins: |_| None,
            expired_logins: false,
            spent_refreshes: false,
            posts: |_| PostAnswer::Make,
        }
    }
}

#[derive(Default)]
struct PdsState {
    /// Every access token issued, in order, with its expiry; only the last is accepted.
    access: Vec<(String, i64)>,
    /// The refresh token issued last: the only one accepted.
    refresh: String,
    /// The posts made, by record key: (uri, cid).
    posts: BTreeMap<String, (String, String)>,
}

/// A fake PDS: the API, and what it issued and holds.
struct Pds {
    api: FakeApi,
    state: Arc<Mutex<PdsState>>,
}

impl Pds {
    fn url(&self) -> &str {
        &self.api.url
    }

    fn requests(&self, method: &str, path: &str) -> Vec<ApiRequest> {
        self.api.requests(method, path)
    }

    /// The record lookups, whatever their query.
    fn lookups(&self) -> Vec<ApiRequest> {
        self.api
            .received()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.starts_with(GET_RECORD))
            .collect()
    }

    /// The XRPC methods called, in order.
    fn calls(&self) -> Vec<String> {
        self.api
            .received()
            .iter()
            .map(|r| r.path.split('?').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// `Bearer` and the n-th access token issued (from 0).
    fn access(&self, n: usize) -> String {
        format!("Bearer {}", self.state.lock().unwrap().access[n].0)
    }

    /// The uri and cid of the post made under `rkey`, as a reply ref.
    fn post(&self, rkey: &str) -> Value {
        let (uri, cid) = self.state.lock().unwrap().posts[rkey].clone();
        json!({"uri": uri, "cid": cid})
    }
}

fn jwt(claims: Value) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        engine.encode(br#"{"typ":"at+jwt","alg":"ES256K"}"#),
        engine.encode(claims.to_string()),
        engine.encode(b"not-checked")
    )
}

fn xrpc_error(status: u16, error: &str, message: &str) -> Reply {
    Reply::json(status, json!({"error": error, "message": message}))
}

/// A new session: an access token that expires in two hours (or expired an hour ago) and a
/// refresh token, each the only one accepted from now on.
fn issue(state: &mut PdsState, expired: bool) -> Reply {
    let now = chrono::Utc::now().timestamp();
    let exp = if expired { now - 3600 } else { now + 7200 };
    let n = state.access.len();
    let access = jwt(json!({
        "scope": "com.atproto.appPass", "sub": DID, "iat": now, "exp": exp, "jti": format!("access-{n}")
    }));
    let refresh = jwt(json!({
        "scope": "com.atproto.refresh", "sub": DID, "iat": now, "exp": now + 90 * 86400, "jti": format!("refresh-{n}")
    }));
    state.access.push((access.clone(), exp));
    state.refresh = refresh.clone();
    Reply::json(
        200,
        json!({
            "did": DID,
            "handle": HANDLE,
            "email": "status@example.com",
            "accessJwt": access,
            "refreshJwt": refresh,
            "active": true
        }),
    )
}

/// The access token's refusal, if the request's is not the one issued last or has expired.
fn check_access(state: &PdsState, request: &ApiRequest) -> Option<Reply> {
    let Some(presented) = request
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return Some(xrpc_error(401, "AuthMissing", "Authentication Required"));
    };
    let Some((_, exp)) = state.access.iter().find(|(token, _)| token == presented) else {
        return Some(xrpc_error(
            401,
            "InvalidToken",
            "Token could not be verified",
        ));
    };
    if *exp <= chrono::Utc::now().timestamp() {
        return Some(xrpc_error(400, "ExpiredToken", "Token has expired"));
    }
    if state.access.last().map(|(token, _)| token.as_str()) != Some(presented) {
        return Some(xrpc_error(401, "InvalidToken", "Token has been revoked"));
    }
    None
}

/// The query parameters of a path.
fn query(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, query)| query)
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn pds(script: Script) -> Pds {
    let state: Arc<Mutex<PdsState>> = Arc::default();
    let shared = state.clone();
    let api = FakeApi::start(move |request: &ApiRequest, earlier| {
        let mut state = shared.lock().unwrap();
        let path = request.path.split('?').next().unwrap_or_default();
        match (request.method.as_str(), path) {
            ("POST", CREATE_SESSION) => match (script.logins)(earlier) {
                Some(reply) => reply,
                None => issue(&mut state, script.expired_logins),
            },
            ("POST", REFRESH_SESSION) => {
                let presented = request.header("authorization");
                if !script.spent_refreshes
                    && presented == Some(&*format!("Bearer {}", state.refresh))
                {
                    issue(&mut state, false)
                } else {
                    xrpc_error(400, "ExpiredToken", "Token has expired")
                }
            }
            ("POST", CREATE_RECORD) => {
                if let Some(refusal) = check_access(&state, request) {
                    return refusal;
                }
                let answer = (script.posts)(earlier);
                if let PostAnswer::Refuse(reply) = answer {
                    return reply;
                }
                let body = request.json();
                let rkey = body["rkey"].as_str().unwrap_or_default().to_owned();
                let uri = format!("at://{DID}/{POST}/{rkey}");
                let cid = format!("bafyreipost{earlier}");
                state.posts.insert(rkey, (uri.clone(), cid.clone()));
                match answer {
                    PostAnswer::MakeThen(reply) => reply,
                    _ => Reply::json(
                        200,
                        json!({
                            "uri": uri,
                            "cid": cid,
                            "commit": {"cid": "bafyreicommit", "rev": "3kabcdefghij2"},
                            "validationStatus": "valid"
                        }),
                    ),
                }
            }
            ("GET", GET_RECORD) => {
                let query = query(&request.path);
                match state
                    .posts
                    .get(query.get("rkey").map(String::as_str).unwrap_or(""))
                {
                    Some((uri, cid)) => Reply::json(
                        200,
                        json!({"uri": uri, "cid": cid, "value": {"$type": POST}}),
                    ),
                    None => xrpc_error(
                        400,
                        "RecordNotFound",
                        &format!("Could not locate record: at://{DID}/{POST}/…"),
                    ),
                }
            }
            _ => xrpc_error(404, "MethodNotImplemented", "Method Not Implemented"),
        }
    })
    .await;
    Pds { api, state }
}

fn channel(crier: Crier, url: &str, extra: &str) -> Crier {
    crier
        .with_env("CRIER_BLUESKY_APP_PASSWORD", APP_PASSWORD)
        .channel(
            "social",
            &format!(
                "kind = \"bluesky\"\nservice = \"{url}\"\nhandle = \"{HANDLE}\"\napp_password_env = \"CRIER_BLUESKY_APP_PASSWORD\"\n{extra}"
            ),
        )
}

/// A login as `createSession` documents it.
#[track_caller]
fn assert_login(request: &ApiRequest) {
    assert_eq!(request.header("authorization"), None);
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.json_keys(), ["identifier", "password"]);
    assert_eq!(request.json()["identifier"], HANDLE);
    assert_eq!(request.json()["password"], APP_PASSWORD);
}

/// A post as `createRecord` documents it, made with `authorization`; its record key.
#[track_caller]
fn assert_post(request: &ApiRequest, authorization: &str) -> String {
    assert_eq!(request.header("authorization"), Some(authorization));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json_keys(),
        ["collection", "record", "repo", "rkey"]
    );
    let body = request.json();
    assert_eq!(body["repo"], DID);
    assert_eq!(body["collection"], POST);
    assert_eq!(body["record"]["$type"], POST);
    let created_at = body["record"]["createdAt"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created_at).is_ok(),
        "{created_at}"
    );
    let rkey = body["rkey"].as_str().unwrap().to_owned();
    assert_eq!(rkey.len(), 13, "a TID: {rkey}");
    assert!(
        rkey.bytes()
            .all(|b| b"234567abcdefghijklmnopqrstuvwxyz".contains(&b)),
        "a TID: {rkey}"
    );
    rkey
}

/// The record keys of the top level of the record, sorted.
fn record_keys(request: &ApiRequest) -> Vec<String> {
    let mut keys: Vec<String> = request.json()["record"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
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

/// The post's text in a preview that succeeded.
fn previewed(output: &Output) -> String {
    output.assert_ok();
    let parts = &output.json()["channels"]["social"];
    assert_eq!(parts[0]["part"], "text");
    parts[0]["text"].as_str().unwrap().to_owned()
}

/// The provider id kept on the channel's delivery of `update`.
async fn provider_id(crier: &Crier, update: &str) -> Option<String> {
    let key = crier::delivery::DeliveryKey::new(
        update.parse().unwrap(),
        "social",
        &crier::delivery::Recipient::Broadcast,
    );
    crier
        .store()
        .await
        .delivery(&key)
        .await
        .unwrap()
        .unwrap()
        .provider_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_update_of_an_incident_replies_in_the_thread_its_first_post_started() {
    let api = pds(Script::default()).await;
    let crier = channel(Crier::new(), api.url(), "language = \"en\"\n");
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

    let logins = api.requests("POST", CREATE_SESSION);
    assert_eq!(logins.len(), 3, "one login per crier process");
    for login in &logins {
        assert_login(login);
    }
    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 3);
    let rkeys: Vec<String> = posts
        .iter()
        .enumerate()
        .map(|(n, post)| assert_post(post, &api.access(n)))
        .collect();
    assert!(
        rkeys[0] < rkeys[1] && rkeys[1] < rkeys[2],
        "record keys sort as the updates: {rkeys:?}"
    );

    assert_eq!(
        record_keys(&posts[0]),
        ["$type", "createdAt", "facets", "langs", "text"]
    );
    let record = &posts[0].json()["record"];
    assert_eq!(record["langs"], json!(["en"]));
    let text = record["text"].as_str().unwrap();
    assert!(
        text.starts_with("Investigating: Activations delayed"),
        "{text}"
    );
    assert!(text.contains("We're working on it."), "{text}");
    assert!(text.contains("Next update by"), "{text}");
    assert!(text.ends_with(STATUS_PAGE), "{text}");

    let first_post = api.post(&rkeys[0]);
    let second_post = api.post(&rkeys[1]);
    assert_eq!(
        record_keys(&posts[1]),
        ["$type", "createdAt", "facets", "langs", "reply", "text"]
    );
    assert_eq!(
        posts[1].json()["record"]["reply"],
        json!({"root": first_post, "parent": first_post})
    );
    assert_eq!(
        posts[2].json()["record"]["reply"],
        json!({"root": first_post, "parent": second_post}),
        "the root stays the incident's first post; the parent is the latest"
    );
    assert_eq!(
        provider_id(&crier, second["update"].as_str().unwrap()).await,
        Some(second_post["uri"].as_str().unwrap().to_owned()),
        "the post's uri is the delivery's provider id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_serves_ten_posts() {
    // The first ten logins are refused, so ten updates wait as dead letters; `crier retry`
    // then posts all ten in one process.
    let api = pds(Script {
        logins: |n| {
            (n < 10).then(|| {
                xrpc_error(
                    401,
                    "AuthenticationRequired",
                    "Invalid identifier or password",
                )
            })
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    for n in 1..=10 {
        crier
            .send_to_no_avail(&format!("Update {n}: we're working on it."))
            .await;
    }
    assert_eq!(api.requests("POST", CREATE_SESSION).len(), 10);

    let retried = crier.run(&["retry", "--json"]).await;
    retried.assert_ok();
    let summary = retried.json();
    assert_eq!(summary["requeued"], 10, "{summary}");
    assert_eq!(summary["channels"]["social"]["sent"], 10, "{summary}");
    let logins = api.requests("POST", CREATE_SESSION);
    assert_eq!(logins.len(), 11, "one login for the ten posts");
    assert_login(&logins[10]);
    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 10);
    let mut rkeys: Vec<String> = posts
        .iter()
        .map(|post| assert_post(post, &api.access(0)))
        .collect();
    rkeys.sort();
    rkeys.dedup();
    assert_eq!(rkeys.len(), 10, "a record key per delivery");
    assert!(api.requests("POST", REFRESH_SESSION).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_past_its_exp_is_refreshed_not_logged_in_again() {
    let api = pds(Script {
        expired_logins: true,
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");

    assert_eq!(
        api.calls(),
        [CREATE_SESSION, REFRESH_SESSION, CREATE_RECORD],
        "the expired token is refreshed before it is used"
    );
    let refresh = &api.requests("POST", REFRESH_SESSION)[0];
    let issued = api.state.lock().unwrap().access.len();
    assert_eq!(issued, 2, "one session from the login, one refreshed");
    assert!(
        refresh
            .header("authorization")
            .is_some_and(|value| value.starts_with("Bearer ") && value != api.access(0)),
        "the refresh token, not the access token, is the bearer"
    );
    assert!(refresh.body.is_empty(), "refreshSession takes no body");
    assert_post(&api.requests("POST", CREATE_RECORD)[0], &api.access(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_answer_is_refreshed_and_the_post_sent_again() {
    let api = pds(Script {
        posts: |n| {
            if n == 0 {
                PostAnswer::Refuse(xrpc_error(400, "ExpiredToken", "Token has expired"))
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    assert_eq!(
        api.calls(),
        [
            CREATE_SESSION,
            CREATE_RECORD,
            REFRESH_SESSION,
            CREATE_RECORD
        ]
    );
    let posts = api.requests("POST", CREATE_RECORD);
    assert_post(&posts[0], &api.access(0));
    assert_post(&posts[1], &api.access(1));
    assert_eq!(posts[0].body, posts[1].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_refresh_token_is_spent_logs_in_once_more() {
    let api = pds(Script {
        spent_refreshes: true,
        posts: |n| {
            if n == 0 {
                PostAnswer::Refuse(xrpc_error(400, "ExpiredToken", "Token has expired"))
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    assert_eq!(
        api.calls(),
        [
            CREATE_SESSION,
            CREATE_RECORD,
            REFRESH_SESSION,
            CREATE_SESSION,
            CREATE_RECORD
        ]
    );
    assert_post(&api.requests("POST", CREATE_RECORD)[1], &api.access(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_once_after_its_retry_after_with_the_same_rkey() {
    let api = pds(Script {
        posts: |n| {
            if n == 0 {
                PostAnswer::Refuse(
                    xrpc_error(429, "RateLimitExceeded", "Rate Limit Exceeded")
                        .with_header("retry-after", "1"),
                )
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");

    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 2, "one throttled attempt, one retry");
    let rkeys: Vec<String> = posts
        .iter()
        .map(|p| assert_post(p, &api.access(0)))
        .collect();
    assert_eq!(rkeys[0], rkeys[1]);
    assert_eq!(posts[0].body, posts[1].body);
    let waited = posts[1].at - posts[0].at;
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
    assert!(
        api.lookups().is_empty(),
        "a 429 made nothing: no look-up before the retry"
    );
    assert_eq!(api.requests("POST", CREATE_SESSION).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_only_blueskys_ratelimit_reset_waits_for_the_reset() {
    let api = pds(Script {
        posts: |n| {
            if n == 0 {
                let reset = (chrono::Utc::now().timestamp() + 2).to_string();
                PostAnswer::Refuse(
                    xrpc_error(429, "RateLimitExceeded", "Rate Limit Exceeded")
                        .with_header("ratelimit-limit", "5000")
                        .with_header("ratelimit-remaining", "0")
                        .with_header("ratelimit-reset", &reset)
                        .with_header("ratelimit-policy", "5000;w=3600"),
                )
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 2);
    let waited = posts[1].at - posts[0].at;
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_500_the_retry_finds_the_post_and_does_not_make_it_again() {
    let api = pds(Script {
        posts: |n| {
            if n == 0 {
                PostAnswer::MakeThen(xrpc_error(
                    500,
                    "InternalServerError",
                    "Internal Server Error",
                ))
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");

    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 1, "the post is not made twice");
    let rkey = assert_post(&posts[0], &api.access(0));
    let lookups = api.lookups();
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].path,
        format!("{GET_RECORD}?repo={DID}&collection={POST}&rkey={rkey}")
    );
    assert_eq!(lookups[0].header("authorization"), Some(&*api.access(0)));
    let found = api.post(&rkey);
    let update = summary["update"].as_str().unwrap();
    assert_eq!(
        provider_id(&crier, update).await.as_deref(),
        found["uri"].as_str()
    );

    // The post found is the thread's start, as if its own answer had come.
    let incident = summary["incident"].as_str().unwrap();
    crier
        .send(&["--incident", incident], "We found the cause.")
        .await;
    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(
        posts[1].json()["record"]["reply"],
        json!({"root": found, "parent": found})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503s_are_retried_until_the_post_is_made() {
    let api = pds(Script {
        posts: |n| {
            if n < 3 {
                PostAnswer::Refuse(Reply::status(503))
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    let posts = api.requests("POST", CREATE_RECORD);
    assert_eq!(posts.len(), 4);
    for post in &posts {
        assert_post(post, &api.access(0));
        assert_eq!(post.body, posts[0].body, "the same record key and post");
    }
    assert_eq!(
        api.lookups().len(),
        3,
        "each retry looks first, and finds nothing"
    );
    assert_eq!(api.requests("POST", CREATE_SESSION).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_a_dead_letter_at_once_that_says_so() {
    let api = pds(Script {
        logins: |_| {
            Some(xrpc_error(
                401,
                "AuthenticationRequired",
                "Invalid identifier or password",
            ))
        },
        ..Script::default()
    })
    .await;
    let crier = channel(Crier::new(), api.url(), FAST);
    let summary = crier.send_to_no_avail("We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["dead"], 1, "{summary}");
    let logins = api.requests("POST", CREATE_SESSION);
    assert_eq!(logins.len(), 1, "no retry loop");
    assert_login(&logins[0]);
    assert!(api.requests("POST", CREATE_RECORD).is_empty());

    let failed = crier
        .run(&["deliveries", "--failed", "--json"])
        .await
        .json();
    let failure = &failed["failures"][0];
    assert_eq!(failure["last_status"], 401, "{failure}");
    assert_eq!(failure["last_code"], "AuthenticationRequired", "{failure}");
    let reason = failure["last_error"].as_str().unwrap();
    assert!(reason.contains("refused the credentials"), "{failure}");
    assert!(reason.contains(HANDLE), "{failure}");
    assert!(
        reason.contains("Invalid identifier or password"),
        "{failure}"
    );
    assert!(!reason.contains(APP_PASSWORD), "{failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_answer_comes_too_late_is_found_by_the_retry_not_posted_twice() {
    let api = pds(Script {
        posts: |n| {
            if n == 0 {
                PostAnswer::MakeThen(Reply::json(200, json!({})).after(Duration::from_secs(3)))
            } else {
                PostAnswer::Make
            }
        },
        ..Script::default()
    })
    .await;
    let crier = channel(
        Crier::new(),
        api.url(),
        &format!("{FAST}timeout = \"300ms\"\n"),
    );
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    assert_eq!(
        api.requests("POST", CREATE_RECORD).len(),
        1,
        "the attempt that timed out had posted; the retry found it"
    );
    assert_eq!(api.lookups().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_marked_as_facets_at_their_utf8_byte_offsets() {
    let api = pds(Script::default()).await;
    let crier = channel(Crier::new(), api.url(), "");
    let help = "https://help.example.com/activations?region=nord";
    let body = format!("Café ☕ en panne 🚀 : voir {help}.");
    let summary = crier.send(&[], &body).await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");

    let record = api.requests("POST", CREATE_RECORD)[0].json()["record"].clone();
    let text = record["text"].as_str().unwrap();
    let facets = record["facets"].as_array().unwrap();
    assert_eq!(facets.len(), 2, "{facets:?}");
    for (facet, url) in facets.iter().zip([help, STATUS_PAGE]) {
        let start = text.find(url).unwrap();
        assert_eq!(
            facet,
            &json!({
                "index": {"byteStart": start, "byteEnd": start + url.len()},
                "features": [{"$type": "app.bsky.richtext.facet#link", "uri": url}]
            })
        );
        assert_eq!(&text.as_bytes()[start..start + url.len()], url.as_bytes());
    }
    let help_start = text.find(help).unwrap();
    assert!(
        text[..help_start].chars().count() < help_start,
        "é, ☕ and 🚀 take more bytes than characters"
    );
}

/// How many graphemes (and bytes) the template adds around a body: the text of a one-letter
/// body, less that letter. The template and the headline are ASCII, so here a character is
/// a grapheme and a byte.
async fn overhead(crier: &Crier) -> usize {
    let text = previewed(&preview(crier, "x").await);
    assert!(text.is_ascii(), "{text}");
    text.len() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_of_300_graphemes_is_sent_as_previewed_and_301_is_refused_with_nothing_stored() {
    let api = pds(Script::default()).await;
    let crier = channel(Crier::new(), api.url(), "");
    let overhead = overhead(&crier).await;
    // A thumb with a skin tone: one grapheme of two characters and eight bytes.
    let at_limit = "👍🏽".repeat(300 - overhead);
    let over = "👍🏽".repeat(301 - overhead);

    let expected = "channel social: the text is 301 graphemes; the limit is 300 graphemes";
    preview(&crier, &over).await.assert_user_error(expected);
    crier
        .run(&["send", "--yes", "--headline", "Activations delayed", &over])
        .await
        .assert_user_error(expected);
    assert!(api.api.received().is_empty(), "not even a login");
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

    let text = previewed(&preview(&crier, &at_limit).await);
    assert!(text.contains(&at_limit), "{text}");
    assert!(
        text.chars().count() > 300,
        "graphemes, not characters, count"
    );
    let summary = crier.send(&[], &at_limit).await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    assert_eq!(
        api.requests("POST", CREATE_RECORD)[0].json()["record"]["text"],
        text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_of_3000_bytes_is_sent_and_3001_refused_though_far_under_300_graphemes() {
    let api = pds(Script::default()).await;
    let crier = channel(Crier::new(), api.url(), "");
    let overhead = overhead(&crier).await;
    // A family: one grapheme of 25 bytes.
    let family = "👨‍👩‍👧‍👦";
    let families = (3000 - overhead) / family.len();
    let body = |total: usize| {
        format!(
            "{}{}",
            family.repeat(families),
            "x".repeat(total - overhead - families * family.len())
        )
    };

    preview(&crier, &body(3001))
        .await
        .assert_user_error("channel social: the text is 3001 bytes; the limit is 3000 bytes");
    let text = previewed(&preview(&crier, &body(3000)).await);
    assert_eq!(text.len(), 3000);
    let summary = crier.send(&[], &body(3000)).await;
    assert_eq!(summary["channels"]["social"]["sent"], 1, "{summary}");
    assert_eq!(
        api.requests("POST", CREATE_RECORD)[0].json()["record"]["text"],
        text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_truncate_a_long_text_is_cut_at_a_word_and_links_the_status_page() {
    let api = pds(Script::default()).await;
    let crier = channel(Crier::new(), api.url(), "overflow = \"truncate\"\n");
    let text = previewed(&preview(&crier, &"We're working on it. ".repeat(30)).await);
    assert!(text.ends_with(&format!("… {STATUS_PAGE}")), "{text}");
    let length = text.chars().count();
    assert!(length <= 300, "{length}: {text}");
    assert!(length > 300 - 10, "cut at the last word that fits: {text}");
    assert!(api.api.received().is_empty(), "a preview never logs in");
}
