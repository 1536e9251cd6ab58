//! Configuration: the main file, one file per channel, and their validation.
//!
//! Loading reads the files and the environment variables that hold secrets, and nothing else:
//! `crier check-config` runs exactly this, with no network and no store.

use crate::channel::registry::{self, ChannelKind, ChannelSettings, SettingsInput};
use crate::domain::OrderPattern;
use reqwest::Url;
use secrecy::SecretString;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    pub fn new(file: &Path, key: impl Into<Option<String>>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn at(file: &Path, key: &str, reason: impl Into<String>) -> Self {
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
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    api: ApiFile,
    #[serde(default)]
    alerts: AlertsFile,
}

/// Where the watchdog tells the comms lead that a promised update is nearly due or overdue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsFile {
    /// An email address, reached through the first email channel.
    to: Option<String>,
    /// A URL that gets each alert as JSON, signed the Standard Webhooks way.
    webhook: Option<String>,
    /// The variable holding the webhook's `whsec_` signing secret.
    webhook_secret_env: Option<String>,
    /// How long before a promised update is due the reminder goes out.
    #[serde(default = "default_alert_lead")]
    lead_time: String,
}

impl Default for AlertsFile {
    fn default() -> Self {
        Self {
            to: None,
            webhook: None,
            webhook_secret_env: None,
            lead_time: default_alert_lead(),
        }
    }
}

fn default_alert_lead() -> String {
    "15m".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    /// Named admin tokens: each name maps to the environment variable holding its token.
    #[serde(default)]
    tokens: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    /// The address `crier serve` listens on (port 0 picks a free one).
    #[serde(default = "default_listen")]
    listen: String,
    /// The reverse proxies in front of crier (addresses or networks like `10.0.0.0/8`), whose
    /// `X-Forwarded-For` says who the client is. From anywhere else it is ignored: a client
    /// could write anything in it.
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// Connections open at once; more are closed as soon as they are accepted.
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// Connections open at once from one client address (trusted proxies aside).
    #[serde(default = "default_max_connections_per_client")]
    max_connections_per_client: usize,
    /// How long a client may take to send a request's head.
    #[serde(default = "default_header_timeout")]
    header_timeout: String,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            trusted_proxies: Vec::new(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            header_timeout: default_header_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    crate::web::listener::ConnectionLimits::default().total
}

fn default_max_connections_per_client() -> usize {
    crate::web::listener::ConnectionLimits::default().per_client
}

fn default_header_timeout() -> String {
    "10s".into()
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
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
    /// `sled` (embedded, the default) or `postgres` (shared by several nodes).
    #[serde(default = "default_backend")]
    backend: String,
    /// With `postgres`: the environment variable holding the connection string.
    #[serde(default = "default_url_env")]
    url_env: String,
    /// With `postgres`: the most connections this process opens.
    #[serde(default = "default_pool_size")]
    pool_size: usize,
    /// The embedded store's folder (with `postgres`, only where `crier serve` announces
    /// itself).
    #[serde(default = "default_store_path")]
    path: PathBuf,
    /// The embedded store's page cache in MiB (its own default would be 1 GiB).
    #[serde(default = "default_cache_capacity_mb")]
    cache_capacity_mb: u64,
    /// How long sent and skipped deliveries are kept after their update; counts and dead
    /// letters are kept for good.
    #[serde(default = "default_retention")]
    retention: String,
}

fn default_retention() -> String {
    "30d".into()
}

fn default_backend() -> String {
    "sled".into()
}

fn default_url_env() -> String {
    "CRIER_DATABASE_URL".into()
}

fn default_pool_size() -> usize {
    16
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            url_env: default_url_env(),
            pool_size: default_pool_size(),
            path: default_store_path(),
            cache_capacity_mb: default_cache_capacity_mb(),
            retention: default_retention(),
        }
    }
}

fn default_store_path() -> PathBuf {
    "var/store".into()
}

