//! crier on PostgreSQL, a real server the tests start: the CLI's whole job on it, three
//! `crier serve` nodes sharing one outbox (one of them killed with `kill -9` mid-send), and a
//! clear error for a backend or a connection variable that is wrong.

use crate::serve::{Server, serve};
use crate::subscribe::client;
use crate::support::{Crier, SmtpSink, wait_until};
use crier::config::PostgresSettings;
use crier::delivery::{DeliveryRecord, DeliveryState};
use crier::store::{DeliveryFilter, PostgresStore, Store};
use std::collections::BTreeMap;
use std::time::Duration;
use ulid::Ulid;

#[path = "../../src/store/postgres/test_server.rs"]
mod test_server;
pub use test_server::PostgresServer;

const TOKEN: &str = "lead-token-0123456789abcdefghij";

impl Crier {
    /// Keeps the store in the PostgreSQL database at `url` instead of sled.
    pub fn on_postgres(self, url: &str) -> Self {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let config = config.replacen(
            "[store]\n",
            "[store]\nbackend = \"postgres\"\nurl_env = \"CRIER_DATABASE_URL\"\npool_size = 8\n",
            1,
        );
        std::fs::write(&self.config, config).unwrap();
        self.with_env("CRIER_DATABASE_URL", url)
    }

    fn with_api_token(self) -> Self {
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str("[api]\ntokens = { lead = \"CRIER_API_TOKEN\" }\n");
        std::fs::write(&self.config, config).unwrap();
        self.with_env("CRIER_API_TOKEN", TOKEN)
    }
}

/// A fresh database on the test process's PostgreSQL server.
async fn fresh_database() -> String {
    tokio::task::spawn_blocking(|| PostgresServer::shared().database())
        .await
        .unwrap()
}

async fn open_store(url: &str) -> PostgresStore {
    PostgresStore::open(&PostgresSettings {
        url: url.to_owned().into(),
        variable: "CRIER_DATABASE_URL".into(),
        pool_size: 2,
    })
    .await
    .expect("the test opens the store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_subscribes_sends_and_looks_up_an_order_on_postgres() {
    let url = fresh_database().await;
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "").status_page().on_postgres(&url);

    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    let sent = crier.send(&[], "We're on it.").await;
    assert_eq!(sent["channels"]["email"]["sent"], 2, "{sent}");
    let per_recipient = smtp.per_recipient();
    assert_eq!(
        per_recipient.keys().collect::<Vec<_>>(),
        ["ann@example.com", "bob@example.com"]
    );

    let order = crier.run(&["order", "AB-1001", "--json"]).await;
    order.assert_ok();
    let order = order.json();
    assert_eq!(order["update"]["id"], sent["update"], "{order}");
    let deliveries = crier.run(&["deliveries", "--json"]).await;
    deliveries.assert_ok();
    assert_eq!(deliveries.json()["channels"]["email"]["sent"], 2);
    // Nothing of it went to a sled folder.
    assert!(!crier.path("var/store/db").exists());
}

/// Any command that opens the store: each config error below must stop it.
const SUBSCRIBE_ANN: &[&str] = &[
    "subscribe",
    "--order",
    "AB-1001",
    "--email",
    "ann@example.com",
];

