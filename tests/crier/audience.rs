//! The audience rules: one message per contact, nothing for pending or unsubscribed
//! contacts, and targeted updates only to the named orders.

use crate::support::{Crier, SmtpSink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_following_two_orders_gets_one_email_and_the_partner_one_post() {
    let (crier, smtp, hooks) = Crier::with_every_channel().await;
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "Ann@Example.com").await;
    crier.subscribe("AB-1003", "+447700900123").await;

    let summary = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;

    assert_eq!(
        smtp.per_recipient().into_iter().collect::<Vec<_>>(),
        [("ann@example.com".to_owned(), 1)]
    );
    assert_eq!(hooks.received().len(), 1);
    let counts = &summary["channels"];
    assert_eq!(counts["email"]["sent"], 1);
    assert_eq!(counts["partners"]["sent"], 1);
    assert_eq!(counts["status"]["sent"], 1);

    let mail = &smtp.messages()[0].data;
    assert!(
        mail.contains("You follow orders AB-1001 and AB-1002."),
        "{mail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_and_unsubscribed_contacts_get_nothing() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    crier
        .run(&[
            "subscribe",
            "--order",
            "AB-1001",
            "--email",
            "pending@example.com",
        ])
        .await
        .assert_ok();
    crier.subscribe("AB-1002", "gone@example.com").await;
    crier
        .run(&["unsubscribe", "--email", "gone@example.com"])
        .await
        .assert_ok();
    crier.subscribe("AB-1003", "partly@example.com").await;
    crier.subscribe("AB-1004", "partly@example.com").await;
    crier
        .run(&[
            "unsubscribe",
            "--email",
            "partly@example.com",
            "--order",
            "AB-1003",
        ])
        .await
        .assert_ok();
    crier.subscribe("AB-1005", "ann@example.com").await;

    let summary = crier.send(&[], "We're working on it.").await;

    let recipients: Vec<String> = smtp.per_recipient().into_keys().collect();
    assert_eq!(recipients, ["ann@example.com", "partly@example.com"]);
    assert_eq!(summary["channels"]["email"]["sent"], 2);

    let targeted = crier
        .send(&["--orders", "AB-1003,AB-1001,AB-1002"], "Only for some.")
        .await;
    assert!(targeted["channels"].get("email").is_none(), "{targeted}");
    assert_eq!(
        smtp.count(),
        2,
        "no follower of those orders may receive updates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targeted_update_reaches_only_the_named_orders_and_never_the_status_page() {
    let (crier, smtp, hooks) = Crier::with_every_channel().await;
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "ann@example.com").await;
    crier.subscribe("AB-1003", "bob@example.com").await;
    crier.subscribe("AB-1004", "cat@example.com").await;
    crier.send(&[], "Public update for everyone.").await;
    let public_page = std::fs::read_to_string(crier.path("var/status/status.html")).unwrap();

    let orders_file = crier.path("orders.txt");
    std::fs::write(
        &orders_file,
        "# from the order system\nab-1001\nAB-1002\n\nAB-1003\n",
    )
    .unwrap();
    let summary = crier
        .send(
            &["--orders-file", orders_file.to_str().unwrap()],
            "Your SIM is on its way.",
        )
        .await;

    assert_eq!(summary["channels"]["email"]["sent"], 2, "{summary}");
    assert!(summary["channels"].get("status").is_none(), "{summary}");
    let per_recipient = smtp.per_recipient();
    assert_eq!(per_recipient["ann@example.com"], 2);
    assert_eq!(per_recipient["bob@example.com"], 2);
    assert_eq!(
        per_recipient["cat@example.com"], 1,
        "cat's order was not named"
    );

    let ann_targeted = smtp
        .messages()
        .into_iter()
        .find(|m| m.rcpt_tos == ["ann@example.com"] && m.data.contains("SIM is on its way"))
        .unwrap();
    assert!(
        ann_targeted
            .data
            .contains("This update concerns your orders AB-1001 and AB-1002."),
        "{}",
        ann_targeted.data
    );

    let hook = hooks.received().last().unwrap().json();
    assert_eq!(hook["type"], "update.targeted");
    assert_eq!(hook["data"]["targeted"], true);
    assert_eq!(
        hook["data"]["orders"],
        serde_json::json!(["AB-1001", "AB-1002", "AB-1003"])
    );

    let page = std::fs::read_to_string(crier.path("var/status/status.html")).unwrap();
    assert!(!page.contains("SIM is on its way"));
    assert!(page.contains("Public update for everyone."));
    assert_eq!(
        public_page, page,
        "a targeted update does not rewrite the status page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_from_everything_forgets_every_order() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "ann@example.com").await;
    crier
        .run(&["unsubscribe", "--email", "ann@example.com"])
        .await
        .assert_ok();
    crier.subscribe("AB-1003", "ann@example.com").await;

    let summary = crier
        .send(&["--orders", "AB-1001,AB-1002"], "Old orders.")
        .await;
    assert!(summary["channels"].get("email").is_none(), "{summary}");
    crier.send(&["--orders", "AB-1003"], "The new order.").await;
    assert_eq!(smtp.count(), 1);
}
