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
