//! `GET /v1/subscribe/{subject}[?queue=G][&format=json]`: Server-Sent Events,
//! one event per message.
//!
//! An SSE client subscribes like a native connection: an [`Outlet`] with
//! its own bounded [`Outbox`](sockbus_protocol::outbox::Outbox) in the
//! router, so the delivery engine encodes MSG frames into it exactly as for
//! any client, and the same slow-consumer
//! policy applies (over `--max-pending` queued bytes: dropped and
//! disconnected).
//! The response body takes what is queued, decodes the frames and writes
//! them as events; hyper polls it only when the socket can take more, so a
//! client that stops reading leaves its bytes in the outbox until the budget
//! cuts it off.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Either, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use sockbus_protocol::frame::{self, iter_headers, FrameRef};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::routes::{decode_path, error, Body};
use super::{ConnCtx, Gateway};
use crate::auth::User;
use crate::deliver::{SubscribeError, Subscriber};
use crate::outlet::Outlet;
use crate::router::Subscription;

/// A comment line sent when nothing else was, so proxies keep the stream
/// open and a vanished client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Bytes of queued frames turned into one chunk of events (at least one frame).
const CHUNK_INPUT: usize = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `data:` is the payload; subject, reply and headers are extra fields.
    Raw,
    /// `data:` is one JSON object with subject, reply, headers and payload.
    Json,
}

pub(super) fn subscribe(
    gw: &Arc<Gateway>,
    ctx: &Arc<ConnCtx>,
    shutdown: &CancellationToken,
    raw_subject: &str,
    query: Option<&str>,
    user: Option<&User>,
) -> Response<Body> {
    let state = &gw.state;
    let pattern = match decode_path(raw_subject) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid subject: {e}")),
    };
    let mut queue = None;
    let mut format = Format::Raw;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = match decode_path(v) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("query {k}: {e}")),
        };
        match k {
            "queue" => {
                if v.is_empty() || v.len() > 255 || v.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid queue group name {v:?}"),
                    );
                }
                queue = Some(v.into_owned());
            }
            "format" => {
                format = match &*v {
                    "raw" => Format::Raw,
                    "json" => Format::Json,
                    other => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("unknown format {other:?} (raw or json)"),
                        )
                    }
                }
            }
            _ => {} // cache busters and the like
        }
    }

    // The connection's kill token doubles as the subscriber's abort token:
    // a slow-consumer verdict drops the HTTP connection at once, even when
    // hyper is stuck writing to a client that stopped reading.
    let account = state.accounts.of(user);
    let conn = Arc::new(account.delivery.outlet(
        state.delivery.next_id(),
        0,
        ctx.kill.clone(),
        None,
    ));
    let sub = match account.delivery.subscribe(
        &Subscriber {
            api: false,
            perms: user.and_then(|u| u.perms.as_deref()),
        },
        &conn,
        1,
        &pattern,
        queue.as_deref(),
    ) {
        Ok(s) => s,
        Err(SubscribeError::InvalidSubject(e)) => {
            return error(StatusCode::BAD_REQUEST, format!("invalid subject: {e}"))
        }
        Err(e @ SubscribeError::Denied(_)) => {
            if let Some(u) = user {
                u.denied_subscribe
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(user = %u.name, pattern = %pattern, "SSE subscription denied by permissions");
            }
            return error(StatusCode::FORBIDDEN, e.to_string());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    gw.metrics.sse_opened();
    debug!(conn = ctx.id, subscriber = conn.id, pattern = %pattern, queue = queue.as_deref().unwrap_or(""), "SSE subscription");

    let hello = Bytes::from(format!(
        ": subscribed to {pattern}{}\nretry: 2000\n\n",
        queue
            .as_deref()
            .map(|q| format!(" (queue group {q})"))
            .unwrap_or_default()
    ));
    let feed = Feed {
        guard: Guard {
            gw: gw.clone(),
            delivery: account.delivery.clone(),
            sub,
        },
        conn,
        shutdown: shutdown.clone(),
        hello: Some(hello),
        format,
        frames: BytesMut::new(),
        ending: false,
    };
    let stream = futures_util::stream::unfold(feed, |mut f| async move {
        let chunk = f.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), f))
    });
    let mut r = Response::new(Either::Right(StreamBody::new(stream).boxed()));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell buffering reverse proxies (nginx) to pass events through at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Removes the subscription when the stream ends, however it ends.
