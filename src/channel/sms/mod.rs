//! The SMS channel: one text message per phone subscriber, through Twilio's Messages API or a
//! Kannel gateway's `sendsms` interface. It owns its settings and their validation, the text's
//! limits (GSM-7 or UCS-2, in segments: see [`encoding`]) and how each provider's answer is
//! classified. The dispatcher owns the policy, the rate limit and the retries.

pub mod encoding;

use super::http::{failure_for_request, failure_for_response, failure_for_status};
use super::limits::{self, Measure, Overflow};
use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, Notice, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy, Rate};
use crate::delivery::{DeliveryError, FailureKind, Receipt};
use crate::domain::{Contact, ContactKind, PhoneNumber};
use crate::render::{MessageContext, Renderer};
use encoding::{Encoding, Measured};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub static KIND: ChannelKind = ChannelKind {
    name: "sms",
    templates: &["sms.txt"],
    // The rate is Twilio's for one long code, a message a second; a Kannel channel starts
    // without one (see `SmsSettings::default_policy`), its SMSC link being the operator's own.
    default_policy: DeliveryPolicy::with_concurrency(4)
        .with_timeout(Duration::from_secs(15))
        .with_rate(Rate::new(1, Duration::from_secs(1))),
    parse: SmsSettings::parse,
};

/// Twilio's API root, unless the file names another.
const TWILIO_BASE_URL: &str = "https://api.twilio.com";
/// Segments one message may take unless the file says otherwise.
const DEFAULT_MAX_SEGMENTS: usize = 3;
/// The most `max_segments` may be: Twilio advises against more than 10 segments (and refuses
/// a body over 1600 characters), and handsets reassemble long chains unreliably.
const MOST_SEGMENTS: usize = 10;
/// Kannel's delivery report mask: delivered, failed, buffered, accepted by the SMSC and
/// rejected by it.
const KANNEL_DLR_MASK: &str = "31";
/// The most of a provider's answer read: enough for any error it sends, and a bound on a
/// hostile one.
const ANSWER_LIMIT: usize = 64 * 1024;

/// A channel file of kind `sms`, as written. Which keys apply depends on `provider`; a key
/// of the other provider is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SmsFile {
    /// `twilio` or `kannel`.
    provider: String,
    /// The provider's API root: `https://api.twilio.com` unless set for Twilio; Kannel's
    /// smsbox, like `http://127.0.0.1:13013`, is required.
    base_url: Option<String>,
    /// Twilio: the account SID (`AC` and 32 hexadecimal digits).
    account_sid: Option<String>,
    /// Twilio: the environment variable holding the account's auth token.
    auth_token_env: Option<String>,
    /// The sender. Twilio: a number in E.164 (or set `messaging_service_sid` instead).
    /// Kannel: a number, a short code or an alphanumeric sender of at most 11 characters.
    from: Option<String>,
    /// Twilio: a Messaging Service (`MG` and 32 hexadecimal digits) that picks the sender.
    messaging_service_sid: Option<String>,
    /// Kannel: the `sendsms-user` to send as.
    username: Option<String>,
    /// Kannel: the environment variable holding that user's password.
    password_env: Option<String>,
    /// Kannel: the environment variable holding the secret Kannel's sms-service sends with
    /// each message it forwards to `/inbound/sms/{channel}` (as `secret=`); without it,
    /// inbound messages through Kannel are refused.
    inbound_secret_env: Option<String>,
    /// The most segments one message may take, 1 to 10 (default 3).
    max_segments: Option<i64>,
    /// Over `max_segments`: `refuse` the update (default) or `truncate` the text and append
    /// the status page's link.
    overflow: Option<String>,
    /// The regions whose numbers the channel texts, as ISO 3166 codes (`["GB", "IE"]`); every
    /// region when unset. Texts to premium-rate ranges abroad are how SMS pumping makes money,
    /// so a business that serves a few countries should list them.
    countries: Option<Vec<String>>,
}

/// Which gateway sends, and how to reach it.
#[derive(Debug, Clone)]
pub enum Provider {
    Twilio(Twilio),
    Kannel(Kannel),
}

/// Twilio's Messages API, for one account.
#[derive(Debug, Clone)]
pub struct Twilio {
    /// `{base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`.
    pub messages_url: Url,
    pub account_sid: String,
    pub auth_token: SecretString,
    pub sender: TwilioSender,
}

/// A Kannel smsbox's sendsms interface, as one sendsms-user.
#[derive(Debug, Clone)]
pub struct Kannel {
    /// `{base_url}/cgi-bin/sendsms`.
    pub sendsms_url: Url,
    pub username: String,
    pub password: SecretString,
    pub from: String,
    /// What an inbound call from Kannel's sms-service must carry as `secret`.
    pub inbound_secret: Option<SecretString>,
}

/// Where a Twilio message comes from.
#[derive(Debug, Clone)]
pub enum TwilioSender {
    /// A number of the account, in E.164.
    From(String),
    /// A Messaging Service, which picks a number from its pool.
    MessagingService(String),
}

#[derive(Debug, Clone)]
pub struct SmsSettings {
    pub provider: Provider,
    pub max_segments: usize,
    pub overflow: Overflow,
    pub countries: Option<Countries>,
}

/// The regions a channel texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Countries(std::collections::BTreeSet<String>);

impl Countries {
    fn parse(file: &Path, codes: &[String]) -> Result<Self, ConfigError> {
        if codes.is_empty() {
            return Err(ConfigError::at(
                file,
                "countries",
                "lists no region: leave it out to text every region",
            ));
        }
        let mut regions = std::collections::BTreeSet::new();
        for code in codes {
            let code = code.trim().to_ascii_uppercase();
            if !PhoneNumber::is_region(&code) {
                return Err(ConfigError::at(
                    file,
                    "countries",
                    format!("'{code}' is not a region code like GB or US"),
                ));
            }
            regions.insert(code);
        }
        Ok(Self(regions))
    }