/// Small on purpose: sled's page cache barely speeds crier up (planning and sending walk the
/// store in key order; the status page is served from memory), and each MiB of it costs about
/// 1.3 MiB of resident memory. Measured side by side, 8 instead of 64 sent to 1,000,000
/// subscribers in the same time with 72 MB less peak memory, and imported as fast.
fn default_cache_capacity_mb() -> u64 {
    8
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersFile {
    /// A regular expression every (trimmed, upper-cased) order number must match whole.
    pattern: String,
    /// An order number of that shape, shown in errors [default: one made from the pattern].
    #[serde(default)]
    example: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrandFile {
    /// The name customers know the sender by.
    name: String,
    /// The public base URL of crier's web pages; links in messages point here.
    public_url: String,
    /// The IANA time zone times are written in, like "Europe/London" [default: UTC].
    #[serde(default)]
    time_zone: Option<String>,
    /// An http(s) URL of the logo shown at the top of the public pages.
    #[serde(default)]
    logo_url: Option<String>,
    /// The accent colour of the public pages, as `#rrggbb`.
    #[serde(default)]
    accent_color: Option<String>,
    /// One sentence about the status page, for search results and link previews.
    #[serde(default)]
    description: Option<String>,
    /// The subscribe form's line on what is kept and how to stop.
    #[serde(default)]
    subscribe_note: Option<String>,
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
    /// At most this many attempts per period, like "300/5m" or "1/s".
    rate: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub store: StoreSettings,
    pub templates_dir: PathBuf,
    pub orders: OrderPattern,
    pub brand: Brand,
    pub link_secret: SecretString,
    pub unsubscribe_ttl: Duration,
    pub lease: Duration,
    pub plan_batch: usize,
    /// Where `crier serve` listens.
    pub listen: std::net::SocketAddr,
    /// The reverse proxies whose `X-Forwarded-For` `crier serve` believes.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How many connections `crier serve` keeps open, and how long a request may take to come.
    pub connections: crate::web::listener::ConnectionLimits,
    /// How long settled deliveries are kept (see `Store::prune_settled`).
    pub retention: Duration,
    /// The admin API's bearer tokens, by name.
    pub api_tokens: Vec<ApiToken>,
    pub alerts: AlertSettings,
    pub channels: Vec<ChannelConfig>,
}

/// Where promise alerts go, and when the reminder comes.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub to: Option<crate::domain::EmailAddress>,
    pub webhook: Option<AlertWebhook>,
    pub lead_time: Duration,
}

#[derive(Clone)]
pub struct AlertWebhook {
    pub url: Url,
    pub secret: secrecy::SecretSlice<u8>,
}

impl std::fmt::Debug for AlertWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertWebhook")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

/// One named admin token. Its variable may be unset where the token is not used: `crier serve`
/// refuses to start then, and the CLI looks for another.
#[derive(Debug, Clone)]
pub struct ApiToken {
    /// Recorded as the author of the updates sent with it.
    pub name: String,
    /// The environment variable that holds it.
    pub variable: String,
    pub secret: Option<SecretString>,
}

/// An admin token is a password that never needs typing: long enough not to be guessed.
const SHORTEST_API_TOKEN: usize = 24;

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub path: PathBuf,
    pub cache_capacity_bytes: u64,
    pub backend: StoreBackend,
}

impl StoreSettings {
    /// The embedded sled store in `path`.
    pub fn sled(path: PathBuf, cache_capacity_bytes: u64) -> Self {
        Self {
            path,
            cache_capacity_bytes,
            backend: StoreBackend::Sled,
        }
    }
}

/// Which database holds the store.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The embedded one, in `StoreSettings::path`: one process at a time.
    Sled,
    /// A PostgreSQL database several processes share.
    Postgres(PostgresSettings),
}

#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The connection string, from the environment.
    pub url: SecretString,
    /// The variable it came from, for messages.
    pub variable: String,
    pub pool_size: usize,
}

#[derive(Debug, Clone)]
pub struct Brand {
    pub name: String,
    /// Without a trailing slash.
    pub public_url: String,
    /// Times on pages, in messages and alerts are written in it.
    pub time_zone: chrono_tz::Tz,
    /// The logo on the public pages, an http(s) URL.
    pub logo_url: Option<String>,
    /// The public pages' accent colour.
    pub accent: Rgb,
    /// What search results and link previews say about the status page.
    pub description: String,
    /// The subscribe form's line on what is kept and how to stop; None for crier's own.
    pub subscribe_note: Option<String>,
}

