//! The read path without a socket: bytes as the broker sends them go into a
//! [`ReadState`], in whatever pieces the test chooses, and the outcome is
//! what a user sees (a subscription's messages, a request's reply, a flush's
//! result) or what the client sends back (PONG, CREDIT).

use std::time::Duration;

use bytes::BytesMut;
use sockbus_protocol::frame::{code, MSG_NO_RESPONDERS};
use sockbus_protocol::{Frame, ProtocolError};

use super::ReadState;
use crate::client::Inner;
use crate::error::Error;
use crate::message::Headers;
use crate::options::{ConnectOptions, Overflow};
use crate::testing::{encode, msg, offline_client, ready, subscribe, take_sent};

/// A read state with flow control off (a window of 0 grants nothing).
fn no_credit() -> ReadState {
    ReadState::new(BytesMut::new(), 0, 0)
}

fn feed(st: &mut ReadState, inner: &Inner, bytes: &[u8]) -> Result<(), Error> {
    st.buf.extend_from_slice(bytes);
    st.handle(inner)
}

fn feed_frames(st: &mut ReadState, inner: &Inner, frames: &[Frame]) {
    feed(st, inner, &encode(frames)).expect("the frames are handled");
}

/// Lets spawned tasks run until `find` matches something the client sent.
async fn wait_sent<T>(inner: &Inner, mut find: impl FnMut(&Frame) -> Option<T>) -> Vec<T> {
    for _ in 0..100 {
        tokio::task::yield_now().await;
        let found: Vec<T> = take_sent(inner).iter().filter_map(&mut find).collect();
        if !found.is_empty() {
            return found;
        }
    }
    panic!("the client sent nothing expected");
}

#[tokio::test]
async fn msg_frames_split_at_any_byte_arrive_whole_and_in_order() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "orders.>").await;
    let mut headers = Headers::new();
    headers.insert("Trace", "abc");
    let bytes = encode(&[
        Frame::Msg {
            sid,
            flags: 0,
            subject: "orders.eu".into(),
            reply: Some("_INBOX.r.1".into()),
            headers: headers.encode().unwrap(),
            payload: b"one".to_vec(),
        },
        Frame::Ping(7),
        msg(sid, "orders.us", "two"),
    ]);
    let check = |sub: &mut crate::Subscriber, st: &ReadState, at: &str| {
        let one = ready(sub)
            .flatten()
            .unwrap_or_else(|| panic!("first, {at}"));
        assert_eq!(
            (one.subject(), one.reply(), one.payload.as_ref()),
            ("orders.eu", Some("_INBOX.r.1"), &b"one"[..]),
            "{at}"
        );
        assert_eq!(one.headers().get("Trace"), Some("abc"), "{at}");
        let two = ready(sub)
            .flatten()
            .unwrap_or_else(|| panic!("second, {at}"));
        assert_eq!((two.subject(), two.reply()), ("orders.us", None), "{at}");
        assert_eq!(two.payload.as_ref(), b"two", "{at}");
        assert!(!two.has_headers(), "{at}");
        assert!(ready(sub).is_none(), "nothing else, {at}");
        assert!(st.buf.is_empty(), "nothing left over, {at}");
        assert_eq!(take_sent(inner), [Frame::Pong(7)], "{at}");
    };
    for at in 0..=bytes.len() {
        let mut st = no_credit();
        feed(&mut st, inner, &bytes[..at]).unwrap();
        feed(&mut st, inner, &bytes[at..]).unwrap();
        check(&mut sub, &st, &format!("split at byte {at}"));
    }
    let mut st = no_credit();
    for b in &bytes {
        feed(&mut st, inner, std::slice::from_ref(b)).unwrap();
    }
    check(&mut sub, &st, "one byte at a time");
}

#[tokio::test]
async fn a_message_reaches_only_the_subscription_it_names() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let (mut a, sid_a) = subscribe(&client, "a").await;
    let (mut b, sid_b) = subscribe(&client, "b").await;
    let mut st = no_credit();
    feed_frames(
        &mut st,
        inner,
        &[
            msg(sid_b, "b", "for b"),
            msg(sid_a + sid_b + 100, "c", "for nobody"),
        ],
    );
    assert_eq!(ready(&mut b).flatten().unwrap().payload.as_ref(), b"for b");
    assert!(ready(&mut b).is_none());
    assert!(ready(&mut a).is_none(), "a got b's message");
}

#[tokio::test]
async fn a_ping_from_the_broker_is_answered_with_its_pong() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let mut st = no_credit();
    feed_frames(&mut st, inner, &[Frame::Ping(41), Frame::Ping(42)]);
    assert_eq!(take_sent(inner), [Frame::Pong(41), Frame::Pong(42)]);
}