    /// Refuses a number outside the regions, naming its region but never the number.
    pub fn check(&self, number: &PhoneNumber) -> Result<(), DeliveryError> {
        match number.region() {
            Some(region) if self.0.contains(&region) => Ok(()),
            region => Err(DeliveryError::permanent(format!(
                "the number is in {}, and this channel texts only {}",
                region.as_deref().unwrap_or("no known region"),
                self.0.iter().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// The keys only one provider takes, and whose they are.
const TWILIO_ONLY: &[&str] = &["account_sid", "auth_token_env", "messaging_service_sid"];
const KANNEL_ONLY: &[&str] = &["username", "password_env", "inbound_secret_env"];

impl SmsSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        Ok(Arc::new(Self::from_input(input)?))
    }

    fn from_input(input: &SettingsInput) -> Result<Self, ConfigError> {
        let file = input.file;
        check_types(input)?;
        let raw: SmsFile = input.parse()?;
        let max_segments = match raw.max_segments {
            None => DEFAULT_MAX_SEGMENTS,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MOST_SEGMENTS).contains(n))
                .ok_or_else(|| {
                    ConfigError::at(
                        file,
                        "max_segments",
                        format!("{n} is not a number of segments from 1 to {MOST_SEGMENTS}"),
                    )
                })?,
        };
        let overflow = match raw.overflow.as_deref() {
            None | Some("refuse") => Overflow::Refuse,
            Some("truncate") => Overflow::Truncate,
            Some(other) => {
                return Err(ConfigError::at(
                    file,
                    "overflow",
                    format!("'{other}' is not an overflow: use refuse or truncate"),
                ));
            }
        };
        let provider = match raw.provider.as_str() {
            "twilio" => {
                refuse_keys_of(file, &raw, KANNEL_ONLY, "Kannel", "twilio")?;
                twilio(file, &raw, input.secrets)?
            }
            "kannel" => {
                refuse_keys_of(file, &raw, TWILIO_ONLY, "Twilio", "kannel")?;
                kannel(file, &raw, input.secrets)?
            }
            other => {
                return Err(ConfigError::at(
                    file,
                    "provider",
                    format!("'{other}' is not an SMS provider: use twilio or kannel"),
                ));
            }
        };
        let countries = raw
            .countries
            .as_deref()
            .map(|codes| Countries::parse(file, codes))
            .transpose()?;
        Ok(SmsSettings {
            provider,
            max_segments,
            overflow,
            countries,
        })
    }
}

/// The keys whose values are strings; `max_segments` is the one number.
const STRING_KEYS: &[&str] = &[
    "provider",
    "base_url",
    "account_sid",
    "auth_token_env",
    "from",
    "messaging_service_sid",
    "username",
    "password_env",
    "inbound_secret_env",
    "overflow",
];

/// Checks each known key's type first: toml's own type errors do not name the key. Unknown
/// keys are left to the strict parse, whose error names them.
fn check_types(input: &SettingsInput) -> Result<(), ConfigError> {
    let Some(table) = input.table.as_table() else {
        return Ok(());
    };
    for (key, value) in table {
        if key == "max_segments" && !value.is_integer() {
            return Err(ConfigError::at(
                input.file,
                key,
                format!("must be a whole number, like 3, not {}", value.type_str()),
            ));
        }
        let strings = value
            .as_array()
            .is_some_and(|values| values.iter().all(|v| v.is_str()));
        if key == "countries" && !strings {
            return Err(ConfigError::at(
                input.file,
                key,
                format!(
                    "must be a list of region codes, like [\"GB\", \"IE\"], not {}",
                    value.type_str()
                ),
            ));
        }
        if STRING_KEYS.contains(&key.as_str()) && !value.is_str() {
            return Err(ConfigError::at(
                input.file,
                key,
                format!("must be a string in quotes, not {}", value.type_str()),
            ));
        }
    }
    Ok(())
}

/// Refuses any of `keys` set in a file whose provider does not take them.
fn refuse_keys_of(
    file: &Path,
    raw: &SmsFile,
    keys: &[&str],
    owner: &str,
    provider: &str,
) -> Result<(), ConfigError> {
    let set = |key: &str| match key {
        "account_sid" => raw.account_sid.is_some(),
        "auth_token_env" => raw.auth_token_env.is_some(),
        "messaging_service_sid" => raw.messaging_service_sid.is_some(),
        "username" => raw.username.is_some(),
        "password_env" => raw.password_env.is_some(),
        _ => false,
    };
    match keys.iter().find(|key| set(key)) {
        Some(key) => Err(ConfigError::at(
            file,
            key,
            format!("is a {owner} setting, and this channel's provider is {provider}"),
        )),
        None => Ok(()),
    }
}

fn required<'a>(file: &Path, key: &str, value: &'a Option<String>) -> Result<&'a str, ConfigError> {
    match value.as_deref().map(str::trim) {
        Some(value) if !value.is_empty() => Ok(value),
        Some(_) => Err(ConfigError::at(file, key, "must not be empty")),
        None => Err(ConfigError::at(file, key, "missing")),
    }
}

