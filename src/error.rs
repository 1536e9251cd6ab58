//! Errors classified once: every typed error of the library says what kind of failure it is,
//! and the CLI's exit codes and the web server's HTTP statuses both map from that kind.

use std::fmt;

/// What kind of failure an error is, whoever reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A mistake in the input or the configuration: the message says what to change.
    User,
    /// The thing asked for does not exist.
    NotFound,
    /// It clashes with something else going on (the store is in use, a key was reused).
    Conflict,
    /// Something crier needs is not available right now (a full disk, a closed database).
    Unavailable,
    /// crier itself failed.
    Internal,
}

impl ErrorKind {
    /// The CLI's exit code: 1 for whatever the user can fix, 2 for the rest.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::User | ErrorKind::NotFound | ErrorKind::Conflict => 1,
            ErrorKind::Unavailable | ErrorKind::Internal => 2,
        }
    }

    /// The kind of failure an HTTP status reports, for errors a server sent back.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            400..=499 => ErrorKind::User,
            502..=504 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    /// The HTTP status the web server answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::User => 422,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// Any failure of a crier operation, with its kind. Typed errors convert into it with their
/// own kind; anything else (`anyhow` at the edges) is internal unless said otherwise.
pub struct Error {
    kind: ErrorKind,
    inner: anyhow::Error,
}

impl Error {
    pub fn new(kind: ErrorKind, inner: impl Into<anyhow::Error>) -> Self {
        Self {
            kind,
            inner: inner.into(),
        }
    }

    /// A mistake in what the user asked for, in their words.
    pub fn user(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::User, anyhow::anyhow!("{message}"))
    }

    pub fn internal(inner: impl Into<anyhow::Error>) -> Self {
        Self::new(ErrorKind::Internal, inner)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether writing to a closed pipe caused it.
    pub fn is_broken_pipe(&self) -> bool {
        self.inner.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        })
    }

    /// The same error with a note in front saying what was being done.
    pub fn context(self, note: impl fmt::Display + Send + Sync + 'static) -> Self {
        Self {
            kind: self.kind,
            inner: self.inner.context(note),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every cause on one line: "cannot read x: permission denied".
        write!(f, "{:#}", self.inner)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} error: {:#}", self.kind, self.inner)
    }
}

impl From<anyhow::Error> for Error {
    fn from(inner: anyhow::Error) -> Self {
        Self::internal(inner)
    }
}

impl From<std::io::Error> for Error {
    fn from(inner: std::io::Error) -> Self {
        Self::internal(inner)
    }
}

impl From<serde_json::Error> for Error {
    fn from(inner: serde_json::Error) -> Self {
        Self::internal(inner)
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(inner: tokio::task::JoinError) -> Self {
        Self::internal(inner)
    }
}

/// Typed errors and their kinds: the one list, checked by the compiler.
macro_rules! classified {
    ($($error:ty => |$e:ident| $kind:expr;)*) => {$(
        impl From<$error> for Error {
            fn from($e: $error) -> Self {
                let kind = $kind;
                Self::new(kind, $e)
            }
        }
    )*};
}

classified! {
    crate::store::StoreError => |e| e.kind();
    crate::config::ConfigError => |_e| ErrorKind::User;
    crate::domain::DomainError => |_e| ErrorKind::User;
    crate::domain::token::TokenError => |_e| ErrorKind::User;
    crate::channel::RejectError => |_e| ErrorKind::User;
    crate::render::RenderError => |_e| ErrorKind::User;
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
