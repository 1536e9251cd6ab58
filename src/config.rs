//! Configuration: the main file, one file per channel, and their validation.
//!
//! Loading reads the files and the environment variables that hold secrets, and nothing else:
//! `crier check-config` runs exactly this, with no network and no store.

use crate::domain::OrderPattern;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lettre::message::Mailbox;
use reqwest::Url;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem, always naming the file, and the key when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{reason}", file.display(), key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub reason: String,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<Option<String>>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn at(file: &Path, key: &str, reason: impl Into<String>) -> Self {
        Self::new(file, Some(key.to_owned()), reason)
    }
}

/// The main configuration file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Folder of channel files, one per channel instance.
    #[serde(default = "default_channels_dir")]
    channels_dir: PathBuf,
    /// Folder of handlebars templates.
    #[serde(default = "default_templates_dir")]
    templates_dir: PathBuf,
    #[serde(default)]
    store: StoreFile,
    orders: OrdersFile,
    brand: BrandFile,
    tokens: TokensFile,
    #[serde(default)]
    dispatch: DispatchFile,
}

fn default_channels_dir() -> PathBuf {
    "channels".into()
}

fn default_templates_dir() -> PathBuf {
    "templates".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    /// The sled store's folder.
    #[serde(default = "default_store_path")]
    path: PathBuf,
    /// sled's page cache in MiB (sled's own default is 1 GiB).
    #[serde(default = "default_cache_capacity_mb")]
    cache_capacity_mb: u64,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            path: default_store_path(),
            cache_capacity_mb: default_cache_capacity_mb(),
        }
    }
}

fn default_store_path() -> PathBuf {
    "var/store".into()
}