fn twilio(
    file: &Path,
    raw: &SmsFile,
    secrets: &dyn config::SecretSource,
) -> Result<Provider, ConfigError> {
    let base_url = base_url(file, raw.base_url.as_deref().unwrap_or(TWILIO_BASE_URL))?;
    let account_sid = sid(
        file,
        "account_sid",
        required(file, "account_sid", &raw.account_sid)?,
        "AC",
    )?;
    let token_env = required(file, "auth_token_env", &raw.auth_token_env)?;
    let auth_token = config::secret(file, "auth_token_env", token_env, secrets)?;
    let token = auth_token.expose_secret();
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::at(
            file,
            "auth_token_env",
            format!(
                "the auth token in {token_env} is not 32 hexadecimal digits, as Twilio's are \
                 (a stray space or newline?)"
            ),
        ));
    }
    let sender = match (&raw.from, &raw.messaging_service_sid) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at(
                file,
                "messaging_service_sid",
                "set from or messaging_service_sid, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::at(
                file,
                "from",
                "missing: set the sending number (E.164, like +447700900000) or \
                 messaging_service_sid",
            ));
        }
        (Some(_), None) => {
            let from = required(file, "from", &raw.from)?;
            let number = PhoneNumber::parse(from).map_err(|e| {
                ConfigError::at(file, "from", format!("not a number Twilio sends from: {e}"))
            })?;
            TwilioSender::From(number.as_str().to_owned())
        }
        (None, Some(_)) => {
            let service = required(file, "messaging_service_sid", &raw.messaging_service_sid)?;
            TwilioSender::MessagingService(sid(file, "messaging_service_sid", service, "MG")?)
        }
    };
    let messages_url = join(
        file,
        &base_url,
        &format!("2010-04-01/Accounts/{account_sid}/Messages.json"),
    )?;
    Ok(Provider::Twilio(Twilio {
        messages_url,
        account_sid,
        auth_token,
        sender,
    }))
}

fn kannel(
    file: &Path,
    raw: &SmsFile,
    secrets: &dyn config::SecretSource,
) -> Result<Provider, ConfigError> {
    let Some(base) = raw.base_url.as_deref() else {
        return Err(ConfigError::at(
            file,
            "base_url",
            "missing: a Kannel channel needs its smsbox's address, like http://127.0.0.1:13013",
        ));
    };
    let base_url = base_url(file, base)?;
    let username = required(file, "username", &raw.username)?;
    if username
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ConfigError::at(
            file,
            "username",
            "must not contain spaces or control characters",
        ));
    }
    let password_env = required(file, "password_env", &raw.password_env)?;
    let password = config::secret(file, "password_env", password_env, secrets)?;
    if password.expose_secret().trim() != password.expose_secret() {
        return Err(ConfigError::at(
            file,
            "password_env",
            format!(
                "the password in {password_env} starts or ends with whitespace (a stray newline?)"
            ),
        ));
    }
    let from = kannel_sender(file, required(file, "from", &raw.from)?)?;
    let inbound_secret = match &raw.inbound_secret_env {
        Some(variable) => {
            let secret = config::secret(file, "inbound_secret_env", variable, secrets)?;
            if secret.expose_secret().trim().chars().count() < 16 {
                return Err(ConfigError::at(
                    file,
                    "inbound_secret_env",
                    format!("the secret in {variable} needs at least 16 characters"),
                ));
            }
            Some(secret)
        }
        None => None,
    };
    Ok(Provider::Kannel(Kannel {
        sendsms_url: join(file, &base_url, "cgi-bin/sendsms")?,
        username: username.to_owned(),
        password,
        from,
        inbound_secret,
    }))
}

/// A Kannel sender: a number in E.164, a short code, or an alphanumeric sender of at most 11
/// characters (what the GSM originator field carries).
fn kannel_sender(file: &Path, from: &str) -> Result<String, ConfigError> {
    if from.starts_with('+') {
        return PhoneNumber::parse(from)
            .map(|number| number.as_str().to_owned())
            .map_err(|e| ConfigError::at(file, "from", e.to_string()));
    }
    let short_code = from.len() <= 15 && from.bytes().all(|b| b.is_ascii_digit());
    let alphanumeric =
        from.len() <= 11 && from.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ');
    if short_code || alphanumeric {
        Ok(from.to_owned())
    } else {
        Err(ConfigError::at(
            file,
            "from",
            format!(
                "'{from}' is not a sender: use a number (+447700900000), a short code, or at \
                 most 11 letters, digits and spaces"
            ),
        ))
    }
}

/// A Twilio SID: its two-letter prefix and 32 hexadecimal digits.
fn sid(file: &Path, key: &str, value: &str, prefix: &str) -> Result<String, ConfigError> {
    let valid = value
        .strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::at(
            file,
            key,
            format!("'{value}' is not a SID: {prefix} followed by 32 hexadecimal digits"),
        ))
    }
}

/// An http(s) URL with no credentials, query or fragment: they belong in the settings and
/// secrets, not in an address that gets logged.
fn base_url(file: &Path, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text)
        .map_err(|e| ConfigError::at(file, "base_url", format!("'{text}' is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::at(
            file,
            "base_url",
            "must be an http or https URL",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::at(
            file,
            "base_url",
            "must not carry credentials: set them with the provider's own keys",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::at(
            file,
            "base_url",
            "must not have a query or a fragment",
        ));
    }
    Ok(url)
}

/// `path` under `base`, whatever trailing slash `base` has.
fn join(file: &Path, base: &Url, path: &str) -> Result<Url, ConfigError> {
    let text = format!("{}/{path}", base.as_str().trim_end_matches('/'));
    Url::parse(&text)
        .map_err(|e| ConfigError::at(file, "base_url", format!("'{text}' is not a URL: {e}")))
}

#[async_trait::async_trait]
impl ChannelSettings for SmsSettings {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn warnings(&self) -> Vec<String> {
        match &self.provider {
            Provider::Kannel(kannel) if kannel.inbound_secret.is_none() => vec![
                "without inbound_secret_env, crier refuses every reply Kannel forwards, so a \
                 STOP never unsubscribes anyone and no delivery report is kept; set it, and add \
                 its secret to the sms-service's get-url"
                    .to_owned(),
            ],
            _ => Vec::new(),
        }
    }

    async fn build(
        &self,
        id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        let receipts_url = format!(
            "{}/inbound/sms/{id}/status",
            context.composer.link_maker().public_url()
        );
        Ok(Arc::new(SmsChannel::build(
            self,
            policy,
            context.renderer.clone(),
            receipts_url,
        )?))
    }

    fn default_policy(&self, kind_default: &DeliveryPolicy) -> DeliveryPolicy {
        let mut policy = kind_default.clone();
        if let Provider::Kannel(_) = self.provider {
            policy.rate = None;
        }
        policy
    }
}

/// One message, rendered and measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sms {
    pub text: String,
    pub measured: Measured,
}

