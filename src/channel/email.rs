//! The email channel: multipart text and HTML through lettre, over SMTP or into a folder.

use super::{Channel, DeliveryError, Reach, RejectError, RenderedPart};
use crate::config::{DeliveryPolicy, EmailSettings, EmailTransport};
use crate::domain::{ContactKind, EmailAddress};
use crate::render::{MessageContext, Renderer};
use crate::store::DeliveryRecord;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub const TEMPLATES: &[&str] = &["email.subject", "email.txt", "email.html"];

enum Sender {
    File(AsyncFileTransport<Tokio1Executor>),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

pub struct EmailChannel {
    name: String,
    from: Mailbox,
    policy: DeliveryPolicy,
    renderer: Arc<Renderer>,
    sender: Sender,
}

impl EmailChannel {
    pub fn build(
        name: &str,
        settings: &EmailSettings,
        policy: DeliveryPolicy,
        renderer: Arc<Renderer>,
    ) -> anyhow::Result<Self> {
        let sender = match &settings.transport {
            EmailTransport::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("channel {name}: cannot create {}: {e}", dir.display())
                })?;
                Sender::File(AsyncFileTransport::new(dir))
            }
            EmailTransport::Smtp {
                host,
                port,
                implicit_tls,
                credentials,
            } => {
                let tls_parameters = TlsParameters::new(host.clone())?;
                let tls = if *implicit_tls {
                    Tls::Wrapper(tls_parameters)
                } else {
                    Tls::Opportunistic(tls_parameters)
                };
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(*port)
                    .tls(tls)
                    .timeout(Some(policy.timeout))
                    .pool_config(PoolConfig::new().max_size(policy.concurrency as u32));
                if let Some((user, password)) = credentials {
                    builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
                }
                Sender::Smtp(builder.build())
            }
        };
        Ok(Self {
            name: name.to_owned(),
            from: settings.from.clone(),
            policy,
            renderer,
            sender,
        })
    }

    fn render_error(&self, source: crate::render::RenderError) -> RejectError {
        RejectError::Render {
            channel: self.name.clone(),
            source,
        }
    }

    fn parts(&self, message: &MessageContext) -> Result<(String, String, String), RejectError> {
        let render = |name| {
            self.renderer
                .render(name, message)
                .map_err(|e| self.render_error(e))
        };
        let subject = render("email.subject")?;
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        if subject.is_empty() {
            return Err(RejectError::OverLimit {
                channel: self.name.clone(),
                reason: "the subject renders empty".into(),
            });
        }
        Ok((subject, render("email.txt")?, render("email.html")?))
    }

    /// `<{update}.{hash of the delivery key}@{sender's domain}>`: the same on every retry.
    fn message_id(&self, delivery: &DeliveryRecord) -> String {
        let digest = Sha256::digest(delivery.key().as_bytes());
        let hash: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("<{}.{hash}@{}>", delivery.update, self.from.email.domain())
    }

    fn build_message(
        &self,
        message: &MessageContext,
        delivery: &DeliveryRecord,
    ) -> Result<Message, DeliveryError> {
        let recipient = message
            .recipient
            .as_ref()
            .ok_or_else(|| DeliveryError::permanent("an email needs a recipient"))?;
        let to = EmailAddress::parse(&recipient.contact)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
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
            .message_id(Some(self.message_id(delivery)))
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

fn classify_smtp(error: lettre::transport::smtp::Error) -> DeliveryError {
    if error.is_permanent() {
        DeliveryError::permanent(format!("the SMTP server refused it: {error}"))
    } else if error.is_transient() || error.is_timeout() {
        DeliveryError::transient(format!("the SMTP server deferred it: {error}"))
    } else {
        // Connection refused, reset or TLS trouble: the server may well be back soon.
        DeliveryError::transient(format!("SMTP failed: {error}"))
    }
}

#[async_trait::async_trait]
impl Channel for EmailChannel {
    fn name(&self) -> &str {
        &self.name
    }

    fn reach(&self) -> Reach {
        Reach::Subscribers(ContactKind::Email)
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, RejectError> {
        let (subject, text, html) = self.parts(message)?;
        Ok(vec![
            RenderedPart {
                part: "subject".into(),
                text: subject,
            },
            RenderedPart {
                part: "text".into(),
                text,
            },
            RenderedPart {
                part: "html".into(),
                text: html,
            },
        ])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        delivery: &DeliveryRecord,
    ) -> Result<(), DeliveryError> {
        let email = self.build_message(message, delivery)?;
        match &self.sender {
            Sender::File(transport) => transport
                .send(email)
                .await
                .map(|_| ())
                .map_err(|e| DeliveryError::transient(format!("cannot write the email: {e}"))),
            Sender::Smtp(transport) => transport
                .send(email)
                .await
                .map(|_| ())
                .map_err(classify_smtp),
        }
    }
}
