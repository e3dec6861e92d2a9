//! The stream listing and info routes: the store's own JSON (docs/http.md,
//! docs/storage.md). A publish to a captured subject is stored by the
//! delivery engine like any other (see `publish`).

use serde_json::{json, Value};

use crate::server::State;

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
