//! Email through lettre's SMTP transport to a real SMTP server on 127.0.0.1.

use crate::support::{Crier, FAST_RETRIES, SmtpSink};
use mail_parser::MessageParser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_arrives_as_a_multipart_email_with_one_click_unsubscribe() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    crier.subscribe("AB-1001", "ann@example.com").await;

    let summary = crier
        .send(
            &["--next-update-in", "2h"],
            "We're working on it. Sorry. Details: https://example.com/launch",
        )
        .await;
    assert_eq!(summary["channels"]["email"]["sent"], 1);

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.mail_from, "updates@example.com");
    assert_eq!(mail.rcpt_tos, ["ann@example.com"]);

    let message = MessageParser::default()
        .parse(mail.data.as_bytes())
        .expect("a parsable email");
    assert_eq!(
        message.subject(),
        Some("Investigating: Activations delayed")
    );
    let from = message
        .from()
        .and_then(|a| a.first())
        .expect("a From header");
    assert_eq!(from.address(), Some("updates@example.com"));
    assert_eq!(from.name(), Some("Example Mobile"));

    let text = message.body_text(0).expect("a text/plain part");
    assert!(text.contains("We're working on it. Sorry."), "{text}");
    assert!(text.contains("Next update by"), "{text}");
    assert!(text.contains("You follow order AB-1001."), "{text}");
    let html = message.body_html(0).expect("a text/html part");
    assert!(
        html.contains("<a href=\"https://example.com/launch\">"),
        "{html}"
    );
    assert!(html.contains("We&#x27;re working on it."), "{html}");
    assert_eq!(message.text_body.len(), 1);
    assert_eq!(message.html_body.len(), 1);

    // The Message-ID is derived from the delivery key: the update id and the sender's domain.
    let update = summary["update"].as_str().unwrap();
    let message_id = message.message_id().expect("a Message-ID");
    assert!(
        message_id.starts_with(&format!("{update}.")),
        "{message_id}"
    );
    assert!(message_id.ends_with("@example.com"), "{message_id}");

    assert!(message.header("List-Unsubscribe").is_some());
    let unsubscribe = raw_header(&mail.data, "List-Unsubscribe");
    let unsubscribe = unsubscribe
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned();
    assert!(
        unsubscribe.starts_with("https://status.example.com/unsubscribe/"),
        "{unsubscribe}"
    );
    assert_eq!(
        raw_header(&mail.data, "List-Unsubscribe-Post"),
        "List-Unsubscribe=One-Click"
    );
    assert!(
        text.contains(&unsubscribe),
        "the text part carries the same link"
    );
}

/// A header's raw value, unfolded, straight from the message.
pub fn raw_header(data: &str, name: &str) -> String {
    let head = data.split("\r\n\r\n").next().unwrap_or(data);
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} header in:\n{head}"))
}