impl Brand {
    /// A brand with only a name and an address, everything else as crier's defaults.
    pub fn plain(name: &str, public_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            time_zone: chrono_tz::UTC,
            logo_url: None,
            accent: Rgb::DEFAULT_ACCENT,
            description: default_description(name),
            subscribe_note: None,
        }
    }
}

/// What search results and link previews say about the status page unless
/// `brand.description` says otherwise.
fn default_description(name: &str) -> String {
    format!(
        "Live status of {name}: what is wrong, what we are doing about it, and when the next update comes."
    )
}

/// A colour as `#rrggbb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub [u8; 3]);

impl Rgb {
    /// A deep blue: white text on it reads at a contrast of 7:1.
    pub const DEFAULT_ACCENT: Rgb = Rgb([0x1d, 0x4e, 0xd8]);

    pub fn parse(text: &str) -> Option<Rgb> {
        let hex = text.trim().strip_prefix('#')?;
        if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let byte = |at: usize| u8::from_str_radix(&hex[at..at + 2], 16).ok();
        Some(Rgb([byte(0)?, byte(2)?, byte(4)?]))
    }

    pub fn hex(self) -> String {
        let [r, g, b] = self.0;
        format!("#{r:02x}{g:02x}{b:02x}")
    }

    /// WCAG 2's relative luminance.
    fn luminance(self) -> f64 {
        let channel = |c: u8| {
            let c = f64::from(c) / 255.0;
            if c <= 0.03928 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        let [r, g, b] = self.0;
        0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    }

    /// WCAG 2's contrast ratio between two colours, from 1 to 21.
    pub fn contrast(self, other: Rgb) -> f64 {
        let (a, b) = (self.luminance(), other.luminance());
        (a.max(b) + 0.05) / (a.min(b) + 0.05)
    }

    /// White or black, whichever reads better on this colour: on any colour one of them reads
    /// at 4.58:1 or better, so a button in any accent colour keeps legible text.
    pub fn text_on(self) -> Rgb {
        let (white, black) = (Rgb([0xff; 3]), Rgb([0; 3]));
        if self.contrast(white) >= self.contrast(black) {
            white
        } else {
            black
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The channel's stable id: the file's `id`, or else the file's name
    /// (`channels/partners.toml` is the channel `partners`).
    pub id: String,
    pub file: PathBuf,
    pub kind: &'static ChannelKind,
    pub settings: Arc<dyn ChannelSettings>,
    pub policy: DeliveryPolicy,
}

/// How one channel retries and how much it does at once. The dispatcher applies it; the
/// kind only supplies its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// At most this many attempts per period (a provider's limit per account), none if unset.
    pub rate: Option<Rate>,
    /// Fixed waits before each retry (the first after the first failure), with jitter,
    /// instead of exponential backoff; `max_attempts` is then one more than its length.
    pub schedule: Option<&'static [Duration]>,
}

/// `count` attempts per `period`, as `rate = "300/5m"` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    pub const fn new(count: u32, period: Duration) -> Self {
        Self { count, period }
    }

    /// How many attempts may go at once: a millisecond's worth, at least one (see the
    /// dispatcher's limiters for why no more).
    pub fn burst(&self) -> u32 {
        let per_millisecond = u128::from(self.count) * 1_000_000 / self.period.as_nanos().max(1);
        u32::try_from(per_millisecond).unwrap_or(u32::MAX).max(1)
    }

    /// Reads `N/period`, like `300/5m` or `1/s`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (count, period) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not a rate like 300/5m or 1/s"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("'{text}': the count must be a whole number above zero"))?;
        let period = period.trim();
        // "1/s" means one per second: a bare unit is one of it.
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            period.to_owned()
        } else {
            format!("1{period}")
        };
        let period = humantime::parse_duration(&period)
            .ok()
            .filter(|p| !p.is_zero() && *p <= Duration::from_secs(24 * 3600))
            .ok_or_else(|| format!("'{text}': the period must be a duration of at most a day"))?;
        Ok(Self { count, period })
    }
}

impl DeliveryPolicy {
    /// The defaults a kind starts from, with its own concurrency.
    pub const fn with_concurrency(concurrency: usize) -> Self {
        Self {
            concurrency,
            max_attempts: 8,
            max_age: Duration::from_secs(3600),
            timeout: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            rate: None,
            schedule: None,
        }
    }

