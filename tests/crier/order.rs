//! `crier order N`: what support needs about one order: the latest update that applies, how it
//! reached each contact (masked), and a reply to paste.

use crate::support::{Crier, SmtpSink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_sees_the_latest_update_for_an_order_its_contacts_masked_and_a_reply() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "").status_page();
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1001", "+447700900123").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    let targeted = crier
        .send(&["--orders", "AB-1002"], "Your SIM ships tomorrow.")
        .await;

    let output = crier.run(&["order", "ab-1001", "--json"]).await;
    output.assert_ok();
    let report = output.json();
    assert_ne!(
        report["update"]["id"], targeted["update"],
        "an update for another order does not apply"
    );
    assert_eq!(report["update"]["headline"], "Activations delayed");
    assert!(report["update"]["next_update_by"].as_str().is_some());
    let contacts = report["contacts"].as_array().unwrap();
    let shown: Vec<&str> = contacts
        .iter()
        .map(|c| c["contact"].as_str().unwrap())
        .collect();
    assert_eq!(shown, ["+44*******123", "a***@example.com"]);
    assert_eq!(contacts[1]["deliveries"]["email"], "sent");
    let snippet = report["snippet"].as_str().unwrap();
    assert!(snippet.contains("AB-1001") && snippet.contains("We're working on it."));
    assert!(snippet.contains("https://status.example.com/"));
    assert!(
        snippet.contains("https://status.example.com/s/"),
        "a support link to subscribe: {snippet}"
    );
    assert!(
        !output.stdout.contains("ann@example.com"),
        "contacts are masked"
    );

    let text = crier.run(&["order", "AB-1002"]).await;
    text.assert_ok();
    assert!(
        text.stdout.contains("Your SIM ships tomorrow."),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("reply to paste"));
    crier
        .run(&["order", "12345"])
        .await
        .assert_user_error("'12345' is not an order number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_order_number_is_answered_with_an_example_not_the_pattern() {
    let crier = Crier::new();
    let output = crier.run(&["order", "12345"]).await;
    output.assert_user_error("'12345' is not an order number: order numbers look like AA-0000");
    assert!(!output.stderr.contains("[A-Z]"), "{}", output.stderr);

    // The operator's own example, checked against the pattern.
    let config = std::fs::read_to_string(&crier.config).unwrap();
    let with_example = config.replace("[orders]\n", "[orders]\nexample = \"AB-1001\"\n");
    std::fs::write(&crier.config, &with_example).unwrap();
    crier
        .run(&["order", "12345"])
        .await
        .assert_user_error("order numbers look like AB-1001");
    std::fs::write(
        &crier.config,
        config.replace("[orders]\n", "[orders]\nexample = \"1001\"\n"),
    )
    .unwrap();
    crier
        .run(&["check-config"])
        .await
        .assert_user_error("orders.example: '1001' does not match orders.pattern");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_sees_everyone_who_ever_followed_the_order_and_where_each_consent_stands() {
    let crier = Crier::new();
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "cat@example.com",
        ])
        .await
        .assert_ok();
    crier.subscribe("AB-1001", "dan@example.com").await;
    crier.subscribe("AB-1002", "dan@example.com").await;
    crier
        .run(&[
            "unsubscribe",
            "--email",
            "dan@example.com",
            "--order",
            "AB-1001",
        ])
        .await
        .assert_ok();

    let report = crier.run(&["order", "AB-1001", "--json"]).await.json();
    let contacts = report["contacts"].as_array().unwrap();
    let seen: Vec<(&str, &str, &str)> = contacts
        .iter()
        .map(|c| {
            (
                c["contact"].as_str().unwrap(),
                c["state"].as_str().unwrap(),
                c["how"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a***@example.com", "confirmed", "by an operator"),
            ("c***@example.com", "pending", "by an operator"),
            ("d***@example.com", "left", "by an operator"),
        ],
        "one who left stays listed, as having left"
    );
    for contact in contacts {
        assert!(
            chrono::DateTime::parse_from_rfc3339(contact["since"].as_str().unwrap()).is_ok(),
            "{contact}"
        );
    }

    let text = crier.run(&["order", "AB-1001"]).await;
    text.assert_ok();
    assert!(
        text.stdout
            .contains("contacts that follow or followed AB-1001:")
            && text.stdout.contains("d***@example.com · left "),
        "{}",
        text.stdout
    );
}