#[tokio::test]
async fn a_wrong_backend_or_an_unset_connection_variable_is_a_one_line_error() {
    let crier = Crier::new();
    let config = std::fs::read_to_string(&crier.config).unwrap();
    std::fs::write(
        &crier.config,
        config.replacen("[store]\n", "[store]\nbackend = \"mysql\"\n", 1),
    )
    .unwrap();
    crier
        .run(SUBSCRIBE_ANN)
        .await
        .assert_user_error("store.backend: \"mysql\" is not a backend");

    let crier = Crier::new()
        .on_postgres("unused")
        .without_env("CRIER_DATABASE_URL");
    crier
        .run(SUBSCRIBE_ANN)
        .await
        .assert_user_error("store.url_env: the environment variable CRIER_DATABASE_URL is not set");

    // Nothing listens there: the store cannot be used, and says where.
    let crier = Crier::new().on_postgres(&format!(
        "postgres://crier@127.0.0.1:{}/nowhere",
        free_port()
    ));
    let output = crier.run(SUBSCRIBE_ANN).await;
    assert_eq!(output.code, 2, "{}", output.stderr);
    assert!(
        output.stderr.contains("PostgreSQL at 127.0.0.1"),
        "{}",
        output.stderr
    );

    // An '@' left unescaped in the password: said so, and no piece of the password shown.
    let crier = Crier::new().on_postgres("postgres://crier:se@cret@127.0.0.1:5432/crier");
    let output = crier.run(SUBSCRIBE_ANN).await;
    assert_eq!(output.code, 2, "{}", output.stderr);
    assert!(output.stderr.contains("%40"), "{}", output.stderr);
    assert!(!output.stderr.contains("cret"), "{}", output.stderr);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- three nodes, one database ----------------------------------------------------------------

const SUBSCRIBERS: usize = 20_000;
/// Short, so a killed node's leases come back within the test.
const LEASE: &str = "6s";

/// One `crier serve` node: its own folder and port, the shared database, email to the shared
/// SMTP server.
fn node(url: &str, smtp_port: u16) -> Crier {
    let crier = Crier::new()
        .email(smtp_port, "[delivery]\nconcurrency = 8\ntimeout = \"4s\"\n")
        .on_postgres(url)
        .with_api_token();
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str(&format!("[dispatch]\nlease = \"{LEASE}\"\n"));
    std::fs::write(&crier.config, config).unwrap();
    crier
}

/// Subscribes `count` confirmed customers through `crier import`, into the shared database.
async fn import_subscribers(crier: &Crier, count: usize) {
    let mut csv = String::from("order,email,phone,confirmed\n");
    for i in 0..count {
        csv.push_str(&format!(
            "AB-{},customer{i}@example.com,,true\n",
            100_000 + i
        ));
    }
    let file = crier.path("subscribers.csv");
    std::fs::write(&file, csv).unwrap();
    let imported = crier
        .run(&["import", file.to_str().unwrap(), "--json"])
        .await;
    imported.assert_ok();
}

/// Sends an update through a node's admin API; returns its id.
async fn send_through(server: &Server, headline: &str) -> Ulid {
    let answer = client()
        .post(format!("{}/api/updates", server.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({
            "headline": headline,
            "body": "We're working on it.",
            "channels": ["email"],
        }))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body["update"].as_str().unwrap().parse().unwrap()
}

/// How many emails a node's own `/metrics` says it sent.
async fn sent_by(server: &Server) -> u64 {
    let text = client()
        .get(format!("{}/metrics", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| {
            line.starts_with("crier_delivery_outcomes_total")
                && line.contains("channel=\"email\"")
                && line.contains("outcome=\"sent\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn email_counts(store: &PostgresStore, update: Ulid) -> crier::delivery::Counts {
    let counts = store.counts(Some(update)).await.unwrap();
    counts.get("email").copied().unwrap_or_default()
}

/// Every delivery of an update, read page by page.
async fn every_delivery(store: &PostgresStore, update: Ulid) -> Vec<DeliveryRecord> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .deliveries(update, DeliveryFilter::All, after.as_ref(), 2_000)
            .await
            .unwrap();
        if page.items.is_empty() {
            return all;
        }
        all.extend(page.items);
        after = page.next;
    }
}

/// Emails of one update per recipient, told apart by the headline in the subject.
fn received_per_recipient(smtp: &SmtpSink, headline: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for mail in smtp.messages() {
        if mail.data.contains(headline) {
            for recipient in mail.rcpt_tos {
                *counts.entry(recipient).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_outbox_and_a_node_killed_mid_send_loses_nobody() {
    let url = fresh_database().await;
    let smtp_dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(smtp_dir.path(), 0);
    let nodes: Vec<Crier> = (0..3).map(|_| node(&url, smtp.port)).collect();
    import_subscribers(&nodes[0], SUBSCRIBERS).await;
    let store = open_store(&url).await;
    assert_eq!(store.subscriber_count().await.unwrap(), SUBSCRIBERS as u64);

    let mut servers = Vec::new();
    for node in &nodes {
        servers.push(serve(node).await);
    }

    // All three nodes up: every one delivers a share, each subscriber gets one email.
    let first = send_through(&servers[0], "Activations delayed").await;
    let done = wait_until(Duration::from_secs(600), || {
        let counts = futures_lite(email_counts(&store, first));
        counts.sent == SUBSCRIBERS as u64
    })
    .await;
    assert!(done, "{:?}", email_counts(&store, first).await);
    // A node counts an email in its metrics just after the store has it: wait for the last.
    let mut shares = Vec::new();
    wait_until(Duration::from_secs(30), || {
        shares = servers
            .iter()
            .map(|server| futures_lite(sent_by(server)))
            .collect();
        shares.iter().sum::<u64>() >= SUBSCRIBERS as u64
    })
    .await;
    println!("three nodes: each sent {shares:?} of {SUBSCRIBERS}");
    assert!(
        shares.iter().all(|&share| share > 0),
        "every node delivers a share: {shares:?}"
    );
    assert_eq!(shares.iter().sum::<u64>(), SUBSCRIBERS as u64);
    let per_recipient = received_per_recipient(&smtp, "Activations delayed");
    assert_eq!(per_recipient.len(), SUBSCRIBERS, "no subscriber is missed");
    assert!(per_recipient.values().all(|&n| n == 1), "and none twice");

    // Again, and node C is killed a quarter of the way through.
    let second = send_through(&servers[0], "Activations resumed").await;
    let midway = wait_until(Duration::from_secs(600), || {
        futures_lite(email_counts(&store, second)).sent >= SUBSCRIBERS as u64 / 4
    })
    .await;
    assert!(midway, "the second send got a quarter of the way");
    let killed = servers.pop().unwrap();
    let killed_pid = killed.child.id().unwrap();
    let mut child = killed.child;
    child.start_kill().unwrap(); // SIGKILL: no chance to give anything back
    child.wait().await.unwrap();
    let owner = format!("crier-{killed_pid}-");
    let held_by_killed = every_delivery(&store, second)
        .await
        .iter()
        .filter(|record| {
            record.state == DeliveryState::InFlight
                && record
                    .owner
                    .as_deref()
                    .is_some_and(|o| o.starts_with(&owner))
        })
        .count();

    let done = wait_until(Duration::from_secs(600), || {
        futures_lite(email_counts(&store, second)).sent == SUBSCRIBERS as u64
    })
    .await;
    assert!(done, "{:?}", email_counts(&store, second).await);
    let per_recipient = received_per_recipient(&smtp, "Activations resumed");
    let duplicates: usize = per_recipient.values().map(|n| n - 1).sum();
    println!(
        "node killed mid-send holding {held_by_killed} lease(s): {} of {SUBSCRIBERS} subscribers reached, {duplicates} duplicate(s)",
        per_recipient.len()
    );
    assert_eq!(per_recipient.len(), SUBSCRIBERS, "no subscriber is missed");
    assert!(
        duplicates <= held_by_killed,
        "{duplicates} duplicates, but the killed node held {held_by_killed} leases"
    );
    for server in servers {
        crate::subscribe::stop(server).await;
    }
}

/// Waits for a future from inside `wait_until`'s synchronous condition.
fn futures_lite<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

// ---- the database goes away -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rides_out_a_database_restart_mid_send_and_loses_nothing() {
    const COUNT: usize = 2_000;
    const CONCURRENCY: usize = 4;
    let mut database = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap();
    let url = database.database();
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 10);
    let crier = crier
        .email(
            smtp.port,
            &format!("[delivery]\nconcurrency = {CONCURRENCY}\ntimeout = \"4s\"\n"),
        )
        .status_page()
        .on_postgres(&url)
        .with_api_token();
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str("[dispatch]\nlease = \"40s\"\n");
    std::fs::write(&crier.config, config).unwrap();
    import_subscribers(&crier, COUNT).await;
    let server = serve(&crier).await;
    let store = open_store(&url).await;

    let update = send_through_all(&server, "Activations delayed").await;
    let started = wait_until(Duration::from_secs(120), || {
        futures_lite(email_counts(&store, update)).sent >= COUNT as u64 / 4
    })
    .await;
    assert!(started, "the send got a quarter of the way");
    let mut database = tokio::task::spawn_blocking(move || {
        database.stop();
        database
    })
    .await
    .unwrap();

    // Requests that need the store say why they cannot be answered; the status page, served
    // from memory, stays up.
    let answer = client()
        .get(format!("{}/api/incidents", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 503);
    let error: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(error["error"], "unavailable", "{error}");
    assert!(
        error["detail"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL at 127.0.0.1"),
        "{error}"
    );
    let refused = client()
        .post(format!("{}/api/updates", server.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "headline": "Lost?", "body": "Never stored." }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    let page = client().get(&server.base).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("Activations delayed"));
    let ready = client()
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    // Three seconds without a database: the node keeps running and waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut server = server;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the node is still running"
    );
    let during = smtp.count();

    database = tokio::task::spawn_blocking(move || {
        database.resume();
        database
    })
    .await
    .unwrap();
    let done = wait_until(Duration::from_secs(180), || {
        futures_lite(email_counts(&store, update)).sent == COUNT as u64
    })
    .await;
    assert!(done, "{:?}", email_counts(&store, update).await);
    let per_recipient = received_per_recipient(&smtp, "Activations delayed");
    let duplicates: usize = per_recipient.values().map(|n| n - 1).sum();
    println!(
        "database stopped for 3 s with {during} of {COUNT} emails out: all {} reached afterwards, {duplicates} duplicate(s)",
        per_recipient.len()
    );
    assert_eq!(per_recipient.len(), COUNT, "no subscriber is missed");
    // At most what was in flight or leased ahead when the database went away.
    assert!(duplicates <= 2 * CONCURRENCY, "{duplicates} duplicates");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("the worker pauses")
                || line.contains("cannot record the outcome yet")),
        "the log says the node waited for the database: {:?}",
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            .collect::<Vec<_>>()
    );
    crate::subscribe::stop(server).await;
    drop(store);
    tokio::task::spawn_blocking(move || drop(database))
        .await
        .unwrap();
}

/// Sends an update to every channel through a node's admin API; returns its id.
async fn send_through_all(server: &Server, headline: &str) -> Ulid {
    let answer = client()
        .post(format!("{}/api/updates", server.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "headline": headline, "body": "We're working on it." }))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body["update"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sent_through_one_node_reaches_every_nodes_status_page_at_once() {
    let url = fresh_database().await;
    let smtp_dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(smtp_dir.path(), 0);
    let nodes: Vec<Crier> = (0..2)
        .map(|_| {
            node(&url, smtp.port).channel(
                "status",
                "kind = \"status_page\"\ndir = \"var/status\"\n[delivery]\ntimeout = \"3s\"\n",
            )
        })
        .collect();
    let mut servers = Vec::new();
    for node in &nodes {
        servers.push(serve(node).await);
    }
    let status_of = |server: &Server| {
        let url = format!("{}/status.json", server.base);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert!(!status_of(&servers[1]).await.contains("Network maintenance"));

    let sent_at = std::time::Instant::now();
    send_through_all(&servers[0], "Network maintenance").await;
    let mut reached = [None, None];
    let everywhere = wait_until(Duration::from_secs(10), || {
        for (i, server) in servers.iter().enumerate() {
            if reached[i].is_none()
                && futures_lite(status_of(server)).contains("Network maintenance")
            {
                reached[i] = Some(sent_at.elapsed());
            }
        }
        reached.iter().all(Option::is_some)
    })
    .await;
    println!("the update reached the nodes' pages after {reached:?}");
    assert!(
        everywhere,
        "every node's page shows the update: {reached:?}"
    );
    for server in servers {
        crate::subscribe::stop(server).await;
    }
}

// ---- one rate for every node ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_a_channels_rate_together_measured_at_the_provider() {
    const TEXTS: usize = 300;
    const RATE: usize = 50;
    let url = fresh_database().await;
    let twilio = crate::sms::TwilioSink::start(&[], &[]).await;
    let nodes: Vec<Crier> = (0..3)
        .map(|_| {
            crate::sms::twilio_crier(
                &twilio.url,
                &format!("[delivery]\nconcurrency = 8\nrate = \"{RATE}/1s\"\n"),
            )
            .on_postgres(&url)
            .with_api_token()
        })
        .collect();
    let phones: Vec<String> = (0..TEXTS).map(|i| format!("+447700900{i:03}")).collect();
    let mut csv = String::from("order,email,phone,confirmed\n");
    for (i, phone) in phones.iter().enumerate() {
        csv.push_str(&format!("AB-{},,{phone},true\n", 100_000 + i));
    }
    let file = nodes[0].path("phones.csv");
    std::fs::write(&file, csv).unwrap();
    nodes[0]
        .run(&["import", file.to_str().unwrap()])
        .await
        .assert_ok();
    let mut servers = Vec::new();
    for node in &nodes {
        servers.push(serve(node).await);
    }

    send_through_all(&servers[0], "Activations delayed").await;
    let all = wait_until(Duration::from_secs(120), || {
        twilio.received().len() >= TEXTS
    })
    .await;
    let received = twilio.received();
    assert!(all, "{} of {TEXTS} texts arrived", received.len());
    let mut by_phone: BTreeMap<&str, usize> = BTreeMap::new();
    for request in &received {
        *by_phone.entry(request.field("To")).or_default() += 1;
    }
    for phone in &phones {
        assert_eq!(
            by_phone.get(phone.as_str()),
            Some(&1),
            "{phone} got one text"
        );
    }
    received[0].assert_documented(received[0].field("To"));

    // The most texts that arrived within any one second, at the provider.
    let mut arrivals: Vec<std::time::Instant> = received.iter().map(|r| r.at).collect();
    arrivals.sort();
    let busiest = (0..arrivals.len())
        .map(|first| {
            arrivals[first..]
                .iter()
                .take_while(|at| at.duration_since(arrivals[first]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let took = arrivals[arrivals.len() - 1].duration_since(arrivals[0]);
    println!(
        "three nodes at {RATE}/s together: {TEXTS} texts in {took:?}, at most {busiest} within any second"
    );
    assert!(
        busiest <= RATE,
        "{busiest} texts arrived within one second, over the rate of {RATE}"
    );
    for server in servers {
        crate::subscribe::stop(server).await;
    }
}

// ---- moving from sled -------------------------------------------------------------------------

/// What `crier deliveries` and `crier order` answer, as JSON.
async fn answers(crier: &Crier) -> Vec<serde_json::Value> {
    let mut answers = Vec::new();
    for args in [
        &["deliveries", "--json"][..],
        &["deliveries", "--failed", "--json"],
        &["order", "AB-1001", "--json"],
        &["order", "AB-1002", "--json"],
    ] {
        let output = crier.run(args).await;
        output.assert_ok();
        let mut answer = output.json();
        // The reply's subscribe link is signed afresh with an expiry counted from now.
        if let Some(snippet) = answer.get_mut("snippet") {
            let text = snippet.as_str().unwrap();
            let unsigned = text.split("/s/").next().unwrap().to_owned();
            assert_ne!(unsigned, text, "the reply has a subscribe link");
            *snippet = unsigned.into();
        }
        answers.push(answer);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_sled_store_to_postgres_with_the_same_answers() {
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "[delivery]\nmax_attempts = 1\n");
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "reject-bob@example.com").await;
    let sent = crier.send_partly(&[], "We're on it.").await;
    assert_eq!(sent["channels"]["email"]["sent"], 1, "{sent}");
    assert_eq!(sent["channels"]["email"]["dead"], 1, "{sent}");
    let on_sled = answers(&crier).await;

    let url = fresh_database().await;
    let crier = crier.on_postgres(&url);
    let sled_store = format!("sled:{}", crier.path("var/store").display());
    let copy = crier
        .run(&["store", "copy", "--from", &sled_store, "--json"])
        .await;
    copy.assert_ok();
    let copied = copy.json();
    assert_eq!(
        (
            &copied["subscribers"],
            &copied["incidents"],
            &copied["updates"],
            &copied["deliveries"],
            &copied["already_there"]
        ),
        (&2.into(), &1.into(), &1.into(), &2.into(), &0.into()),
        "{copied}"
    );
    assert_eq!(
        answers(&crier).await,
        on_sled,
        "the same answers on PostgreSQL"
    );

    // Run again (after an interruption, say): nothing is copied twice.
    let again = crier
        .run(&["store", "copy", "--from", &sled_store, "--json"])
        .await;
    again.assert_ok();
    assert_eq!(again.json()["already_there"], 6, "{}", again.stdout);
    assert_eq!(answers(&crier).await, on_sled);

    // The counter came along with the subscribers.
    let store = open_store(&url).await;
    assert_eq!(store.subscriber_count().await.unwrap(), 2);
    let bad = crier.run(&["store", "copy", "--from", "var/store"]).await;
    bad.assert_user_error("give the store to copy as sled:PATH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_planning_leaves_the_plan_to_another_node() {
    const COUNT: usize = 5_000;
    let url = fresh_database().await;
    let smtp_dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(smtp_dir.path(), 0);
    // Small planning batches, so planning is still under way when node A dies.
    let nodes: Vec<Crier> = (0..2)
        .map(|_| {
            let crier = node(&url, smtp.port);
            let config = std::fs::read_to_string(&crier.config).unwrap();
            std::fs::write(
                &crier.config,
                config.replace("[dispatch]\n", "[dispatch]\nplan_batch = 5\n"),
            )
            .unwrap();
            crier
        })
        .collect();
    import_subscribers(&nodes[0], COUNT).await;
    let store = open_store(&url).await;
    let mut servers = Vec::new();
    for node in &nodes {
        servers.push(serve(node).await);
    }

    let update = send_through(&servers[0], "Activations delayed").await;
    let planning = wait_until(Duration::from_secs(60), || {
        let counts = futures_lite(email_counts(&store, update));
        counts.queued + counts.in_flight + counts.sent >= 100
    })
    .await;
    assert!(planning, "node A started planning");
    let accepting = servers.remove(0);
    let mut child = accepting.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let counts = email_counts(&store, update).await;
    let planned_at_kill = counts.queued
        + counts.in_flight
        + counts.sent
        + counts.retrying
        + counts.dead
        + counts.skipped;
    assert!(
        planned_at_kill < COUNT as u64,
        "node A was killed before it finished planning ({planned_at_kill} planned)"
    );
    assert!(!store.plan_state(update).await.unwrap().done);

    let done = wait_until(Duration::from_secs(300), || {
        futures_lite(email_counts(&store, update)).sent == COUNT as u64
    })
    .await;
    assert!(done, "{:?}", email_counts(&store, update).await);
    assert!(store.plan_state(update).await.unwrap().done);
    let per_recipient = received_per_recipient(&smtp, "Activations delayed");
    let duplicates: usize = per_recipient.values().map(|n| n - 1).sum();
    println!(
        "node A killed with {planned_at_kill} of {COUNT} deliveries planned: node B planned the rest, {} reached, {duplicates} duplicate(s)",
        per_recipient.len()
    );
    assert_eq!(per_recipient.len(), COUNT, "no subscriber is missed");
    assert!(
        duplicates <= 16,
        "{duplicates} duplicates, but node A held at most 16 leases (8 attempts, 8 ahead)"
    );
    for server in servers {
        crate::subscribe::stop(server).await;
    }
}
