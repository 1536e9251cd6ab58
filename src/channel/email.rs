//! The email channel: multipart text and HTML through lettre, over SMTP or into a folder, for
//! updates and for notices (a confirmation).
//! It owns its settings (the `from` mailbox and the transport URL) and their validation.

use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::smtp_pool::{SendError, SmtpPool, SmtpServer};
use super::{Attempt, BuildContext, Channel, Notice, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy, SecretSource};
use crate::delivery::{DeliveryError, FailureKind, Receipt};
use crate::domain::{Contact, ContactKind, EmailAddress};
use crate::render::{MessageContext, Renderer};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub static KIND: ChannelKind = ChannelKind {
    name: "email",
    templates: &["email.subject", "email.txt", "email.html"],
    default_policy: DeliveryPolicy::with_concurrency(8),
    parse: EmailSettings::parse,
};

/// A channel file of kind `email`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailFile {
    /// The sender, as `Name <address>`.
    from: String,
    /// `file://DIR`, `smtp://[user@]host:port` (STARTTLS when offered) or `smtps://[user@]host:port`.
    transport: String,
    /// The environment variable holding the SMTP password, when the URL names a user.
    password_env: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EmailSettings {
    pub from: Mailbox,
    pub transport: EmailTransport,
}

#[derive(Debug, Clone)]
pub enum EmailTransport {
    /// One `.eml` per message in a folder, no outside service needed.
    File(PathBuf),
    Smtp {
        host: String,
        port: u16,
        implicit_tls: bool,
        credentials: Option<(String, SecretString)>,
    },
}

impl EmailSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let file = input.file;
        let raw: EmailFile = input.parse()?;
        let from: Mailbox = raw.from.parse().map_err(|e| {
            ConfigError::at(
                file,
                "from",
                format!("'{}' is not a mailbox: {e}", raw.from),
            )
        })?;
        let transport = parse_transport(
            file,
            input.base,
            &raw.transport,
            raw.password_env.as_deref(),
            input.secrets,
        )?;
        Ok(Arc::new(EmailSettings { from, transport }))
    }
}

#[async_trait::async_trait]
impl ChannelSettings for EmailSettings {
    fn check(&self) -> Result<(), String> {
        match &self.transport {
            EmailTransport::File(dir) => {
                crate::files::can_create_dir(dir).map_err(|reason| format!("transport: {reason}"))
            }
            EmailTransport::Smtp { .. } => Ok(()),
        }
    }

    async fn build(
        &self,
        _id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        Ok(Arc::new(EmailChannel::build(
            self,
            policy,
            context.renderer.clone(),
        )?))
    }
}

enum Sender {
    /// Writes each message as `<update>.<hash of the key>.eml`: a retry overwrites its own
    /// file instead of adding a copy.
    Folder(PathBuf),
    /// `smtp://`: crier's own connections (see `smtp_pool`), STARTTLS when offered.
    Smtp(SmtpPool),
    /// `smtps://`: lettre's pooled transport, which wraps TLS from the first byte.
    Smtps(AsyncSmtpTransport<Tokio1Executor>),
}

pub struct EmailChannel {
    from: Mailbox,
    renderer: Arc<Renderer>,
    sender: Sender,
    rendered: RenderedOnce,
}

/// Marks open with this private-use character and close with [`MARK_CLOSE`]; no template or
/// value of crier's writes either.
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';
/// How many renderings are kept: one per update and number of orders a recipient has.
const RENDERED_KEPT: usize = 32;
/// Recipients with more orders than this are rendered on their own: they are rare, and a
/// rendering per count of orders would not be shared.
const MOST_ORDERS_SHARED: usize = 8;

/// The subject, text and HTML of an update rendered once per number of orders a recipient
/// has, with marks where each recipient's contact, orders and unsubscribe link go, so a send
/// to many renders its templates a few times instead of three times per recipient.
///
/// A rendering is checked before it is used: filling it for the first recipient, and for a
/// made-up one whose values are full of characters HTML escapes, must give exactly what
/// rendering for each gives. A template that tests or transforms one of those values, or
/// prints one unescaped, fails the check, and every recipient is then rendered on its own.
#[derive(Default)]
struct RenderedOnce {
    kept: std::sync::Mutex<std::collections::VecDeque<(RenderedKey, Option<Arc<Parts>>)>>,
}

/// What a shared rendering depends on besides the recipient: the update (immutable, by id),
/// its incident's title and state as the templates see them now (a retry after the incident
/// moved on renders it as it is), and how many orders the recipient has. The links and the
/// brand are the composer's, the same for every message of the process.
type RenderedKey = (ulid::Ulid, String, String, usize);
type Parts = (String, String, String);