    /// The same defaults with a rate limit.
    pub const fn with_rate(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// The same defaults with a request timeout.
    pub const fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same defaults with a fixed retry schedule, `max_attempts` and `max_age` to match.
    pub const fn with_schedule(mut self, schedule: &'static [Duration], max_age: Duration) -> Self {
        self.schedule = Some(schedule);
        self.max_attempts = schedule.len() as u32 + 1;
        self.max_age = max_age;
        self
    }
}

/// The longest any configured duration may be: beyond it a value is a typo, and time
/// arithmetic on it would overflow.
const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The longest a delivery may keep being retried.
const LONGEST_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest one attempt may take.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Where secrets come from. Tests pass a map; the binary passes the process environment.
pub trait SecretSource {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl SecretSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
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
        if let Some(anything) = ["", "HELLO, WORLD!"]
            .into_iter()
            .find(|text| orders.matches(text))
        {
            return Err(ConfigError::at(
                file,
                "orders.pattern",
                format!(
                    "matches '{anything}', so it would take any text as an order number: write \
                     the shape of yours, like [A-Z]{{2}}-[0-9]{{4,10}}"
                ),
            ));
        }
        let orders = match raw.orders.example.as_deref() {
            None => orders,
            Some(example) => orders
                .with_example(example)
                .map_err(|reason| ConfigError::at(file, "orders.example", reason))?,
        };
        let public_url = Url::parse(&raw.brand.public_url)
            .map_err(|e| ConfigError::at(file, "brand.public_url", format!("not a URL: {e}")))?;
        if !matches!(public_url.scheme(), "http" | "https") {
            return Err(ConfigError::at(
                file,
                "brand.public_url",
                "must be an http or https URL",
            ));
        }
        // crier serves its pages at the root of its address: a path would make every link in
        // every message point beside them.
        if public_url.path() != "/"
            || public_url.query().is_some()
            || public_url.fragment().is_some()
        {
            return Err(ConfigError::at(
                file,
                "brand.public_url",
                format!(
                    "must be the site's address alone, like https://status.example.com, without \
                     a path, query or fragment ('{}' has one): crier's pages are served at its root",
                    clip(&raw.brand.public_url, 80)
                ),
            ));
        }
        let time_zone = match raw.brand.time_zone.as_deref().map(str::trim) {
            None | Some("") => chrono_tz::UTC,
            Some(name) => name.parse::<chrono_tz::Tz>().map_err(|_| {
                ConfigError::at(
                    file,
                    "brand.time_zone",
                    format!(
                        "'{name}' is not an IANA time zone; write one like \"Europe/London\", \"America/New_York\" or \"UTC\""
                    ),
                )
            })?,
        };
        if raw.brand.name.trim().is_empty() {
            return Err(ConfigError::at(file, "brand.name", "must not be empty"));
        }
        let logo_url = match raw.brand.logo_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => match Url::parse(text) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url.to_string()),
                _ => {
                    return Err(ConfigError::at(
                        file,
                        "brand.logo_url",
                        format!("'{}' is not an http or https URL", clip(text, 80)),
                    ));
                }
            },
        };
        let accent = match raw.brand.accent_color.as_deref() {
            None => Rgb::DEFAULT_ACCENT,
            Some(text) => Rgb::parse(text).ok_or_else(|| {
                ConfigError::at(
                    file,
                    "brand.accent_color",
                    format!(
                        "'{}' is not a colour; write it as #rrggbb, like \"#1d4ed8\"",
                        clip(text, 40)
                    ),
                )
            })?,
        };
        let brand_name = raw.brand.name.trim().to_owned();
        let description = match raw.brand.description.as_deref().map(str::trim) {
            None | Some("") => default_description(&brand_name),
            Some(text) if text.chars().count() > 300 => {
                return Err(ConfigError::at(
                    file,
                    "brand.description",
                    "is longer than 300 characters; search results show about 160",
                ));
            }
            Some(text) => text.to_owned(),
        };
        let link_secret = link_secret(file, &raw.tokens.link_secret_env, secrets)?;
        let unsubscribe_ttl = duration(
            file,
            "tokens.unsubscribe_ttl",
            &raw.tokens.unsubscribe_ttl,
            LONGEST,
        )?;
        let lease = duration(file, "dispatch.lease", &raw.dispatch.lease, LONGEST)?;
        let retention = duration(file, "store.retention", &raw.store.retention, LONGEST)?;
        if raw.dispatch.plan_batch == 0 || raw.dispatch.plan_batch > 100_000 {
            return Err(ConfigError::at(
                file,
                "dispatch.plan_batch",
                "must be between 1 and 100000",
            ));
        }
        if raw.store.cache_capacity_mb == 0 || raw.store.cache_capacity_mb > 1 << 20 {
            return Err(ConfigError::at(
                file,
                "store.cache_capacity_mb",
                "must be between 1 and 1048576",
            ));
        }

        let listen = raw.server.listen.parse().map_err(|e| {
            ConfigError::at(
                file,
                "server.listen",
                format!(
                    "'{}' is not an address like 127.0.0.1:8080: {e}",
                    raw.server.listen
                ),
            )
        })?;
        let trusted_proxies = raw
            .server
            .trusted_proxies
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::at(
                            file,
                            "server.trusted_proxies",
                            format!("'{text}' is not an address or a network like 10.0.0.0/8"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(everyone) = trusted_proxies.iter().find(|net| net.prefix_len() == 0) {
            return Err(ConfigError::at(
                file,
                "server.trusted_proxies",
                format!(
                    "'{everyone}' trusts every address, so any client could name itself in \
                     X-Forwarded-For and slip past the subscribe form's limits: list your proxies"
                ),
            ));
        }
        let connections = connection_limits(file, &raw.server)?;
        let api_tokens = api_tokens(file, &raw.api, secrets)?;
        let alerts = alert_settings(file, &raw.alerts, secrets)?;
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
                    slowest.id,
                    crate::render::duration_text(slowest.policy.timeout)
                ),
            ));
        }

        Ok(Self {
            file: file.to_owned(),
            store: StoreSettings {
                path: base.join(&raw.store.path),
                cache_capacity_bytes: raw.store.cache_capacity_mb * 1024 * 1024,
                backend: store_backend(file, &raw.store, secrets)?,
            },
            templates_dir: base.join(&raw.templates_dir),
            orders,
            brand: Brand {
                name: brand_name,
                public_url: public_url.as_str().trim_end_matches('/').to_owned(),
                time_zone,
                logo_url,
                accent,
                description,
                subscribe_note: raw
                    .brand
                    .subscribe_note
                    .map(|note| note.trim().to_owned())
                    .filter(|note| !note.is_empty()),
            },
            link_secret,
            unsubscribe_ttl,
            lease,
            plan_batch: raw.dispatch.plan_batch,
            listen,
            trusted_proxies,
            connections,
            alerts,
            retention,
            api_tokens,
            channels,
        })
    }
}

