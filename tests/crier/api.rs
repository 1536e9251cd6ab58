//! The admin API of `crier serve`: bearer tokens, `Idempotency-Key`, errors as 4xx JSON, the
//! OpenAPI document covering every route, and the CLI going through the API while the server
//! holds the store.

use crate::email::raw_header;
use crate::serve::{Server, serve};
use crate::subscribe::{client, confirm_link, local, open_form, post_form, press_yes, stop};
use crate::support::{Crier, SmtpSink, wait_until};
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "lead-token-0123456789abcdefghij";
const PARTNER_TOKEN: &str = "partner-token-0123456789abcdefgh";

/// A crier with two admin tokens and email to a real SMTP server.
fn api_crier() -> (Crier, SmtpSink) {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str(
        "[api]\ntokens = { lead = \"CRIER_API_TOKEN\", partner = \"CRIER_PARTNER_TOKEN\" }\n",
    );
    std::fs::write(&crier.config, config).unwrap();
    let crier = crier
        .email(smtp.port, "")
        .status_page()
        .with_env("CRIER_API_TOKEN", TOKEN)
        .with_env("CRIER_PARTNER_TOKEN", PARTNER_TOKEN);
    (crier, smtp)
}

fn api(server: &Server, path: &str) -> String {
    format!("{}/api{path}", server.base)
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: not JSON ({e}): {text}"));
    (status, value)
}

/// An error answer: its status, and `{error, detail}` with a detail that says something.
async fn error_of(response: reqwest::Response) -> (u16, String) {
    let (status, body) = json_of(response).await;
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["detail", "error"], "{body}");
    assert!(!body["detail"].as_str().unwrap().is_empty(), "{body}");
    (status, body["error"].as_str().unwrap().to_owned())
}