impl Sms {
    /// "GSM-7: 161 characters in 2 segments (at most 3)", and what forced UCS-2.
    fn describe(&self, max_segments: usize) -> String {
        let Measured {
            encoding,
            units,
            segments,
        } = self.measured;
        format!(
            "{}: {units} characters in {segments} segment{} (at most {max_segments})",
            encoding_name(&self.text, encoding),
            if segments == 1 { "" } else { "s" },
        )
    }
}

/// "GSM-7", or "UCS-2 (because of ’ U+2019)": a comms lead can replace the character that
/// costs more than half the room, found by its code point when it is invisible (a no-break
/// space pasted from a document).
fn encoding_name(text: &str, encoding: Encoding) -> String {
    match text.chars().find(|c| encoding::gsm7_septets(*c).is_none()) {
        Some(c) if encoding == Encoding::Ucs2 => {
            format!("UCS-2 (because of {c} U+{:04X})", u32::from(c))
        }
        _ => encoding.name().to_owned(),
    }
}

/// Measures texts in segments, for [`limits::fit`].
struct Segments(usize);

impl Measure for Segments {
    fn measure(&self, text: &str) -> usize {
        encoding::measure(text).segments
    }
    fn limit(&self) -> usize {
        self.0
    }
    fn unit(&self) -> &str {
        "SMS segments"
    }
}

pub struct SmsChannel {
    provider: Provider,
    max_segments: usize,
    overflow: Overflow,
    countries: Option<Countries>,
    renderer: Arc<Renderer>,
    /// One client, so connections to the provider are pooled and kept alive.
    client: reqwest::Client,
    /// Where the provider reports what became of a message: `{public_url}/inbound/sms/{id}/status`.
    receipts_url: String,
}

