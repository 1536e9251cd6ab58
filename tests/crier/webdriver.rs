//! The browser machinery crier's browser tests share: a chromedriver and the headless Debian
//! chromium it drives over W3C WebDriver, the commands a test sends them (pages, elements,
//! forms, scripts, screenshots in `target/screenshots`), and accessibility checks with
//! axe-core from npm.

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
pub(crate) const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key under which W3C WebDriver names an element.
pub(crate) const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a page may take to show what the test waits for.
pub(crate) const PAGE_WAIT: Duration = Duration::from_secs(15);
/// How long axe-core may take over one page.
pub(crate) const AXE_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs axe-core, once `axe.min.js` is in the page, and answers its violations as JSON text,
/// or `{"error": ...}` when axe could not run.
const AXE_RUN: &str = "\
    const done = arguments[arguments.length - 1];
    if (typeof axe === 'undefined') {
        done(JSON.stringify({ error: 'axe.min.js did not define axe' }));
        return;
    }
    axe.run(document, { resultTypes: ['violations'] }).then(
        (results) => done(JSON.stringify(results.violations)),
        (error) => done(JSON.stringify({ error: String(error) })),
    );";

/// A free port on 127.0.0.1, for a server started next that cannot report its own.
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub(crate) fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// One chromedriver and the chromium session it drives, both ended when dropped.
pub(crate) struct WebDriver {
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
    pub(crate) async fn start() -> Self {
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
    pub(crate) async fn try_command(
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
    pub(crate) async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        self.try_command(method, path, body)
            .await
            .unwrap_or_else(|error| panic!("WebDriver {path} failed: {error}"))
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub(crate) async fn current_url(&self) -> String {
        let url = self.command(reqwest::Method::GET, "/url", None).await;
        url.as_str().unwrap_or_default().to_owned()
    }

    pub(crate) async fn title(&self) -> String {
        let title = self.command(reqwest::Method::GET, "/title", None).await;
        title.as_str().unwrap_or_default().to_owned()
    }

    pub(crate) async fn try_find(&self, css: &str) -> Result<String, String> {
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
    pub(crate) async fn find(&self, css: &str) -> String {
        match self.try_find(css).await {
            Ok(element) => element,
            Err(error) => panic!("no {css:?} on {}: {error}", self.current_url().await),
        }
    }

    /// Replaces what the field holds with `text`, typed key by key as a person would.
    pub(crate) async fn type_into(&self, element: &str, text: &str) {
        self.clear(element).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub(crate) async fn click(&self, element: &str) {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    pub(crate) async fn try_text(&self, css: &str) -> Result<String, String> {
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
    pub(crate) async fn text(&self, css: &str) -> String {
        self.try_text(css)
            .await
            .unwrap_or_else(|error| panic!("no text in {css:?}: {error}"))
    }

    /// Waits until `css` shows `needle`, as after a form is sent and the next page loads.
    pub(crate) async fn wait_for_text(&self, css: &str, needle: &str) -> String {
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
    pub(crate) async fn property(&self, css: &str, name: &str) -> Value {
        let element = self.find(css).await;
        self.command(
            reqwest::Method::GET,
            &format!("/element/{element}/property/{name}"),
            None,
        )
        .await
    }

    pub(crate) async fn attribute(&self, css: &str, name: &str) -> Option<String> {
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

    pub(crate) async fn is_displayed(&self, css: &str) -> bool {
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
    pub(crate) async fn screenshot(&self, name: &str) -> PathBuf {
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

    /// Empties the field `element` names, as selecting what it holds and deleting it would.
    pub(crate) async fn clear(&self, element: &str) {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/clear"),
            Some(json!({})),
        )
        .await;
    }

    /// Chooses the `<option>` whose value is `value` in the `<select>` that `css_select`
    /// selects, by clicking it as a person would, so the page sees its `input` and `change`.
    pub(crate) async fn select_by_value(&self, css_select: &str, value: &str) {
        let select = self.find(css_select).await;
        let options = self
            .command(
                reqwest::Method::POST,
                &format!("/element/{select}/elements"),
                Some(json!({ "using": "css selector", "value": "option" })),
            )
            .await;
        let mut offered = Vec::new();
        for option in options.as_array().into_iter().flatten() {
            let option = option[ELEMENT_KEY]
                .as_str()
                .unwrap_or_else(|| panic!("no element reference in {option}"));
            let this = self
                .command(
                    reqwest::Method::GET,
                    &format!("/element/{option}/property/value"),
                    None,
                )
                .await;
            if this == value {
                self.click(option).await;
                assert!(
                    self.element_selected(option).await,
                    "clicking option {value:?} of {css_select:?} did not choose it"
                );
                return;
            }
            offered.push(this);
        }
        panic!("{css_select:?} has no option {value:?}, only {offered:?}");
    }

    /// Whether the checkbox or radio button that `css` selects is checked, or the `<option>`
    /// chosen.
    pub(crate) async fn is_selected(&self, css: &str) -> bool {
        let element = self.find(css).await;
        self.element_selected(&element).await
    }

    async fn element_selected(&self, element: &str) -> bool {
        let selected = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{element}/selected"),
                None,
            )
            .await;
        selected == true
    }

    /// Resizes the window to `width` by `height` CSS pixels, to see the page as a phone or a
    /// narrow window shows it: the page is then `width` wide (`innerWidth`, what media queries
    /// see), and less than `height` high by headless chromium's own bars.
    pub(crate) async fn set_window_size(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// Makes pages answer `prefers-color-scheme` with `scheme` ("light" or "dark"), through
    /// chromedriver's door to the DevTools protocol.
    pub(crate) async fn prefer_color_scheme(&self, scheme: &str) {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({
                "cmd": "Emulation.setEmulatedMedia",
                "params": { "features": [{ "name": "prefers-color-scheme", "value": scheme }] },
            })),
        )
        .await;
    }

    /// Whether the page is wider than the window, so a reader must scroll sideways.
    pub(crate) async fn scrolls_sideways(&self) -> bool {
        let wider = self
            .execute(
                "return document.documentElement.scrollWidth > window.innerWidth;",
                Vec::new(),
            )
            .await;
        wider.as_bool().expect("a boolean")
    }

    /// The visible text of every element `css` matches, in document order.
    pub(crate) async fn texts(&self, css: &str) -> Vec<String> {
        let texts = self
            .execute(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim());",
                vec![json!(css)],
            )
            .await;
        serde_json::from_value(texts).expect("a list of texts")
    }

    /// Runs `script` in the page as the body of a function whose `arguments` are `args` (an
    /// element as `json!({ ELEMENT_KEY: element })`), and returns what it returns.
    pub(crate) async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Like [`Self::execute`], for a script that answers later: it calls its last argument,
    /// which WebDriver adds after `args`, with what it returns, within the session's script
    /// timeout.
    pub(crate) async fn execute_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Runs axe-core over the page the window shows now, with the rules it runs by default
    /// (WCAG 2 A and AA, and its best practices): fails the test on any violation, each
    /// reported with `page`, the name the test gives the page.
    pub(crate) async fn check_accessibility(&self, page: &str) {
        let script = axe_core_script();
        let axe = std::fs::read_to_string(&script)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", script.display()));
        // Under 0.1 s for crier's pages here, but a long page on a busy machine may need more
        // than the session's 10 s.
        self.command(
            reqwest::Method::POST,
            "/timeouts",
            Some(json!({ "script": AXE_TIMEOUT.as_millis() as u64 })),
        )
        .await;
        self.execute(&axe, Vec::new()).await;
        let answer = self.execute_async(AXE_RUN, Vec::new()).await;
        let answer = answer
            .as_str()
            .unwrap_or_else(|| panic!("{page}: axe answered {answer}, not JSON text"));
        let violations: Value = serde_json::from_str(answer)
            .unwrap_or_else(|error| panic!("{page}: axe answered {answer:?}: {error}"));
        if let Some(error) = violations.get("error") {
            panic!("{page}: axe-core could not check the page: {error}");
        }
        let violations = violations
            .as_array()
            .unwrap_or_else(|| panic!("{page}: axe answered {violations}, not its violations"));
        // Every violation fails, whatever its impact: a minor one is still a person who cannot
        // read or reach something.
        let failing: Vec<String> = violations
            .iter()
            .map(|violation| describe_violation(page, violation))
            .collect();
        assert!(
            failing.is_empty(),
            "axe-core found {} accessibility violation(s):\n{}",
            failing.len(),
            failing.join("\n")
        );
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
pub(crate) fn delete_session(port: u16, session: &str) -> bool {
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

/// axe-core's `axe.min.js`, which scripts/test.sh installs from npm under `target/npm`.
pub(crate) fn axe_core_script() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/npm/node_modules/axe-core/axe.min.js");
    assert!(
        path.exists(),
        "the accessibility check runs axe-core, and {} is missing: run scripts/test.sh, which \
         installs it (or npm install --prefix target/npm axe-core@4.10.3)",
        path.display()
    );
    path
}

/// One axe violation as a person fixing it reads it: the page, the rule, its impact and
/// help, and the first few elements that break it with what is wrong with each.
fn describe_violation(page: &str, violation: &Value) -> String {
    const SHOWN: usize = 3;
    let text = |value: &Value| value.as_str().unwrap_or("?").to_owned();
    let mut report = format!(
        "{page}: {} ({}): {} <{}>",
        text(&violation["id"]),
        text(&violation["impact"]),
        text(&violation["help"]),
        text(&violation["helpUrl"]),
    );
    let nodes = violation["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for node in nodes.iter().take(SHOWN) {
        report += &format!("\n  - {}", node["target"]);
        for line in text(&node["failureSummary"]).lines() {
            report += &format!("\n      {line}");
        }
    }
    if nodes.len() > SHOWN {
        report += &format!("\n  - and {} more", nodes.len() - SHOWN);
    }
    report
}
