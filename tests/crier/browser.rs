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

    // The status page: the state at a glance, the update under its incident's title.
    browser.goto(&format!("{base}/")).await;
    assert_eq!(browser.title().await, "Example Mobile status");
    assert_eq!(browser.text("h1").await, "Example Mobile status");
    assert_eq!(
        browser.text(".banner h2").await,
        "We are investigating a problem"
    );
    assert_eq!(browser.text(".card h2").await, "Activations delayed");
    let update = browser.text(".card article.update").await;
    assert!(update.contains("New lines ordered today"), "{update}");
    assert!(
        browser
            .text(".card .promise")
            .await
            .starts_with("Next update by")
    );
    assert_eq!(
        browser
            .attribute("header a.button[href$='/subscribe']", "href")
            .await,
        Some(format!("{base}/subscribe"))
    );
    let status_shot = browser.screenshot("status-page.png").await;
    browser.check_accessibility("status page").await;

    // The form, the order filled in from the link. With no SMS channel it asks for no
    // mobile number, and says what is kept and how to stop.
    browser
        .goto(&format!("{base}/subscribe?order=AB-1234"))
        .await;
    assert_eq!(browser.property("#order", "value").await, "AB-1234");
    assert!(
        browser.try_find("#phone").await.is_err(),
        "no channel can text a confirmation, so the form asks for no mobile number"
    );
    assert!(
        browser
            .text("main")
            .await
            .contains("Get every update on your order by email, as soon as we post it.")
    );
    assert_eq!(
        browser.text(".note").await,
        "We keep your order number and the contact you give only to send you updates on that \
         order. Every email has a link to stop them."
    );
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
    browser.check_accessibility("confirm page").await;
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
    browser.check_accessibility("confirm page, done").await;
    drop(browser);

    stop(server).await;
    let ann = crier
        .store()
        .await
        .subscriber(&Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .expect("ann is a subscriber");
    assert_eq!(ann.state(), SubscriberState::Confirmed);
    let orders: Vec<String> = ann.orders().iter().map(ToString::to_string).collect();
    assert_eq!(orders, ["AB-1234"]);
    for shot in [status_shot, form_shot, error_shot, confirm_shot, done_shot] {
        assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{shot:?}");
    }
}

/// Each of `pages` at phone width (360 px) and at desktop width, in the light and the dark
/// scheme: no sideways scrolling, no accessibility violation, and a screenshot of each.
async fn look_at_every_width_and_scheme(browser: &WebDriver, pages: &[(&str, &str)]) {
    for scheme in ["light", "dark"] {
        browser.prefer_color_scheme(scheme).await;
        for (width, height) in [(360, 800), (1280, 900)] {
            browser.set_window_size(width, height).await;
            for (name, url) in pages {
                browser.goto(url).await;
                assert!(
                    !browser.scrolls_sideways().await,
                    "{name} scrolls sideways at {width} px ({scheme})"
                );
                browser
                    .check_accessibility(&format!("{name} at {width} px ({scheme})"))
                    .await;
                let shot = browser
                    .screenshot(&format!("{name}-{width}-{scheme}.png"))
                    .await;
                assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{shot:?}");
            }
        }
    }
    browser.prefer_color_scheme("light").await;
    browser.set_window_size(1280, 900).await;
}