impl SmsChannel {
    pub fn build(
        settings: &SmsSettings,
        policy: &DeliveryPolicy,
        renderer: Arc<Renderer>,
        receipts_url: String,
    ) -> crate::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .user_agent(concat!("crier/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the credentials somewhere the operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::internal(anyhow::anyhow!("HTTP client: {e}")))?;
        Ok(Self {
            provider: settings.provider.clone(),
            max_segments: settings.max_segments,
            overflow: settings.overflow,
            countries: settings.countries.clone(),
            renderer,
            client,
            receipts_url,
        })
    }

    /// Refuses, before any text costs money, a number outside the channel's `countries`.
    fn check_region(&self, to: &PhoneNumber) -> Result<(), DeliveryError> {
        match &self.countries {
            Some(countries) => countries.check(to),
            None => Ok(()),
        }
    }

    /// Renders the text and fits it within `max_segments`, or says why it cannot.
    pub fn compose(&self, message: &MessageContext) -> Result<Sms, Rejection> {
        let rendered = self.renderer.render("sms.txt", message)?;
        let text = tidy(&rendered);
        if text.is_empty() {
            return Err(Rejection::Invalid("the SMS text renders empty".into()));
        }
        fit(
            &text,
            self.max_segments,
            self.overflow,
            &message.links.status_page,
        )
    }

    /// `status_callback` is where Twilio reports what became of the message; a notice has
    /// no delivery to record it on, so none.
    async fn send_twilio(
        &self,
        twilio: &Twilio,
        to: &str,
        sms: &Sms,
        status_callback: Option<&str>,
    ) -> Result<Receipt, DeliveryError> {
        let (sender_field, sender_value) = match &twilio.sender {
            TwilioSender::From(number) => ("From", number.as_str()),
            TwilioSender::MessagingService(sid) => ("MessagingServiceSid", sid.as_str()),
        };
        let mut form = vec![
            ("To", to),
            (sender_field, sender_value),
            ("Body", sms.text.as_str()),
        ];
        if let Some(callback) = status_callback {
            form.push(("StatusCallback", callback));
        }
        let response = self
            .client
            .post(twilio.messages_url.clone())
            .basic_auth(&twilio.account_sid, Some(twilio.auth_token.expose_secret()))
            .form(&form)
            .send()
            .await
            .map_err(|e| failure_for_request(&e))?;
        if response.status().is_success() {
            let answer = read_answer(response).await;
            let provider_id = serde_json::from_str::<TwilioMessage>(&answer)
                .ok()
                .and_then(|message| message.sid);
            if provider_id.is_none() {
                // Twilio took the message: sending it again would send it twice.
                tracing::warn!("Twilio accepted a message but its answer carried no sid");
            }
            return Ok(Receipt {
                provider_id,
                thread: None,
            });
        }
        let failure = failure_for_response(&response, "Twilio");
        let answer = read_answer(response).await;
        Err(classify_twilio(failure, &answer))
    }

    async fn send_kannel(
        &self,
        kannel: &Kannel,
        to: &str,
        sms: &Sms,
        dlr_url: Option<&str>,
    ) -> Result<Receipt, DeliveryError> {
        let segments = sms.measured.segments.to_string();
        let mut query: Vec<(&str, &str)> = vec![
            ("username", kannel.username.as_str()),
            ("password", kannel.password.expose_secret()),
            ("from", kannel.from.as_str()),
            ("to", to),
            ("text", &sms.text),
        ];
        if sms.measured.encoding == Encoding::Ucs2 {
            query.extend([("coding", "2"), ("charset", "UTF-8")]);
        }
        // Kannel 1.4.5 splits by its sendsms-user's own `max-messages` and ignores this one;
        // it is sent for the gateways that read it, and says what crier measured.
        query.push(("max-messages", segments.as_str()));
        if let Some(dlr_url) = dlr_url {
            query.extend([("dlr-mask", KANNEL_DLR_MASK), ("dlr-url", dlr_url)]);
        }
        let response = self
            .client
            .get(kannel.sendsms_url.clone())
            .query(&query)
            .send()
            .await
            // Without the URL: its query holds the password.
            .map_err(|e| failure_for_request(&e))?;
        let status = response.status();
        let answer = read_answer(response).await;
        classify_kannel(status, &answer)
    }
}

/// What Twilio answers for a message it took (only the sid is read).
#[derive(Debug, Deserialize)]
struct TwilioMessage {
    sid: Option<String>,
}

/// Twilio's error body: `{"code": 21211, "message": "…", "more_info": "…", "status": 400}`.
#[derive(Debug, Deserialize)]
struct TwilioError {
    code: Option<u64>,
    message: Option<String>,
}

/// Twilio's error codes that mean the number will never take an SMS from this account: not a
/// valid number (21211), not a mobile (21614), or its owner replied STOP (21610).
const TWILIO_RECIPIENT_GONE: &[u64] = &[21211, 21614, 21610];
/// Twilio's "too many requests", whatever status it comes with.
const TWILIO_TOO_MANY_REQUESTS: u64 = 20429;

/// Refines the failure the status gave with Twilio's own code and message.
fn classify_twilio(failure: DeliveryError, answer: &str) -> DeliveryError {
    let Ok(TwilioError { code, message }) = serde_json::from_str::<TwilioError>(answer) else {
        return failure;
    };
    let Some(code) = code else {
        return failure;
    };
    let message = one_line(message.as_deref().unwrap_or_default());
    let kind = if TWILIO_RECIPIENT_GONE.contains(&code) {
        FailureKind::RecipientGone
    } else if code == TWILIO_TOO_MANY_REQUESTS {
        FailureKind::Throttled
    } else {
        failure.kind
    };
    let reason = format!("{}: error {code}: {message}", failure.reason);
    DeliveryError {
        kind,
        reason,
        ..failure
    }
    .with_code(code.to_string())
}

/// Kannel's `sendsms` answers: 202 with `0: Accepted for delivery` or `3: Queued for later
/// delivery` (or `Sent.` when it answers before its bearerbox does) is taken; 503 and other
/// 5xx are worth retrying; a 4xx never succeeds, and a 403 says why in its body (the
/// credentials, or a receiver it cannot route).
fn classify_kannel(status: StatusCode, answer: &str) -> Result<Receipt, DeliveryError> {
    let answer = one_line(answer);
    if status.is_success() {
        let accepted = ["0:", "3:", "Sent."]
            .iter()
            .any(|start| answer.starts_with(start));
        if accepted {
            return Ok(Receipt::none());
        }
        // Something answered that is not Kannel's sendsms: the message may or may not be on
        // its way, and sending it again could send it twice.
        return Err(DeliveryError::permanent(format!(
            "Kannel answered {status} with '{answer}', which is not a sendsms answer"
        ))
        .with_status(status.as_u16()));
    }
    let reason = if answer.starts_with("Authorization failed") {
        format!("Kannel refused the credentials ({status}): check username and password_env")
    } else {
        format!("Kannel answered {status}: {answer}")
    };
    Err(DeliveryError::new(failure_for_status(status), reason).with_status(status.as_u16()))
}

/// Twilio's status callback for one delivery: the receipt route and which update it is
/// about (Twilio reports the message's sid and number; the update makes the delivery's key).
/// Twilio signs the whole URL, query included.
fn twilio_status_callback(receipts_url: &str, attempt: &Attempt<'_>) -> String {
    format!("{receipts_url}?update={}", attempt.update)
}

/// Kannel's delivery report URL: the receipt route, which delivery it is about, the secret
/// Kannel's calls prove themselves with, and Kannel's escape codes for the report (`%d` its
/// type, `%A` the SMSC's answer, `%F` the SMSC's message id, `%T` its time). Kannel reads
/// `%` as the start of an escape code, so every `%` of crier's own part is written `%%`.
fn kannel_dlr_url(
    receipts_url: &str,
    attempt: &Attempt<'_>,
    to: &str,
    secret: Option<&SecretString>,
) -> String {
    let mut ours = format!("{receipts_url}?");
    let query: String = reqwest::Url::parse("http://query.invalid/")
        .map(|mut url| {
            let mut pairs = url.query_pairs_mut();
            pairs
                .append_pair("update", &attempt.update.to_string())
                .append_pair("to", to);
            if let Some(secret) = secret {
                pairs.append_pair("secret", secret.expose_secret());
            }
            drop(pairs);
            url.query().unwrap_or_default().to_owned()
        })
        .unwrap_or_default();
    ours.push_str(&query);
    format!(
        "{}&status=%d&answer=%A&smsc_id=%F&at=%T",
        ours.replace('%', "%%")
    )
}

/// The rendered template as sent: each line without trailing spaces, no blank lines at either
/// end, and at most one blank line in a row (a template's skipped sections leave some).
fn tidy(rendered: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim_end) {
        let blank = line.is_empty();
        if blank && lines.last().is_none_or(|last| last.is_empty()) {
            continue;
        }
        lines.push(line);
    }
    while lines.last().is_some_and(|last| last.is_empty()) {
        lines.pop();
    }
    lines.join("\n")
}