fn default_cache_capacity_mb() -> u64 {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersFile {
    /// A regular expression every (trimmed, upper-cased) order number must match whole.
    pattern: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrandFile {
    /// The name customers know the sender by.
    name: String,
    /// The public base URL of crier's web pages; links in messages point here.
    public_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    /// The environment variable that holds the secret signing every link.
    link_secret_env: String,
    /// How long the unsubscribe link in a message keeps working.
    #[serde(default = "default_unsubscribe_ttl")]
    unsubscribe_ttl: String,
}

fn default_unsubscribe_ttl() -> String {
    "365d".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchFile {
    /// How long a worker may hold a delivery before it returns to the queue.
    #[serde(default = "default_lease")]
    lease: String,
    /// How many subscribers are planned per store transaction.
    #[serde(default = "default_plan_batch")]
    plan_batch: usize,
}

impl Default for DispatchFile {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            plan_batch: default_plan_batch(),
        }
    }
}

fn default_lease() -> String {
    "2m".into()
}

fn default_plan_batch() -> usize {
    500
}

/// The retry and concurrency settings every channel file may set under `[delivery]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryFile {
    /// How many deliveries of this channel are in flight at once.
    concurrency: Option<usize>,
    /// How many attempts before a delivery goes to dead letters.
    max_attempts: Option<u32>,
    /// How long after it was queued a delivery stops being retried.
    max_age: Option<String>,
    /// How long one attempt may take.
    timeout: Option<String>,
    /// The first retry waits up to this long; each later one doubles it.
    backoff_base: Option<String>,
    /// No retry waits longer than this (unless the provider's Retry-After asks for more).
    backoff_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailFile {
    /// The sender, as `Name <address>`.
    from: String,
    /// `file://DIR`, `smtp://[user@]host:port` (STARTTLS when offered) or `smtps://[user@]host:port`.
    transport: String,
    /// The environment variable holding the SMTP password, when the URL names a user.
    password_env: Option<String>,
    #[serde(default)]
    delivery: DeliveryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    /// The partner's endpoint.
    url: String,
    /// The environment variable holding the Standard Webhooks secret (`whsec_<base64>`).
    secret_env: String,
    #[serde(default)]
    delivery: DeliveryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusPageFile {
    /// The folder `status.html`, `feed.atom` and `status.json` are written into.
    dir: PathBuf,
    /// How many incidents the page shows, newest first.
    #[serde(default = "default_status_incidents")]
    incidents: usize,
    #[serde(default)]
    delivery: DeliveryFile,
}

fn default_status_incidents() -> usize {
    20
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub store: StoreSettings,
    pub templates_dir: PathBuf,
    pub orders: OrderPattern,
    pub brand: Brand,
    pub link_secret: Vec<u8>,
    pub unsubscribe_ttl: Duration,
    pub lease: Duration,
    pub plan_batch: usize,
    pub channels: Vec<ChannelConfig>,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub path: PathBuf,
    pub cache_capacity_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Brand {
    pub name: String,
    /// Without a trailing slash.
    pub public_url: String,
}

#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The file stem: `channels/partners.toml` is the channel `partners`.
    pub name: String,
    pub file: PathBuf,
    pub kind: ChannelKind,
    pub policy: DeliveryPolicy,
}

#[derive(Debug, Clone)]
pub enum ChannelKind {
    Email(EmailSettings),
    Webhook(WebhookSettings),
    StatusPage(StatusPageSettings),
}

impl ChannelKind {
    pub fn name(&self) -> &'static str {
        match self {
            ChannelKind::Email(_) => "email",
            ChannelKind::Webhook(_) => "webhook",
            ChannelKind::StatusPage(_) => "status_page",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmailSettings {
    pub from: Mailbox,
    pub transport: EmailTransport,
}

#[derive(Debug, Clone)]
pub enum EmailTransport {
    /// lettre's file transport: one `.eml` per message, no outside service needed.
    File(PathBuf),
    Smtp {
        host: String,
        port: u16,
        implicit_tls: bool,
        credentials: Option<(String, String)>,
    },
}

#[derive(Clone)]
pub struct WebhookSettings {
    pub url: Url,
    /// The decoded `whsec_` secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct StatusPageSettings {
    pub dir: PathBuf,
    pub incidents: usize,
}

/// How one channel retries and how much it does at once.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl DeliveryPolicy {
    fn defaults_for(kind: &str) -> Self {
        let concurrency = match kind {
            "email" => 8,
            "status_page" => 1,
            _ => 4,
        };
        Self {
            concurrency,
            max_attempts: 8,
            max_age: Duration::from_secs(3600),
            timeout: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// Where secrets come from. Tests pass a map; the binary passes the process environment.
pub trait SecretSource {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl SecretSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Reads and validates the main file, every channel file and the secrets they name.
    pub fn load(file: &Path, secrets: &dyn SecretSource) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, None, format!("cannot read it: {e}")))?;
        let raw: ConfigFile = parse_toml(file, &text)?;
        let base = file.parent().unwrap_or(Path::new(".")).to_owned();

        let orders = OrderPattern::new(&raw.orders.pattern).map_err(|e| {
            ConfigError::at(
                file,
                "orders.pattern",
                format!("not a regular expression: {e}"),
            )
        })?;
        let public_url = Url::parse(&raw.brand.public_url)
            .map_err(|e| ConfigError::at(file, "brand.public_url", format!("not a URL: {e}")))?;
        if !matches!(public_url.scheme(), "http" | "https") {
            return Err(ConfigError::at(
                file,
                "brand.public_url",
                "must be an http or https URL",
            ));
        }
        if raw.brand.name.trim().is_empty() {
            return Err(ConfigError::at(file, "brand.name", "must not be empty"));
        }
        let link_secret = secret(
            file,
            "tokens.link_secret_env",
            &raw.tokens.link_secret_env,
            secrets,
        )?;
        if link_secret.len() < 16 {
            return Err(ConfigError::at(
                file,
                "tokens.link_secret_env",
                format!(
                    "the secret in {} must be at least 16 characters",
                    raw.tokens.link_secret_env
                ),
            ));
        }
        let unsubscribe_ttl =
            duration(file, "tokens.unsubscribe_ttl", &raw.tokens.unsubscribe_ttl)?;
        let lease = duration(file, "dispatch.lease", &raw.dispatch.lease)?;
        if raw.dispatch.plan_batch == 0 {
            return Err(ConfigError::at(
                file,
                "dispatch.plan_batch",
                "must be at least 1",
            ));
        }
        if raw.store.cache_capacity_mb == 0 {
            return Err(ConfigError::at(
                file,
                "store.cache_capacity_mb",
                "must be at least 1",
            ));
        }

        let channels_dir = base.join(&raw.channels_dir);
        let channels = load_channels(&channels_dir, &base, secrets)?;
        // A lease shorter than an attempt may take would hand a delivery that is still being
        // sent to another worker.
        if let Some(slowest) = channels.iter().max_by_key(|c| c.policy.timeout)
            && slowest.policy.timeout + Duration::from_secs(1) >= lease
        {
            return Err(ConfigError::at(
                file,
                "dispatch.lease",
                format!(
                    "must be longer than every channel's timeout plus a second; channel {} allows {}",
                    slowest.name,
                    humantime::format_duration(slowest.policy.timeout)
                ),
            ));
        }

        Ok(Self {
            file: file.to_owned(),
            store: StoreSettings {
                path: base.join(&raw.store.path),
                cache_capacity_bytes: raw.store.cache_capacity_mb * 1024 * 1024,
            },
            templates_dir: base.join(&raw.templates_dir),
            orders,
            brand: Brand {
                name: raw.brand.name.trim().to_owned(),
                public_url: public_url.as_str().trim_end_matches('/').to_owned(),
            },
            link_secret: link_secret.into_bytes(),
            unsubscribe_ttl,
            lease,
            plan_batch: raw.dispatch.plan_batch,
            channels,
        })
    }
}

fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let file = match line {
            Some(line) => PathBuf::from(format!("{}:{line}", file.display())),
            None => file.to_owned(),
        };
        ConfigError::new(&file, None, e.message().trim().to_owned())
    })
}

