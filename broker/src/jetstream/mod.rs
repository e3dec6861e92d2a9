//! JetStream on the NATS port, mapped onto sockbus's own streams
//! (docs/nats.md, "JetStream"). A NATS client's `$JS.API.…` requests and
//! `$JS.ACK.…` acks reach the delivery engine like any publish, so they
//! pass the same permission checks, and each account's engine answers with
//! that account's streams only. There is one set of streams and consumers:
//! a stream created here is the stream `sockbus stream ls` lists, and a
//! consumer created here is a sockbus consumer whose deliveries carry
//! JetStream's ack subjects.
//!
//! This module translates: JetStream's JSON (configurations in
//! nanoseconds, `-1` for "no limit", `type` fields, `error` objects with
//! the `err_code`s clients test) to and from the stream API's types
//! (`sockbus_protocol::api`), and the ack subject
//! `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`.
//! The streams, their writers and consumers do the work (crate::streams).

mod api;
mod config;
mod push;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sockbus_protocol::frame::push_header;

use crate::deliver::Delivery;
use crate::streams::consumer::Consumer;
use crate::streams::{PubAck, StreamError, Streams};

pub(crate) use api::handle;

/// JetStream's subjects: `$JS.API.…` requests, `$JS.ACK.…` acks,
/// `$JS.FC.…` flow-control replies.
#[inline]
pub(crate) fn is_js(subject: &str) -> bool {
    subject.starts_with("$JS.")
}

const ACK_PREFIX: &str = "$JS.ACK.";

/// A JetStream API error: `{"code":404,"err_code":10059,"description":"stream not found"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsError {
    pub code: u16,
    pub err_code: u32,
    pub description: String,
}

impl JsError {
    pub fn new(code: u16, err_code: u32, description: impl Into<String>) -> JsError {
        JsError {
            code,
            err_code,
            description: description.into(),
        }
    }

    pub fn bad_request(d: impl Into<String>) -> JsError {
        JsError::new(400, 10003, d)
    }

    pub fn stream_not_found() -> JsError {
        JsError::new(404, 10059, "stream not found")
    }

    pub fn consumer_not_found() -> JsError {
        JsError::new(404, 10014, "consumer not found")
    }

    /// A setting sockbus does not implement, named.
    pub fn unsupported(what: impl std::fmt::Display) -> JsError {
        JsError::new(400, 10052, format!("not supported by sockbus: {what}"))
    }

    pub fn json(&self) -> Value {
        json!({
            "code": self.code,
            "err_code": self.err_code,
            "description": self.description,
        })
    }
}

impl From<StreamError> for JsError {
    fn from(e: StreamError) -> JsError {
        let text = e.to_string();
        match e {
            StreamError::NotFound(_) | StreamError::Deleted(_) => JsError::stream_not_found(),
            StreamError::ConsumerNotFound(_) => JsError::consumer_not_found(),
            StreamError::Exists(_) => JsError::new(
                400,
                10058,
                "stream name already in use with a different configuration",
            ),
            StreamError::Expected { err_code, text } => JsError::new(400, err_code, text),
            StreamError::TooMany { .. } | StreamError::AccountTooMany { .. } => JsError::new(
                400,
                10027,
                format!("maximum number of streams reached: {text}"),
            ),
            StreamError::AccountFull { .. } => {
                JsError::new(503, 10023, format!("insufficient resources: {text}"))
            }
            StreamError::Storage { .. } => JsError::new(500, 10077, text),
            StreamError::AnswerTooLarge { .. } => JsError::bad_request(text),
            StreamError::BadRequest(t) if t.contains(" overlaps ") => JsError::new(
                400,
                10065,
                format!("subjects overlap with an existing stream: {t}"),
            ),
            StreamError::Unchangeable("replicas") => {
                JsError::new(400, 10061, "Replicas configuration can not be updated")
            }
            // nats-server's words and code for an update it refuses.
            StreamError::Unchangeable(_) => JsError::new(500, 10052, text),
            StreamError::Unsupported(t) => JsError::unsupported(t),
            StreamError::BadRequest(t) => JsError::bad_request(t),
        }
    }
}

/// The answer to a NATS publish a stream stored (or refused): JetStream's
/// PubAck, `{"stream":"S","seq":5}` (plus `"duplicate":true`), or
/// `{"error":{...}}`.
pub(crate) fn pub_ack_body(r: &Result<PubAck, StreamError>) -> Vec<u8> {
    let v = match r {
        Ok(a) if a.duplicate => json!({"stream": a.stream, "seq": a.seq, "duplicate": true}),
        Ok(a) => json!({"stream": a.stream, "seq": a.seq}),
        Err(e) => json!({"error": JsError::from(e.clone()).json()}),
    };
    serde_json::to_vec(&v).expect("serialisable")
}

/// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
pub(crate) fn ack_subject(
    stream: &str,
    consumer: &str,
    delivered: u32,
    sseq: u64,
    cseq: u64,
    ts: u64,
    pending: u64,
) -> String {
    format!("{ACK_PREFIX}{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}")
}

/// The parts of an ack subject the broker needs: stream, consumer, stream
/// sequence. Reads the short form above and the long one with a domain
/// and an account hash in front (`$JS.ACK.<domain>.<hash>.<stream>...`).
fn parse_ack(subject: &str) -> Option<(&str, &str, u64)> {
    let rest = subject.strip_prefix(ACK_PREFIX)?;
    let t: Vec<&str> = rest.split('.').collect();
    let base = match t.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let sseq = t[base + 3].parse().ok()?;
    Some((t[base], t[base + 1], sseq))
}

/// A JetStream status message to a pull's inbox: the NATS port writes
/// `Sb-Status`/`Sb-Description` as the status line (`NATS/1.0 408 Request
/// Timeout`), then `Nats-Pending-Messages`/`-Bytes`.
pub(crate) fn send_status(d: &Delivery, reply: &str, code: u16, pending: usize, bytes: usize) {
    let text = match code {
        100 => "Idle Heartbeat",
        404 => "No Messages",
        408 => "Request Timeout",
        409 => "Consumer Deleted",
        400 => "Bad Request",
        _ => "",
    };
    status(d, reply, code, text, pending, bytes)
}

fn status(d: &Delivery, reply: &str, code: u16, text: &str, pending: usize, bytes: usize) {
    let mut h = Vec::new();
    let _ = push_header(&mut h, "Sb-Status", &code.to_string());
    if !text.is_empty() {
        let _ = push_header(&mut h, "Sb-Description", text);
    }
    if code != 100 && code != 503 {
        let _ = push_header(&mut h, "Nats-Pending-Messages", &pending.to_string());
        let _ = push_header(
            &mut h,
            "Nats-Pending-Bytes",
            &bytes.min(i64::MAX as usize).to_string(),
        );
    }
    let _ = d.publish_now(reply, &h, &[]);
}

/// Called for every consumer that starts (created, or loaded at start-up):
/// one with a JetStream `deliver_subject` is a push consumer, driven here.
pub(crate) fn started(c: &Arc<Consumer>) {
    if let Some(cfg) = &c.nats {
        if let Some(subject) = cfg.get("deliver_subject").and_then(Value::as_str) {
            let hb = cfg
                .get("idle_heartbeat")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .map(Duration::from_nanos);
            push::spawn(c.clone(), subject.to_string(), hb);
        }
    }
}

/// Streams of the requester's account, for the API.
pub(crate) struct Ctx<'a> {
    pub streams: &'a Arc<Streams>,
    pub delivery: &'a Delivery,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_are_read_in_the_short_and_the_domain_form() {
        let s = ack_subject("ORDERS", "w", 2, 42, 7, 1_700_000_000_000_000_000, 3);
        assert_eq!(s, "$JS.ACK.ORDERS.w.2.42.7.1700000000000000000.3");
        assert_eq!(parse_ack(&s), Some(("ORDERS", "w", 42)));
        assert_eq!(
            parse_ack("$JS.ACK.hub.ACCHASH.ORDERS.w.2.42.7.1700000000000000000.3.tok"),
            Some(("ORDERS", "w", 42))
        );
        for bad in [
            "$JS.ACK.ORDERS.w.2",
            "$JS.ACK.ORDERS.w.2.x.7.1.3",
            "$SB.ACK.S.c.1.1",
        ] {
            assert_eq!(parse_ack(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_pub_ack_has_jetstreams_shape_with_its_error_codes() {
        let ok = pub_ack_body(&Ok(PubAck {
            stream: "S".into(),
            seq: 4,
            duplicate: true,
        }));
        assert_eq!(ok, br#"{"duplicate":true,"seq":4,"stream":"S"}"#.to_vec());
        let e = pub_ack_body(&Err(StreamError::Expected {
            err_code: 10071,
            text: "wrong last sequence: 3".into(),
        }));
        let v: Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": 400, "err_code": 10071, "description": "wrong last sequence: 3"}})
        );
    }
}
