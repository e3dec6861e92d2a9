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

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