#[tokio::test]
async fn an_err_from_the_broker_fails_the_next_flush_with_its_code_and_text() {
    let client = offline_client(ConnectOptions::default());
    let inner = client.inner.clone();
    let mut st = no_credit();
    let c = client.clone();
    let flush = tokio::spawn(async move { c.flush_timeout(Duration::from_secs(5)).await });
    let ping = wait_sent(&inner, |f| match f {
        Frame::Ping(id) => Some(*id),
        _ => None,
    })
    .await[0];
    let refusal = Frame::Err {
        code: code::MAX_PAYLOAD,
        text: "payload too large".into(),
    };
    feed_frames(&mut st, &inner, &[refusal, Frame::Pong(ping)]);
    match flush.await.unwrap() {
        Err(Error::Server { code, message }) => {
            assert_eq!(
                (code, message.as_str()),
                (code::MAX_PAYLOAD, "payload too large")
            )
        }
        other => panic!("flush gave {other:?}"),
    }

    // Reported once: the next flush, with no new ERR, succeeds.
    let c = client.clone();
    let flush = tokio::spawn(async move { c.flush_timeout(Duration::from_secs(5)).await });
    let ping = wait_sent(&inner, |f| match f {
        Frame::Ping(id) => Some(*id),
        _ => None,
    })
    .await[0];
    feed_frames(&mut st, &inner, &[Frame::Pong(ping)]);
    flush
        .await
        .unwrap()
        .expect("a flush with no new error succeeds");
}

#[tokio::test]
async fn bytes_that_are_not_a_frame_end_the_connection_with_a_protocol_error() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "a").await;
    let mut bytes = encode(&[msg(sid, "a", "before")]);
    bytes.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    let err = feed(&mut no_credit(), inner, &bytes).unwrap_err();
    assert!(matches!(err, Error::Protocol(ProtocolError::BadMagic(_))));
    assert_eq!(
        err.to_string(),
        "protocol error: bad magic bytes [48, 54]: not a sockbus frame"
    );
    // What came before the garbage was delivered.
    assert_eq!(
        ready(&mut sub).flatten().unwrap().payload.as_ref(),
        b"before"
    );
}

#[tokio::test]
async fn a_msg_with_a_truncated_body_ends_the_connection() {
    let client = offline_client(ConnectOptions::default());
    let bytes = encode(&[msg(1, "a", "x")]);
    // Same header, but the body stops inside the subject.
    let mut cut = bytes[..sockbus_protocol::HEADER_LEN].to_vec();
    cut[4..8].copy_from_slice(&5u32.to_le_bytes());
    cut.extend_from_slice(&bytes[sockbus_protocol::HEADER_LEN..][..5]);
    let err = feed(&mut no_credit(), &client.inner, &cut).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn a_frame_only_clients_send_ends_the_connection_as_unexpected() {
    let client = offline_client(ConnectOptions::default());
    let publish = Frame::Pub {
        flags: 0,
        subject: "a".into(),
        reply: None,
        headers: Vec::new(),
        payload: b"x".to_vec(),
    };
    let err = feed(&mut no_credit(), &client.inner, &encode(&[publish])).unwrap_err();
    match err {
        Error::Server { code, message } => {
            assert_eq!(code, code::MALFORMED);
            assert_eq!(message, "unexpected frame from the broker");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn credit_is_granted_back_once_a_quarter_of_the_window_is_handled() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let (_sub, sid) = subscribe(&client, "a").await;
    let one = encode(&[msg(sid, "a", "x")]).len();
    let mut st = ReadState::new(BytesMut::new(), (4 * 3 * one) as u32, 0);
    // Two messages, and more bytes of CREDIT frames than a third message:
    // CREDIT frames do not count, so nothing is granted yet.
    let credits = vec![Frame::Credit(1); one / 16 + 1];
    feed_frames(&mut st, inner, &[msg(sid, "a", "x"), msg(sid, "a", "x")]);
    feed_frames(&mut st, inner, &credits);
    assert!(take_sent(inner).is_empty());
    // The third completes the quarter: all three are granted at once.
    feed_frames(&mut st, inner, &[msg(sid, "a", "x")]);
    assert_eq!(take_sent(inner), [Frame::Credit(3 * one as u32)]);
}

#[tokio::test]
async fn credit_from_the_broker_releases_publishes_its_window_held_back() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let one = encode(&[Frame::Pub {
        flags: 0,
        subject: "a".into(),
        reply: None,
        headers: Vec::new(),
        payload: b"x".to_vec(),
    }])
    .len();
    inner.outbox.reset(2 * one as u32, &[], false);
    for _ in 0..3 {
        client.publish("a", "x").await.unwrap();
    }
    assert_eq!(take_sent(inner).len(), 2, "the window holds two");
    assert!(take_sent(inner).is_empty(), "the third waits for credit");
    feed_frames(&mut no_credit(), inner, &[Frame::Credit(one as u32)]);
    assert_eq!(take_sent(inner).len(), 1, "credit for one more");
}

#[tokio::test]
async fn unsubscribe_after_n_ends_the_stream_after_the_nth_message() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "a").await;
    sub.unsubscribe_after(2).unwrap();
    let mut st = no_credit();
    feed_frames(
        &mut st,
        inner,
        &[msg(sid, "a", "1"), msg(sid, "a", "2"), msg(sid, "a", "3")],
    );
    assert_eq!(ready(&mut sub).flatten().unwrap().payload.as_ref(), b"1");
    assert_eq!(ready(&mut sub).flatten().unwrap().payload.as_ref(), b"2");
    assert_eq!(ready(&mut sub).map(|m| m.is_none()), Some(true), "ended");
}

