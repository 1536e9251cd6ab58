//! The SMTP connections of an email channel: crier opens the TCP streams itself, with
//! `TCP_NODELAY`, hands them to lettre's SMTP client, and keeps them for reuse.
//!
//! Why not lettre's own pooled transport: lettre 0.11 writes a message's body and its
//! `\r\n.\r\n` terminator as two writes on a socket with Nagle's algorithm on, so the
//! terminator waits for the server's delayed ACK (about 40 ms a message, on every
//! connection), and its pool sends a `NOOP` before every reuse, one more round trip per
//! message. Here a connection idle for longer than [`IDLE_LIMIT`] is closed instead of
//! tested, and a reused connection that turns out to be dead is replaced once, at once.

use lettre::address::Envelope;
use lettre::transport::smtp::Error;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a connection may sit unused and still be reused. Servers close idle connections
/// after minutes (Postfix after 300 s); well below that, a reused connection is alive.
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Where and how to connect.
pub struct SmtpServer {
    pub host: String,
    pub port: u16,
    /// STARTTLS when the server offers it.
    pub tls: TlsParameters,
    pub credentials: Option<Credentials>,
    pub timeout: Duration,
}

struct Idle {
    connection: AsyncSmtpConnection,
    since: Instant,
}

pub struct SmtpPool {
    server: SmtpServer,
    hello: ClientId,
    idle: Mutex<Vec<Idle>>,
    /// At most this many connections are kept (the channel's concurrency).
    keep: usize,
}

impl SmtpPool {
    pub fn new(server: SmtpServer, keep: usize) -> Self {
        Self {
            server,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// `host:port` of the server, as a failure names it.
    pub fn place(&self) -> String {
        format!("{}:{}", self.server.host, self.server.port)
    }

    /// Sends one message on a pooled connection, or a new one.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Response, SendError> {
        if let Some(mut connection) = self.take_idle() {
            match connection.send(envelope, message).await {
                Ok(response) => {
                    self.give_back(connection);
                    return Ok(response);
                }
                // A server's answer is the answer; anything else may be a connection the
                // server closed meanwhile: try once more on a fresh one.
                Err(error) if error.is_permanent() || error.is_transient() => {
                    if !connection.has_broken() {
                        self.give_back(connection);
                    }
                    return Err(SendError::Smtp(error));
                }
                Err(error) => {
                    tracing::debug!(%error, "a reused SMTP connection failed; opening a new one");
                }
            }
        }
        let mut connection = self.connect().await?;
        let result = connection.send(envelope, message).await;
        if !connection.has_broken() {
            self.give_back(connection);
        }
        result.map_err(SendError::Smtp)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(candidate) = idle.pop() {
            if candidate.since.elapsed() < IDLE_LIMIT {
                return Some(candidate.connection);
            }
            // Too old to trust; dropping it closes the socket.
        }
        None
    }

    fn give_back(&self, connection: AsyncSmtpConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let server = &self.server;
        let address = (server.host.as_str(), server.port);
        let stream = tokio::time::timeout(server.timeout, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting timed out",
                ))
            })?
            .map_err(SendError::Connect)?;
        // The point of owning the socket: no 40 ms wait for each message's terminator.
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let mut connection =
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?;
        if connection.can_starttls() {
            connection.starttls(server.tls.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &server.credentials {
            connection.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        Ok(connection)
    }
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Smtp(Error),
}

impl From<Error> for SendError {
    fn from(error: Error) -> Self {
        SendError::Smtp(error)
    }
}