impl RenderedOnce {
    fn get(&self, key: &RenderedKey) -> Option<Option<Arc<Parts>>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter()
            .find(|(kept_key, _)| kept_key == key)
            .map(|(_, parts)| parts.clone())
    }

    /// Keeps a checked rendering; a failed check (`None`) replaces a passed one, never the
    /// other way round.
    fn keep(&self, key: RenderedKey, parts: Option<Arc<Parts>>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = kept.iter_mut().find(|(kept_key, _)| *kept_key == key) {
            if parts.is_none() {
                entry.1 = None;
            }
            return;
        }
        if kept.len() >= RENDERED_KEPT {
            kept.pop_front();
        }
        kept.push_back((key, parts));
    }
}

/// The mark named `name`: `\u{E000}name\u{E001}`.
fn mark(name: &str) -> String {
    format!("{MARK_OPEN}{name}{MARK_CLOSE}")
}

/// `recipient` with marks in place of its values.
fn marked(recipient: &crate::render::RecipientView) -> crate::render::RecipientView {
    crate::render::RecipientView {
        contact: mark("contact"),
        unsubscribe_url: mark("unsubscribe"),
        orders: (0..recipient.orders.len())
            .map(|index| mark(&format!("order-{index}")))
            .collect(),
    }
}

/// `marked` with the recipient's own values in place of the marks, escaped for HTML in the
/// HTML part. One pass over each part: a value is never searched for marks itself.
fn fill(marked: &Parts, recipient: &crate::render::RecipientView) -> Parts {
    let value_of = |name: &str| -> Option<&str> {
        match name {
            "contact" => Some(&recipient.contact),
            "unsubscribe" => Some(&recipient.unsubscribe_url),
            _ => {
                let index: usize = name.strip_prefix("order-")?.parse().ok()?;
                recipient.orders.get(index).map(String::as_str)
            }
        }
    };
    let fill_one = |part: &str, escape: bool| {
        let mut filled = String::with_capacity(part.len() + 256);
        let mut rest = part;
        while let Some(open) = rest.find(MARK_OPEN) {
            filled.push_str(&rest[..open]);
            let after = &rest[open + MARK_OPEN.len_utf8()..];
            let value = after
                .find(MARK_CLOSE)
                .and_then(|close| Some((value_of(&after[..close])?, close)));
            match value {
                Some((value, close)) => {
                    if escape {
                        filled.push_str(&handlebars::html_escape(value));
                    } else {
                        filled.push_str(value);
                    }
                    rest = &after[close + MARK_CLOSE.len_utf8()..];
                }
                None => {
                    filled.push(MARK_OPEN);
                    rest = after;
                }
            }
        }
        filled.push_str(rest);
        filled
    };
    (
        normalized_subject(&fill_one(&marked.0, false)),
        fill_one(&marked.1, false),
        fill_one(&marked.2, true),
    )
}

/// A recipient no one is, whose every value holds what HTML escapes: the second check of a
/// rendering.
fn made_up(orders: usize) -> crate::render::RecipientView {
    crate::render::RecipientView {
        contact: "check+'&<>\"=@example.invalid".to_owned(),
        unsubscribe_url: "https://example.invalid/unsubscribe/'&<>\"=".to_owned(),
        orders: (0..orders)
            .map(|index| format!("ORDER'&<>\"={index}"))
            .collect(),
    }
}