#[tokio::test]
async fn a_full_subscription_drops_new_messages_and_counts_them() {
    let client = offline_client(ConnectOptions::new().subscription_capacity(2));
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "a").await;
    let mut st = no_credit();
    let frames: Vec<Frame> = (1..=5).map(|i| msg(sid, "a", &i.to_string())).collect();
    feed_frames(&mut st, inner, &frames);
    assert_eq!(sub.dropped(), 3);
    assert_eq!(ready(&mut sub).flatten().unwrap().payload.as_ref(), b"1");
    assert_eq!(ready(&mut sub).flatten().unwrap().payload.as_ref(), b"2");
    assert!(ready(&mut sub).is_none());
    // Room again: the next message is kept.
    feed_frames(&mut st, inner, &[msg(sid, "a", "6")]);
    assert_eq!(ready(&mut sub).flatten().unwrap().payload.as_ref(), b"6");
}

/// A client whose subscriptions hold two messages and make the connection
/// wait when full.
fn waiting_client() -> crate::Client {
    offline_client(
        ConnectOptions::new()
            .subscription_capacity(2)
            .when_subscription_full(Overflow::Wait),
    )
}

fn payload(m: Option<Option<crate::Message>>) -> String {
    let m = m.flatten().expect("a message");
    String::from_utf8_lossy(&m.payload).into_owned()
}

#[tokio::test]
async fn a_full_subscription_that_waits_holds_up_the_connection_and_loses_nothing() {
    let client = waiting_client();
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "a").await;
    let mut st = no_credit();
    let mut frames: Vec<Frame> = (1..=5).map(|i| msg(sid, "a", &i.to_string())).collect();
    frames.push(Frame::Ping(9));
    feed_frames(&mut st, inner, &frames);
    assert!(st.stalled.is_some(), "the third message waits for room");
    assert!(
        take_sent(inner).is_empty(),
        "nothing behind it is handled yet"
    );
    assert_eq!(
        (payload(ready(&mut sub)), payload(ready(&mut sub))),
        ("1".into(), "2".into())
    );
    assert!(ready(&mut sub).is_none());
    // The read side goes on where it stopped, as far as there is room.
    st.handle(inner).unwrap();
    assert_eq!(
        (payload(ready(&mut sub)), payload(ready(&mut sub))),
        ("3".into(), "4".into())
    );
    assert!(take_sent(inner).is_empty());
    st.handle(inner).unwrap();
    assert!(st.stalled.is_none());
    assert_eq!(payload(ready(&mut sub)), "5");
    assert_eq!(take_sent(inner), [Frame::Pong(9)], "then what came after");
    assert_eq!(sub.dropped(), 0);
}

#[tokio::test]
async fn a_subscriber_that_makes_room_wakes_the_waiting_read_side() {
    let client = waiting_client();
    let inner = &client.inner;
    let (mut sub, sid) = subscribe(&client, "a").await;
    let mut st = no_credit();
    let frames: Vec<Frame> = (1..=3).map(|i| msg(sid, "a", &i.to_string())).collect();
    feed_frames(&mut st, inner, &frames);
    let room = inner.room.notified();
    tokio::pin!(room);
    room.as_mut().enable();
    assert!(futures_util::poll!(room.as_mut()).is_pending());
    payload(ready(&mut sub));
    assert!(
        futures_util::poll!(room.as_mut()).is_ready(),
        "woken by the take"
    );
}

