//! Hardening: hostile input, hostile partners and hostile surroundings (a closed stdout, a file
//! where a folder should be) get a clear answer, never a panic, and leak no secret.

use crate::support::{
    Answer, Crier, FAST_RETRIES, LINK_SECRET, Output, SmtpSink, WebhookSink, unused_url,
};
use chrono::Utc;
use crier::domain::Contact;
use crier::domain::token::{TokenPurpose, TokenSigner};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Runs crier with `input` on its standard input.
async fn run_with_stdin(crier: &Crier, args: &[&str], input: &[u8]) -> Output {
    let mut command = crier.command(args);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("crier runs");
    let mut stdin = child.stdin.take().unwrap();
    // crier may refuse before it reads everything: a broken pipe here is its right.
    let _ = stdin.write_all(input).await;
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("crier finished within a minute")
        .expect("crier runs");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Not a panic (exit code 101, "panicked" on stderr).
#[track_caller]
fn assert_no_panic(what: &str, output: &Output) {
    assert_ne!(
        output.code, 101,
        "{what} panicked\nstdout: {}\nstderr: {}",
        output.stdout, output.stderr
    );
    assert!(
        !output.stderr.contains("panicked"),
        "{what} panicked\nstdout: {}\nstderr: {}",
        output.stdout,
        output.stderr
    );
}

/// Exit code 1 and exactly one line on stderr, whatever it says.
#[track_caller]
fn assert_one_line_user_error(what: &str, output: &Output) {
    assert_no_panic(what, output);
    assert_eq!(
        output.code, 1,
        "{what}: expected exit code 1\nstdout: {}\nstderr: {}",
        output.stdout, output.stderr
    );
    assert_eq!(
        output.stderr.lines().count(),
        1,
        "{what}: expected one line on stderr, got: {}",
        output.stderr
    );
}

fn email_channel(transport: &str, extra: &str) -> String {
    format!(
        "kind = \"email\"\nfrom = \"Example Mobile <updates@example.com>\"\ntransport = \"{transport}\"\n{extra}"
    )
}

async fn assert_nothing_stored(crier: &Crier) {
    assert!(
        crier
            .store()
            .await
            .recent_updates(1)
            .await
            .unwrap()
            .is_empty(),
        "no update was stored"
    );
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

// ---- 1. Retry-After beyond any clock --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_any_clock_neither_panics_nor_leaves_a_delivery_in_flight() {
    let sink = WebhookSink::start(&[Answer::retry_after(503, 99_999_999_999_999_999)]).await;
    let crier = Crier::new().webhook(&sink.url, FAST_RETRIES);

    let send = crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "Activations delayed",
            "We're on it.",
        ])
        .await;
    assert_no_panic("send", &send);
    assert_ne!(
        send.code, 2,
        "a long Retry-After is not an internal error\nstdout: {}\nstderr: {}",
        send.stdout, send.stderr
    );
    // A wait no clock can hold is no wait at all: the usual backoff applies, and the second
    // attempt (which the partner takes) delivers it.
    assert_eq!(
        sink.received().len(),
        2,
        "the partner was asked again after the usual backoff"
    );
    assert_eq!(send.code, 0, "{}", send.stderr);

    let dispatch = crier.run(&["dispatch"]).await;
    assert_no_panic("dispatch", &dispatch);

    let counts = crier.run(&["deliveries", "--json"]).await;
    counts.assert_ok();
    let counts = counts.json();
    assert_eq!(
        counts["channels"]["partners"]["in_flight"], 0,
        "nothing is left in flight: {counts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_age_beyond_any_clock_is_refused_with_its_key() {
    let crier = Crier::new().webhook(
        "http://127.0.0.1:9/hooks",
        "[delivery]\nmax_age = \"100000000y\"\n",
    );
    let output = crier.run(&["check-config"]).await;
    assert_no_panic("check-config", &output);
    output.assert_user_error("delivery.max_age");
}