struct Guard {
    gw: Arc<Gateway>,
    /// The engine of the subscriber's account.
    delivery: crate::deliver::Delivery,
    sub: Arc<Subscription>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.delivery.unsubscribe(&self.sub);
        self.sub.outlet.outbox.close();
        self.sub.outlet.outbox.clear();
        self.gw.metrics.sse_closed();
    }
}

struct Feed {
    guard: Guard,
    conn: Arc<Outlet>,
    shutdown: CancellationToken,
    hello: Option<Bytes>,
    format: Format,
    /// MSG frames taken from the outbox and not yet sent as events.
    frames: BytesMut,
    /// Shutting down: send what is queued, then end.
    ending: bool,
}

impl Feed {
    /// The next chunk of the event stream; None ends it.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(h) = self.hello.take() {
            return Some(h);
        }
        loop {
            if self.frames.is_empty() {
                self.frames = self.conn.outbox.take().data;
            }
            if !self.frames.is_empty() {
                return Some(encode_events(
                    &self.guard.gw.state.config.node_id,
                    &mut self.frames,
                    self.format,
                ));
            }
            if self.ending || self.conn.abort.is_cancelled() {
                return None;
            }
            tokio::select! {
                _ = self.conn.notify.notified() => {}
                _ = self.conn.abort.cancelled() => return None,
                _ = self.shutdown.cancelled() => self.ending = true,
                _ = tokio::time::sleep(KEEPALIVE) => return Some(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }
}

/// Turns the first MSG frames of `frames` into SSE events and removes
/// them: whole frames, at least one, until [`CHUNK_INPUT`] bytes are used.
/// Events can be several times larger than their frames (a payload of line
/// breaks), so turning the whole outbox into one chunk could multiply a
/// subscriber's `--max-pending` in memory.
fn encode_events(node: &str, frames: &mut BytesMut, format: Format) -> Bytes {
    let mut data = &frames[..];
    let mut out = BytesMut::with_capacity(data.len().min(CHUNK_INPUT) * 3 / 2 + 64);
    while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
        if frames.len() - data.len() >= CHUNK_INPUT {
            break;
        }
        data = &data[len..];
        if let FrameRef::Msg {
            subject,
            reply,
            headers,
            payload,
            ..
        } = f
        {
            match format {
                Format::Raw => raw_event(&mut out, subject, reply, headers, payload),
                Format::Json => json_event(&mut out, subject, reply, headers, payload),
            }
        }
    }
    let used = frames.len() - data.len();
    if used == 0 {
        // Only whole frames are ever queued; anything else is a bug worth a line.
        tracing::warn!(
            node,
            bytes = data.len(),
            "SSE: undecodable bytes in a subscriber's outbox"
        );
        frames.clear();
    } else {
        frames.advance(used);
    }
    out.freeze()
}

/// Field names and values may not hold line breaks; they become spaces.
fn put_clean(out: &mut BytesMut, s: &str) {
    for b in s.bytes() {
        out.put_u8(if b == b'\n' || b == b'\r' { b' ' } else { b });
    }
}

fn put_field(out: &mut BytesMut, name: &str, value: &str) {
    put_clean(out, name);
    out.put_slice(b": ");
    put_clean(out, value);
    out.put_u8(b'\n');
}

fn raw_event(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    put_field(out, "subject", subject);
    if let Some(r) = reply {
        put_field(out, "reply", r);
    }
    for (k, v) in iter_headers(headers) {
        out.put_slice(b"header: ");
        put_field(out, k, v);
    }
    put_data(out, &String::from_utf8_lossy(payload));
    out.put_u8(b'\n');
}

/// One `data:` field per line of `text`. The event-stream format ends a
/// line at CRLF, a lone LF or a lone CR, so each of them ends a field here:
/// a payload byte can never end the field early and start another field or
/// event. Receivers join the fields with LF.
fn put_data(out: &mut BytesMut, text: &str) {
    let mut rest = text.as_bytes();
    loop {
        out.put_slice(b"data: ");
        let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
            out.put_slice(rest);
            out.put_u8(b'\n');
            return;
        };
        out.put_slice(&rest[..i]);
        out.put_u8(b'\n');
        let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
        rest = &rest[i + 1 + crlf as usize..];
    }
}