#[tokio::test]
async fn a_held_message_whose_subscriber_leaves_lets_the_connection_go_on() {
    let client = waiting_client();
    let inner = &client.inner;
    let (full, sid) = subscribe(&client, "a").await;
    let (mut other, other_sid) = subscribe(&client, "b").await;
    let mut st = no_credit();
    let mut frames: Vec<Frame> = (1..=3).map(|i| msg(sid, "a", &i.to_string())).collect();
    frames.push(msg(other_sid, "b", "x"));
    feed_frames(&mut st, inner, &frames);
    assert!(ready(&mut other).is_none(), "held up behind the full one");
    drop(full);
    st.handle(inner).unwrap();
    assert_eq!(payload(ready(&mut other)), "x");
}

#[tokio::test]
async fn a_held_message_lost_with_its_connection_counts_as_dropped() {
    let client = waiting_client();
    let inner = &client.inner;
    let (sub, sid) = subscribe(&client, "a").await;
    let mut st = no_credit();
    let frames: Vec<Frame> = (1..=3).map(|i| msg(sid, "a", &i.to_string())).collect();
    feed_frames(&mut st, inner, &frames);
    assert_eq!(sub.dropped(), 0);
    drop(st);
    assert_eq!(sub.dropped(), 1);
}

/// Starts a request and returns the inbox subscription's id and the reply
/// subject the request was published with.
async fn start_request(
    client: &crate::Client,
) -> (
    tokio::task::JoinHandle<crate::Result<crate::Message>>,
    u32,
    String,
) {
    let c = client.clone();
    let task = tokio::spawn(async move {
        c.request_timeout("svc", "ping", Duration::from_secs(5))
            .await
    });
    let mut mux = None;
    let reply = wait_sent(&client.inner, |f| match f {
        Frame::Sub { sid, subject, .. } if subject.ends_with(".*") => {
            mux = Some(*sid);
            None
        }
        Frame::Pub { reply, .. } => reply.clone(),
        _ => None,
    })
    .await
    .remove(0);
    (
        task,
        mux.expect("the inbox subscription went out first"),
        reply,
    )
}

#[tokio::test]
async fn a_reply_reaches_the_request_that_waits_for_it() {
    let client = offline_client(ConnectOptions::default());
    let (task, mux, reply) = start_request(&client).await;
    let mut st = no_credit();
    feed_frames(&mut st, &client.inner, &[msg(mux, &reply, "pong")]);
    let m = task.await.unwrap().expect("the reply");
    assert_eq!(
        (m.subject(), m.payload.as_ref()),
        (reply.as_str(), &b"pong"[..])
    );
}

#[tokio::test]
async fn a_no_responders_status_fails_the_request_at_once() {
    let client = offline_client(ConnectOptions::default());
    let (task, mux, reply) = start_request(&client).await;
    let status = Frame::Msg {
        sid: mux,
        flags: MSG_NO_RESPONDERS,
        subject: reply,
        reply: None,
        headers: Vec::new(),
        payload: Vec::new(),
    };
    feed_frames(&mut no_credit(), &client.inner, &[status]);
    assert!(matches!(task.await.unwrap(), Err(Error::NoResponders)));
}

#[tokio::test]
async fn a_new_info_changes_the_largest_payload_publish_accepts() {
    let client = offline_client(ConnectOptions::default());
    let info = Frame::Info {
        flags: 0,
        recv_window: 0,
        max_payload: 16,
        server_name: "b1".into(),
    };
    feed_frames(&mut no_credit(), &client.inner, &[info]);
    assert_eq!(client.max_payload(), 16);
    assert!(matches!(
        client.publish("a", [0u8; 17]).await,
        Err(Error::PayloadTooLarge { size: 17, max: 16 })
    ));
}

#[tokio::test]
async fn a_frame_longer_than_the_brokers_limits_ends_the_connection_without_buffering_it() {
    let client = offline_client(ConnectOptions::default());
    let inner = &client.inner;
    let mut st = no_credit();
    // A MSG header announcing a body of almost 4 GiB (a lying or broken broker).
    let mut lie = vec![0x53, 0x42, 6, 0];
    lie.extend_from_slice(&(u32::MAX - 16).to_le_bytes());
    lie.extend_from_slice(&[0; 4]);
    let e = feed(&mut st, inner, &lie).expect_err("the connection ends");
    assert!(
        matches!(e, Error::Protocol(ProtocolError::FrameTooLarge { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
    assert!(
        st.buf.capacity() < 1 << 20,
        "nothing was reserved for it: {} bytes",
        st.buf.capacity()
    );
}