// ---- 2. control characters ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headline_or_body_with_control_characters_is_refused_and_nothing_stored() {
    let crier = Crier::new().status_page();
    let cases: [(&str, &str); 6] = [
        ("Activations \u{1b}[31mdelayed", "We're on it."),
        (
            "Activations delayed",
            "We're \u{1b}]8;;https://evil.example\u{7}on it.",
        ),
        ("Activations \u{1}delayed", "We're on it."),
        ("Activations delayed", "We're \u{1}on it."),
        ("Activations delayed", "We're\u{b}on it."),
        ("Activations\u{c}delayed", "We're\u{c}on it."),
    ];
    for command in [&["send", "--yes"][..], &["preview"][..]] {
        for (headline, body) in cases {
            let mut args = command.to_vec();
            args.extend(["--headline", headline, body]);
            let output = crier.run(&args).await;
            assert_no_panic(command[0], &output);
            output.assert_user_error("control character");
        }
        // Text that displays in another order than it was typed.
        for (headline, body) in [
            ("Refund \u{202e}00.01$", "We're on it."),
            ("Activations delayed", "Pay \u{2067}here\u{2069} now."),
        ] {
            let mut args = command.to_vec();
            args.extend(["--headline", headline, body]);
            let output = crier.run(&args).await;
            assert_no_panic(command[0], &output);
            output.assert_user_error("bidirectional control");
        }
        // NUL cannot be an argument: it comes on standard input.
        let mut args = command.to_vec();
        args.extend(["--headline", "Activations delayed", "-"]);
        let output = run_with_stdin(&crier, &args, b"We're\0on it.").await;
        assert_no_panic(command[0], &output);
        output.assert_user_error("control character");
    }
    assert_nothing_stored(&crier).await;

    let body = "We're on it.\n\n\tStep one: activations.\n\tStep two: porting.";
    crier
        .run(&["preview", "--headline", "Activations delayed", body])
        .await
        .assert_ok();
    crier
        .run(&["send", "--yes", "--headline", "Activations delayed", body])
        .await
        .assert_ok();
    assert_eq!(
        crier.store().await.recent_updates(1).await.unwrap().len(),
        1,
        "tabs and newlines are text"
    );
}

// ---- 3. permissions -------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_world_readable_and_the_store_and_outbox_are_private() {
    let crier = Crier::new()
        .status_page()
        .channel("email", &email_channel("file://var/outbox", ""));
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    let summary = crier.send(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["email"]["sent"], 2, "{summary}");
    assert_eq!(summary["channels"]["status"]["sent"], 1, "{summary}");

    for page in ["status.html", "feed.atom", "status.json"] {
        let path = crier.path(&format!("var/status/{page}"));
        assert_eq!(mode(&path), 0o644, "{}", path.display());
    }

    let outbox = crier.path("var/outbox");
    assert_eq!(mode(&outbox), 0o700, "{}", outbox.display());
    let emails: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    assert_eq!(emails.len(), 2, "{emails:?}");
    for email in &emails {
        assert_eq!(mode(email), 0o600, "{}", email.display());
    }

    let store = crier.path("var/store");
    assert_eq!(mode(&store), 0o700, "{}", store.display());
    let mut files = 0;
    for entry in std::fs::read_dir(&store).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files += 1;
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    assert!(files > 0, "the store has files");
}

// ---- 4. email addresses ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internationalised_domain_and_its_punycode_are_one_subscriber() {
    let crier = Crier::new().status_page();
    crier.subscribe("AB-1001", "user@bücher.de").await;
    crier.subscribe("AB-1002", "user@xn--bcher-kva.de").await;
    crier.subscribe("AB-1001", "user@xn--bcher-kva.de").await;
    assert_eq!(crier.store().await.subscriber_count().await.unwrap(), 1);

    for address in ["\"john doe\"@example.com", "a@[127.0.0.1]"] {
        let output = crier
            .run(&[
                "subscribe",
                "--order",
                "AB-1003",
                "--email",
                address,
                "--confirmed",
            ])
            .await;
        assert_one_line_user_error(address, &output);
    }
    assert_eq!(crier.store().await.subscriber_count().await.unwrap(), 1);
}

// ---- 5. --next-update-in --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_update_beyond_any_clock_or_right_now_is_refused() {
    let crier = Crier::new().status_page();
    for wait in ["999999999y", "0s"] {
        let output = crier
            .run(&[
                "send",
                "--yes",
                "--headline",
                "Activations delayed",
                "--next-update-in",
                wait,
                "We're on it.",
            ])
            .await;
        assert_one_line_user_error(&format!("--next-update-in {wait}"), &output);
    }
    assert_nothing_stored(&crier).await;
}

