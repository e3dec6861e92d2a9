//! Where durable streams meet the HTTP gateway: a publish to a captured
//! subject is stored (per the stream's fsync policy) before the answer, which
//! is then 200 `{"stream": .., "seq": ..}`; the stream listing and info
//! routes are the store's own JSON (docs/http.md, docs/storage.md).

use bytes::Bytes;
use serde_json::{json, Value};

use crate::server::State;
use crate::streams::StreamError;

/// Where a captured message was stored.
pub struct Stored {
    pub stream: String,
    pub seq: u64,
}

/// Called by `POST /v1/publish/{subject}` before the message is routed to
/// subscribers. `Ok(None)`: no stream captures it, the answer is 204.
/// `Err(reason)`: the store refused or failed; the answer is 503
/// `{"error": reason}` and the message is not routed.
pub async fn store_if_captured(
    state: &State,
    subject: &str,
    _reply: Option<&str>,
    headers: &[u8],
    payload: &Bytes,
) -> Result<Option<Stored>, String> {
    match state.streams.publish(subject, headers, payload).await {
        Ok(a) => Ok(Some(Stored {
            stream: a.stream,
            seq: a.seq,
        })),
        Err(StreamError::NotCaptured(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// `GET /v1/streams` → `{"streams": [ {..one object per stream..} ]}`.
pub fn list(state: &State) -> Value {
    json!({ "streams": state.streams.list() })
}

/// `GET /v1/streams/{name}` → the stream's JSON, or None for 404.
pub fn info(state: &State, name: &str) -> Option<Value> {
    state
        .streams
        .info(name)
        .ok()
        .and_then(|i| serde_json::to_value(i).ok())
}
