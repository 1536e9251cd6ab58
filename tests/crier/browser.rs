//! `crier serve`'s public pages in a real browser: Debian's chromium, driven by chromedriver
//! over W3C WebDriver, reads the status page, fills in the subscribe form, meets its inline
//! error, and confirms from the emailed link; axe-core checks the status page and the form
//! for accessibility, and screenshots land in `target/screenshots`.

use crate::serve::{Server, serve};
use crate::support::{Crier, SmtpSink, wait_until};
use crate::webdriver::{WebDriver, free_port};
use crier::domain::{Contact, SubscriberState};
use mail_parser::MessageParser;
use std::time::Duration;

/// Makes crier's public address the one `crier serve` will listen on, and returns it.
///
/// The fixture's `https://status.example.com` will not do here: the subscribe form posts to
/// the absolute `{public_url}/subscribe`, so a browser that sends it leaves the test's
/// server for a site it cannot reach.
fn public_on_a_local_port(crier: &Crier) -> String {
    let base = format!("http://127.0.0.1:{}", free_port());
    let config = std::fs::read_to_string(&crier.config).unwrap();
    assert!(config.contains("public_url = \"https://status.example.com\""));
    let config = config.replace(
        "public_url = \"https://status.example.com\"",
        &format!("public_url = \"{base}\""),
    ) + &format!("[server]\nlisten = \"{}\"\n", &base["http://".len()..]);
    std::fs::write(&crier.config, config).unwrap();
    base
}

/// Sends SIGTERM and waits for a clean exit, so the store is unlocked for the test to read.
async fn stop(mut server: Server) {
    let pid = server.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("crier serve stopped within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The confirm link in the text part of a confirmation email.
fn confirm_link(data: &str, base: &str) -> String {
    let message = MessageParser::default().parse(data.as_bytes()).unwrap();
    let text = message.body_text(0).unwrap();
    text.split_whitespace()
        .find(|word| word.starts_with(&format!("{base}/confirm/")))
        .unwrap_or_else(|| panic!("no confirm link in:\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_reads_the_status_page_subscribes_past_an_inline_error_and_confirms() {
    // First, so a machine without chromium fails at once with what to do about it.
    let browser = WebDriver::start().await;
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "").status_page();
    let base = public_on_a_local_port(&crier);
    crier
        .send(
            &["--next-update-in", "2h"],
            "New lines ordered today start working tomorrow. We're working on it with our provider.",
        )
        .await;
    let server = serve(&crier).await;
    assert_eq!(server.base, base);

    // The status page.
    browser.goto(&format!("{base}/")).await;
    assert_eq!(browser.title().await, "Example Mobile status");
    assert_eq!(browser.text("h1").await, "Example Mobile status");
    assert_eq!(browser.text("header strong").await, "Activations delayed");
    assert_eq!(
        browser.text("article.update h3").await,
        "Activations delayed"
    );
    let update = browser.text("article.update").await;
    assert!(update.contains("New lines ordered today"), "{update}");
    assert!(update.contains("Next update by"), "{update}");
    assert_eq!(
        browser
            .attribute("header a[href$='/subscribe']", "href")
            .await,
        Some(format!("{base}/subscribe"))
    );
    let status_shot = browser.screenshot("status-page.png").await;
    browser.check_accessibility("status page").await;

    // The form, the order filled in from the link.
    browser
        .goto(&format!("{base}/subscribe?order=AB-1234"))
        .await;
    assert_eq!(browser.property("#order", "value").await, "AB-1234");
    assert!(
        !browser.is_displayed("#website").await,
        "the honeypot is hidden from people"
    );
    let form_shot = browser.screenshot("subscribe-form.png").await;
    browser.check_accessibility("subscribe form").await;

    // A wrong order number: the form comes back with the error beside the field, and keeps
    // what was typed.
    let order = browser.find("#order").await;
    browser.type_into(&order, "nonsense").await;
    let email = browser.find("#email").await;
    browser.type_into(&email, "ann@example.com").await;
    let send = browser.find("form button[type=submit]").await;
    browser.click(&send).await;
    let error = browser
        .wait_for_text("#order-error", "not an order number")
        .await;
    assert_eq!(
        error,
        "That is not an order number: check the confirmation of your order."
    );
    assert_eq!(browser.property("#order", "value").await, "nonsense");
    assert_eq!(browser.property("#email", "value").await, "ann@example.com");
    assert_eq!(
        browser.attribute("#order", "aria-invalid").await.as_deref(),
        Some("true")
    );
    assert_eq!(
        browser
            .attribute("#order", "aria-describedby")
            .await
            .as_deref(),
        Some("order-error"),
        "a screen reader reads the error with the field"
    );
    assert_eq!(browser.attribute("#email", "aria-invalid").await, None);
    let error_shot = browser.screenshot("subscribe-error.png").await;

    // Corrected, it goes through.
    let order = browser.find("#order").await;
    browser.type_into(&order, "AB-1234").await;
    let send = browser.find("form button[type=submit]").await;
    browser.click(&send).await;
    let answer = browser.wait_for_text("main", "Thank you").await;
    assert!(answer.contains("Open it and confirm"), "{answer}");

    // The confirmation email, and its link opened in the browser: a page that asks first.
    assert!(
        wait_until(Duration::from_secs(20), || smtp.count() == 1).await,
        "one confirmation email within 20 s, got {}",
        smtp.count()
    );
    let mail = smtp.messages().remove(0);
    assert_eq!(mail.rcpt_tos, ["ann@example.com"]);
    let link = confirm_link(&mail.data, &base);
    browser.goto(&link).await;
    let ask = browser.text("main").await;
    assert!(
        ask.contains("Send every update on order AB-1234 to a***@example.com?"),
        "{ask}"
    );
    let confirm_shot = browser.screenshot("confirm-page.png").await;
    let yes = browser.find("form button[type=submit]").await;
    assert_eq!(
        browser.text("form button[type=submit]").await,
        "Yes, send me updates"
    );
    browser.click(&yes).await;
    let done = browser
        .wait_for_text("main", "Done: every update on order AB-1234")
        .await;
    assert!(done.contains("now reaches a***@example.com"), "{done}");
    assert_eq!(
        browser.current_url().await,
        link,
        "the button posts to the link"
    );
    let done_shot = browser.screenshot("confirm-done.png").await;
    drop(browser);

    stop(server).await;
    let ann = crier
        .store()
        .await
        .subscriber(&Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .expect("ann is a subscriber");
    assert_eq!(ann.state, SubscriberState::Confirmed);
    let orders: Vec<&str> = ann.orders.iter().map(|o| o.as_str()).collect();
    assert_eq!(orders, ["AB-1234"]);
    for shot in [status_shot, form_shot, error_shot, confirm_shot, done_shot] {
        assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{shot:?}");
    }
}