/// Reloads `url` until `css` shows `needle`: the server renders the page again once the
/// status page channel has delivered the update.
async fn reload_until(browser: &WebDriver, url: &str, css: &str, needle: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        browser.goto(url).await;
        if let Ok(text) = browser.try_text(css).await
            && text.contains(needle)
        {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{css} did not show {needle:?} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_state_at_a_glance_one_promise_per_incident_and_past_incidents_by_day()
 {
    let browser = WebDriver::start().await;
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier
        .email(smtp.port, "")
        .status_page()
        .with_env("CRIER_API_TOKEN", "lead-token-0123456789abcdef0123");
    let base = public_on_a_local_port(&crier);
    let config = std::fs::read_to_string(&crier.config).unwrap();
    std::fs::write(
        &crier.config,
        config + "[api]\ntokens = { lead = \"CRIER_API_TOKEN\" }\n",
    )
    .unwrap();
    let first = crier
        .send(
            &["--next-update-in", "2h"],
            "New lines ordered today start working tomorrow. We're working on it.",
        )
        .await;
    let incident = first["incident"].as_str().unwrap().to_owned();
    let server = serve(&crier).await;
    let front = format!("{base}/");

    // A second update on the incident, with a new promise: the card shows its title once,
    // the newest update first, one promise (the newest), and the first update below.
    crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--incident",
            &incident,
            "--state",
            "identified",
            "--headline",
            "Cause found",
            "--next-update-in",
            "3h",
            "The activation queue was stuck. We are clearing it.",
        ])
        .await
        .assert_ok();
    reload_until(&browser, &front, ".card", "Cause found").await;
    assert_eq!(
        browser.text(".banner h2").await,
        "We know the cause and are fixing it"
    );
    assert_eq!(
        browser.texts(".card").await.len(),
        1,
        "one card per open incident"
    );
    let card = browser.text(".card").await;
    assert_eq!(
        card.matches("Activations delayed").count(),
        1,
        "the title once: {card}"
    );
    assert_eq!(browser.texts(".card .promise").await.len(), 1, "{card}");
    assert_eq!(
        card.matches("Next update by").count(),
        1,
        "one promise: {card}"
    );
    let newest = card.find("The activation queue was stuck").unwrap();
    let oldest = card.find("New lines ordered today").unwrap();
    assert!(newest < oldest, "newest first: {card}");
    assert!(
        card.find("Next update by").unwrap() < oldest,
        "the promise sits with the newest update: {card}"
    );
    assert_eq!(browser.texts(".timeline li").await.len(), 1);
    let subscribe = format!("{base}/subscribe");
    let own_page = format!("{base}/incidents/{incident}.html");
    let stale_confirm = format!("{base}/confirm/not-a-valid-token");
    let stale_unsubscribe = format!("{base}/unsubscribe/not-a-valid-token");
    look_at_every_width_and_scheme(
        &browser,
        &[
            ("status-open", front.as_str()),
            ("incident-open", own_page.as_str()),
            ("subscribe", subscribe.as_str()),
            ("confirm-invalid", stale_confirm.as_str()),
            ("unsubscribe-invalid", stale_unsubscribe.as_str()),
        ],
    )
    .await;

    // The dark scheme is a scheme of its own, not the light one.
    browser.prefer_color_scheme("dark").await;
    browser.goto(&front).await;
    let background = browser
        .execute(
            "return getComputedStyle(document.body).backgroundColor;",
            Vec::new(),
        )
        .await;
    assert_eq!(background, "rgb(14, 16, 20)");
    browser.prefer_color_scheme("light").await;
    browser.goto(&front).await;
    let background = browser
        .execute(
            "return getComputedStyle(document.body).backgroundColor;",
            Vec::new(),
        )
        .await;
    assert_eq!(background, "rgb(244, 245, 247)");

    // Resolved: all clear at the top, no open card, and the incident under today's date.
    crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--incident",
            &incident,
            "--state",
            "resolved",
            "--headline",
            "Activations working again",
            "Every line ordered today now works. Sorry for the wait.",
        ])
        .await
        .assert_ok();
    reload_until(&browser, &front, ".banner h2", "All clear").await;
    let banner = browser.text(".banner").await;
    assert!(
        banner.contains("No open incidents. The last one was resolved at"),
        "{banner}"
    );
    assert!(browser.texts(".card").await.is_empty(), "nothing is open");
    assert!(!browser.text("main").await.contains("Next update by"));
    let days = browser.texts(".past .day h3").await;
    assert_eq!(days.len(), 14, "{days:?}");
    let today = browser.texts(".past .day").await.remove(0);
    assert!(today.contains("Activations delayed"), "{today}");
    assert!(
        today.contains("Every line ordered today now works."),
        "{today}"
    );
    assert_eq!(
        browser.attribute(".past .day a", "href").await,
        Some(own_page.clone())
    );
    assert!(
        browser.texts(".past .day").await[1..]
            .iter()
            .all(|day| day.ends_with("No incidents reported.")),
    );
    look_at_every_width_and_scheme(
        &browser,
        &[
            ("status-clear", front.as_str()),
            ("incident-resolved", own_page.as_str()),
        ],
    )
    .await;
    browser.goto(&own_page).await;
    assert_eq!(browser.text("h1").await, "Activations delayed");
    assert_eq!(browser.text(".banner h2").await, "Resolved");
    assert_eq!(browser.texts(".card article.update").await.len(), 3);
    drop(browser);
    stop(server).await;
}
