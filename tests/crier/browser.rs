//! `crier serve`'s public pages in a real browser: Debian's chromium, driven by chromedriver
//! over W3C WebDriver, reads the status page, fills in the subscribe form, meets its inline
//! error, and confirms from the emailed link; screenshots land in `target/screenshots`.

use crate::serve::{Server, serve};
use crate::support::{Crier, SmtpSink, wait_until};
use base64::Engine as _;
use crier::domain::{Contact, SubscriberState};
use mail_parser::MessageParser;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key under which W3C WebDriver names an element.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a page may take to show what the test waits for.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// A free port on 127.0.0.1, for a server started next that cannot report its own.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// One chromedriver and the chromium session it drives, both ended when dropped.
struct WebDriver {
    http: reqwest::Client,
    port: u16,
    session: String,
    /// chromium's own process: killed only if chromedriver could not quit it.
    browser_pid: Option<u32>,
    _driver: tokio::process::Child,
    /// A fresh profile, so no earlier run's cookies or state leak in; removed after chromium.
    _profile: tempfile::TempDir,
}

impl WebDriver {
    async fn start() -> Self {
        assert!(
            Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
            "this test drives Debian's chromium through chromedriver, and {CHROMIUM} or \
             {CHROMEDRIVER} is missing: run scripts/test.sh, which installs them \
             (or, as root, apt-get install chromium chromium-driver)"
        );
        let port = free_port();
        let mut driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        // Every request stays on 127.0.0.1, whatever proxy the environment names.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let status_url = format!("http://127.0.0.1:{port}/status");
        let start = Instant::now();
        loop {
            if let Ok(answer) = http.get(&status_url).send().await
                && let Ok(status) = answer.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            if let Ok(Some(exit)) = driver.try_wait() {
                panic!("chromedriver exited at start-up: {exit}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver was not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "timeouts": { "implicit": 0, "pageLoad": 30_000, "script": 10_000 },
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    // Without the networking flags chromium keeps calling home, on a network
                    // that lets nothing out.
                    "args": [
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--no-first-run",
                        format!("--user-data-dir={}", profile.path().display()),
                        "--window-size=1280,900",
                    ],
                },
            }},
        });
        let answer = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers");
        let created: Value = answer.json().await.expect("a JSON answer");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromium did not start: {created}"))
            .to_owned();
        let browser_pid = created["value"]["capabilities"]["goog:processID"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok());
        Self {
            http,
            port,
            session,
            browser_pid,
            _driver: driver,
            _profile: profile,
        }
    }

    /// One WebDriver command on the session: its `value`, or the driver's error.
    async fn try_command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!(
            "http://127.0.0.1:{}/session/{}{path}",
            self.port, self.session
        );
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.map_err(|e| e.to_string())?;
        let ok = answer.status().is_success();
        let mut answer: Value = answer.json().await.map_err(|e| e.to_string())?;
        let value = answer["value"].take();
        if ok {
            Ok(value)
        } else {
            Err(format!("{}: {}", value["error"], value["message"]))
        }
    }

    /// One WebDriver command on the session: its `value`; the driver's error fails the test.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_command(method, path, body)
            .await
            .unwrap_or_else(|error| panic!("WebDriver {path} failed: {error}"))
    }

    async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn current_url(&self) -> String {
        let url = self.command(reqwest::Method::GET, "/url", None).await;
        url.as_str().unwrap_or_default().to_owned()
    }

    async fn title(&self) -> String {
        let title = self.command(reqwest::Method::GET, "/title", None).await;
        title.as_str().unwrap_or_default().to_owned()
    }

    async fn try_find(&self, css: &str) -> Result<String, String> {
        let found = self
            .try_command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        found[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element reference in {found}"))
    }

    /// The element `css` selects on the current page.
    async fn find(&self, css: &str) -> String {
        match self.try_find(css).await {
            Ok(element) => element,
            Err(error) => panic!("no {css:?} on {}: {error}", self.current_url().await),
        }
    }

    /// Replaces what the field holds with `text`, typed key by key as a person would.
    async fn type_into(&self, element: &str, text: &str) {
        let path = format!("/element/{element}");
        self.command(
            reqwest::Method::POST,
            &format!("{path}/clear"),
            Some(json!({})),
        )
        .await;
        self.command(
            reqwest::Method::POST,
            &format!("{path}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, element: &str) {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn try_text(&self, css: &str) -> Result<String, String> {
        let element = self.try_find(css).await?;
        let text = self
            .try_command(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                None,
            )
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// The text `css` shows as rendered: hidden text is left out.
    async fn text(&self, css: &str) -> String {
        self.try_text(css)
            .await
            .unwrap_or_else(|error| panic!("no text in {css:?}: {error}"))
    }

    /// Waits until `css` shows `needle`, as after a form is sent and the next page loads.
    async fn wait_for_text(&self, css: &str, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let text = self.try_text(css).await;
            if let Ok(text) = &text
                && text.contains(needle)
            {
                return text.clone();
            }
            if start.elapsed() >= PAGE_WAIT {
                let shown = match text {
                    Ok(text) => format!("it shows {text:?}"),
                    Err(error) => format!("it is not there ({error})"),
                };
                panic!(
                    "{css:?} did not show {needle:?} within {PAGE_WAIT:?} at {}: {shown}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A property of the element `css` selects, like the `value` a field holds now.
    async fn property(&self, css: &str, name: &str) -> Value {
        let element = self.find(css).await;
        self.command(
            reqwest::Method::GET,
            &format!("/element/{element}/property/{name}"),
            None,
        )
        .await
    }

    async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let element = self.find(css).await;
        let value = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{element}/attribute/{name}"),
                None,
            )
            .await;
        value.as_str().map(str::to_owned)
    }

    async fn is_displayed(&self, css: &str) -> bool {
        let element = self.find(css).await;
        let shown = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{element}/displayed"),
                None,
            )
            .await;
        shown == true
    }

    /// Saves what the window shows as a PNG at `target/screenshots/{name}`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("the screenshot is base64");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        // Deleting the session is what makes chromedriver quit chromium: killing chromedriver
        // alone leaves chromium running. Sent by hand, without the async client, because
        // drop cannot await; chromedriver itself is then killed by `kill_on_drop`.
        if !delete_session(self.port, &self.session)
            && let Some(pid) = self.browser_pid
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// `DELETE /session/{id}` on chromedriver, in plain blocking HTTP/1.1: whether it succeeded.
fn delete_session(port: u16, session: &str) -> bool {
    use std::io::{Read, Write};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    // chromedriver answers once chromium has quit, and keeps the connection open whatever
    // the request says: the status line is all there is to wait for.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    while !answer.windows(2).any(|pair| pair == b"\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(read) => answer.extend_from_slice(&chunk[..read]),
        }
    }
    answer.starts_with(b"HTTP/1.1 200")
}

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
