//! The durable-stream API, defined once for the broker and the SDK: the JSON
//! bodies of its requests and replies ([`stream`], [`consumer`]) and the
//! reserved `$SB.` subjects they travel on ([`subject`]). Like Iggy's
//! `binary_protocol` crate, the broker and the SDK both use these types, so
//! a field renamed on one side is renamed on the other, and the tests here
//! pin the JSON so a rename cannot slip through unnoticed by old peers.
//!
//! Plain data and validation only: what the broker does with a stream (its
//! store, its segment sizes) stays in the broker. See docs/storage.md.

pub mod consumer;
pub mod stream;
pub mod subject;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::subject::SubjectError;

pub use consumer::{
    AckKind, AckPolicy, ConsumerConfig, ConsumerInfo, ConsumerList, PullRequest, Start,
};
pub use stream::{
    Fsync, PeerInfo, PubAck, PurgeRequest, Purged, ReplacePeer, StreamCluster, StreamConfig,
    StreamInfo, StreamList, StreamListRequest, StreamState,
};

/// Header names the stream API gives a meaning to.
pub mod header {
    /// Makes a stored publish idempotent within the stream's duplicate window.
    pub const MSG_ID: &str = "Msg-Id";
    /// On a status message to a pull's inbox: an HTTP-style code (404, 408, ..).
    pub const STATUS: &str = "Sb-Status";
    /// On a status message: the code in words.
    pub const DESCRIPTION: &str = "Sb-Description";
    /// On a status message: how many messages of the pull were not delivered.
    pub const PENDING: &str = "Sb-Pending";
}

/// Longest stream or consumer name.
pub const MAX_NAME_LEN: usize = 64;

/// The body of every failed API request: `{"error":"...","status":N}`, the
/// status HTTP-style (400, 404, 409, 503). `error` is serialised first: the
/// SDK tells an error from an answer by that prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default)]
    pub status: u16,
}

/// The answer to a `DELETE` request: `{"deleted":true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// Why a stream or consumer configuration was refused. The text is what
/// users see (the broker answers it with status 400).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{kind} name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '_' or '-'")]
    Name { kind: &'static str, name: String },
    #[error("a stream needs at least one subject")]
    NoSubjects,
    #[error("{0}")]
    Subject(SubjectError),
    #[error("subject {0:?} is reserved")]
    Reserved(String),
    #[error("subject {0:?} is under _INBOX.: streams never capture reply subjects")]
    Inbox(String),
    #[error("segment_bytes must be at least {}", stream::MIN_SEGMENT_BYTES)]
    SegmentTooSmall,
    #[error("replicas must be 1, 3 or 5, not {0}")]
    Replicas(u32),
    #[error("filter subject: {0}")]
    FilterSubject(SubjectError),
}

/// Stream and consumer names: 1 to 64 letters, digits, `_` or `-`. So a
/// name is always exactly one subject token, never a wildcard. `kind` names
/// what is being named in the error ("stream", "consumer").
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ConfigError::Name {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_error_is_error_then_status_and_a_missing_status_still_parses() {
        let e = ApiError {
            error: "stream \"X\" not found".into(),
            status: 404,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"error":"stream \"X\" not found","status":404}"#);
        assert_eq!(serde_json::from_str::<ApiError>(&json).unwrap(), e);
        // The SDK recognises an error answer by this prefix.
        assert!(json.starts_with(r#"{"error""#));
        let bare: ApiError = serde_json::from_str(r#"{"error":"x"}"#).unwrap();
        assert_eq!(bare.status, 0);
    }

    #[test]
    fn a_delete_answer_is_deleted_true() {
        let json = serde_json::to_string(&Deleted { deleted: true }).unwrap();
        assert_eq!(json, r#"{"deleted":true}"#);
        assert!(serde_json::from_str::<Deleted>(&json).unwrap().deleted);
    }

    #[test]
    fn names_are_one_plain_token_of_at_most_64_bytes() {
        for ok in ["ORDERS", "a", "x_1-y", &"n".repeat(64)] {
            assert_eq!(validate_name("stream", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a.b",
            "*",
            ">",
            "a*",
            "has space",
            "tab\t",
            "é",
            &"n".repeat(65),
        ] {
            assert!(validate_name("stream", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_name("consumer", "a.b").unwrap_err().to_string(),
            r#"consumer name "a.b" must be 1 to 64 letters, digits, '_' or '-'"#
        );
    }
}