fn json_event(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    let mut m = serde_json::Map::new();
    m.insert("subject".into(), subject.into());
    if let Some(r) = reply {
        m.insert("reply".into(), r.into());
    }
    let h: serde_json::Map<String, serde_json::Value> = iter_headers(headers)
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    if !h.is_empty() {
        m.insert("headers".into(), h.into());
    }
    match std::str::from_utf8(payload) {
        Ok(s) => m.insert("data".into(), s.into()),
        Err(_) => m.insert("data_base64".into(), base64(payload).into()),
    };
    out.put_slice(b"data: ");
    // serde_json escapes control characters, so the object is one line.
    let _ = serde_json::to_writer((&mut *out).writer(), &m);
    out.put_slice(b"\n\n");
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn raw_events_split_payload_lines_and_carry_subject_and_headers() {
        let mut out = BytesMut::new();
        let mut h = Vec::new();
        frame::push_header(&mut h, "trace", "a\nb").unwrap();
        raw_event(&mut out, "a.b", Some("r.1"), &h, b"one\r\ntwo");
        assert_eq!(
            &out[..],
            b"subject: a.b\nreply: r.1\nheader: trace: a b\ndata: one\ndata: two\n\n"
        );
    }

    #[test]
    fn cr_lf_and_crlf_each_end_one_data_line_and_nothing_else_does() {
        let data = |payload: &[u8]| {
            let mut out = BytesMut::new();
            raw_event(&mut out, "a", None, &[], payload);
            String::from_utf8(out.to_vec()).unwrap()
        };
        assert_eq!(
            data(b"\rid: 7\revent: x\r\rdata: forged"),
            "subject: a\ndata: \ndata: id: 7\ndata: event: x\ndata: \ndata: data: forged\n\n"
        );
        assert_eq!(
            data(b"a\r\nb\n\rc\r"),
            "subject: a\ndata: a\ndata: b\ndata: \ndata: c\ndata: \n\n"
        );
        assert_eq!(data(b""), "subject: a\ndata: \n\n");
        assert_eq!(data(b"n\0l"), "subject: a\ndata: n\0l\n\n");
        // Whatever the payload, the only line ends are the encoder's own:
        // "data: " starts every line of the event after the subject.
        for p in [&b"\r\r\n\n\r"[..], b"\xff\r\xfe\n", b"x\r\n\r\ny"] {
            let d = data(p);
            let body = d.strip_suffix("\n\n").unwrap();
            for line in body.split(['\r', '\n']).skip(1) {
                assert!(line.starts_with("data: "), "{p:?}: {d:?}");
            }
        }
    }

    #[test]
    fn a_backlog_becomes_events_in_bounded_chunks() {
        // 64 messages of 16 KiB of line breaks: each becomes 7 times larger.
        let payload = vec![b'\r'; 16 * 1024];
        let mut frames = BytesMut::new();
        for sid in 0..64 {
            frame::encode_msg(&mut frames, sid, 0, "a", 0, None, &[], &payload);
        }
        let (mut events, mut chunks) = (0, 0);
        while !frames.is_empty() {
            let chunk = encode_events("n", &mut frames, Format::Raw);
            assert!(
                chunk.len() <= 7 * (CHUNK_INPUT + payload.len()) + 1024,
                "{} bytes",
                chunk.len()
            );
            events += chunk.windows(3).filter(|w| w == b"\n\ns").count();
            chunks += 1;
        }
        assert_eq!(events + chunks, 64, "every message once");
        assert!(chunks > 1);
        // A single message larger than a chunk still goes out whole.
        frame::encode_msg(&mut frames, 1, 0, "a", 0, None, &[], &vec![b'x'; 200_000]);
        let chunk = encode_events("n", &mut frames, Format::Raw);
        assert!(chunk.len() > 200_000 && frames.is_empty());
    }

    #[test]
    fn json_events_are_one_line() {
        let one = |payload: &[u8]| {
            let mut out = BytesMut::new();
            json_event(&mut out, "a", None, &[], payload);
            let text = std::str::from_utf8(&out).unwrap().to_string();
            let body = text
                .strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap();
            assert!(!body.contains(['\n', '\r']), "{text:?}");
            serde_json::from_str::<serde_json::Value>(body).unwrap()
        };
        assert_eq!(
            one(b"x\ny"),
            serde_json::json!({"subject": "a", "data": "x\ny"})
        );
        assert_eq!(
            one(b"\rid: 1\r\r\0"),
            serde_json::json!({"subject": "a", "data": "\rid: 1\r\r\0"})
        );
        assert_eq!(
            one(&[0xff]),
            serde_json::json!({"subject": "a", "data_base64": "/w=="})
        );
    }
}