fn secret(
    file: &Path,
    key: &str,
    variable: &str,
    secrets: &dyn SecretSource,
) -> Result<String, ConfigError> {
    if variable.trim().is_empty() {
        return Err(ConfigError::at(
            file,
            key,
            "must name an environment variable",
        ));
    }
    secrets.get(variable).ok_or_else(|| {
        ConfigError::at(
            file,
            key,
            format!("the environment variable {variable} is not set"),
        )
    })
}

fn duration(file: &Path, key: &str, text: &str) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        ConfigError::at(
            file,
            key,
            format!("'{text}' is not a duration like 30s, 5m or 2h: {e}"),
        )
    })?;
    if parsed.is_zero() {
        return Err(ConfigError::at(file, key, "must be longer than zero"));
    }
    Ok(parsed)
}

fn load_channels(
    dir: &Path,
    base: &Path,
    secrets: &dyn SecretSource,
) -> Result<Vec<ChannelConfig>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConfigError::new(dir, None, format!("cannot read the channels folder: {e}"))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|file| load_channel(file, base, secrets))
        .collect()
}

fn load_channel(
    file: &Path,
    base: &Path,
    secrets: &dyn SecretSource,
) -> Result<ChannelConfig, ConfigError> {
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_name {
        return Err(ConfigError::new(
            file,
            None,
            "a channel file's name is the channel's name: use lower-case letters, digits, - and _",
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, None, format!("cannot read it: {e}")))?;
    let mut table: toml::Table = parse_toml(file, &text)?;
    let kind = match table.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => return Err(ConfigError::at(file, "kind", "must be a string")),
        None => {
            return Err(ConfigError::at(
                file,
                "kind",
                "missing: use email, webhook or status_page",
            ));
        }
    };
    let body = toml::Value::Table(table);
    let deserialize_error =
        |e: toml::de::Error| ConfigError::new(file, None, e.message().trim().to_owned());
    let (kind, delivery) = match kind.as_str() {
        "email" => {
            let raw: EmailFile = body.try_into().map_err(deserialize_error)?;
            let from: Mailbox = raw.from.parse().map_err(|e| {
                ConfigError::at(
                    file,
                    "from",
                    format!("'{}' is not a mailbox: {e}", raw.from),
                )
            })?;
            let transport = email_transport(
                file,
                base,
                &raw.transport,
                raw.password_env.as_deref(),
                secrets,
            )?;
            (
                ChannelKind::Email(EmailSettings { from, transport }),
                raw.delivery,
            )
        }
        "webhook" => {
            let raw: WebhookFile = body.try_into().map_err(deserialize_error)?;
            let url = Url::parse(&raw.url).map_err(|e| {
                ConfigError::at(file, "url", format!("'{}' is not a URL: {e}", raw.url))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::at(file, "url", "must be an http or https URL"));
            }
            let encoded = secret(file, "secret_env", &raw.secret_env, secrets)?;
            let secret = encoded
                .strip_prefix("whsec_")
                .and_then(|b64| STANDARD.decode(b64).ok())
                .filter(|key| !key.is_empty())
                .ok_or_else(|| {
                    ConfigError::at(
                        file,
                        "secret_env",
                        format!(
                            "the secret in {} must be whsec_ followed by base64",
                            raw.secret_env
                        ),
                    )
                })?;
            (
                ChannelKind::Webhook(WebhookSettings { url, secret }),
                raw.delivery,
            )
        }
        "status_page" => {
            let raw: StatusPageFile = body.try_into().map_err(deserialize_error)?;
            if raw.incidents == 0 {
                return Err(ConfigError::at(file, "incidents", "must be at least 1"));
            }
            (
                ChannelKind::StatusPage(StatusPageSettings {
                    dir: base.join(raw.dir),
                    incidents: raw.incidents,
                }),
                raw.delivery,
            )
        }
        other => {
            return Err(ConfigError::at(
                file,
                "kind",
                format!("'{other}' is not a channel kind: use email, webhook or status_page"),
            ));
        }
    };
    let policy = delivery_policy(file, kind.name(), delivery)?;
    Ok(ChannelConfig {
        name,
        file: file.to_owned(),
        kind,
        policy,
    })
}

