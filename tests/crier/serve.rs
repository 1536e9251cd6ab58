//! `crier serve`: the status page, feed and JSON served from memory with ETags, the health
//! checks, and a clean stop on SIGTERM.

use crate::support::Crier;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running `crier serve` and the address it listens on; killed if the test ends early.
pub struct Server {
    pub child: tokio::process::Child,
    pub base: String,
    /// Every line the server wrote to stderr (its log), as it comes.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub async fn serve(crier: &Crier) -> Server {
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    if !config.contains("[server]") {
        config.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
        std::fs::write(&crier.config, config).unwrap();
    }
    let mut child = crier.command(&["serve"]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        let mut before = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            before.push(line.clone());
            if let Some(rest) = line.strip_prefix("crier serves ") {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_owned();
            }
        }
        panic!(
            "crier serve ended before it listened:\n{}",
            before.join("\n")
        );
    })
    .await
    .expect("crier serve listened within a minute");
    // Keep draining stderr so the server never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    Server { child, base, log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_served_from_memory_with_an_etag_and_a_304_for_a_fresh_copy() {
    let crier = Crier::new().status_page();
    crier
        .send(&["--next-update-in", "2h"], "We're working on it <script>.")
        .await;
    let mut server = serve(&crier).await;
    let client = reqwest::Client::new();

    let page = client
        .get(format!("{}/", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let etag = page.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(page.headers()["cache-control"], "public, max-age=15");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("Activations delayed"), "{html}");
    assert!(
        html.contains("&lt;script&gt;") && !html.contains("<script>."),
        "escaped"
    );

    let again = client
        .get(format!("{}/", server.base))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        304,
        "a reader with the current copy gets no body"
    );

    let feed = client
        .get(format!("{}/feed.atom", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    assert_eq!(feed.headers()["content-type"], "application/atom+xml");
    let feed = atom_syndication::Feed::read_from(&feed.bytes().await.unwrap()[..]).unwrap();
    assert_eq!(feed.entries().len(), 1);
    let json: serde_json::Value = client
        .get(format!("{}/status.json", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(json["latest"]["next_update_by"].as_str().is_some());

    for path in ["healthz", "readyz"] {
        let answer = client
            .get(format!("{}/{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
    }

    // SIGTERM: stop accepting, finish, exit 0.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_of_readers_gets_the_page_every_time() {
    let crier = Crier::new().status_page();
    crier.send(&[], "We're on it.").await;
    let mut server = serve(&crier).await;
    let client = reqwest::Client::new();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (client, url) = (client.clone(), format!("{}/", server.base));
        readers.spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    }
    let mut answered = 0;
    while let Some(status) = readers.join_next().await {
        assert_eq!(status.unwrap().unwrap(), 200);
        answered += 1;
    }
    assert_eq!(answered, 200);
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unsubscribe_link_asks_on_get_and_acts_on_a_one_click_post() {
    let crier = Crier::new();
    let smtp = crate::support::SmtpSink::start(crier.dir.path(), 0);
    let crier = crier.email(smtp.port, "").status_page();
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.send(&[], "First update.").await;
    let token = crate::email::unsubscribe_token(&smtp.messages()[0].data);

    let mut server = serve(&crier).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = format!("{}/unsubscribe/{token}", server.base);
    let page = client.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("a***@example.com"),
        "the contact, masked: {html}"
    );
    assert!(
        !html.contains("ann@example.com"),
        "never the contact itself"
    );
    assert!(
        html.contains("<form method=\"post\""),
        "a button, not an action"
    );

    let forged = format!("{}/unsubscribe/{}x", server.base, &token[..token.len() - 1]);
    let refused = client
        .post(&forged)
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    // RFC 8058: a POST with this body, no cookie, no CSRF token, no redirect.
    let one_click = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(one_click.status(), 200);

    let pid = server.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let ann = crier
        .store()
        .await
        .subscriber(&crier::domain::Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !ann.receives_updates(),
        "the one-click POST unsubscribed ann"
    );
    let before = smtp.count();
    crier.send(&[], "Second update.").await;
    assert_eq!(smtp.count(), before, "the next update does not reach ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incidents_own_page_is_served_with_every_update_and_an_unknown_one_is_404() {
    let crier = Crier::new().status_page();
    let first = crier.send(&[], "Update 1.").await;
    let incident = first["incident"].as_str().unwrap().to_owned();
    for n in 2..=12 {
        crier
            .run(&[
                "send",
                "--yes",
                "--incident",
                &incident,
                &format!("Update {n}."),
            ])
            .await
            .assert_ok();
    }
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    let page = client
        .get(format!("{}/incidents/{incident}.html", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    for n in 1..=12 {
        assert!(page.contains(&format!("<p>Update {n}.</p>")), "update {n}");
    }
    let front = client
        .get(&server.base)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !front.contains("<p>Update 2.</p>"),
        "the front page shows the latest ten"
    );
    assert!(front.contains("Earlier updates"), "{front}");
    for missing in [
        "01ARZ3NDEKTSV4RRFFQ69G5FAV.html",
        "nonsense",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
    ] {
        let answer = client
            .get(format!("{}/incidents/{missing}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{missing}");
    }
    crate::subscribe::stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_public_page_can_be_framed_by_another_site_and_the_console_keeps_its_own_policy() {
    let crier = Crier::new().status_page();
    let sent = crier.send(&[], "We're working on it.").await;
    let incident = sent["incident"].as_str().unwrap();
    let server = serve(&crier).await;
    let client = reqwest::Client::new();
    for path in [
        "/".to_owned(),
        format!("/incidents/{incident}.html"),
        "/subscribe".to_owned(),
        "/confirm/not-a-token".to_owned(),
        "/unsubscribe/not-a-token".to_owned(),
        "/s/not-a-token".to_owned(),
        "/feed.atom".to_owned(),
    ] {
        let answer = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let policy = header("content-security-policy");
        assert!(
            policy.contains("frame-ancestors 'none'"),
            "{path}: {policy:?}"
        );
        assert!(policy.contains("default-src 'none'"), "{path}: {policy:?}");
        assert!(
            policy.contains("form-action 'self' https://status.example.com;"),
            "{path}: {policy:?}"
        );
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
    }
    let robots = client
        .get(format!("{}/robots.txt", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(robots.status(), 200);
    let robots = robots.text().await.unwrap();
    for private in ["/admin", "/api", "/confirm/", "/unsubscribe/", "/s/"] {
        assert!(
            robots.contains(&format!("Disallow: {private}\n")),
            "{robots}"
        );
    }
    assert!(
        !robots.contains("Disallow: /\n"),
        "the status page may be indexed"
    );
    let console = client
        .get(format!("{}/admin/login", server.base))
        .send()
        .await
        .unwrap();
    let policy = console
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(policy.starts_with("default-src 'self';"), "{policy}");
    crate::subscribe::stop(server).await;
}

/// Opens a connection to `server` from `local` (any 127.x address is this machine).
async fn connect_from(local: &str, server: std::net::SocketAddr) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(format!("{local}:0").parse().ok()?).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(server))
        .await
        .ok()?
        .ok()
}

/// Whether the server closed `stream` (or never kept it) within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or 400 answer before the close is fine: read on to the end.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_through_a_flood_of_idle_and_slow_connections_which_the_timeouts_close() {
    use tokio::io::AsyncWriteExt;
    let crier = Crier::new().status_page();
    let mut config = std::fs::read_to_string(&crier.config).unwrap();
    config.push_str(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2000\nmax_connections_per_client = 1200\nheader_timeout = \"5s\"\n",
    );
    std::fs::write(&crier.config, config).unwrap();
    let server = serve(&crier).await;
    let address: std::net::SocketAddr = server.base["http://".len()..].parse().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let healthz = format!("{}/healthz", server.base);

    // 1,200 from one client (its share), then 1,000 from another: 200 more than the server
    // keeps. Half of each send a partial request head and stop; the rest send nothing.
    let mut flood = Vec::new();
    for (from, count) in [("127.0.0.2", 1200), ("127.0.0.3", 1000)] {
        for n in 0..count {
            let Some(mut stream) = connect_from(from, address).await else {
                continue;
            };
            if n % 2 == 0 {
                let _ = stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: crier\r\n")
                    .await;
            }
            flood.push(stream);
        }
        if from == "127.0.0.2" {
            // One more from the first client is over its share: closed at once.
            let mut over = connect_from(from, address).await.expect("connects");
            assert!(
                closed_within(&mut over, Duration::from_secs(1)).await,
                "a client past its share is closed at once"
            );
        }
    }
    let opened = std::time::Instant::now();
    assert!(flood.len() >= 2000, "{} connections opened", flood.len());
    // A few that trickle their head, a byte every half second.
    let mut trickling = Vec::new();
    for _ in 0..20 {
        if let Some(stream) = connect_from("127.0.0.4", address).await {
            trickling.push(stream);
        }
    }

    // Meanwhile /healthz answers, every time within a second.
    for round in 0..6 {
        let started = std::time::Instant::now();
        let answer = client.get(&healthz).send().await;
        assert!(
            answer.as_ref().is_ok_and(|a| a.status() == 200),
            "round {round}: /healthz did not answer within a second: {answer:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        for stream in &mut trickling {
            let _ = stream.write_all(b"X").await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Past the header deadline (5 s) every one of them is closed, the trickling ones too,
    // though they kept sending.
    let deadline = opened + Duration::from_secs(12);
    let mut still_open = 0;
    for stream in flood.iter_mut().chain(trickling.iter_mut()) {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        if !closed_within(stream, wait.max(Duration::from_millis(10))).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "connections the timeouts left open");
    drop(flood);
    drop(trickling);
    let answer = client.get(&healthz).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    crate::subscribe::stop(server).await;
}