fn update_body(headline: &str, body: &str) -> Value {
    json!({ "headline": headline, "body": body, "next_update_in": "2h" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_valid_bearer_token() {
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    let incidents = api(&server, "/incidents");

    let none = client().get(&incidents).send().await.unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_of(none).await, (401, "unauthorized".into()));
    let wrong = client()
        .get(&incidents)
        .bearer_auth("lead-token-0123456789abcdefghiX")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong).await, (401, "unauthorized".into()));
    let basic = client()
        .get(&incidents)
        .basic_auth("lead", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(basic).await, (401, "unauthorized".into()));

    for token in [TOKEN, PARTNER_TOKEN] {
        let right = client()
            .get(&incidents)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(right).await;
        assert_eq!((status, body), (200, json!([])));
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_name_is_the_author_and_an_idempotency_key_replays_the_first_answer() {
    let (crier, smtp) = api_crier();
    crier.subscribe("AB-1001", "ann@example.com").await;
    let server = serve(&crier).await;
    let send = |key: &'static str, body: Value| {
        let url = api(&server, "/updates");
        async move {
            client()
                .post(url)
                .bearer_auth(PARTNER_TOKEN)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };

    let first = send("send-1", update_body("Activations delayed", "We're on it.")).await;
    assert_eq!(first.headers().get("idempotent-replayed"), None);
    let (status, accepted) = json_of(first).await;
    assert_eq!(status, 202, "{accepted}");
    let again = send("send-1", update_body("Activations delayed", "We're on it.")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (status, replayed) = json_of(again).await;
    assert_eq!((status, &replayed), (202, &accepted), "the same answer");
    // The same request written another way (keys in another order, other spacing) is the
    // same request.
    let rewritten = client()
        .post(api(&server, "/updates"))
        .bearer_auth(PARTNER_TOKEN)
        .header("idempotency-key", "send-1")
        .header("content-type", "application/json")
        .body("{\n  \"next_update_in\" : \"2h\",\n  \"body\": \"We're on it.\",  \"headline\":\"Activations delayed\"\n}")
        .send()
        .await
        .unwrap();
    assert_eq!(rewritten.headers()["idempotent-replayed"], "true");
    let (status, replayed) = json_of(rewritten).await;
    assert_eq!((status, &replayed), (202, &accepted), "the same answer");

    let other = send(
        "send-1",
        update_body("Activations delayed", "Another text."),
    )
    .await;
    assert_eq!(
        error_of(other).await,
        (422, "idempotency_key_reused".into())
    );

    let (_, incidents) = json_of(
        client()
            .get(api(&server, "/incidents"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(incidents.as_array().unwrap().len(), 1, "{incidents}");
    assert_eq!(
        incidents[0]["updates"],
        json!([accepted["update"]]),
        "one update, whatever the retries"
    );
    assert!(
        wait_until(Duration::from_secs(30), || smtp.count() == 1).await,
        "the server delivered it, once: {}",
        smtp.count()
    );
    let progress = api(
        &server,
        &format!("/updates/{}", accepted["update"].as_str().unwrap()),
    );
    let (status, progress) = json_of(
        client()
            .get(progress)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{progress}");
    assert_eq!(progress["planned"], true);
    assert_eq!(progress["channels"]["email"]["sent"], 1, "{progress}");
    stop(server).await;

    let update = crier
        .store()
        .await
        .update(accepted["update"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap();
    assert_eq!(update.author, "partner", "the token's name is the author");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.count(), 1, "the replay sent nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_4xx_json_never_a_500() {
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    let post = |path: &str, content_type: &str, body: Vec<u8>| {
        client()
            .post(api(&server, path))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let get = |path: &str| client().get(api(&server, path)).bearer_auth(TOKEN).send();
    let json = "application/json";

    let cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "malformed JSON",
            post("/updates", json, b"{\"body\": ".to_vec())
                .await
                .unwrap(),
            400,
            "malformed",
        ),
        (
            "an unknown field",
            post(
                "/updates",
                json,
                br#"{"body": "x", "colour": "red"}"#.to_vec(),
            )
            .await
            .unwrap(),
            422,
            "invalid",
        ),
        (
            "a field of the wrong type",
            post("/updates", json, br#"{"body": 7}"#.to_vec())
                .await
                .unwrap(),
            422,
            "invalid",
        ),
        (
            "a new incident without a headline",
            post("/updates", json, br#"{"body": "x"}"#.to_vec())
                .await
                .unwrap(),
            422,
            "invalid",
        ),
        (
            "a bad order number in the audience",
            post(
                "/updates",
                json,
                br#"{"headline": "h", "body": "x", "orders": ["nonsense"]}"#.to_vec(),
            )
            .await
            .unwrap(),
            422,
            "invalid",
        ),
        (
            "a body that is not JSON",
            post("/updates", "text/plain", b"hello".to_vec())
                .await
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            "an oversized body",
            post(
                "/preview",
                json,
                format!("{{\"body\": \"{}\"}}", "x".repeat(2 << 20)).into_bytes(),
            )
            .await
            .unwrap(),
            413,
            "payload_too_large",
        ),
        (
            "a bad order number",
            get("/orders/nonsense").await.unwrap(),
            422,
            "invalid",
        ),
        (
            "a bad order number to subscribe",
            post(
                "/subscribers",
                json,
                br#"{"order": "nonsense", "email": "ann@example.com"}"#.to_vec(),
            )
            .await
            .unwrap(),
            422,
            "invalid",
        ),
        (
            "a bad email address",
            post(
                "/subscribers",
                json,
                br#"{"order": "AB-1001", "email": "ann@"}"#.to_vec(),
            )
            .await
            .unwrap(),
            422,
            "invalid",
        ),
        (
            "an unknown subscriber",
            client()
                .delete(api(&server, "/subscribers/nobody%40example.com"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            "an update id that is not one",
            get("/updates/12").await.unwrap(),
            422,
            "invalid",
        ),
        (
            "an unknown update",
            get("/updates/01JCRQ8W5ZC3X4X9PS9VNE4C3T").await.unwrap(),
            404,
            "not_found",
        ),
        (
            "an unknown query parameter",
            get("/deliveries?colour=red").await.unwrap(),
            422,
            "invalid",
        ),
        (
            "an unknown route",
            get("/nothing-here").await.unwrap(),
            404,
            "not_found",
        ),
        (
            "an over-long support link",
            post(
                "/links",
                json,
                br#"{"order": "AB-1001", "expires": "365d"}"#.to_vec(),
            )
            .await
            .unwrap(),
            422,
            "invalid",
        ),
    ];
    for (what, response, status, code) in cases {
        assert_eq!(
            error_of(response).await,
            (status, code.to_owned()),
            "{what}"
        );
    }
    stop(server).await;
}

/// Every route the admin API has, as `METHOD /path`: the OpenAPI document must list each.
const ROUTES: [&str; 11] = [
    "POST /api/updates",
    "POST /api/preview",
    "GET /api/updates/{id}",
    "GET /api/incidents",
    "GET /api/deliveries",
    "POST /api/deliveries/retry",
    "POST /api/subscribers",
    "POST /api/subscribers/import",
    "DELETE /api/subscribers/{contact}",
    "GET /api/orders/{order}",
    "POST /api/links",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_and_every_listed_route_is_served() {
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    let (status, document) = json_of(
        client()
            .get(api(&server, "/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{document}"
    );
    // Valid against the OpenAPI schema its version names, as client generators check it.
    let file = crier.path("openapi.json");
    std::fs::write(&file, document.to_string()).unwrap();
    let validated = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))",
        ])
        .arg(&file)
        .output()
        .expect("python3 runs (scripts/test.sh installs openapi-spec-validator from PyPI)");
    assert!(
        validated.status.success(),
        "the OpenAPI document is invalid:\n{}",
        String::from_utf8_lossy(&validated.stderr)
    );
    let mut documented = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "delete", "put", "patch"].contains(&method.as_str()) {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    documented.sort();
    let mut expected: Vec<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    expected.sort();
    assert_eq!(documented, expected, "the document and the routes agree");

    // Each documented route exists and is guarded: without a token, 401, never 404 or 405.
    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "01JCRQ8W5ZC3X4X9PS9VNE4C3T")
            .replace("{contact}", "ann%40example.com")
            .replace("{order}", "AB-1001");
        let request = client().request(method.parse().unwrap(), format!("{}{path}", server.base));
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 401, "{route}");
    }
    assert!(
        document["components"]["securitySchemes"]["bearer"].is_object(),
        "{document}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_when_a_token_variable_is_unset() {
    let (crier, _smtp) = api_crier();
    let crier = crier.without_env("CRIER_PARTNER_TOKEN");
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(&crier.config, config).unwrap();
    let output = crier.run(&["serve"]).await;
    assert_eq!(output.code, 1, "{}", output.stderr);
    assert!(
        output.stderr.contains("CRIER_PARTNER_TOKEN"),
        "{}",
        output.stderr
    );
}

/// The list-unsubscribe link of an email.
fn unsubscribe_link(data: &str) -> String {
    let header = raw_header(data, "List-Unsubscribe");
    header
        .split(['<', '>'])
        .find(|part| part.starts_with("https://"))
        .unwrap_or_else(|| panic!("no https link in {header}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_serve_runs_the_cli_goes_through_its_api_from_subscribe_to_unsubscribe() {
    let (crier, smtp) = api_crier();
    let server = serve(&crier).await;

    // A customer subscribes on the form and confirms with the emailed link's button.
    let (token, _) = open_form(&server, "?order=AB-1001").await;
    let fields = [
        ("order", "AB-1001"),
        ("email", "ann@example.com"),
        ("phone", ""),
        ("website", ""),
        ("csrf", token.field.as_str()),
    ];
    let answer = post_form(&server, Some(&token.cookie), &fields).await;
    assert_eq!(answer.status(), 200);
    assert!(wait_until(Duration::from_secs(20), || smtp.count() == 1).await);
    let link = confirm_link(&smtp.messages()[0].data);
    let confirmed = press_yes(&server, &link).await;
    assert_eq!(confirmed.status(), 200);

    // Support subscribes another contact with the CLI: through the API, the store is held.
    let output = crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1002",
            "--email",
            "bob@example.com",
            "--confirmed",
        ])
        .await;
    output.assert_ok();
    assert!(
        output
            .stdout
            .contains("bob@example.com follows AB-1002 (confirmed)"),
        "{}",
        output.stdout
    );

    // The comms lead sends while the server runs: the server delivers, send follows.
    let sent = crier
        .send(&["--next-update-in", "2h"], "We're on it.")
        .await;
    assert_eq!(sent["channels"]["email"]["sent"], 2, "{sent}");
    let update_id = sent["update"].as_str().unwrap().to_owned();
    assert_eq!(
        smtp.per_recipient()["ann@example.com"],
        2,
        "the confirmation, then the update"
    );
    assert_eq!(smtp.per_recipient()["bob@example.com"], 1);

    // Support looks the order up: masked contacts, the update, a reply to paste.
    let order = crier.run(&["order", "AB-1001", "--json"]).await;
    order.assert_ok();
    let order = order.json();
    assert_eq!(order["update"]["id"], update_id.as_str());
    assert_eq!(order["contacts"][0]["contact"], "a***@example.com");
    assert_eq!(order["contacts"][0]["deliveries"]["email"], "sent");
    assert!(
        order["snippet"]
            .as_str()
            .unwrap()
            .contains("https://status.example.com/s/"),
        "{order}"
    );
    let deliveries = crier.run(&["deliveries", "--json", "--failed"]).await;
    deliveries.assert_ok();
    assert_eq!(deliveries.json()["failures"], json!([]));
    let link = crier
        .run(&["link", "--order", "AB-1001", "--email", "cy@example.com"])
        .await;
    link.assert_ok();
    assert!(
        link.stdout.starts_with("https://status.example.com/s/"),
        "{}",
        link.stdout
    );

    // Ann leaves with one click from her email client (RFC 8058), Bob through support.
    let update_mail = smtp
        .messages()
        .into_iter()
        .find(|m| m.rcpt_tos == ["ann@example.com"] && m.data.contains("We're on it."))
        .unwrap();
    let one_click = client()
        .post(local(&server, &unsubscribe_link(&update_mail.data)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(one_click.status(), 200);
    crier
        .run(&["unsubscribe", "--email", "bob@example.com"])
        .await
        .assert_ok();

    let output = crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--headline",
            "Fixed",
            "All done.",
        ])
        .await;
    output.assert_ok();
    assert!(
        output.stderr.contains("by crier serve at"),
        "{}",
        output.stderr
    );
    assert_eq!(smtp.per_recipient()["ann@example.com"], 2, "nothing more");
    assert_eq!(smtp.per_recipient()["bob@example.com"], 1, "nothing more");
    let log = server.log.clone();
    stop(server).await;
    let log = log.lock().unwrap().join("\n");
    for contact in [
        "ann@example.com",
        "bob@example.com",
        "cy@example.com",
        "ann%40",
    ] {
        assert!(
            !log.contains(contact),
            "{contact} in the server's log:\n{log}"
        );
    }
    let delivered: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("delivery") && line.contains("outcome=\"sent\""))
        .collect();
    assert!(
        delivered
            .iter()
            .any(|line| line.contains("a***@example.com") && line.contains("channel=\"email\"")),
        "one line per delivery outcome, the contact masked:\n{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("request") && line.contains("/api/updates")),
        "one line per request:\n{log}"
    );
    let latest = crier.run(&["deliveries", "--json"]).await;
    latest.assert_ok();
    assert_eq!(
        latest.json()["headline"],
        "Fixed",
        "after the server stops, the CLI reads the store itself again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_serve_runs_a_cli_without_a_token_says_what_to_set() {
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    let crier = crier
        .without_env("CRIER_API_TOKEN")
        .without_env("CRIER_PARTNER_TOKEN");
    let output = crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "ann@example.com",
        ])
        .await;
    assert_eq!(output.code, 1, "{}", output.stderr);
    output.assert_user_error("crier serve is running");
    assert!(
        output.stderr.contains("CRIER_API_TOKEN"),
        "{}",
        output.stderr
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_file_over_the_json_limit_is_imported_through_the_api_with_bad_rows_reported()
{
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    // 40,000 rows, about 1.4 MiB: over the 1 MiB a JSON body may be, within the import's limit.
    let mut csv = String::from("order,email,phone,confirmed\n");
    for n in 0..40_000 {
        csv.push_str(&format!(
            "AB-{:06},customer{n}@example.com,,true\n",
            n % 5000
        ));
    }
    csv.push_str("nonsense,ann@example.com,,true\n");
    assert!(csv.len() > 1 << 20);
    let import = |content_type: &'static str, body: String| {
        client()
            .post(api(&server, "/subscribers/import"))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let (status, report) = json_of(import("text/csv", csv).await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows"], 40_001, "{report}");
    assert_eq!(report["imported"], 40_000, "{report}");
    assert_eq!(report["refused"], 1, "{report}");
    assert_eq!(report["refusals"][0]["line"], 40_002, "{report}");

    let jsonl = "{\"order\": \"AB-1001\", \"phone\": \"+447700900123\"}\n".to_owned();
    let (status, report) = json_of(import("application/x-ndjson", jsonl).await.unwrap()).await;
    assert_eq!((status, &report["imported"]), (200, &json!(1)), "{report}");
    let wrong = import("application/json", "[]".into()).await.unwrap();
    assert_eq!(
        error_of(wrong).await,
        (415, "unsupported_media_type".into())
    );

    // The CLI's preview goes through the server too, and says what each channel would send.
    let preview = crier
        .run(&[
            "preview",
            "--json",
            "--headline",
            "Activations delayed",
            "On it.",
        ])
        .await;
    preview.assert_ok();
    let email = &preview.json()["channels"]["email"];
    assert!(
        email
            .as_array()
            .unwrap()
            .iter()
            .any(|part| part["text"].as_str().unwrap().contains("On it.")),
        "{email}"
    );
    stop(server).await;
    assert_eq!(
        crier.store().await.subscriber_count().await.unwrap(),
        40_001,
        "every good row, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_followed_through_a_server_that_stops_says_the_update_is_accepted_and_queued() {
    use crate::support::{FakeApi, Reply};
    use tokio::io::AsyncBufReadExt;
    // A partner that takes a minute to answer: the send is still being followed when the
    // server goes away.
    let partner = FakeApi::start(|_, _| Reply::status(204).after(Duration::from_secs(60))).await;
    let (crier, _smtp) = api_crier();
    let crier = crier.webhook(&format!("{}/hooks", partner.url), "");
    let mut server = serve(&crier).await;
    let mut send = crier
        .command(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "We're on it.",
        ])
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(send.stderr.take().unwrap()).lines();
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let accepted = line.starts_with("accepted update");
            said.push(line);
            if accepted {
                break;
            }
        }
    })
    .await
    .expect("the server accepted the update");
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), send.wait())
        .await
        .expect("the send stops following once the server is gone")
        .unwrap();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await
    {
        said.push(line);
    }
    let said = said.join("\n");
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(
        said.contains("was accepted and stays queued, but crier serve at")
            && said.contains("it is delivered when crier serve runs again"),
        "{said}"
    );
    assert!(!said.contains("error sending request"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_serve_runs_import_goes_through_it_and_dispatch_says_it_is_not_needed() {
    let (crier, _smtp) = api_crier();
    let server = serve(&crier).await;
    let file = crier.path("subscribers.csv");
    std::fs::write(
        &file,
        "order,email,phone,confirmed\nAB-1001,ann@example.com,,true\nnonsense,bob@example.com,,true\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let dry = crier.run(&["import", "--dry-run", "--json", path]).await;
    assert_eq!(dry.code, 1, "a row is refused\n{}", dry.stderr);
    let report = dry.json();
    assert_eq!(report["dry_run"], true, "{report}");
    assert_eq!(report["report"]["imported"], 1, "{report}");
    assert_eq!(report["report"]["refusals"][0]["line"], 3, "{report}");

    let imported = crier.run(&["import", path]).await;
    assert_eq!(imported.code, 1, "{}", imported.stderr);
    assert!(
        imported
            .stdout
            .contains("2 rows: imported 1 (1 new subscribers)"),
        "{}",
        imported.stdout
    );
    assert!(
        imported
            .stdout
            .contains("line 3: 'nonsense' is not an order number")
    );
    let order = crier.run(&["order", "AB-1001", "--json"]).await;
    order.assert_ok();
    assert!(
        order.stdout.contains("a***@example.com"),
        "{}",
        order.stdout
    );

    let dispatch = crier.run(&["dispatch"]).await;
    assert_eq!(dispatch.code, 1, "{}", dispatch.stderr);
    assert!(
        dispatch
            .stderr
            .contains("a crier serve already delivers what is queued"),
        "{}",
        dispatch.stderr
    );
    assert!(
        !dispatch.stderr.contains("wait for it"),
        "{}",
        dispatch.stderr
    );
    stop(server).await;
}