fn delivery_policy(
    file: &Path,
    kind: &str,
    raw: DeliveryFile,
) -> Result<DeliveryPolicy, ConfigError> {
    let mut policy = DeliveryPolicy::defaults_for(kind);
    if let Some(concurrency) = raw.concurrency {
        if concurrency == 0 || concurrency > 1024 {
            return Err(ConfigError::at(
                file,
                "delivery.concurrency",
                "must be between 1 and 1024",
            ));
        }
        policy.concurrency = concurrency;
    }
    if let Some(max_attempts) = raw.max_attempts {
        if max_attempts == 0 {
            return Err(ConfigError::at(
                file,
                "delivery.max_attempts",
                "must be at least 1",
            ));
        }
        policy.max_attempts = max_attempts;
    }
    let durations = [
        ("delivery.max_age", raw.max_age, &mut policy.max_age),
        ("delivery.timeout", raw.timeout, &mut policy.timeout),
        (
            "delivery.backoff_base",
            raw.backoff_base,
            &mut policy.backoff_base,
        ),
        (
            "delivery.backoff_max",
            raw.backoff_max,
            &mut policy.backoff_max,
        ),
    ];
    for (key, text, target) in durations {
        if let Some(text) = text {
            *target = duration(file, key, &text)?;
        }
    }
    Ok(policy)
}

fn email_transport(
    file: &Path,
    base: &Path,
    transport: &str,
    password_env: Option<&str>,
    secrets: &dyn SecretSource,
) -> Result<EmailTransport, ConfigError> {
    if let Some(dir) = transport.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(ConfigError::at(
                file,
                "transport",
                "file:// needs a folder, like file://var/outbox",
            ));
        }
        if password_env.is_some() {
            return Err(ConfigError::at(
                file,
                "password_env",
                "only an SMTP transport takes a password",
            ));
        }
        return Ok(EmailTransport::File(base.join(dir)));
    }
    let url = Url::parse(transport).map_err(|e| {
        ConfigError::at(
            file,
            "transport",
            format!("'{transport}' is not a URL: {e}"),
        )
    })?;
    let implicit_tls = match url.scheme() {
        "smtp" => false,
        "smtps" => true,
        other => {
            return Err(ConfigError::at(
                file,
                "transport",
                format!("'{other}' is not a transport: use file://, smtp:// or smtps://"),
            ));
        }
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ConfigError::at(file, "transport", "the URL has no host"))?
        .to_owned();
    let port = url.port().unwrap_or(if implicit_tls { 465 } else { 587 });
    let credentials = match (url.username(), password_env) {
        ("", None) => None,
        ("", Some(_)) => {
            return Err(ConfigError::at(
                file,
                "password_env",
                "a password needs a user in the transport URL, like smtp://user@host:587",
            ));
        }
        (_, None) => {
            return Err(ConfigError::at(
                file,
                "password_env",
                "the transport URL names a user, so password_env must name the variable holding the password",
            ));
        }
        (user, Some(variable)) => Some((
            user.to_owned(),
            secret(file, "password_env", variable, secrets)?,
        )),
    };
    Ok(EmailTransport::Smtp {
        host,
        port,
        implicit_tls,
        credentials,
    })
}
