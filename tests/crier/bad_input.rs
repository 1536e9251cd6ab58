//! Bad input gets a clear one-line error, exit code 1, and nothing is stored.

use crate::support::{Crier, LINK_SECRET, WebhookSink};
use chrono::{Duration, Utc};
use crier::config::Config;
use crier::domain::Contact;
use crier::domain::token::{TokenPurpose, TokenSigner};

async fn assert_no_subscribers(crier: &Crier) {
    if crier.path("var/store").exists() {
        assert_eq!(
            crier.store().await.subscriber_count().await.unwrap(),
            0,
            "nothing was stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_order_number_email_or_phone_is_refused_and_nothing_stored() {
    let crier = Crier::new().status_page();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--order", "12345", "--email", "ann@example.com"],
            "'12345' is not an order number",
        ),
        (
            &["--order", "AB-1001x", "--email", "ann@example.com"],
            "'AB-1001x' is not an order number",
        ),
        (
            &["--order", "AB-1001", "--email", "ann@"],
            "'ann@' is not an email address",
        ),
        (
            &["--order", "AB-1001", "--phone", "07700900123"],
            "is not a phone number in E.164 form",
        ),
        (
            &["--order", "AB-1001", "--phone", "+44123"],
            "wrong number of digits",
        ),
    ];
    for (args, message) in cases {
        let mut full = vec!["subscribe", "--confirmed"];
        full.extend_from_slice(args);
        crier.run(&full).await.assert_user_error(message);
    }
    assert_no_subscribers(&crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_config_key_is_reported_with_its_file_and_key() {
    let crier = Crier::new().status_page();
    let mut main = std::fs::read_to_string(&crier.config).unwrap();
    main.insert_str(0, "colour = \"red\"\n");
    std::fs::write(&crier.config, &main).unwrap();
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("crier.toml:1: colour: unknown field `colour`");

    let crier = Crier::new()
        .status_page()
        .webhook("http://127.0.0.1:9/hooks", "colour = \"red\"\n");
    let output = crier.run(&["check-config"]).await;
    output.assert_user_error("unknown field `colour`");
    assert!(
        output.stderr.contains("channels/partners.toml"),
        "{}",
        output.stderr
    );

    let crier = Crier::new().webhook("http://127.0.0.1:9/hooks", "[delivery]\nretries = 3\n");
    crier
        .run(&["send", "--yes", "--headline", "H", "Body"])
        .await
        .assert_user_error("unknown field `retries`");
    assert!(!crier.path("var/store").exists(), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_that_is_no_address_is_named() {
    let crier = Crier::new().status_page();
    let mut main = std::fs::read_to_string(&crier.config).unwrap();
    main.push_str("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.internal\"]\n");
    std::fs::write(&crier.config, &main).unwrap();
    crier.run(&["check-config"]).await.assert_user_error(
        "server.trusted_proxies: 'proxy.internal' is not an address or a network like 10.0.0.0/8",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_alerts_setting_is_named() {
    let cases = [
        ("to = \"lead-at-example.com\"\n", "alerts.to: "),
        (
            "lead_time = \"soon\"\n",
            "alerts.lead_time: 'soon' is not a time from 1m to 24h",
        ),
        (
            "lead_time = \"3d\"\n",
            "alerts.lead_time: '3d' is not a time from 1m to 24h",
        ),
        (
            "webhook = \"http://127.0.0.1:9/alerts\"\n",
            "alerts.webhook_secret_env: missing",
        ),
        (
            "webhook = \"ftp://example.com\"\nwebhook_secret_env = \"X\"\n",
            "alerts.webhook: 'ftp://example.com' is not an http(s) URL",
        ),
        (
            "webhook = \"http://127.0.0.1:9/alerts\"\nwebhook_secret_env = \"UNSET_SECRET\"\n",
            "alerts.webhook_secret_env: the environment variable UNSET_SECRET is not set",
        ),
    ];
    for (alerts, message) in cases {
        let crier = Crier::new().status_page();
        let mut main = std::fs::read_to_string(&crier.config).unwrap();
        main.push_str(&format!("[alerts]\n{alerts}"));
        std::fs::write(&crier.config, &main).unwrap();
        crier
            .run(&["check-config"])
            .await
            .assert_user_error(message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_zone_that_is_not_an_iana_name_is_named() {
    let crier = Crier::new().status_page();
    let main = std::fs::read_to_string(&crier.config).unwrap();
    let main = main.replace(
        "public_url = \"https://status.example.com\"\n",
        "public_url = \"https://status.example.com\"\ntime_zone = \"London\"\n",
    );
    std::fs::write(&crier.config, main).unwrap();
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("brand.time_zone: 'London' is not an IANA time zone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brand_colour_logo_or_description_that_cannot_be_used_is_named() {
    let long = "x".repeat(301);
    for (line, message) in [
        (
            "accent_color = \"blue\"",
            "brand.accent_color: 'blue' is not a colour; write it as #rrggbb",
        ),
        (
            "accent_color = \"#12345\"",
            "brand.accent_color: '#12345' is not a colour",
        ),
        (
            "logo_url = \"javascript:alert(1)\"",
            "brand.logo_url: 'javascript:alert(1)' is not an http or https URL",
        ),
        (
            &format!("description = \"{long}\""),
            "brand.description: is longer than 300 characters",
        ),
    ] {
        let crier = Crier::new().status_page();
        let main = std::fs::read_to_string(&crier.config).unwrap().replace(
            "public_url = \"https://status.example.com\"\n",
            &format!("public_url = \"https://status.example.com\"\n{line}\n"),
        );
        std::fs::write(&crier.config, main).unwrap();
        crier
            .run(&["check-config"])
            .await
            .assert_user_error(message);
    }
    let crier = Crier::new().channel(
        "status",
        "kind = \"status_page\"\ndir = \"var/status\"\nhistory_days = 0\n",
    );
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("history_days: must be between 1 and 90");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_variable_or_an_invalid_value_is_named() {
    let crier = Crier::new()
        .webhook("http://127.0.0.1:9/hooks", "")
        .without_env("CRIER_WEBHOOK_SECRET");
    crier.run(&["check-config"]).await.assert_user_error(
        "channels/partners.toml: secret_env: the environment variable CRIER_WEBHOOK_SECRET is not set",
    );
    let crier = Crier::new().status_page().without_env("CRIER_LINK_SECRET");
    crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "ann@example.com",
        ])
        .await
        .assert_user_error(
            "tokens.link_secret_env: the environment variable CRIER_LINK_SECRET is not set",
        );
    assert!(!crier.path("var/store").exists(), "nothing was stored");

    let crier = Crier::new().webhook("not a url", "");
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("url: 'not a url' is not a URL");
    let crier = Crier::new().email(25, "[delivery]\ntimeout = \"soon\"\n");
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("delivery.timeout: 'soon' is not a duration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_out_of_range_in_the_config_names_its_key() {
    let crier = Crier::new();
    let config = std::fs::read_to_string(&crier.config).unwrap();
    std::fs::write(
        &crier.config,
        config.replace("cache_capacity_mb = 16", "cache_capacity_mb = -16"),
    )
    .unwrap();
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("store.cache_capacity_mb: invalid value: integer `-16`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_settings_that_contradict_each_other_are_refused_with_the_key() {
    let cases = [
        (
            "[delivery]\nbackoff_base = \"10m\"\nbackoff_max = \"1m\"\n",
            "delivery.backoff_base: 10 minutes is longer than delivery.backoff_max (1 minute)",
        ),
        (
            "[delivery]\nmax_age = \"5s\"\ntimeout = \"10s\"\n",
            "delivery.max_age: 5 seconds is shorter than one attempt may take (delivery.timeout, 10 seconds)",
        ),
        ("id = \"Not An Id\"\n", "id: use lower-case letters"),
    ];
    for (extra, message) in cases {
        let crier = Crier::new().webhook("http://127.0.0.1:9/hooks", extra);
        crier
            .run(&["check-config"])
            .await
            .assert_user_error(message);
    }
    let crier = Crier::new().status_page().channel(
        "page",
        "kind = \"status_page\"\nid = \"status\"\ndir = \"var/page\"\n",
    );
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("id: 'status' is already the id of");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_over_long_update_is_refused_before_anything_is_stored() {
    let hooks = WebhookSink::start(&[]).await;
    let crier = Crier::new().webhook(&hooks.url, "").status_page();
    crier
        .run(&["send", "--yes", "--headline", "Activations delayed", "  "])
        .await
        .assert_user_error("the body is empty");
    let long = "x".repeat(5_001);
    crier
        .run(&["send", "--yes", "--headline", "Activations delayed", &long])
        .await
        .assert_user_error("the body is 5001 characters long; the limit is 5000");
    // 5,000 four-byte characters, and 200 in the headline, pass their own limits but make a
    // webhook body over 20 KB.
    let wide = "\u{1F4F1}".repeat(5_000);
    let wide_headline = "\u{1F4F1}".repeat(200);
    crier
        .run(&["send", "--yes", "--headline", &wide_headline, &wide])
        .await
        .assert_user_error("channel partners: the JSON body is");
    crier
        .run(&["send", "--yes", "We're on it."])
        .await
        .assert_user_error("a new incident needs --headline");
    crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "H",
            "--channel",
            "pigeon",
            "We're on it.",
        ])
        .await
        .assert_user_error("no channel is named 'pigeon'");
    crier
        .run(&["send", "--headline", "H", "We're on it."])
        .await
        .assert_user_error("add --yes");

    let store = crier.store().await;
    assert!(
        store.recent_updates(10).await.unwrap().is_empty(),
        "no update was stored"
    );
    assert!(
        store.counts(None).await.unwrap().is_empty(),
        "no delivery was planned"
    );
    assert!(hooks.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_expired_or_misused_unsubscribe_token_changes_nothing() {
    let crier = Crier::new().status_page();
    crier.subscribe("AB-1001", "ann@example.com").await;
    let genuine = TokenSigner::new(LINK_SECRET);
    let forger = TokenSigner::new("a secret the forger made up");
    let tomorrow = Utc::now() + Duration::days(1);
    let cases = [
        (
            forger.issue(TokenPurpose::Unsubscribe, "ann@example.com", tomorrow),
            "signature is not valid",
        ),
        (
            genuine.issue(
                TokenPurpose::Unsubscribe,
                "ann@example.com",
                Utc::now() - Duration::minutes(1),
            ),
            "the link expired",
        ),
        (
            genuine.issue(TokenPurpose::Confirm, "ann@example.com", tomorrow),
            "made for something else",
        ),
        ("not-a-token".to_owned(), "malformed"),
    ];
    for (token, message) in cases {
        crier
            .run(&["unsubscribe", "--token", &token])
            .await
            .assert_user_error(message);
    }
    let ann = crier
        .store()
        .await
        .subscriber(&Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(ann.receives_updates(), "ann is still subscribed");

    let valid = genuine.issue(TokenPurpose::Unsubscribe, "ann@example.com", tomorrow);
    crier
        .run(&["unsubscribe", "--token", &valid])
        .await
        .assert_ok();
}

#[test]
fn the_example_configuration_is_valid() {
    struct Secrets;
    impl crier::config::SecretSource for Secrets {
        fn get(&self, name: &str) -> Option<String> {
            match name {
                "CRIER_LINK_SECRET" => Some("an example secret of some length".into()),
                "CRIER_WEBHOOK_SECRET" => Some(crate::support::webhook_secret()),
                _ => None,
            }
        }
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let config = Config::load(&file, &Secrets).unwrap();
    let names: Vec<&str> = config.channels.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(names, ["email", "partners", "status"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_explains_itself_with_help() {
    let crier = Crier::new();
    for command in [
        "send",
        "preview",
        "subscribe",
        "unsubscribe",
        "dispatch",
        "deliveries",
        "retry",
        "check-config",
    ] {
        let output = crier.run(&[command, "--help"]).await;
        output.assert_ok();
        assert!(
            output.stdout.contains("Usage: crier"),
            "{command}: {}",
            output.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_flag_is_a_one_line_user_error() {
    let crier = Crier::new().status_page();
    let cases: [(&[&str], &str); 5] = [
        (
            &["send", "--yes", "--incident", "nope", "Body"],
            "invalid value 'nope' for '--incident",
        ),
        (
            &["send", "--yes", "--next-update-in", "soonish", "Body"],
            "invalid value 'soonish' for '--next-update-in",
        ),
        (
            &["send", "--yes", "--state", "panicking", "Body"],
            "invalid value 'panicking' for '--state",
        ),
        (
            &["subscribe", "--order", "AB-1001"],
            "--email <EMAIL>|--phone <PHONE>",
        ),
        (
            &["send", "--colour", "red", "Body"],
            "unexpected argument '--colour'",
        ),
    ];
    for (args, message) in cases {
        crier.run(args).await.assert_user_error(message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targeted_update_whose_webhook_body_would_be_too_big_is_refused_at_compose() {
    let hooks = WebhookSink::start(&[]).await;
    let crier = Crier::new().webhook(&hooks.url, "");
    let orders: Vec<String> = (0..1_500)
        .map(|i| format!("AB-{}", 1_000_000_000 + i))
        .collect();
    let file = crier.path("orders.txt");
    std::fs::write(&file, orders.join("\n")).unwrap();
    crier
        .run(&[
            "send",
            "--yes",
            "--headline",
            "H",
            "--orders-file",
            file.to_str().unwrap(),
            "Body",
        ])
        .await
        .assert_user_error("channel partners: the JSON body is");
    assert!(
        crier
            .store()
            .await
            .recent_updates(1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(hooks.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_command_or_flag_gets_a_suggestion() {
    let crier = Crier::new();
    let output = crier.run(&["sned"]).await;
    assert_eq!(output.code, 1);
    assert_eq!(
        output.stderr.trim(),
        "crier: unrecognized subcommand 'sned'; a similar subcommand exists: 'send' (see --help)"
    );
    let output = crier.run(&["send", "--headlin", "x", "body"]).await;
    assert_eq!(output.code, 1);
    assert!(
        output
            .stderr
            .contains("a similar argument exists: '--headline'"),
        "{}",
        output.stderr
    );
    assert_eq!(output.stderr.trim().lines().count(), 1, "{}", output.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_finds_an_admin_token_variable_that_serve_would_need() {
    let crier = Crier::new().status_page();
    let config = std::fs::read_to_string(&crier.config).unwrap()
        + "[api]\ntokens = { lead = \"CRIER_API_TOKEN\" }\n";
    std::fs::write(&crier.config, config).unwrap();
    let crier = crier.without_env("CRIER_API_TOKEN");
    crier.run(&["check-config"]).await.assert_user_error(
        "api.tokens.lead: the environment variable CRIER_API_TOKEN is not set (only crier serve needs it",
    );
    // The other commands do not need it.
    crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "ann@example.com",
        ])
        .await
        .assert_ok();
    let crier = crier.with_env("CRIER_API_TOKEN", "lead-token-0123456789abcdef0123");
    crier.run(&["check-config"]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_would_pass_but_break_every_link_or_limit_is_refused_with_its_key() {
    for (from, to, message) in [
        (
            "public_url = \"https://status.example.com\"\n",
            "public_url = \"https://example.com/status\"\n",
            "brand.public_url: must be the site's address alone",
        ),
        (
            "public_url = \"https://status.example.com\"\n",
            "public_url = \"https://status.example.com/?utm=1\"\n",
            "brand.public_url: must be the site's address alone",
        ),
        (
            "public_url = \"https://status.example.com\"\n",
            "public_url = \"https://status.example.com/#top\"\n",
            "brand.public_url: must be the site's address alone",
        ),
        (
            "pattern = \"[A-Z]{2}-[0-9]{4,10}\"\n",
            "pattern = \".*\"\n",
            "orders.pattern: matches '', so it would take any text as an order number",
        ),
        (
            "pattern = \"[A-Z]{2}-[0-9]{4,10}\"\n",
            "pattern = \".+\"\n",
            "orders.pattern: matches 'HELLO, WORLD!'",
        ),
    ] {
        let crier = Crier::new().status_page();
        let main = std::fs::read_to_string(&crier.config).unwrap();
        assert!(main.contains(from), "{main}");
        std::fs::write(&crier.config, main.replace(from, to)).unwrap();
        crier
            .run(&["check-config"])
            .await
            .assert_user_error(message);
    }
    for everyone in ["0.0.0.0/0", "::/0"] {
        let crier = Crier::new().status_page();
        let mut main = std::fs::read_to_string(&crier.config).unwrap();
        main.push_str(&format!(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"{everyone}\"]\n"
        ));
        std::fs::write(&crier.config, main).unwrap();
        crier
            .run(&["check-config"])
            .await
            .assert_user_error(&format!(
                "server.trusted_proxies: '{everyone}' trusts every address"
            ));
    }
    // The shape of a real site still passes.
    let crier = Crier::new().status_page();
    let main = std::fs::read_to_string(&crier.config).unwrap().replace(
        "public_url = \"https://status.example.com\"\n",
        "public_url = \"https://status.example.com/\"\n",
    );
    std::fs::write(&crier.config, main).unwrap();
    crier.run(&["check-config"]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kannel_channel_that_cannot_hear_stop_is_warned_about() {
    let crier = Crier::new()
        .channel(
            "sms",
            "kind = \"sms\"\nprovider = \"kannel\"\nbase_url = \"http://127.0.0.1:13013\"\nusername = \"crier\"\npassword_env = \"KANNEL_PASSWORD\"\nfrom = \"+447700900000\"\n",
        )
        .with_env("KANNEL_PASSWORD", "kannel-password");
    let output = crier.run(&["check-config"]).await;
    output.assert_ok();
    assert!(
        output.stdout.contains(
            "warning: without inbound_secret_env, crier refuses every reply Kannel forwards, so a STOP never unsubscribes anyone"
        ),
        "{}",
        output.stdout
    );
    let with_secret = crier.channel(
        "sms",
        "kind = \"sms\"\nprovider = \"kannel\"\nbase_url = \"http://127.0.0.1:13013\"\nusername = \"crier\"\npassword_env = \"KANNEL_PASSWORD\"\nfrom = \"+447700900000\"\ninbound_secret_env = \"KANNEL_INBOUND_SECRET\"\n",
    )
    .with_env("KANNEL_INBOUND_SECRET", "a-long-enough-inbound-secret");
    let output = with_secret.run(&["check-config"]).await;
    output.assert_ok();
    assert!(!output.stdout.contains("warning"), "{}", output.stdout);
}
