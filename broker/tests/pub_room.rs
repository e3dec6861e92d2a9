//! PUBs with room for the sid (PUB flag `PUB_ROOM`, docs/protocol.md): the
//! broker skips the room, whatever it holds, on every path a PUB takes, and
//! old-style PUBs keep working beside them. The kernel side (direct delivery
//! rewriting them in place) is tested in accel.rs.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{recv, Raw, TestBroker};
use sockbus_client::streams::StreamConfig;
use sockbus_protocol::frame::{
    code, encode_connect, encode_pub, encode_pub_flags, push_header, Header, Kind, HEADER_LEN,
    INFO_PUB_ROOM, PUB_ROOM, PUB_ROOM_LEN,
};
use sockbus_protocol::Frame;

/// A PUB with room whose room holds `room`.
fn room_pub(subject: &str, reply: Option<&str>, headers: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_pub_flags(&mut b, PUB_ROOM, subject, reply, headers, payload).unwrap();
    b[HEADER_LEN..HEADER_LEN + PUB_ROOM_LEN].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    b.to_vec()
}

#[tokio::test]
async fn pubs_with_room_and_without_reach_subscribers_repliers_and_streams_alike() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("room.>").await.unwrap();
    c.stream_add(&StreamConfig::new("ROOM", ["room.kept"]))
        .await
        .unwrap();
    c.flush().await.unwrap();
    let mut raw = Raw::connect(b.addr).await;
    let mut hdr = Vec::new();
    push_header(&mut hdr, "trace", "t-1").unwrap();
    let mut send = room_pub("room.a", None, &[], b"with room");
    send.extend(room_pub(
        "room.b",
        Some("room.reply"),
        &hdr,
        b"room, reply, headers",
    ));
    let mut old = BytesMut::new();
    encode_pub(&mut old, "room.c", None, &[], b"old style").unwrap();
    send.extend_from_slice(&old);
    send.extend(room_pub("room.kept", None, &[], b"stored"));
    send.extend(room_pub("room.d", None, &[], b""));
    raw.send(&send).await;

    let m = recv(&mut sub).await;
    assert_eq!(
        (m.subject(), m.payload.as_ref()),
        ("room.a", &b"with room"[..])
    );
    let m = recv(&mut sub).await;
    assert_eq!(m.subject(), "room.b");
    assert_eq!(m.payload.as_ref(), b"room, reply, headers");
    assert_eq!(m.reply(), Some("room.reply"));
    assert_eq!(m.headers().get("trace"), Some("t-1"));
    let m = recv(&mut sub).await;
    assert_eq!(
        (m.subject(), m.payload.as_ref()),
        ("room.c", &b"old style"[..])
    );
    let m = recv(&mut sub).await;
    assert_eq!(
        (m.subject(), m.payload.as_ref()),
        ("room.kept", &b"stored"[..])
    );
    let m = recv(&mut sub).await;
    assert_eq!((m.subject(), m.payload.as_ref()), ("room.d", &b""[..]));
    let t = std::time::Instant::now();
    while c.stream_info("ROOM").await.unwrap().state.messages != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "the stream stored it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A broker without direct delivery does not ask for room.
    let mut r2 = Raw::connect_only(b.addr).await;
    let mut hello = BytesMut::new();
    encode_connect(&mut hello, 0, 0, "raw", b"").unwrap();
    r2.send(&hello).await;
    match r2.next().await {
        Some(Frame::Info { flags, .. }) => assert_eq!(flags & INFO_PUB_ROOM, 0),
        other => panic!("expected INFO, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pub_with_the_room_flag_but_no_room_gets_err_malformed() {
    let b = TestBroker::start().await;
    let mut raw = Raw::connect(b.addr).await;
    let mut f = BytesMut::new();
    Header {
        kind: Kind::Pub,
        flags: PUB_ROOM,
        len: 3,
        hash: 0,
    }
    .write(&mut f);
    f.extend_from_slice(&[0, 0, 0]);
    raw.send(&f).await;
    match raw.next().await {
        Some(Frame::Err { code: c, text }) => {
            assert_eq!(c, code::MALFORMED, "{text}");
            assert!(text.contains("room"), "{text}");
        }
        other => panic!("expected ERR MALFORMED, got {other:?}"),
    }
    // The others still work.
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut s = c.subscribe("ok").await.unwrap();
    c.flush().await.unwrap();
    c.publish("ok", "alive").await.unwrap();
    assert_eq!(recv(&mut s).await.payload.as_ref(), b"alive");
}
