//! Test fixtures: a crier configuration in a temporary folder, an SMTP sink and a webhook sink,
//! each stopped when dropped.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub const LINK_SECRET: &str = "integration-link-secret-0123456789";
/// The raw webhook key; the channel reads it as `whsec_` + base64 of these bytes.
pub const WEBHOOK_KEY: &[u8] = b"integration-partner-key-0123456789";

pub fn webhook_secret() -> String {
    use base64::Engine;
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(WEBHOOK_KEY)
    )
}

/// Polls `condition` every 20 ms for at most `limit`.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

// ---- SMTP ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReceivedMail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub data: String,
}

/// aiosmtpd, started from `tests/support/smtp_sink.py`, writing one JSON file per message.
pub struct SmtpSink {
    child: std::process::Child,
    pub port: u16,
    out_dir: PathBuf,
}

impl SmtpSink {
    pub fn start(dir: &Path, delay_ms: u64) -> Self {
        let out_dir = dir.join("smtp-received");
        let port_file = dir.join("smtp-port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg("--out-dir")
            .arg(&out_dir)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--delay-ms")
            .arg(delay_ms.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs the SMTP sink (is aiosmtpd installed? .ci/run installs it)");
        let start = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("the sink writes its port");
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the SMTP sink exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the SMTP sink did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            port,
            out_dir,
        }
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        let Ok(entries) = std::fs::read_dir(&self.out_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "json"))
            .map(|p| serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
            .collect()
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.out_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|ext| ext == "json"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// How many messages each recipient received.
    pub fn per_recipient(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for mail in self.messages() {
            for rcpt in mail.rcpt_tos {
                *counts.entry(rcpt).or_insert(0) += 1;
            }
        }
        counts
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- webhooks -----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ReceivedHook {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub answered: u16,
}

impl ReceivedHook {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the webhook body is JSON")
    }
}

/// An answer the sink gives: a status, perhaps a Retry-After, perhaps after a delay.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    status: u16,
    retry_after: Option<u64>,
    delay: Duration,
    /// One more header on the answer.
    header: Option<(&'static str, &'static str)>,
}

impl Answer {
    pub const fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            delay: Duration::ZERO,
            header: None,
        }
    }

    pub const fn retry_after(status: u16, seconds: u64) -> Self {
        Self {
            status,
            retry_after: Some(seconds),
            delay: Duration::ZERO,
            header: None,
        }
    }

    /// A 204 that comes only after `delay`: a provider that times out.
    pub const fn slow(delay: Duration) -> Self {
        Self {
            status: 204,
            retry_after: None,
            delay,
            header: None,
        }
    }

    /// The same answer with one more header.
    pub const fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.header = Some((name, value));
        self
    }
}

#[derive(Default)]
struct HookState {
    received: Vec<ReceivedHook>,
    /// Answers to give, in order; once empty, every request gets 204.
    script: VecDeque<Answer>,
}

/// An axum server on 127.0.0.1 that records every POST to /hooks.
pub struct WebhookSink {
    pub url: String,
    state: Arc<Mutex<HookState>>,
    stop: Option<oneshot::Sender<()>>,
}

impl WebhookSink {
    pub async fn start(script: &[Answer]) -> Self {
        let state = Arc::new(Mutex::new(HookState {
            received: Vec::new(),
            script: script.iter().copied().collect(),
        }));
        let handler_state = state.clone();
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = handler_state.clone();
                async move {
                    let answer = {
                        let mut state = state.lock().unwrap();
                        let answer = state.script.pop_front().unwrap_or(Answer::status(204));
                        state.received.push(ReceivedHook {
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_owned(),
                                        v.to_str().unwrap_or_default().to_owned(),
                                    )
                                })
                                .collect(),
                            body: body.to_vec(),
                            answered: answer.status,
                        });
                        answer
                    };
                    tokio::time::sleep(answer.delay).await;
                    let Answer {
                        status,
                        retry_after,
                        header,
                        ..
                    } = answer;
                    let mut response = StatusCode::from_u16(status).unwrap().into_response();
                    if let Some(seconds) = retry_after {
                        response
                            .headers_mut()
                            .insert("retry-after", seconds.to_string().parse().unwrap());
                    }
                    if let Some((name, value)) = header {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            state,
            stop: Some(stop),
        }
    }

    pub fn received(&self) -> Vec<ReceivedHook> {
        self.state.lock().unwrap().received.clone()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A URL on 127.0.0.1 where nothing listens: a provider that is down.
pub fn unused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/hooks")
}

// ---- crier ------------------------------------------------------------------------------------