fn alert_settings(
    file: &Path,
    alerts: &AlertsFile,
    secrets: &dyn SecretSource,
) -> Result<AlertSettings, ConfigError> {
    let to = alerts
        .to
        .as_deref()
        .map(|to| {
            crate::domain::EmailAddress::parse(to)
                .map_err(|e| ConfigError::at(file, "alerts.to", e.to_string()))
        })
        .transpose()?;
    let webhook = match (&alerts.webhook, &alerts.webhook_secret_env) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ConfigError::at(
                file,
                "alerts.webhook_secret_env",
                "set alerts.webhook too, or leave this out",
            ));
        }
        (Some(_), None) => {
            return Err(ConfigError::at(
                file,
                "alerts.webhook_secret_env",
                "missing: alerts are signed, so name the variable holding the whsec_ secret",
            ));
        }
        (Some(url), Some(variable)) => {
            let parsed = Url::parse(url)
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    ConfigError::at(
                        file,
                        "alerts.webhook",
                        format!("'{url}' is not an http(s) URL"),
                    )
                })?;
            let secret = crate::channel::webhook::signing_secret(
                file,
                "alerts.webhook_secret_env",
                variable,
                secrets,
            )?;
            Some(AlertWebhook {
                url: parsed,
                secret,
            })
        }
    };
    let lead_time = humantime::parse_duration(&alerts.lead_time)
        .ok()
        .filter(|lead| (Duration::from_secs(60)..=Duration::from_secs(24 * 3600)).contains(lead))
        .ok_or_else(|| {
            ConfigError::at(
                file,
                "alerts.lead_time",
                format!(
                    "'{}' is not a time from 1m to 24h, like 15m",
                    alerts.lead_time
                ),
            )
        })?;
    Ok(AlertSettings {
        to,
        webhook,
        lead_time,
    })
}

