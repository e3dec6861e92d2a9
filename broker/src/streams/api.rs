//! The stream API over request/reply on reserved subjects, the way NATS
//! JetStream does it. The broker intercepts every PUB to `$SB.>`:
//!
//! | subject | body | reply |
//! |---|---|---|
//! | `$SB.API.STREAM.CREATE.<stream>` | StreamConfig | StreamInfo |
//! | `$SB.API.STREAM.INFO.<stream>` | - | StreamInfo |
//! | `$SB.API.STREAM.DELETE.<stream>` | - | `{"deleted":true}` |
//! | `$SB.API.STREAM.LIST` | - | `{"streams":[StreamInfo..]}` |
//! | `$SB.API.CONSUMER.CREATE.<stream>` | ConsumerConfig | ConsumerInfo |
//! | `$SB.API.CONSUMER.INFO.<stream>.<consumer>` | - | ConsumerInfo |
//! | `$SB.API.CONSUMER.DELETE.<stream>.<consumer>` | - | `{"deleted":true}` |
//! | `$SB.API.CONSUMER.LIST.<stream>` | - | `{"consumers":[ConsumerInfo..]}` |
//! | `$SB.API.CONSUMER.NEXT.<stream>.<consumer>` | PullRequest | messages to the reply subject |
//! | `$SB.ACK.<stream>.<consumer>.<seq>.<deliveries>` | ``/`+ACK`, `-NAK`, `+WPI`, `+TERM` | `{"ok":true}` once stored, if a reply subject is given |
//!
//! Errors are `{"error": "...", "status": N}` with an HTTP-style status.

use serde::Serialize;

use super::consumer::{self, AckKind, ConsumerConfig, PullRequest};
use super::Streams;
use super::{StreamConfig, StreamError};
use crate::deliver::Delivery;

/// What the API needs of the broker: the streams, and a way to answer.
struct Ctx<'a> {
    streams: &'a Streams,
    delivery: &'a Delivery,
}

pub const API_PREFIX: &str = "$SB.API.";
pub const ACK_PREFIX: &str = "$SB.ACK.";

pub fn error_body(e: &StreamError) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": e.to_string(), "status": e.status()}))
        .expect("serialisable")
}

fn reply_with<T: Serialize>(state: &Ctx<'_>, reply: Option<&str>, r: Result<T, StreamError>) {
    let Some(reply) = reply else { return };
    let body = match r {
        Ok(v) => serde_json::to_vec(&v).expect("serialisable"),
        Err(e) => error_body(&e),
    };
    let _ = state.delivery.publish_now(reply, &[], &body);
}

fn parse<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, StreamError> {
    serde_json::from_slice(if payload.is_empty() { b"{}" } else { payload })
        .map_err(|e| StreamError::BadRequest(format!("invalid request body: {e}")))
}

/// Handles a PUB to a `$SB.` subject (never routed to subscribers).
pub(crate) fn handle(
    streams: &Streams,
    delivery: &Delivery,
    subject: &str,
    reply: Option<&str>,
    payload: &[u8],
) {
    let state = &Ctx { streams, delivery };
    if let Some(rest) = subject.strip_prefix(ACK_PREFIX) {
        let r = ack(state, rest, payload, reply);
        if let Err(e) = r {
            reply_with::<()>(state, reply, Err(e));
        }
        return;
    }
    let Some(rest) = subject.strip_prefix(API_PREFIX) else {
        reply_with::<()>(
            state,
            reply,
            Err(StreamError::BadRequest(format!(
                "unknown API subject {subject:?}"
            ))),
        );
        return;
    };
    let toks: Vec<&str> = rest.split('.').collect();
    let streams = &state.streams;
    match toks.as_slice() {
        ["STREAM", "CREATE", name] => {
            let r = parse::<serde_json::Value>(payload).and_then(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.entry("name")
                        .or_insert_with(|| serde_json::Value::String(name.to_string()));
                }
                let cfg: StreamConfig = serde_json::from_value(v).map_err(|e| {
                    StreamError::BadRequest(format!("invalid stream configuration: {e}"))
                })?;
                if cfg.name != *name {
                    return Err(StreamError::BadRequest(format!(
                        "stream name {:?} in the body does not match {name:?} in the subject",
                        cfg.name
                    )));
                }
                streams.create(cfg)
            });
            reply_with(state, reply, r)
        }
        ["STREAM", "INFO", name] => reply_with(state, reply, streams.info(name)),
        ["STREAM", "DELETE", name] => reply_with(
            state,
            reply,
            streams
                .delete(name)
                .map(|_| serde_json::json!({"deleted": true})),
        ),
        ["STREAM", "LIST"] => reply_with(
            state,
            reply,
            Ok(serde_json::json!({"streams": streams.list()})),
        ),
        ["CONSUMER", "CREATE", stream] => {
            let r = parse::<ConsumerConfig>(payload).and_then(|cfg| {
                let s = streams
                    .get(stream)
                    .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
                consumer::create(&s, cfg)
            });
            reply_with(state, reply, r)
        }
        ["CONSUMER", "INFO", stream, name] => {
            let r = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()))
                .and_then(|s| {
                    s.consumer(name)
                        .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))
                })
                .map(|c| c.info());
            reply_with(state, reply, r)
        }
        ["CONSUMER", "DELETE", stream, name] => {
            let r = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()))
                .and_then(|s| consumer::delete(&s, name))
                .map(|_| serde_json::json!({"deleted": true}));
            reply_with(state, reply, r)
        }
        ["CONSUMER", "LIST", stream] => {
            let r = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()))
                .map(|s| {
                    let mut v: Vec<_> = s
                        .consumers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .values()
                        .map(|c| c.info())
                        .collect();
                    v.sort_by(|a, b| a.name.cmp(&b.name));
                    serde_json::json!({"consumers": v})
                });
            reply_with(state, reply, r)
        }
        ["CONSUMER", "NEXT", stream, name] => {
            let Some(reply) = reply else { return };
            let r = parse::<PullRequest>(payload).and_then(|p| {
                let s = streams
                    .get(stream)
                    .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
                let c = s
                    .consumer(name)
                    .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))?;
                c.pull(reply, p);
                Ok(())
            });
            if let Err(e) = r {
                consumer::send_status(state.delivery, reply, e.status(), &e.to_string(), 0);
            }
        }
        _ => reply_with::<()>(
            state,
            reply,
            Err(StreamError::BadRequest(format!(
                "unknown API subject {subject:?}"
            ))),
        ),
    }
}

fn ack(
    state: &Ctx<'_>,
    rest: &str,
    payload: &[u8],
    reply: Option<&str>,
) -> Result<(), StreamError> {
    let mut t = rest.split('.');
    let (Some(stream), Some(name), Some(seq)) = (t.next(), t.next(), t.next()) else {
        return Err(StreamError::BadRequest("malformed ack subject".into()));
    };
    let seq: u64 = seq
        .parse()
        .map_err(|_| StreamError::BadRequest("malformed ack subject".into()))?;
    let kind = match payload {
        b"" | b"+ACK" => AckKind::Ack,
        b"-NAK" => AckKind::Nak,
        b"+WPI" => AckKind::Progress,
        b"+TERM" => AckKind::Term,
        _ => {
            return Err(StreamError::BadRequest(
                "unknown ack kind (use +ACK, -NAK, +WPI or +TERM)".into(),
            ))
        }
    };
    let s = state
        .streams
        .get(stream)
        .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
    let c = s
        .consumer(name)
        .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))?;
    c.ack(seq, kind, reply);
    Ok(())
}