/// `text` if it fits in `max_segments`; else, with [`Overflow::Truncate`], the longest cut at
/// a word that fits with the status page's link appended; else a rejection naming the
/// encoding, the length and the segments.
pub fn fit(
    text: &str,
    max_segments: usize,
    overflow: Overflow,
    status_link: &str,
) -> Result<Sms, Rejection> {
    let measured = encoding::measure(text);
    if measured.segments <= max_segments {
        return Ok(Sms {
            text: text.to_owned(),
            measured,
        });
    }
    let refused = || {
        let encoding = measured.encoding;
        Rejection::OverLimit(format!(
            "the SMS takes {segments} segments, {units} characters in {name}; the limit is \
             {max_segments} segment{s} ({capacity} characters in {plain}): shorten it, or set \
             overflow = \"truncate\"",
            segments = measured.segments,
            units = measured.units,
            name = encoding_name(text, encoding),
            s = if max_segments == 1 { "" } else { "s" },
            capacity = encoding.capacity(max_segments),
            plain = encoding.name(),
        ))
    };
    if overflow == Overflow::Refuse {
        return Err(refused());
    }
    // The ellipsis itself must not cost the text its GSM-7 encoding.
    let ellipsis = if encoding::is_gsm7(text) {
        "..."
    } else {
        "…"
    };
    let cut = limits::fit_with(
        text,
        overflow,
        status_link,
        ellipsis,
        &Segments(max_segments),
    )
    .map_err(|_| refused())?;
    Ok(Sms {
        measured: encoding::measure(&cut),
        text: cut,
    })
}

