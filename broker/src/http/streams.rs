//! The stream listing and info routes: the store's own JSON (docs/http.md,
//! docs/storage.md). A publish to a captured subject is stored by the
//! delivery engine like any other (see `publish`).

use serde_json::{json, Value};

use crate::auth::User;
use crate::server::State;

/// `GET /v1/streams` → `{"streams": [ {..one object per stream..} ]}`: the
/// streams of the user's account.
pub fn list(state: &State, user: Option<&User>) -> Value {
    json!({ "streams": state.accounts.of(user).streams.list() })
}

/// `GET /v1/streams/{name}` → the stream's JSON, or None for 404.
pub fn info(state: &State, user: Option<&User>, name: &str) -> Option<Value> {
    state
        .accounts
        .of(user)
        .streams
        .info(name)
        .ok()
        .and_then(|i| serde_json::to_value(i).ok())
}
