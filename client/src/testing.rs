//! Unit-test helpers: a client with no connection, whose outbox the test
//! reads as the broker would, and frames as bytes.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use sockbus_protocol::frame::encode_credit;
use sockbus_protocol::Frame;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::client::{Client, Inner};
use crate::message::Message;
use crate::options::ConnectOptions;
use crate::subscriber::Subscriber;

/// A client that is not connected: what it sends stays in its outbox.
pub(crate) fn offline_client(opts: ConnectOptions) -> Client {
    Client::new(Arc::new(Inner::new(opts, vec!["127.0.0.1:7420".into()])))
}

pub(crate) fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut b = Vec::new();
    for f in frames {
        f.encode(&mut b).expect("a test frame encodes");
    }
    b
}

/// Every whole frame in `b`.
pub(crate) fn decode_all(mut b: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some((f, len)) =
        sockbus_protocol::decode(b, u32::MAX).expect("the client's frames decode")
    {
        out.push(Frame::from(f));
        b = &b[len..];
    }
    assert!(b.is_empty(), "a partial frame in the outbox");
    out
}

/// Takes what the client would write to the broker now (a credit grant as
/// the CREDIT frame the writer puts before the data).
pub(crate) fn take_sent(inner: &Inner) -> Vec<Frame> {
    let Some(mut t) = inner.outbox.claim() else {
        return Vec::new();
    };
    let mut b = BytesMut::new();
    b.extend_from_slice(&t.front);
    if t.grant > 0 {
        encode_credit(&mut b, t.grant);
    }
    b.extend_from_slice(&t.data);
    t.front = Bytes::new();
    t.grant = 0;
    t.data.clear();
    inner.outbox.release(t);
    decode_all(&b)
}

/// A MSG frame without reply or headers.
pub(crate) fn msg(sid: u32, subject: &str, payload: &str) -> Frame {
    Frame::Msg {
        sid,
        flags: 0,
        subject: subject.into(),
        reply: None,
        headers: Vec::new(),
        payload: payload.into(),
    }
}

/// Subscribes and returns the subscription id the client sent the broker.
pub(crate) async fn subscribe(client: &Client, subject: &str) -> (Subscriber, u32) {
    let sub = client.subscribe(subject).await.expect("subscribe");
    let sid = take_sent(&client.inner)
        .into_iter()
        .find_map(|f| match f {
            Frame::Sub {
                sid, subject: s, ..
            } if s == subject => Some(sid),
            _ => None,
        })
        .expect("a SUB frame was queued");
    (sub, sid)
}

/// The subscription's next message if one is already there: `None` when it
/// would wait, `Some(None)` when its stream has ended. (Outside tokio's
/// task budget, which would otherwise make a long test's receive wait.)
pub(crate) fn ready(sub: &mut Subscriber) -> Option<Option<Message>> {
    tokio::task::unconstrained(sub.next()).now_or_never()
}

/// The next frame from `io` (`buf` keeps what was read beyond it); `None`
/// once the other end has closed.
pub(crate) async fn next_frame(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Option<Frame> {
    loop {
        if let Some((f, len)) = sockbus_protocol::decode(buf, u32::MAX).expect("a whole frame") {
            let f = Frame::from(f);
            buf.advance(len);
            return Some(f);
        }
        if io.read_buf(buf).await.expect("read") == 0 {
            return None;
        }
    }
}
