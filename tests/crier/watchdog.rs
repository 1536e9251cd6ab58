//! The watchdog through `crier serve`: promises already due when the server starts are alerted
//! at once, by email through a real SMTP server and by a signed webhook; the status page says
//! which update is late; and a restart does not alert again.

use crate::serve::serve;
use crate::subscribe::{client, stop};
use crate::support::{Crier, SmtpSink, WebhookSink, wait_until, webhook_secret};
use chrono::{TimeDelta, Utc};
use crier::domain::{Audience, Body, Headline, Incident, IncidentState, Update};
use mail_parser::MessageParser;
use std::time::Duration;

/// An update on a new incident, made `ago` minutes back, promising the next `promised` minutes
/// after it was made.
fn promising(title: &str, ago: i64, promised: i64) -> (Incident, Update) {
    let made = Utc::now() - TimeDelta::minutes(ago);
    let incident = Incident::open(title.into(), IncidentState::Investigating, made);
    let update = Update {
        id: ulid::Ulid::new(),
        incident: incident.id,
        state: IncidentState::Investigating,
        headline: Headline::parse(&format!("{title}: we are on it")).unwrap(),
        body: Body::parse("We are working on it.").unwrap(),
        next_update_by: Some(made + TimeDelta::minutes(promised)),
        audience: Audience::Everyone,
        author: "lead".into(),
        created_at: made,
        channels: vec!["status".into()],
    };
    (incident, update)
}

fn subject(data: &str) -> String {
    let message = MessageParser::default().parse(data.as_bytes()).unwrap();
    message.subject().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promises_due_when_the_server_starts_alert_the_lead_at_once_and_the_page_says_which_is_late()
 {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let hooks = WebhookSink::start(&[]).await;
    let crier = crier
        .email(smtp.port, "")
        .status_page()
        .with_env("CRIER_ALERTS_SECRET", &webhook_secret());
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str(&format!(
        "[alerts]\nto = \"lead@example.com\"\nwebhook = \"{}\"\nwebhook_secret_env = \"CRIER_ALERTS_SECRET\"\n",
        hooks.url
    ));
    std::fs::write(&crier.config, config).unwrap();

    // One promise an hour overdue, one due in 10 minutes (within the 15-minute lead), one due
    // in 3 hours, and one kept: a later update on its incident made no promise.
    let (overdue, late_update) = promising("Activations", 180, 120);
    let (soon, soon_update) = promising("Porting", 50, 60);
    let (far, far_update) = promising("Billing", 0, 180);
    let (kept, kept_update) = promising("Roaming", 180, 60);
    {
        let store = crier.store().await;
        for (incident, update) in [
            (&overdue, &late_update),
            (&soon, &soon_update),
            (&far, &far_update),
            (&kept, &kept_update),
        ] {
            store.accept_update(update, Some(incident)).await.unwrap();
        }
        let (_, mut answered) = promising("Roaming", 100, 1);
        answered.incident = kept.id;
        answered.next_update_by = None;
        store.accept_update(&answered, None).await.unwrap();
    }

    let server = serve(&crier).await;
    assert!(
        wait_until(Duration::from_secs(20), || smtp.count() >= 2
            && hooks.received().len() >= 2)
        .await,
        "two alerts by email and by webhook; got {} and {}",
        smtp.count(),
        hooks.received().len()
    );
    let page = client()
        .get(format!("{}/", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(server).await;

    let mails = smtp.messages();
    assert_eq!(mails.len(), 2, "the far and the kept promises alert no one");
    assert!(
        mails
            .iter()
            .all(|mail| mail.rcpt_tos == ["lead@example.com"])
    );
    let subjects: Vec<String> = mails.iter().map(|mail| subject(&mail.data)).collect();
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("Overdue:") && s.contains("\"Activations\"")),
        "{subjects:?}"
    );
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("Due by") && s.contains("\"Porting\"")),
        "{subjects:?}"
    );

    let verifier = standardwebhooks::Webhook::new(&webhook_secret()).unwrap();
    let mut kinds = Vec::new();
    for hook in hooks.received() {
        let mut headers = http::HeaderMap::new();
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(name, hook.header(name).parse().unwrap());
        }
        verifier
            .verify(&hook.body, &headers)
            .expect("the official library verifies the alert's signature");
        let body = hook.json();
        kinds.push((
            body["type"].as_str().unwrap().to_owned(),
            body["data"]["title"].as_str().unwrap().to_owned(),
        ));
        assert_eq!(body["data"]["status_page"], "https://status.example.com/");
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("promise.due_soon".to_owned(), "Porting".to_owned()),
            ("promise.overdue".to_owned(), "Activations".to_owned())
        ]
    );

    // The page: the overdue promise is late, in plain words; the others say when.
    let section = |id: &str| {
        let start = html
            .find(&format!("id=\"incident-{id}\""))
            .unwrap_or_else(|| panic!("no section {id} in:\n{html}"));
        let rest = &html[start..];
        rest[..rest.find("</section>").unwrap()].to_owned()
    };
    assert!(section(&overdue.id.to_string()).contains("is late. We are still working on this"));
    assert!(section(&soon.id.to_string()).contains("Next update by"));
    assert!(section(&far.id.to_string()).contains("class=\"promise\">Next update by"));
    assert!(
        !section(&kept.id.to_string()).contains("class=\"promise"),
        "a kept promise is gone"
    );

    // A restart remembers what was sent: nothing again.
    let server = serve(&crier).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(server).await;
    assert_eq!(smtp.count(), 2, "no alert repeated after a restart");
    assert_eq!(hooks.received().len(), 2);
}