/// A subject on one line, its runs of white space made one space.
fn normalized_subject(subject: &str) -> String {
    subject.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn rendered_key(message: &MessageContext, orders: usize) -> RenderedKey {
    (
        message.source.update.id,
        message.incident.title.clone(),
        message.incident.state.clone(),
        orders,
    )
}

impl EmailChannel {
    pub fn build(
        settings: &EmailSettings,
        policy: &DeliveryPolicy,
        renderer: Arc<Renderer>,
    ) -> crate::Result<Self> {
        let sender = match &settings.transport {
            EmailTransport::File(dir) => {
                crate::files::create_private_dir(dir)?;
                Sender::Folder(dir.clone())
            }
            EmailTransport::Smtp {
                host,
                port,
                implicit_tls,
                credentials,
            } => {
                let tls_parameters = TlsParameters::new(host.clone())
                    .map_err(|e| crate::Error::user(format!("TLS for {host}: {e}")))?;
                let credentials = credentials.as_ref().map(|(user, password)| {
                    Credentials::new(user.clone(), password.expose_secret().to_owned())
                });
                if *implicit_tls {
                    let pool_size = u32::try_from(policy.concurrency).unwrap_or(u32::MAX);
                    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                        .port(*port)
                        .tls(Tls::Wrapper(tls_parameters))
                        .timeout(Some(policy.timeout))
                        .pool_config(PoolConfig::new().max_size(pool_size));
                    if let Some(credentials) = credentials {
                        builder = builder.credentials(credentials);
                    }
                    Sender::Smtps(builder.build())
                } else {
                    Sender::Smtp(SmtpPool::new(
                        SmtpServer {
                            host: host.clone(),
                            port: *port,
                            tls: tls_parameters,
                            credentials,
                            timeout: policy.timeout,
                        },
                        policy.concurrency,
                    ))
                }
            }
        };
        Ok(Self {
            from: settings.from.clone(),
            renderer,
            sender,
            rendered: RenderedOnce::default(),
        })
    }

    /// The subject, text and HTML for one message, from a rendering shared with the other
    /// recipients of the same update when there is one (see [`RenderedOnce`]).
    fn parts(&self, message: &MessageContext) -> Result<Parts, Rejection> {
        let Some(recipient) = &message.recipient else {
            return self.render_parts(message);
        };
        let orders = recipient.orders.len();
        if orders > MOST_ORDERS_SHARED {
            return self.render_parts(message);
        }
        let key = rendered_key(message, orders);
        match self.rendered.get(&key) {
            Some(Some(marked)) => return Ok(fill(&marked, recipient)),
            Some(None) => return self.render_parts(message),
            None => {}
        }
        let own = self.render_parts(message)?;
        let with = |recipient: crate::render::RecipientView| {
            let mut other = message.clone();
            other.recipient = Some(recipient);
            other
        };
        let shared = self
            .render_parts_unchecked(&with(marked(recipient)))
            .ok()
            .filter(|marked| fill(marked, recipient) == own)
            .filter(|marked| {
                let made_up = made_up(orders);
                self.render_parts(&with(made_up.clone()))
                    .is_ok_and(|direct| fill(marked, &made_up) == direct)
            })
            .map(Arc::new);
        if shared.is_none() {
            tracing::debug!(update = %message.source.update.id, "the email templates render per recipient");
        }
        self.rendered.keep(key, shared);
        Ok(own)
    }

    fn render_parts(&self, message: &MessageContext) -> Result<Parts, Rejection> {
        let (subject, text, html) = self.render_parts_unchecked(message)?;
        let subject = normalized_subject(&subject);
        if subject.is_empty() {
            return Err(Rejection::Invalid("the subject renders empty".into()));
        }
        Ok((subject, text, html))
    }

    /// The three templates as they render, the subject as written.
    fn render_parts_unchecked(&self, message: &MessageContext) -> Result<Parts, Rejection> {
        let render = |name| self.renderer.render(name, message);
        Ok((
            render("email.subject")?,
            render("email.txt")?,
            render("email.html")?,
        ))
    }

    /// A hash of the delivery key: the same on every retry.
    fn key_hash(attempt: &Attempt<'_>) -> String {
        let digest = Sha256::digest(attempt.key.as_str().as_bytes());
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `<{update}.{hash of the delivery key}@{sender's domain}>`: the same on every retry.
    fn message_id(&self, attempt: &Attempt<'_>) -> String {
        format!(
            "<{}.{}@{}>",
            attempt.update,
            Self::key_hash(attempt),
            self.from.email.domain()
        )
    }

    fn build_message(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Message, DeliveryError> {
        let recipient = message
            .recipient
            .as_ref()
            .ok_or_else(|| DeliveryError::permanent("an email needs a recipient"))?;
        let to = EmailAddress::parse(&recipient.contact)
            .map_err(|e| DeliveryError::new(FailureKind::RecipientGone, e.to_string()))?;
        let (subject, text, html) = self
            .parts(message)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let header = |name: &'static str, value: String| {
            HeaderValue::new(HeaderName::new_from_ascii_str(name), value)
        };
        Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.address().clone()))
            .subject(subject)
            .message_id(Some(self.message_id(attempt)))
            .raw_header(header(
                "List-Unsubscribe",
                format!("<{}>", recipient.unsubscribe_url),
            ))
            .raw_header(header(
                "List-Unsubscribe-Post",
                "List-Unsubscribe=One-Click".into(),
            ))
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| DeliveryError::permanent(format!("cannot build the message: {e}")))
    }
}