fn api_tokens(
    file: &Path,
    api: &ApiFile,
    secrets: &dyn SecretSource,
) -> Result<Vec<ApiToken>, ConfigError> {
    use secrecy::ExposeSecret;
    let mut tokens = Vec::new();
    for (name, variable) in &api.tokens {
        let key = format!("api.tokens.{name}");
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(ConfigError::at(
                file,
                &key,
                "a token's name is 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        let secret = match secrets.get(variable) {
            None => None,
            Some(_) => Some(secret(file, &key, variable, secrets)?),
        };
        if let Some(secret) = &secret {
            let text = secret.expose_secret();
            if text.trim() != text || text.chars().count() < SHORTEST_API_TOKEN {
                return Err(ConfigError::at(
                    file,
                    &key,
                    format!(
                        "the token in {variable} must be {SHORTEST_API_TOKEN} characters or more, without surrounding whitespace"
                    ),
                ));
            }
        }
        tokens.push(ApiToken {
            name: name.clone(),
            variable: variable.clone(),
            secret,
        });
    }
    Ok(tokens)
}

fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let key = line.and_then(|line| key_on_line(text, line));
        let file = match line {
            Some(line) => PathBuf::from(format!("{}:{line}", file.display())),
            None => file.to_owned(),
        };
        ConfigError::new(&file, key, e.message().trim().to_owned())
    })
}

/// The dotted key set on line `line` (from 1) of a TOML text, with the table it is in:
/// `store.pool_size` for `pool_size = …` under `[store]`. The parser's message names the
/// value's problem ("invalid value: integer `-1`, expected u32"), not whose value it is.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let (key, _) = here.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let plain = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !plain(key) {
        return None;
    }
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim().to_owned())
        .filter(|t| plain(t));
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// The secret held by the environment variable that `key` names.
pub fn secret(
    file: &Path,
    key: &str,
    variable: &str,
    secrets: &dyn SecretSource,
) -> Result<SecretString, ConfigError> {
    if variable.trim().is_empty() {
        return Err(ConfigError::at(
            file,
            key,
            "must name an environment variable",
        ));
    }
    match secrets.get(variable) {
        None => Err(ConfigError::at(
            file,
            key,
            format!("the environment variable {variable} is not set"),
        )),
        Some(value) if value.is_empty() => Err(ConfigError::at(
            file,
            key,
            format!("the environment variable {variable} is set but empty"),
        )),
        Some(value) => Ok(SecretString::from(value)),
    }
}

/// The store's backend, and for PostgreSQL its connection string from the environment.
fn store_backend(
    file: &Path,
    raw: &StoreFile,
    secrets: &dyn SecretSource,
) -> Result<StoreBackend, ConfigError> {
    match raw.backend.as_str() {
        "sled" => Ok(StoreBackend::Sled),
        "postgres" => {
            if raw.pool_size == 0 || raw.pool_size > 1000 {
                return Err(ConfigError::at(
                    file,
                    "store.pool_size",
                    "must be between 1 and 1000",
                ));
            }
            let url = secret(file, "store.url_env", &raw.url_env, secrets)?;
            Ok(StoreBackend::Postgres(PostgresSettings {
                url,
                variable: raw.url_env.clone(),
                pool_size: raw.pool_size,
            }))
        }
        other => Err(ConfigError::at(
            file,
            "store.backend",
            format!("{other:?} is not a backend; use \"sled\" or \"postgres\""),
        )),
    }
}

/// The link secret: at least 16 characters of real text, not padding.
fn link_secret(
    file: &Path,
    variable: &str,
    secrets: &dyn SecretSource,
) -> Result<SecretString, ConfigError> {
    use secrecy::ExposeSecret;
    let key = "tokens.link_secret_env";
    let secret = secret(file, key, variable, secrets)?;
    let text = secret.expose_secret();
    let problem = if text.trim() != text {
        Some("starts or ends with whitespace (a stray newline?)".to_owned())
    } else if text.chars().count() < 16 {
        Some(format!(
            "has {} characters; it needs at least 16",
            text.chars().count()
        ))
    } else if distinct_chars(text) < 8 {
        Some("repeats too few characters to be a secret; use a random string".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ConfigError::at(
            file,
            key,
            format!("the secret in {variable} {problem}"),
        )),
        None => Ok(secret),
    }
}