// ---- 6. standard input ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_on_standard_input_that_is_not_utf8_is_refused_in_one_line() {
    let crier = Crier::new().status_page();
    let output = run_with_stdin(
        &crier,
        &["send", "--yes", "--headline", "H", "-"],
        &[0xff, 0xfe, b'a'],
    )
    .await;
    assert_no_panic("send", &output);
    output.assert_user_error("UTF-8");
    assert_nothing_stored(&crier).await;
}

// ---- 7. an outbox below a file --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_outbox_below_a_regular_file_is_a_configuration_error() {
    let crier = Crier::new().channel("email", &email_channel("file://blocker/outbox", ""));
    std::fs::write(crier.path("blocker"), "not a folder").unwrap();
    let output = crier.run(&["check-config"]).await;
    assert_no_panic("check-config", &output);
    output.assert_user_error("transport");
}

// ---- 8. closed stdout -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_standard_output_is_not_a_panic() {
    let crier = Crier::new().status_page();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut command = crier.command(&["check-config"]);
    command.stdout(Stdio::from(writer));
    let child = command.spawn().expect("crier runs");
    drop(command);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("crier finished within a minute")
        .expect("crier runs");
    let output = Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_no_panic("check-config with a closed stdout", &output);
}

// ---- 9. secrets -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_padded_empty_or_tiny_secret_is_refused_with_the_reason() {
    let with_link_secret = |secret: &str| {
        Crier::new()
            .status_page()
            .with_env("CRIER_LINK_SECRET", secret)
    };

    let output = with_link_secret(&" ".repeat(16))
        .run(&["check-config"])
        .await;
    output.assert_user_error("whitespace");

    let output = with_link_secret(&format!("{}\n", "x".repeat(15)))
        .run(&["check-config"])
        .await;
    assert_one_line_user_error("a 15-character secret and a newline", &output);

    let output = with_link_secret("").run(&["check-config"]).await;
    output.assert_user_error("empty");
    assert!(!output.stderr.contains("not set"), "{}", output.stderr);

    let output = Crier::new()
        .webhook("http://127.0.0.1:9/hooks", "")
        .with_env("CRIER_WEBHOOK_SECRET", "whsec_AQ==")
        .run(&["check-config"])
        .await;
    output.assert_user_error("bytes");
}

// ---- 10. a token in a webhook URL -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_webhook_url_never_prints() {
    const TOKEN: &str = "s3cret-value";
    let crier = Crier::new().webhook(&format!("{}?token={TOKEN}", unused_url()), FAST_RETRIES);

    let send = crier
        .run(&["send", "--yes", "--headline", "H", "We're on it."])
        .await;
    assert_eq!(
        send.code, 3,
        "the partner is down: nothing was delivered\nstdout: {}\nstderr: {}",
        send.stdout, send.stderr
    );
    let failed_json = crier.run(&["deliveries", "--failed", "--json"]).await;
    failed_json.assert_ok();
    assert_eq!(
        failed_json.json()["failures"].as_array().map(Vec::len),
        Some(1),
        "{}",
        failed_json.stdout
    );
    let failed = crier.run(&["deliveries", "--failed"]).await;
    failed.assert_ok();
    let check = crier.run(&["check-config"]).await;
    check.assert_ok();

    for (what, output) in [
        ("send", &send),
        ("deliveries --failed", &failed),
        ("deliveries --failed --json", &failed_json),
        ("check-config", &check),
    ] {
        assert!(
            !output.stdout.contains(TOKEN) && !output.stderr.contains(TOKEN),
            "{what} printed the token\nstdout: {}\nstderr: {}",
            output.stdout,
            output.stderr
        );
    }
}