pub fn unsubscribe_token(data: &str) -> String {
    let link = raw_header(data, "List-Unsubscribe");
    link.trim_matches(['<', '>'])
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unsubscribe_link_of_an_email_stops_the_next_ones() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    crier.send(&[], "First update.").await;
    let ann = smtp
        .messages()
        .into_iter()
        .find(|m| m.rcpt_tos == ["ann@example.com"])
        .expect("ann got the first update");

    crier
        .run(&["unsubscribe", "--token", &unsubscribe_token(&ann.data)])
        .await
        .assert_ok();
    let summary = crier.send(&[], "Second update.").await;

    assert_eq!(summary["channels"]["email"]["sent"], 1, "{summary}");
    let per_recipient = smtp.per_recipient();
    assert_eq!(per_recipient["ann@example.com"], 1);
    assert_eq!(per_recipient["bob@example.com"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_smtp_refusal_is_dead_lettered_and_a_transient_one_retried_until_the_limit() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, FAST_RETRIES);
    crier.subscribe("AB-1001", "reject-me@example.com").await;
    crier.subscribe("AB-1002", "defer-me@example.com").await;
    crier.subscribe("AB-1003", "ann@example.com").await;

    let summary = crier.send_partly(&[], "We're on it.").await;
    assert_eq!(summary["channels"]["email"]["sent"], 1, "{summary}");
    assert_eq!(summary["channels"]["email"]["dead"], 2, "{summary}");

    let failed = crier.run(&["deliveries", "--failed", "--json"]).await;
    let failures = failed.assert_ok().json()["failures"]
        .as_array()
        .unwrap()
        .clone();
    let attempts = |who: &str| {
        failures
            .iter()
            .find(|f| f["recipient"] == who)
            .unwrap_or_else(|| panic!("{who} is among the failures: {failures:?}"))["attempts"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(attempts("reject-me@example.com"), 1, "a 550 is not retried");
    assert_eq!(
        attempts("defer-me@example.com"),
        4,
        "a 451 is retried up to max_attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_writes_each_email_as_an_eml_file_in_the_outbox_folder() {
    let crier = Crier::new().channel(
        "email",
        "kind = \"email\"\nfrom = \"Example Mobile <updates@example.com>\"\ntransport = \"file://var/outbox\"\n",
    );
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "ann@example.com").await;
    crier.subscribe("AB-1003", "bob@example.com").await;
    let summary = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    assert_eq!(summary["channels"]["email"]["sent"], 2);

    let files: Vec<_> = std::fs::read_dir(crier.path("var/outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "one file per recipient: {files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "eml"))
    );
    let ann = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .find(|m| m.contains("To: ann@example.com"))
        .expect("ann's email");
    let message = MessageParser::default().parse(ann.as_bytes()).unwrap();
    assert_eq!(
        message.subject(),
        Some("Investigating: Activations delayed")
    );
    assert!(message.body_text(0).unwrap().contains("Next update by"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_past_their_retention_are_forgotten_and_their_counts_stay() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config = config.replace(
        "cache_capacity_mb = 16\n",
        "cache_capacity_mb = 16\nretention = \"1s\"\n",
    );
    std::fs::write(&crier.config, config).unwrap();
    crier.subscribe("AB-1001", "ann@example.com").await;
    let summary = crier.send(&[], "First update.").await;
    let update: ulid::Ulid = summary["update"].as_str().unwrap().parse().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    // Any later run forgets what is past its retention.
    crier.run(&["dispatch"]).await.assert_ok();
    let report = crier
        .run(&["deliveries", "--update", &update.to_string(), "--json"])
        .await;
    report.assert_ok();
    assert_eq!(
        report.json()["channels"]["email"]["sent"],
        1,
        "the counts stay"
    );
    let key = crier::delivery::DeliveryKey::new(
        update,
        "email",
        &crier::delivery::Recipient::Contact(
            crier::domain::Contact::parse("ann@example.com").unwrap(),
        ),
    );
    assert_eq!(
        crier.store().await.delivery(&key).await.unwrap(),
        None,
        "the sent delivery itself is forgotten"
    );
}

/// The parts each recipient gets, as parsed from its message.
fn parts_of(data: &str) -> (String, String, String) {
    let message = MessageParser::default().parse(data.as_bytes()).unwrap();
    (
        message.subject().unwrap_or_default().to_owned(),
        message.body_text(0).unwrap().into_owned(),
        message.body_html(0).unwrap().into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_rendered_once_per_update_still_give_each_recipient_its_own_values() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    // A template that shows the contact, in the subject and in HTML (where it is escaped).
    let crier = crier.email(smtp.port, "").with_template(
        "email.subject.hbs",
        "{{update.headline}} for {{recipient.contact}}",
    );
    std::fs::write(
        crier.path("templates/email.html.hbs"),
        "<p>{{update.body}}</p><p>To {{recipient.contact}}, orders {{#each recipient.orders}}<b>{{this}}</b> {{/each}}</p><a href=\"{{recipient.unsubscribe_url}}\">Stop</a>",
    )
    .unwrap();
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "o'brien@example.com").await;
    crier.subscribe("AB-1003", "o'brien@example.com").await;
    crier.subscribe("AB-1004", "cat@example.com").await;
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["email"]["sent"], 3);

    let mut seen_links = std::collections::BTreeSet::new();
    for mail in smtp.messages() {
        let to = mail.rcpt_tos[0].clone();
        let (subject, text, html) = parts_of(&mail.data);
        assert_eq!(subject, format!("Activations delayed for {to}"));
        let link = raw_header(&mail.data, "List-Unsubscribe")
            .trim_matches(['<', '>'])
            .to_owned();
        assert!(
            text.contains(&format!("Stop these emails: {link}")),
            "{text}"
        );
        assert!(
            html.contains(&format!("<a href=\"{link}\">")),
            "{to}: its own link in {html}"
        );
        let escaped = to.replace('\'', "&#x27;");
        assert!(html.contains(&format!("To {escaped}, orders")), "{html}");
        let orders: Vec<&str> = match to.as_str() {
            "ann@example.com" => vec!["AB-1001"],
            "o'brien@example.com" => vec!["AB-1002", "AB-1003"],
            _ => vec!["AB-1004"],
        };
        let shown: String = orders.iter().map(|o| format!("<b>{o}</b> ")).collect();
        assert!(html.contains(&shown), "{to}: {html}");
        let follows = match orders.as_slice() {
            [one] => format!("You follow order {one}."),
            [first, second] => format!("You follow orders {first} and {second}."),
            _ => unreachable!(),
        };
        assert!(text.contains(&follows), "{to}: {text}");
        assert!(seen_links.insert(link), "every recipient its own link");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_prints_the_contact_unescaped_is_rendered_per_recipient() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    // Triple braces: the contact as it is, unescaped. Filling a shared rendering would escape
    // it, so the check on a made-up recipient must refuse to share.
    let crier = crier.email(smtp.port, "").with_template(
        "email.html.hbs",
        "<p>{{update.body}}</p><p>To {{{recipient.contact}}}</p><a href=\"{{recipient.unsubscribe_url}}\">Stop</a>",
    );
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    crier.subscribe("AB-1003", "o'brien@example.com").await;
    let summary = crier.send(&[], "We're working on it.").await;
    assert_eq!(summary["channels"]["email"]["sent"], 3);
    for mail in smtp.messages() {
        let to = mail.rcpt_tos[0].clone();
        let (_, _, html) = parts_of(&mail.data);
        assert!(html.contains(&format!("<p>To {to}</p>")), "{to}: {html}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_email_says_it_is_resolved_in_its_heading() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "");
    crier.subscribe("AB-1001", "ann@example.com").await;
    let first = crier.send(&[], "We're working on it.").await;
    let incident = first["incident"].as_str().unwrap();
    crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--incident",
            incident,
            "--state",
            "resolved",
            "Activations work again.",
        ])
        .await
        .assert_ok();
    let mails: Vec<(String, String, String)> =
        smtp.messages().iter().map(|m| parts_of(&m.data)).collect();
    assert_eq!(mails.len(), 2);
    let (resolved, first): (Vec<_>, Vec<_>) = mails
        .into_iter()
        .partition(|(_, text, _)| text.contains("Activations work again."));
    let (_, text, html) = &resolved[0];
    assert!(
        html.contains("<h1 style=\"font-size: 1.3em;\">Resolved: Activations delayed</h1>"),
        "{html}"
    );
    assert!(
        text.lines().next() == Some("Resolved: Activations delayed"),
        "{text}"
    );
    let (_, text, _) = &first[0];
    assert_eq!(text.lines().next(), Some("Activations delayed"), "{text}");
}