fn connection_limits(
    file: &Path,
    server: &ServerFile,
) -> Result<crate::web::listener::ConnectionLimits, ConfigError> {
    if !(16..=1_000_000).contains(&server.max_connections) {
        return Err(ConfigError::at(
            file,
            "server.max_connections",
            "must be between 16 and 1000000",
        ));
    }
    if server.max_connections_per_client == 0
        || server.max_connections_per_client > server.max_connections
    {
        return Err(ConfigError::at(
            file,
            "server.max_connections_per_client",
            "must be at least 1 and at most server.max_connections",
        ));
    }
    Ok(crate::web::listener::ConnectionLimits {
        total: server.max_connections,
        per_client: server.max_connections_per_client,
        header_timeout: duration(
            file,
            "server.header_timeout",
            &server.header_timeout,
            Duration::from_secs(300),
        )?,
    })
}

/// At most `max` characters of a value someone wrote, for an error message that quotes it.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

pub fn distinct_chars(text: &str) -> usize {
    text.chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// A humantime duration, more than zero and at most `longest`.
pub fn duration(
    file: &Path,
    key: &str,
    text: &str,
    longest: Duration,
) -> Result<Duration, ConfigError> {
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
    if parsed > longest {
        return Err(ConfigError::at(
            file,
            key,
            format!(
                "'{text}' is longer than the most allowed, {}",
                crate::render::duration_text(longest)
            ),
        ));
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
    let channels = files
        .iter()
        .map(|file| load_channel(file, base, secrets))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, channel) in channels.iter().enumerate() {
        if let Some(earlier) = channels[..i].iter().find(|c| c.id == channel.id) {
            return Err(ConfigError::at(
                &channel.file,
                "id",
                format!(
                    "'{}' is already the id of {}",
                    channel.id,
                    earlier.file.display()
                ),
            ));
        }
    }
    Ok(channels)
}

/// Lower-case letters, digits, - and _, starting with a letter or digit.
fn valid_channel_id(id: &str) -> bool {
    id.len() <= 64
        && id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn load_channel(
    file: &Path,
    base: &Path,
    secrets: &dyn SecretSource,
) -> Result<ChannelConfig, ConfigError> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, None, format!("cannot read it: {e}")))?;
    let mut table: toml::Table = parse_toml(file, &text)?;
    // `kind`, `id` and `[delivery]` are taken out before the kind's own strict parse: serde's
    // internally tagged enums would silently accept unknown keys.
    let kind_name = match table.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => return Err(ConfigError::at(file, "kind", "must be a string")),
        None => {
            return Err(ConfigError::at(
                file,
                "kind",
                format!("missing: use {}", registry::kind_names()),
            ));
        }
    };
    let id = match table.remove("id") {
        Some(toml::Value::String(id)) => {
            if !valid_channel_id(&id) {
                return Err(ConfigError::at(
                    file,
                    "id",
                    "use lower-case letters, digits, - and _ (at most 64)",
                ));
            }
            id
        }
        Some(_) => return Err(ConfigError::at(file, "id", "must be a string")),
        None => {
            if !valid_channel_id(&stem) {
                return Err(ConfigError::new(
                    file,
                    None,
                    "a channel file's name is the channel's id unless it sets `id`: use lower-case letters, digits, - and _",
                ));
            }
            stem
        }
    };
    let delivery: DeliveryFile = match table.remove("delivery") {
        Some(value) => value.try_into().map_err(|e: toml::de::Error| {
            ConfigError::at(file, "delivery", e.message().trim().to_owned())
        })?,
        None => DeliveryFile::default(),
    };
    let kind = registry::kind(&kind_name).ok_or_else(|| {
        ConfigError::at(
            file,
            "kind",
            format!(
                "'{kind_name}' is not a channel kind: use {}",
                registry::kind_names()
            ),
        )
    })?;
    let settings = (kind.parse)(&SettingsInput {
        file,
        base,
        table: toml::Value::Table(table),
        secrets,
    })?;
    let policy = delivery_policy(
        file,
        settings.default_policy(&kind.default_policy),
        delivery,
    )?;
    Ok(ChannelConfig {
        id,
        file: file.to_owned(),
        kind,
        settings,
        policy,
    })
}