/// Quick retries, so tests of retrying take a fraction of a second.
pub const FAST_RETRIES: &str = "[delivery]\nmax_attempts = 4\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\ntimeout = \"5s\"\n";

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// A user error: exit code 1 and exactly one line on stderr that mentions `needle`.
    #[track_caller]
    pub fn assert_user_error(&self, needle: &str) {
        assert_eq!(
            self.code, 1,
            "expected exit code 1\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr, got: {}",
            self.stderr
        );
        assert!(
            lines[0].contains(needle),
            "stderr should mention {needle:?}: {}",
            self.stderr
        );
    }
}

/// One crier installation in a temporary folder.
pub struct Crier {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    env: Vec<(String, String)>,
}

impl Crier {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let config = dir.path().join("crier.toml");
        std::fs::write(
            &config,
            format!(
                r#"channels_dir = "channels"
templates_dir = "{}"
[store]
path = "var/store"
cache_capacity_mb = 16
[orders]
pattern = "[A-Z]{{2}}-[0-9]{{4,10}}"
[brand]
name = "Example Mobile"
public_url = "https://status.example.com"
[tokens]
link_secret_env = "CRIER_LINK_SECRET"
"#,
                templates.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("channels")).unwrap();
        Self {
            dir,
            config,
            env: vec![
                ("CRIER_LINK_SECRET".into(), LINK_SECRET.into()),
                ("CRIER_WEBHOOK_SECRET".into(), webhook_secret()),
            ],
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn channel(self, name: &str, toml: &str) -> Self {
        std::fs::write(self.path(&format!("channels/{name}.toml")), toml).unwrap();
        self
    }

    pub fn email(self, smtp_port: u16, extra: &str) -> Self {
        let toml = format!(
            "kind = \"email\"\nfrom = \"Example Mobile <updates@example.com>\"\ntransport = \"smtp://127.0.0.1:{smtp_port}\"\n{extra}"
        );
        self.channel("email", &toml)
    }

    pub fn webhook(self, url: &str, extra: &str) -> Self {
        let toml = format!(
            "kind = \"webhook\"\nurl = \"{url}\"\nsecret_env = \"CRIER_WEBHOOK_SECRET\"\n{extra}"
        );
        self.channel("partners", &toml)
    }

    pub fn status_page(self) -> Self {
        self.channel("status", "kind = \"status_page\"\ndir = \"var/status\"\n")
    }

    /// Every channel: email to a fresh SMTP sink, webhooks to a fresh receiver, and the status
    /// page.
    pub async fn with_every_channel() -> (Self, SmtpSink, WebhookSink) {
        let crier = Self::new();
        let smtp = SmtpSink::start(crier.dir.path(), 0);
        let hooks = WebhookSink::start(&[]).await;
        let crier = crier
            .email(smtp.port, "")
            .webhook(&hooks.url, "")
            .status_page();
        (crier, smtp, hooks)
    }

    pub fn without_env(mut self, name: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"));
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("CRIER_LINK_SECRET")
            .env_remove("CRIER_WEBHOOK_SECRET")
            .env_remove("CRIER_API_TOKEN")
            .env_remove("CRIER_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        let output = tokio::time::timeout(Duration::from_secs(120), self.command(args).output())
            .await
            .expect("crier finished within 2 minutes")
            .expect("crier runs");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub async fn subscribe(&self, order: &str, contact: &str) {
        let flag = if contact.starts_with('+') {
            "--phone"
        } else {
            "--email"
        };
        self.run(&["subscribe", "--order", order, flag, contact, "--confirmed"])
            .await
            .assert_ok();
    }

    /// Sends an update to everyone with `--json` and returns the parsed summary.
    /// `crier send --yes --json --headline "Activations delayed"`, `extra` and `body`.
    async fn run_send(&self, extra: &[&str], body: &str) -> Output {
        let mut args = vec![
            "send",
            "--yes",
            "--json",
            "--headline",
            "Activations delayed",
        ];
        args.extend_from_slice(extra);
        args.push(body);
        self.run(&args).await
    }

    pub async fn send(&self, extra: &[&str], body: &str) -> serde_json::Value {
        let output = self.run_send(extra, body).await;
        output.assert_ok();
        output.json()
    }

    /// Sends an update to everyone with `--json` when every delivery is expected to fail: exit
    /// code 3 with a line that says so, and the parsed summary.
    /// Sends an update of which some deliveries go to dead letters and the rest are
    /// delivered: exit code 4, with the hint.
    pub async fn send_partly(&self, extra: &[&str], body: &str) -> serde_json::Value {
        let output = self.run_send(extra, body).await;
        assert_eq!(
            output.code, 4,
            "some delivered, some dead is exit code 4\nstdout: {}\nstderr: {}",
            output.stdout, output.stderr
        );
        assert!(
            output.stderr.contains("went to dead letters")
                && output.stderr.contains("see `crier deliveries --failed`"),
            "{}",
            output.stderr
        );
        output.json()
    }

    pub async fn send_to_no_avail(&self, body: &str) -> serde_json::Value {
        let output = self.run_send(&[], body).await;
        assert_eq!(
            output.code, 3,
            "nothing delivered is exit code 3\nstdout: {}\nstderr: {}",
            output.stdout, output.stderr
        );
        assert!(
            output.stderr.contains("nothing was delivered"),
            "{}",
            output.stderr
        );
        output.json()
    }

    /// Opens the store through the library: only while no crier process runs.
    pub async fn store(&self) -> std::sync::Arc<dyn crier::store::Store> {
        crier::store::open(&crier::config::StoreSettings::sled(
            self.path("var/store"),
            16 * 1024 * 1024,
        ))
        .await
        .expect("the store opens")
    }
}

impl Crier {
    /// Sets (or replaces) an environment variable crier runs with.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
        self
    }
}

// ---- fake provider APIs -------------------------------------------------------------------------

/// One request a [`FakeApi`] received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: String,
    /// The path, with the query if there is one.
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl ApiRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }

    /// The top-level keys of the JSON body, sorted.
    pub fn json_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .json()
            .as_object()
            .expect("the request body is a JSON object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }
}

/// What a [`FakeApi`] answers: a status, headers, perhaps a JSON body, perhaps after a delay.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Option<serde_json::Value>,
    delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: None,
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            body: Some(body),
            ..Self::status(status)
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    /// The same answer, given only after `delay`: a provider that times out.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Answerer = dyn Fn(&ApiRequest, usize) -> Reply + Send + Sync;

/// An axum server on 127.0.0.1 that records every request and answers it through a function
/// of the request and how many earlier requests had the same method and path.
pub struct FakeApi {
    /// The base URL, without a trailing slash.
    pub url: String,
    received: Arc<Mutex<Vec<ApiRequest>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeApi {
    pub async fn start(
        answer: impl Fn(&ApiRequest, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let received: Arc<Mutex<Vec<ApiRequest>>> = Arc::default();
        let answer: Arc<Answerer> = Arc::new(answer);
        let handler_received = received.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: HeaderMap,
                  body: Bytes| {
                let received = handler_received.clone();
                let answer = answer.clone();
                async move {
                    let request = ApiRequest {
                        method: method.to_string(),
                        path: uri
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    v.to_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect(),
                        body: body.to_vec(),
                        at: Instant::now(),
                    };
                    let reply = {
                        let mut received = received.lock().unwrap();
                        let earlier = received
                            .iter()
                            .filter(|r| r.method == request.method && r.path == request.path)
                            .count();
                        let reply = answer(&request, earlier);
                        received.push(request);
                        reply
                    };
                    tokio::time::sleep(reply.delay).await;
                    let mut response = match &reply.body {
                        Some(body) => axum::Json(body.clone()).into_response(),
                        None => ().into_response(),
                    };
                    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                    for (name, value) in &reply.headers {
                        response.headers_mut().insert(*name, value.parse().unwrap());
                    }
                    response
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            received,
            stop: Some(stop),
        }
    }

    pub fn received(&self) -> Vec<ApiRequest> {
        self.received.lock().unwrap().clone()
    }

    /// The requests with this method and path, in the order they came.
    pub fn requests(&self, method: &str, path: &str) -> Vec<ApiRequest> {
        self.received()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Crier {
    /// Renders with a copy of the templates in which `name` (like `discourse.title.hbs`) says
    /// `text` instead: an operator's own template.
    pub fn with_template(self, name: &str, text: &str) -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let copy = self.path("templates");
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
            }
        }
        std::fs::write(copy.join(name), text).unwrap();
        let config = std::fs::read_to_string(&self.config).unwrap();
        let config: Vec<String> = config
            .lines()
            .map(|line| {
                if line.starts_with("templates_dir") {
                    "templates_dir = \"templates\"".to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, config.join("\n") + "\n").unwrap();
        self
    }
}

/// An order number of the test configuration's pattern.
pub fn order(raw: &str) -> crier::domain::OrderNumber {
    let pattern = crier::domain::OrderPattern::new(r"[A-Z]{2}-\d{4}").unwrap();
    crier::domain::OrderNumber::parse(raw, &pattern).unwrap()
}