/// A provider's answer, read up to [`ANSWER_LIMIT`]; what could not be read is left out.
async fn read_answer(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ANSWER_LIMIT.saturating_sub(bytes.len());
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= ANSWER_LIMIT {
            break;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A provider's text as one short line of a failure's reason.
fn one_line(text: &str) -> String {
    let line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    line
}

#[async_trait::async_trait]
impl Channel for SmsChannel {
    fn reach(&self) -> Reach {
        Reach::Subscribers(ContactKind::Phone)
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let sms = self.compose(message)?;
        let description = sms.describe(self.max_segments);
        Ok(vec![
            RenderedPart {
                part: "text".into(),
                text: sms.text,
                format: PartFormat::Text,
            },
            RenderedPart {
                part: "encoding".into(),
                text: description,
                format: PartFormat::Measure,
            },
        ])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let to = match attempt.recipient.contact() {
            Some(Contact::Phone(number)) => number,
            _ => return Err(DeliveryError::permanent("an SMS needs a phone number")),
        };
        self.check_region(to)?;
        let to = to.as_str();
        let sms = self
            .compose(message)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        match &self.provider {
            Provider::Twilio(twilio) => {
                let callback = twilio_status_callback(&self.receipts_url, attempt);
                self.send_twilio(twilio, to, &sms, Some(&callback)).await
            }
            Provider::Kannel(kannel) => {
                let dlr_url = kannel_dlr_url(
                    &self.receipts_url,
                    attempt,
                    to,
                    kannel.inbound_secret.as_ref(),
                );
                self.send_kannel(kannel, to, &sms, Some(&dlr_url)).await
            }
        }
    }

    /// A notice's text alone, within `max_segments` (never truncated: a cut confirmation
    /// link is no link), with no delivery report asked of Kannel: no delivery records it.
    async fn notify(&self, contact: &Contact, notice: &Notice) -> Result<Receipt, DeliveryError> {
        let Contact::Phone(to) = contact else {
            return Err(DeliveryError::permanent("an SMS needs a phone number"));
        };
        self.check_region(to)?;
        let text = tidy(&notice.text);
        if text.is_empty() {
            return Err(DeliveryError::permanent("the SMS text renders empty"));
        }
        let sms = fit(&text, self.max_segments, Overflow::Refuse, "")
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        match &self.provider {
            Provider::Twilio(twilio) => self.send_twilio(twilio, to.as_str(), &sms, None).await,
            Provider::Kannel(kannel) => self.send_kannel(kannel, to.as_str(), &sms, None).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DeliveryKey, Recipient};

    struct Env(&'static [(&'static str, &'static str)]);

    impl config::SecretSource for Env {
        fn get(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    const SECRETS: Env = Env(&[
        ("TWILIO_AUTH_TOKEN", "fedcba9876543210fedcba9876543210"),
        ("KANNEL_PASSWORD", "s3cret-kannel"),
        ("PADDED", "s3cret-kannel\n"),
        ("SHORT_TOKEN", "abc123"),
    ]);

    const TWILIO: &str = "provider = \"twilio\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"+447700900000\"\n";
    const KANNEL: &str = "provider = \"kannel\"\nbase_url = \"http://127.0.0.1:13013\"\nusername = \"crier\"\npassword_env = \"KANNEL_PASSWORD\"\nfrom = \"ExampleMob\"\n";

    fn parse(text: &str) -> Result<SmsSettings, String> {
        let table: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        let settings = SmsSettings::from_input(&SettingsInput {
            file: Path::new("channels/sms.toml"),
            base: Path::new("."),
            table,
            secrets: &SECRETS,
        })
        .map_err(|e| e.to_string())?;
        let debug = format!("{settings:?}");
        assert!(!debug.contains("fedcba9876543210"), "{debug}");
        assert!(!debug.contains("s3cret-kannel"), "{debug}");
        Ok(settings)
    }

    #[track_caller]
    fn refused(text: &str, key: &str, needle: &str) {
        let error = parse(text).expect_err("refused");
        assert!(
            error.starts_with(&format!("channels/sms.toml: {key}: ")) && error.contains(needle),
            "{error}"
        );
    }

    #[test]
    fn a_twilio_file_defaults_to_twilio_s_api_root_and_its_messages_url() {
        let settings = parse(TWILIO).unwrap();
        let Provider::Twilio(Twilio {
            messages_url,
            sender,
            ..
        }) = settings.provider
        else {
            panic!("twilio");
        };
        assert_eq!(
            messages_url.as_str(),
            "https://api.twilio.com/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json"
        );
        assert!(matches!(sender, TwilioSender::From(from) if from == "+447700900000"));
        assert_eq!(settings.max_segments, 3);
    }

    #[test]
    fn a_kannel_file_sends_to_its_smsbox_sendsms_path() {
        let settings = parse(&format!("{KANNEL}max_segments = 5\n")).unwrap();
        let Provider::Kannel(Kannel {
            sendsms_url, from, ..
        }) = settings.provider
        else {
            panic!("kannel");
        };
        assert_eq!(
            sendsms_url.as_str(),
            "http://127.0.0.1:13013/cgi-bin/sendsms"
        );
        assert_eq!(from, "ExampleMob");
        assert_eq!(settings.max_segments, 5);
    }

    #[test]
    fn a_channel_with_countries_texts_only_numbers_in_them() {
        let settings = parse(&format!("{TWILIO}countries = [\"gb\", \"IE\"]\n")).unwrap();
        let countries = settings.countries.expect("countries are set");
        let number = |n: &str| PhoneNumber::parse(n).unwrap();
        assert_eq!(countries.check(&number("+447700900123")), Ok(()));
        assert_eq!(countries.check(&number("+353851234567")), Ok(()));
        let abroad = countries.check(&number("+12015550123")).unwrap_err();
        assert_eq!(abroad.kind, FailureKind::Permanent);
        assert!(
            abroad.reason.contains("in US") && abroad.reason.contains("texts only GB, IE"),
            "{abroad:?}"
        );
        assert!(!abroad.reason.contains("5550123"), "{abroad:?}");
        assert_eq!(
            parse(TWILIO).unwrap().countries,
            None,
            "every region unless listed"
        );
        refused(
            &format!("{TWILIO}countries = [\"UK\"]\n"),
            "countries",
            "'UK' is not a region code",
        );
        refused(
            &format!("{TWILIO}countries = []\n"),
            "countries",
            "lists no region",
        );
        refused(
            &format!("{TWILIO}countries = \"GB\"\n"),
            "countries",
            "must be a list",
        );
    }

    #[test]
    fn every_bad_value_is_refused_with_its_key() {
        refused("provider = \"nexmo\"\n", "provider", "twilio or kannel");
        let unknown = parse(&format!("{TWILIO}sender = \"x\"\n")).unwrap_err();
        assert!(unknown.contains("unknown field `sender`"), "{unknown}");
        refused(
            &format!("{TWILIO}username = \"crier\"\n"),
            "username",
            "Kannel setting",
        );
        refused(
            &format!("{KANNEL}account_sid = \"AC\"\n"),
            "account_sid",
            "Twilio setting",
        );
        refused(
            &TWILIO.replace("AC0123456789abcdef0123456789abcdef", "AC123"),
            "account_sid",
            "32 hexadecimal digits",
        );
        refused(
            &TWILIO.replace("TWILIO_AUTH_TOKEN", "SHORT_TOKEN"),
            "auth_token_env",
            "not 32 hexadecimal digits",
        );
        refused(
            &TWILIO.replace("TWILIO_AUTH_TOKEN", "UNSET"),
            "auth_token_env",
            "UNSET is not set",
        );
        refused(&TWILIO.replace("+447700900000", "07700900000"), "from", "+");
        refused(
            &TWILIO.replace("from = \"+447700900000\"\n", ""),
            "from",
            "messaging_service_sid",
        );
        refused(
            &format!("{TWILIO}messaging_service_sid = \"MG0123456789abcdef0123456789abcdef\"\n"),
            "messaging_service_sid",
            "not both",
        );
        refused(
            &format!("{TWILIO}max_segments = 0\n"),
            "max_segments",
            "1 to 10",
        );
        refused(
            &format!("{TWILIO}max_segments = \"3\"\n"),
            "max_segments",
            "whole number",
        );
        refused(
            &TWILIO.replace("\"+447700900000\"", "447700900000"),
            "from",
            "string in quotes, not integer",
        );
        refused(
            &format!("{TWILIO}max_segments = 11\n"),
            "max_segments",
            "1 to 10",
        );
        refused(
            &format!("{TWILIO}overflow = \"cut\"\n"),
            "overflow",
            "refuse or truncate",
        );
        refused(
            &format!("{TWILIO}base_url = \"ftp://api.twilio.com\"\n"),
            "base_url",
            "http or https",
        );
        refused(
            &format!("{TWILIO}base_url = \"https://u:p@api.twilio.com\"\n"),
            "base_url",
            "credentials",
        );
        refused(
            &KANNEL.replace("base_url = \"http://127.0.0.1:13013\"\n", ""),
            "base_url",
            "missing",
        );
        refused(
            &KANNEL.replace("ExampleMob", "Example Mobile Ltd"),
            "from",
            "11",
        );
        refused(
            &KANNEL.replace("KANNEL_PASSWORD", "PADDED"),
            "password_env",
            "whitespace",
        );
    }

    #[test]
    fn a_twilio_messaging_service_may_send_instead_of_a_number() {
        let text = TWILIO.replace(
            "from = \"+447700900000\"",
            "messaging_service_sid = \"MG0123456789abcdef0123456789abcdef\"",
        );
        let settings = parse(&text).unwrap();
        assert!(matches!(
            settings.provider,
            Provider::Twilio(Twilio {
                sender: TwilioSender::MessagingService(_),
                ..
            })
        ));
    }

    #[test]
    fn kannel_starts_without_a_rate_and_twilio_with_one_a_second() {
        let kannel = parse(KANNEL).unwrap();
        let twilio = parse(TWILIO).unwrap();
        assert_eq!(kannel.default_policy(&KIND.default_policy).rate, None);
        assert_eq!(
            twilio.default_policy(&KIND.default_policy).rate,
            Some(Rate::new(1, Duration::from_secs(1)))
        );
        let policy = twilio.default_policy(&KIND.default_policy);
        assert_eq!(
            (policy.concurrency, policy.timeout),
            (4, Duration::from_secs(15))
        );
    }

    #[test]
    fn an_over_long_text_is_refused_naming_the_encoding_length_and_segments() {
        let error = fit(&"a".repeat(460), 3, Overflow::Refuse, "https://s.example/")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "the SMS takes 4 segments, 460 characters in GSM-7; the limit is 3 segments (459 \
             characters in GSM-7): shorten it, or set overflow = \"truncate\""
        );
        let error = fit(&"’".repeat(71), 1, Overflow::Refuse, "https://s.example/")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("2 segments, 71 characters in UCS-2 (because of ’ U+2019)"),
            "{error}"
        );
        assert!(
            error.contains("the limit is 1 segment (70 characters in UCS-2)"),
            "{error}"
        );
    }

    #[test]
    fn truncation_keeps_gsm7_and_ends_with_the_status_link_within_the_limit() {
        let text = "word ".repeat(100);
        let sms = fit(
            text.trim(),
            1,
            Overflow::Truncate,
            "https://status.example.com/",
        )
        .unwrap();
        assert!(
            sms.text.ends_with("... https://status.example.com/"),
            "{}",
            sms.text
        );
        assert_eq!(sms.measured.encoding, Encoding::Gsm7);
        assert_eq!(sms.measured.segments, 1);
        assert!(
            sms.measured.units <= 160 && sms.measured.units > 150,
            "{}",
            sms.measured.units
        );
    }

    #[test]
    fn a_text_is_tidied_of_trailing_spaces_and_repeated_blank_lines() {
        assert_eq!(tidy("\n\nA  \n\n\n\nB\n\n"), "A\n\nB");
    }

    #[test]
    fn the_kannel_receipt_url_escapes_crier_s_percent_signs_and_keeps_kannel_s_codes() {
        let update: ulid::Ulid = "01JDQ8Y1Z8X0000000000000BB".parse().unwrap();
        let recipient = Recipient::Contact(Contact::parse("+447700900123").unwrap());
        let key = DeliveryKey::new(update, "sms", &recipient);
        let attempt = Attempt {
            key: &key,
            update,
            number: 1,
            recipient: &recipient,
            thread: None,
        };
        let url = kannel_dlr_url(
            "https://status.example.com/inbound/sms/sms/status",
            &attempt,
            "+447700900123",
            Some(&SecretString::from("s3cret 100%")),
        );
        assert_eq!(
            url,
            "https://status.example.com/inbound/sms/sms/status?update=01JDQ8Y1Z8X0000000000000BB\
             &to=%%2B447700900123&secret=s3cret+100%%25&status=%d&answer=%A&smsc_id=%F&at=%T"
        );
    }

    #[test]
    fn kannel_answers_are_classified_by_status_and_body() {
        assert!(classify_kannel(StatusCode::ACCEPTED, "0: Accepted for delivery").is_ok());
        assert!(classify_kannel(StatusCode::ACCEPTED, "3: Queued for later delivery").is_ok());
        let auth =
            classify_kannel(StatusCode::FORBIDDEN, "Authorization failed for sendsms").unwrap_err();
        assert_eq!(auth.kind, FailureKind::Permanent);
        assert!(auth.reason.contains("credentials"), "{}", auth.reason);
        let busy = classify_kannel(
            StatusCode::SERVICE_UNAVAILABLE,
            "Temporal failure, try again later.",
        )
        .unwrap_err();
        assert_eq!(
            (busy.kind, busy.status),
            (FailureKind::Transient, Some(503))
        );
        let bad = classify_kannel(StatusCode::BAD_REQUEST, "Coding field misformed, rejected")
            .unwrap_err();
        assert_eq!(bad.kind, FailureKind::Permanent);
        let odd = classify_kannel(StatusCode::OK, "<html>proxy</html>").unwrap_err();
        assert_eq!(odd.kind, FailureKind::Permanent);
    }

    #[test]
    fn twilio_codes_refine_the_failure_and_are_kept() {
        let base = DeliveryError::permanent("Twilio answered 400 Bad Request").with_status(400);
        let gone = classify_twilio(
            base.clone(),
            r#"{"code": 21211, "message": "The 'To' number +4477 is not a valid phone number.", "status": 400}"#,
        );
        assert_eq!(gone.kind, FailureKind::RecipientGone);
        assert_eq!(gone.code.as_deref(), Some("21211"));
        assert_eq!(gone.status, Some(400));
        assert!(
            gone.reason.contains("error 21211: The 'To' number"),
            "{}",
            gone.reason
        );
        for code in [21614, 21610] {
            let answer = format!(r#"{{"code": {code}, "message": "x"}}"#);
            assert_eq!(
                classify_twilio(base.clone(), &answer).kind,
                FailureKind::RecipientGone
            );
        }
        let other = classify_twilio(base.clone(), r#"{"code": 21408, "message": "region"}"#);
        assert_eq!(other.kind, FailureKind::Permanent);
        let throttled = classify_twilio(base.clone(), r#"{"code": 20429, "message": "slow"}"#);
        assert_eq!(throttled.kind, FailureKind::Throttled);
        assert_eq!(classify_twilio(base.clone(), "not json"), base);
    }
}
