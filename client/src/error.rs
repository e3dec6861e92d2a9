use sockbus_protocol::{ProtocolError, SubjectError};
use thiserror::Error;

/// Everything the client can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid server URL {0:?} (expected sockbus://host:port or sockbus+tls://host:port)")]
    InvalidUrl(String),
    #[error("could not connect to any server ({0})")]
    NoServers(String),
    #[error(transparent)]
    InvalidSubject(#[from] SubjectError),
    #[error("payload of {size} bytes exceeds the broker's maximum payload of {max} bytes")]
    PayloadTooLarge { size: usize, max: u32 },
    #[error("broker error {code}: {message}")]
    Server { code: u16, message: String },
    #[error("timeout")]
    Timeout,
    /// The broker refused the credentials (or their absence): ERR
    /// AUTHORIZATION_VIOLATION. Not retried.
    #[error("authorization failed")]
    Authorization(String),
    /// The user may not publish to or subscribe to `subject` (ERR
    /// PERMISSION_DENIED); the connection stays up.
    #[error("permission denied: {op} to {subject}")]
    PermissionDenied { op: String, subject: String },
    #[error("no responders")]
    NoResponders,
    #[error("connection closed")]
    Closed,
    #[error("disconnected from the broker")]
    Disconnected,
    #[error("stale connection: the broker answered none of {0} PINGs")]
    StaleConnection(u32),
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    /// TLS to the broker failed; the text says why (expired certificate,
    /// unknown CA, a port that does not speak TLS, ...).
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The typed error for an ERR the broker sent.
    pub(crate) fn from_server(code: u16, message: &str) -> Error {
        if code == sockbus_protocol::code::PERMISSION_DENIED {
            let what = message
                .strip_prefix("permission denied: ")
                .unwrap_or(message);
            if let Some((op, subject)) = what.split_once(" to ") {
                return Error::PermissionDenied {
                    op: op.to_string(),
                    subject: subject.to_string(),
                };
            }
        }
        if code == sockbus_protocol::code::AUTHORIZATION_VIOLATION {
            return Error::Authorization(message.to_string());
        }
        Error::Server {
            code,
            message: message.to_string(),
        }
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
