//! The CLI's way to a running `crier serve`. The server holds the store (sled locks its
//! folder), so it announces its address in that folder; while a server answers there, the
//! commands go through its admin API instead of waiting for the store.

use crate::config::Config;
use crate::error::{Error, ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The file in the store's folder that says where its server listens.
const ANNOUNCEMENT: &str = "crier-serve.json";
/// How long the CLI waits for a server to say it is alive before opening the store itself.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize, Deserialize)]
struct Announced {
    address: SocketAddr,
    pid: u32,
}

fn announcement_path(config: &Config) -> PathBuf {
    config.store.path.join(ANNOUNCEMENT)
}

/// The server's announcement, removed when the server stops. After a `kill -9` it stays, and
/// the CLI finds nobody answering at the address: it opens the store then, as before.
pub struct Announcement {
    path: PathBuf,
}

impl Announcement {
    pub fn write(config: &Config, listening: SocketAddr) -> crate::Result<Self> {
        // A server on every interface is reached on the loopback one.
        let address = match listening.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listening.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listening.port())
            }
            _ => listening,
        };
        let path = announcement_path(config);
        let text = serde_json::to_vec(&Announced {
            address,
            pid: std::process::id(),
        })?;
        // On PostgreSQL nothing else lives in the store's folder, so it may not exist yet.
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(|e| {
                Error::internal(anyhow::anyhow!("cannot create {}: {e}", folder.display()))
            })?;
        }
        crate::files::write_private(&path, &text).map_err(|e| {
            Error::internal(anyhow::anyhow!("cannot write {}: {e}", path.display()))
        })?;
        Ok(Self { path })
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running server's admin API, with a token to use it.
pub struct Remote {
    base: String,
    token: SecretString,
    client: reqwest::Client,
}

/// An error answer of the API.
#[derive(Debug, Deserialize)]
struct ApiError {
    error: String,
    detail: String,
}

impl Remote {
    /// The running server, if one answers at the address it announced. Without a token for
    /// it, a clear error: the store is the server's while it runs.
    pub async fn find(config: &Config) -> crate::Result<Option<Self>> {
        let Ok(text) = std::fs::read(announcement_path(config)) else {
            return Ok(None);
        };
        let Ok(announced) = serde_json::from_slice::<Announced>(&text) else {
            return Ok(None);
        };
        let base = format!("http://{}", announced.address);
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(anyhow::anyhow!("cannot make an HTTP client: {e}")))?;
        let alive = client
            .get(format!("{base}/healthz"))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .is_ok_and(|answer| answer.status().is_success());
        if !alive {
            return Ok(None);
        }
        let token = config
            .api_tokens
            .iter()
            .find_map(|token| token.secret.clone())
            .ok_or_else(|| {
                let variables: Vec<String> = config
                    .api_tokens
                    .iter()
                    .map(|t| format!("{} ({})", t.variable, t.name))
                    .collect();
                let hint = if variables.is_empty() {
                    "configure one under [api] tokens and set its variable".to_owned()
                } else {
                    format!("set {}", variables.join(" or "))
                };
                Error::new(
                    ErrorKind::Conflict,
                    anyhow::anyhow!(
                        "crier serve is running at {base} and holds the store; to go through its admin API, {hint}"
                    ),
                )
            })?;
        Ok(Some(Self {
            base,
            token,
            client,
        }))
    }

    /// Where the server is, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> crate::Result<T> {
        self.call(self.client.get(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        idempotency_key: Option<&str>,
    ) -> crate::Result<T> {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        self.call(request).await
    }

    /// POSTs `body` as it is, of type `content_type` (a file to import).
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> crate::Result<T> {
        let request = self
            .client
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.call(request).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> crate::Result<T> {
        self.call(self.client.delete(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api{path}", self.base)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> crate::Result<T> {
        let answer = request
            .bearer_auth(self.token.expose_secret())
            .send()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    anyhow::anyhow!("crier serve at {} did not answer: {e}", self.base),
                )
            })?;
        let status = answer.status();
        let bytes = answer.bytes().await.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                anyhow::anyhow!("crier serve at {} broke off its answer: {e}", self.base),
            )
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(anyhow::anyhow!(
                    "crier serve at {} answered with JSON this crier cannot read ({e}); is it another version?",
                    self.base
                ))
            });
        }
        let kind = ErrorKind::from_http_status(status.as_u16());
        let message = match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(error) if error.error == "unauthorized" => format!(
                "crier serve at {} refused the admin token: {}",
                self.base, error.detail
            ),
            Ok(error) => error.detail,
            Err(_) => format!("crier serve at {} answered {status}", self.base),
        };
        Err(Error::new(kind, anyhow::anyhow!("{message}")))
    }
}