// ---- 11. a store that cannot be opened ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_below_a_regular_file_is_one_line_naming_the_path() {
    let crier = Crier::new().status_page();
    std::fs::write(crier.path("blocker"), "not a folder").unwrap();
    let main = std::fs::read_to_string(&crier.config).unwrap();
    assert!(main.contains("path = \"var/store\""));
    std::fs::write(
        &crier.config,
        main.replace("path = \"var/store\"", "path = \"blocker/store\""),
    )
    .unwrap();

    let output = crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "ann@example.com",
            "--confirmed",
        ])
        .await;
    assert_no_panic("subscribe", &output);
    assert_ne!(
        output.code, 0,
        "the store cannot be opened\nstderr: {}",
        output.stderr
    );
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {}", output.stderr);
    assert!(lines[0].contains("blocker/store"), "{}", output.stderr);
    assert!(
        !output.stderr.to_lowercase().contains("backtrace"),
        "{}",
        output.stderr
    );
    assert!(!output.stderr.contains("\u{1b}["), "{:?}", output.stderr);
}

// ---- 12. a pasted unsubscribe link ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_accepts_the_whole_link_pasted_from_an_email() {
    let crier = Crier::new().status_page();
    crier.subscribe("AB-1001", "ann@example.com").await;
    let token = TokenSigner::new(LINK_SECRET).issue(
        TokenPurpose::Unsubscribe,
        "ann@example.com",
        Utc::now() + chrono::Duration::days(1),
    );
    let pasted = format!("<https://status.example.com/unsubscribe/{token}>");
    crier
        .run(&["unsubscribe", "--token", &pasted])
        .await
        .assert_ok();
    let ann = crier
        .store()
        .await
        .subscriber(&Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .expect("ann is known");
    assert!(!ann.receives_updates(), "ann no longer receives updates");
}

// ---- 13. SMTP AUTH the server cannot do -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_the_server_cannot_do_is_a_permanent_failure_not_retried() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier
        .channel(
            "email",
            &email_channel(
                &format!("smtp://user@127.0.0.1:{}", smtp.port),
                &format!("password_env = \"CRIER_SMTP_PASSWORD\"\n{FAST_RETRIES}"),
            ),
        )
        .with_env("CRIER_SMTP_PASSWORD", "an-smtp-password-for-tests");
    crier.subscribe("AB-1001", "ann@example.com").await;

    let summary = crier.send_to_no_avail("We're on it.").await;
    assert_eq!(summary["channels"]["email"]["dead"], 1, "{summary}");
    assert_eq!(smtp.count(), 0);

    let failed = crier.run(&["deliveries", "--failed", "--json"]).await;
    failed.assert_ok();
    let failed = failed.json();
    let failure = &failed["failures"][0];
    assert_eq!(failure["attempts"], 1, "not retried: {failure}");
    assert!(
        failure["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("authentication"),
        "{failure}"
    );
}

// ---- 14. a long Retry-After does not hold the store -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_leaves_a_long_retry_after_to_dispatch_instead_of_holding_the_store() {
    let sink = WebhookSink::start(&[Answer::retry_after(503, 120)]).await;
    let crier = Crier::new().webhook(&sink.url, "");

    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        crier
            .command(&["send", "--yes", "--headline", "H", "We're on it."])
            .output(),
    )
    .await
    .expect("send returns within 30 seconds")
    .expect("crier runs");
    let elapsed = started.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "after {elapsed:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("crier dispatch"), "{stderr}");
    assert_eq!(sink.received().len(), 1);

    let counts = crier.run(&["deliveries", "--json"]).await;
    counts.assert_ok();
    let counts = counts.json();
    assert_eq!(counts["channels"]["partners"]["retrying"], 1, "{counts}");
}

// ---- 15. nothing was interrupted ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_after_clean_runs_reports_nothing_left_in_flight() {
    let sink = WebhookSink::start(&[Answer::retry_after(503, 120)]).await;
    let crier = Crier::new().webhook(&sink.url, "").status_page();

    // On a fresh store.
    let output = crier.run(&["dispatch"]).await;
    output.assert_ok();
    assert!(
        !output.stderr.contains("left in flight"),
        "{}",
        output.stderr
    );

    // After a send that finished cleanly, leaving one retry for later.
    let send = crier
        .run(&["send", "--yes", "--headline", "H", "We're on it."])
        .await;
    send.assert_ok();
    assert!(!send.stderr.contains("left in flight"), "{}", send.stderr);
    for _ in 0..2 {
        let output = crier.run(&["dispatch"]).await;
        output.assert_ok();
        assert!(
            !output.stderr.contains("left in flight"),
            "{}",
            output.stderr
        );
    }
}