/// The server's queue id, when its answer carries one ("250 2.0.0 Ok: queued as X").
fn receipt_of(response: &lettre::transport::smtp::response::Response) -> Receipt {
    let provider_id = response
        .message()
        .last()
        .and_then(|line| line.rsplit_once("queued as "))
        .map(|(_, id)| id.trim().to_owned());
    Receipt {
        provider_id,
        thread: None,
    }
}

fn classify_smtp(error: lettre::transport::smtp::Error) -> DeliveryError {
    let status = error
        .status()
        .and_then(|code| code.to_string().parse::<u16>().ok());
    let failure = if error.is_permanent() {
        DeliveryError::permanent(format!("the SMTP server refused it: {error}"))
    } else if error.is_transient() || error.is_timeout() {
        DeliveryError::transient(format!("the SMTP server deferred it: {error}"))
    } else if error.is_client() {
        // lettre refused before sending: no common AUTH mechanism, no STARTTLS where TLS is
        // required, an address the server cannot take. Retrying changes nothing.
        DeliveryError::permanent(format!(
            "the SMTP server cannot take this message as configured: {error}"
        ))
    } else {
        // Connection refused, reset or TLS trouble: the server may well be back soon.
        DeliveryError::transient(format!("SMTP failed: {error}"))
    };
    match status {
        Some(status) => failure.with_status(status),
        None => failure,
    }
}

#[async_trait::async_trait]
impl Channel for EmailChannel {
    fn reach(&self) -> Reach {
        Reach::Subscribers(ContactKind::Email)
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        // A preview renders directly: each draft is an update of its own, so a shared
        // rendering of it would never be used again.
        let (subject, text, html) = self.render_parts(message)?;
        Ok(vec![
            RenderedPart {
                part: "subject".into(),
                text: subject,
                format: PartFormat::Text,
            },
            RenderedPart {
                part: "text".into(),
                text,
                format: PartFormat::Text,
            },
            RenderedPart {
                part: "html".into(),
                text: html,
                format: PartFormat::Html,
            },
        ])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let email = self.build_message(message, attempt)?;
        let file = format!("{}.{}.eml", attempt.update, Self::key_hash(attempt));
        self.send(email, file).await
    }

    async fn notify(&self, contact: &Contact, notice: &Notice) -> Result<Receipt, DeliveryError> {
        let Contact::Email(to) = contact else {
            return Err(DeliveryError::permanent("an email needs an email address"));
        };
        let subject = notice
            .subject
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if subject.is_empty() {
            return Err(DeliveryError::permanent("the subject renders empty"));
        }
        let id = ulid::Ulid::new();
        let email = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.address().clone()))
            .subject(subject)
            .message_id(Some(format!("<notice.{id}@{}>", self.from.email.domain())))
            .multipart(MultiPart::alternative_plain_html(
                notice.text.clone(),
                notice.html.clone(),
            ))
            .map_err(|e| DeliveryError::permanent(format!("cannot build the message: {e}")))?;
        self.send(email, format!("notice.{id}.eml")).await
    }
}

impl EmailChannel {
    /// Sends one built message: into the folder as `file`, or to the SMTP server.
    async fn send(&self, email: Message, file: String) -> Result<Receipt, DeliveryError> {
        match &self.sender {
            Sender::Folder(dir) => {
                let path = dir.join(file);
                let bytes = email.formatted();
                tokio::task::spawn_blocking(move || crate::files::write_private(&path, &bytes))
                    .await
                    .map_err(|e| DeliveryError::transient(e.to_string()))?
                    .map_err(|e| {
                        DeliveryError::transient(format!("cannot write the email: {e}"))
                    })?;
                Ok(Receipt::none())
            }
            Sender::Smtp(pool) => {
                let response = pool
                    .send(email.envelope(), &email.formatted())
                    .await
                    .map_err(|error| match error {
                        SendError::Smtp(error) => classify_smtp(error),
                        SendError::Connect(error) => DeliveryError::transient(
                            super::network::unreachable(&pool.place(), &error),
                        ),
                    })?;
                Ok(receipt_of(&response))
            }
            Sender::Smtps(transport) => {
                let response = transport.send(email).await.map_err(classify_smtp)?;
                Ok(receipt_of(&response))
            }
        }
    }
}

fn parse_transport(
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
            config::secret(file, "password_env", variable, secrets)?,
        )),
    };
    Ok(EmailTransport::Smtp {
        host,
        port,
        implicit_tls,
        credentials,
    })
}
