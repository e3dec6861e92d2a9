//! `POST /v1/publish/{subject}`: the body is the payload. Request headers
//! named `Sockbus-Header-<Name>` become message headers `<name>`, and
//! `Sockbus-Reply` sets the reply subject (docs/http.md).
//!
//! The message goes through the delivery engine like any publish: checked,
//! routed, and stored when a stream captures its subject (the answer is then
//! 200 `{"stream":..,"seq":..}` once stored, per the stream's fsync policy).
//! The path is kept cheap: the connection's own batch and match cache (no
//! router lock on a hit), a body of one chunk used as is, counters added
//! once per request, no allocation beyond what hyper makes for the request.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use sockbus_protocol::frame::push_header;
use sockbus_protocol::subject::validate_subject;
use tokio::sync::oneshot;

use super::routes::{decode_path, error, json, Body};
use super::{ConnCtx, Gateway};
use crate::auth::User;
use crate::deliver::{Ack, PublishError, Publisher};

/// Request headers with this prefix (any case) are carried as message headers.
pub const HEADER_PREFIX: &str = "sockbus-header-";
/// Request header giving the message's reply subject.
pub const REPLY_HEADER: &str = "sockbus-reply";

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

pub(super) async fn publish(
    gw: &Arc<Gateway>,
    ctx: &Arc<ConnCtx>,
    parts: &Parts,
    raw_subject: &str,
    body: Incoming,
    user: Option<&User>,
) -> Response<Body> {
    let state = &gw.state;
    let subject = match decode_path(raw_subject) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid subject: {e}")),
    };
    if let Err(e) = validate_subject(&subject) {
        return error(StatusCode::BAD_REQUEST, format!("invalid subject: {e}"));
    }
    if let Some(u) = user {
        if !u
            .perms
            .as_ref()
            .is_none_or(|p| p.publish.allows_subject(&subject))
        {
            u.denied_publish
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(user = %u.name, subject = %subject, "HTTP publish denied by permissions");
            return error(
                StatusCode::FORBIDDEN,
                format!("permission denied: publish to {subject}"),
            );
        }
    }
    let mut reply = None;
    let mut headers = Vec::new();
    for (name, value) in &parts.headers {
        let name = name.as_str();
        if name == REPLY_HEADER {
            let r = match std::str::from_utf8(value.as_bytes()) {
                Ok(r) => r,
                Err(_) => return error(StatusCode::BAD_REQUEST, "Sockbus-Reply is not UTF-8"),
            };
            if let Err(e) = validate_subject(r) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid reply subject: {e}"),
                );
            }
            reply = Some(r);
        } else if let Some(key) = name.strip_prefix(HEADER_PREFIX) {
            let Ok(v) = std::str::from_utf8(value.as_bytes()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("header {name} is not UTF-8"),
                );
            };
            if key.is_empty() {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{HEADER_PREFIX}<name> needs a name"),
                );
            }
            if let Err(e) = push_header(&mut headers, key, v) {
                return error(StatusCode::BAD_REQUEST, format!("header {name}: {e}"));
            }
        }
    }

    let max = state.config.max_payload as usize;
    let too_large = |size: String| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("message of {size} bytes exceeds the maximum payload of {max} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > max as u64) {
        // Refused before reading: hyper closes the connection instead of
        // draining a body we do not want.
        return too_large(n.to_string());
    }
    let timeout = state.config.http_body_timeout;
    let payload = match tokio::time::timeout(timeout, read_body(body, max)).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::TooLarge)) => return too_large(format!("more than {max}")),
        Ok(Err(BodyError::Read(e))) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
        Err(_) => {
            gw.metrics.body_timeout();
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    fmt_duration(timeout)
                ),
            );
        }
    };

    // Routed at once; when a stream captures the subject, the answer waits
    // until the message is stored as the stream's fsync policy says.
    let (tx, rx) = oneshot::channel();
    let from = Publisher {
        id: ctx.id,
        echo: true,
        no_responders: false,
        api: false,
        explicit_acks: true,
    };
    let (published, backlog) = {
        let mut guard = ctx.local.lock().unwrap_or_else(|p| p.into_inner());
        // Each request authenticates on its own: a connection whose user
        // changes account gets a batch of the new account's.
        let account = state.accounts.of(user);
        if guard.account != account.name() {
            guard.batch.close();
            guard.batch = account
                .delivery
                .ingress(&account.streams, super::CONN_MATCH_CACHE);
            guard.account = account.name().to_string();
        }
        let batch = &mut guard.batch;
        let r = batch.publish(&from, &subject, reply, &headers, &payload, Ack::Chan(tx));
        batch.finish();
        (r, batch.backlogged())
    };
    let published = match published {
        Ok(p) => p,
        Err(e @ PublishError::PayloadTooLarge { .. }) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(s) = backlog {
        // The stream's writer is behind: this connection waits before its next request.
        s.wait_space().await;
    }
    if !published.stored {
        let mut r = Response::new(Body::Left(Default::default()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        return r;
    }
    match rx.await {
        Ok(Ok(a)) => json(
            StatusCode::OK,
            &serde_json::json!({"stream": a.stream, "seq": a.seq}),
        ),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the stream was deleted before the message was stored".to_string(),
        ),
    }
}

/// Reads the whole body, at most `max` bytes. A body that arrives in one
/// chunk (the usual case for small messages) is used without a copy.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > max {
            return Err(BodyError::TooLarge);
        }
        if first.is_none() && more.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                more.extend_from_slice(&f);
            }
            more.extend_from_slice(&data);
        }
    }
    Ok(first.unwrap_or_else(|| more.freeze()))
}

pub(super) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