fn delivery_policy(
    file: &Path,
    mut policy: DeliveryPolicy,
    raw: DeliveryFile,
) -> Result<DeliveryPolicy, ConfigError> {
    // A file that sets its own backoff or attempts means exponential backoff, not the kind's
    // fixed schedule.
    let sets_own_backoff =
        raw.backoff_base.is_some() || raw.backoff_max.is_some() || raw.max_attempts.is_some();
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
        if max_attempts == 0 || max_attempts > 1000 {
            return Err(ConfigError::at(
                file,
                "delivery.max_attempts",
                "must be between 1 and 1000",
            ));
        }
        policy.max_attempts = max_attempts;
    }
    let durations = [
        (
            "delivery.max_age",
            raw.max_age,
            &mut policy.max_age,
            LONGEST_MAX_AGE,
        ),
        (
            "delivery.timeout",
            raw.timeout,
            &mut policy.timeout,
            LONGEST_TIMEOUT,
        ),
        (
            "delivery.backoff_base",
            raw.backoff_base,
            &mut policy.backoff_base,
            LONGEST_MAX_AGE,
        ),
        (
            "delivery.backoff_max",
            raw.backoff_max,
            &mut policy.backoff_max,
            LONGEST_MAX_AGE,
        ),
    ];
    for (key, text, target, longest) in durations {
        if let Some(text) = text {
            *target = duration(file, key, &text, longest)?;
        }
    }
    if let Some(rate) = raw.rate {
        policy.rate =
            Some(Rate::parse(&rate).map_err(|e| ConfigError::at(file, "delivery.rate", e))?);
    }
    if sets_own_backoff {
        policy.schedule = None;
    }
    let show = crate::render::duration_text;
    if policy.backoff_base > policy.backoff_max {
        return Err(ConfigError::at(
            file,
            "delivery.backoff_base",
            format!(
                "{} is longer than delivery.backoff_max ({})",
                show(policy.backoff_base),
                show(policy.backoff_max)
            ),
        ));
    }
    if policy.max_age < policy.timeout {
        return Err(ConfigError::at(
            file,
            "delivery.max_age",
            format!(
                "{} is shorter than one attempt may take (delivery.timeout, {})",
                show(policy.max_age),
                show(policy.timeout)
            ),
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod brand_tests {
    use super::Rgb;

    #[test]
    fn a_colour_is_read_only_as_six_hex_digits() {
        assert_eq!(Rgb::parse("#1d4ed8"), Some(Rgb([0x1d, 0x4e, 0xd8])));
        assert_eq!(Rgb::parse(" #FFD400 "), Some(Rgb([0xff, 0xd4, 0x00])));
        for bad in ["1d4ed8", "#1d4ed", "#1d4ed8ff", "#gg0000", "", "#", "#ééé"] {
            assert_eq!(Rgb::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Rgb([0xff, 0xd4, 0x00]).hex(), "#ffd400");
    }

    #[test]
    fn text_on_an_accent_is_whichever_of_white_and_ink_reads_better() {
        let white = Rgb([0xff; 3]);
        // The default accent takes white at better than 4.5:1.
        assert_eq!(Rgb::DEFAULT_ACCENT.text_on(), white);
        assert!(Rgb::DEFAULT_ACCENT.contrast(white) >= 4.5);
        // A yellow accent takes dark text, which reads at better than 4.5:1 on it.
        let yellow = Rgb([0xff, 0xd4, 0x00]);
        assert_ne!(yellow.text_on(), white);
        assert!(yellow.contrast(yellow.text_on()) >= 4.5);
        // For every accent, the text chosen reads at least 4.5:1 (WCAG AA for normal text).
        for r in (0..=255u8).step_by(15) {
            for g in (0..=255u8).step_by(15) {
                for b in (0..=255u8).step_by(15) {
                    let accent = Rgb([r, g, b]);
                    let ratio = accent.contrast(accent.text_on());
                    assert!(ratio >= 4.5, "{} at {ratio:.2}", accent.hex());
                }
            }
        }
    }
}
