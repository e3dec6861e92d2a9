//! `GET /v1/subscribe/{subject}[?queue=G][&format=json]`: Server-Sent Events,
//! one event per message.
//!
//! An SSE client subscribes like a native connection: an [`Outlet`] with
//! its own bounded [`Outbox`] in the router, so the delivery engine encodes
//! MSG frames into it exactly as for any client, and the same slow-consumer
//! policy applies (over `--max-pending` queued bytes: dropped and
//! disconnected).
//! The response body takes what is queued, decodes the frames and writes
//! them as events; hyper polls it only when the socket can take more, so a
//! client that stops reading leaves its bytes in the outbox until the budget
//! cuts it off.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Either, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use sockbus_protocol::frame::{self, iter_headers, FrameRef};
use sockbus_protocol::outbox::Outbox;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::routes::{decode_path, error, Body};
use super::{ConnCtx, Gateway};
use crate::deliver::SubscribeError;
use crate::outlet::Outlet;
use crate::router::Subscription;
use crate::server::State;

/// A comment line sent when nothing else was, so proxies keep the stream
/// open and a vanished client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

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
    let conn = Arc::new(Outlet::new(
        state.delivery.next_id(),
        Outbox::new(state.config.max_pending, 0),
        ctx.kill.clone(),
        None,
    ));
    let sub = match state
        .delivery
        .subscribe(&conn, 1, &pattern, queue.as_deref())
    {
        Ok(s) => s,
        Err(SubscribeError::InvalidSubject(e)) => {
            return error(StatusCode::BAD_REQUEST, format!("invalid subject: {e}"))
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
            sub,
        },
        conn,
        shutdown: shutdown.clone(),
        hello: Some(hello),
        format,
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
    sub: Arc<Subscription>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.gw.state.delivery.unsubscribe(&self.sub);
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
            let t = self.conn.outbox.take();
            if !t.data.is_empty() {
                return Some(encode_events(&self.guard.gw.state, &t.data, self.format));
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

/// Turns a run of MSG frames into SSE events.
fn encode_events(state: &State, mut data: &[u8], format: Format) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + data.len() / 2 + 64);
    while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
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
    if !data.is_empty() {
        // Only whole frames are ever queued; anything else is a bug worth a line.
        tracing::warn!(
            node = %state.config.node_id,
            bytes = data.len(),
            "SSE: undecodable bytes in a subscriber's outbox"
        );
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
    let text = String::from_utf8_lossy(payload);
    // Each line of the payload is one data field; receivers join them with "\n".
    for line in text.split('\n') {
        out.put_slice(b"data: ");
        out.put_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
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
            assert!(!body.contains('\n'), "{text:?}");
            serde_json::from_str::<serde_json::Value>(body).unwrap()
        };
        assert_eq!(
            one(b"x\ny"),
            serde_json::json!({"subject": "a", "data": "x\ny"})
        );
        assert_eq!(
            one(&[0xff]),
            serde_json::json!({"subject": "a", "data_base64": "/w=="})
        );
    }
}
