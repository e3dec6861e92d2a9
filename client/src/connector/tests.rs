//! The handshake over an in-memory pipe (`tokio::io::duplex`) with the test
//! playing the broker, and one whole connection over loopback TCP to a fake
//! broker.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use sockbus_protocol::flow::effective_window;
use sockbus_protocol::frame::{
    code, CONNECT_EXPLICIT_ACKS, CONNECT_NO_ECHO, CONNECT_NO_RESPONDERS,
};
use sockbus_protocol::Frame;
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

use super::{greet, Conn};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::options::ConnectOptions;
use crate::reader::ReadState;
use crate::testing::{decode_all, encode, msg, next_frame, offline_client, subscribe, take_sent};

const PEER: &str = "10.0.0.7:7420";

fn info(max_payload: u32) -> Frame {
    Frame::Info {
        flags: 0,
        recv_window: 0,
        max_payload,
        server_name: "b1".into(),
    }
}

/// Runs the client's side of the handshake against `broker`, which gets the
/// pipe's other end.
async fn handshake_with<F: std::future::Future<Output = ()>>(
    client: &Client,
    broker: impl FnOnce(DuplexStream) -> F,
) -> Result<Conn<DuplexStream>> {
    let (ours, theirs) = duplex(64 * 1024);
    let (r, ()) = tokio::join!(
        greet(&client.inner, ours, PEER.parse().unwrap()),
        broker(theirs)
    );
    r
}

/// A broker that reads CONNECT and answers with `reply`.
async fn answer(mut io: DuplexStream, reply: Vec<u8>) {
    let connect = next_frame(&mut io, &mut BytesMut::new()).await;
    assert!(matches!(connect, Some(Frame::Connect { .. })));
    io.write_all(&reply).await.unwrap();
}

#[tokio::test]
async fn the_handshake_announces_the_client_and_adopts_the_brokers_limits() {
    let opts = ConnectOptions::new()
        .name("svc-a")
        .no_echo(true)
        .receive_window(1 << 20);
    let client = offline_client(opts);
    // INFO arrives a byte at a time, its last byte with a PING behind it.
    let conn = handshake_with(&client, |mut io| async move {
        let connect = next_frame(&mut io, &mut BytesMut::new()).await;
        assert_eq!(
            connect,
            Some(Frame::Connect {
                flags: CONNECT_NO_RESPONDERS | CONNECT_NO_ECHO | CONNECT_EXPLICIT_ACKS,
                recv_window: 1 << 20,
                name: "svc-a".into(),
                token: Vec::new(),
            })
        );
        let info = encode(&[info(4096)]);
        let (head, last) = info.split_at(info.len() - 1);
        for b in head {
            io.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut tail = last.to_vec();
        tail.extend_from_slice(&encode(&[Frame::Ping(9)]));
        io.write_all(&tail).await.unwrap();
    })
    .await
    .expect("the handshake");
    assert_eq!(client.max_payload(), 4096);
    let peer: SocketAddr = PEER.parse().unwrap();
    assert_eq!(client.server(), Some(("b1".to_string(), peer)));
    assert_eq!(conn.info_len, encode(&[info(4096)]).len());
    assert_eq!(conn.recv_window, effective_window(1 << 20, 4096));
    // What came behind the INFO is left for the reader, not lost.
    assert_eq!(decode_all(&conn.buf), [Frame::Ping(9)]);
}

#[tokio::test]
async fn a_new_connection_restores_every_subscription_before_queued_publishes() {
    let client = offline_client(ConnectOptions::default());
    let (_a, sid_a) = subscribe(&client, "a").await;
    let _b = client.queue_subscribe("b", "workers").await.unwrap();
    let sid_b = match take_sent(&client.inner).as_slice() {
        [Frame::Sub { sid, .. }] => *sid,
        other => panic!("{other:?}"),
    };
    let (mut c, sid_c) = subscribe(&client, "c").await;
    // `c` ends after 5 messages and has had 2: the new broker, counting
    // from zero, must stop after 3.
    c.unsubscribe_after(5).unwrap();
    let got_two = encode(&[msg(sid_c, "c", "1"), msg(sid_c, "c", "2")]);
    ReadState::new(BytesMut::from(&got_two[..]), 0, 0)
        .handle(&client.inner)
        .unwrap();
    client.publish("x", "queued while away").await.unwrap();

    handshake_with(&client, |io| answer(io, encode(&[info(1024)])))
        .await
        .expect("the handshake");
    let sent = take_sent(&client.inner);
    let sub = |sid, subject: &str, queue: Option<&str>| Frame::Sub {
        sid,
        subject: subject.into(),
        queue: queue.map(Into::into),
    };
    let restored = [
        sub(sid_a, "a", None),
        sub(sid_b, "b", Some("workers")),
        sub(sid_c, "c", None),
        Frame::Unsub { sid: sid_c, max: 3 },
    ];
    assert_eq!(sent.len(), 5, "{sent:?}");
    let at = |f: &Frame| sent.iter().position(|s| s == f);
    for f in &restored {
        assert!(at(f).is_some_and(|i| i < 4), "{f:?} first in {sent:?}");
    }
    assert_eq!(at(&restored[3]), at(&restored[2]).map(|i| i + 1));
    assert!(matches!(&sent[4], Frame::Pub { subject, .. } if subject == "x"));
}

#[tokio::test]
async fn a_broker_that_refuses_the_connection_reports_its_code_and_text() {
    let client = offline_client(ConnectOptions::default());
    let refusal = Frame::Err {
        code: code::MAX_CONNECTIONS,
        text: "too many connections".into(),
    };
    match handshake_with(&client, |io| answer(io, encode(&[refusal]))).await {
        Err(Error::Server { code, message }) => {
            assert_eq!(code, code::MAX_CONNECTIONS);
            assert_eq!(message, "too many connections");
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected"),
    }
}

#[tokio::test]
async fn a_first_frame_other_than_info_is_refused() {
    let client = offline_client(ConnectOptions::default());
    match handshake_with(&client, |io| answer(io, encode(&[Frame::Pong(1)]))).await {
        Err(Error::Server { code, message }) => {
            assert_eq!(code, code::MALFORMED);
            assert_eq!(message, "expected INFO from the broker");
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected"),
    }
}

#[tokio::test]
async fn a_broker_that_hangs_up_during_the_handshake_gives_disconnected() {
    let client = offline_client(ConnectOptions::default());
    let r = handshake_with(&client, |io| answer(io, Vec::new())).await;
    assert!(matches!(r, Err(Error::Disconnected)), "{:?}", r.err());
}

/// The whole read path on a real socket: a malformed frame ends the
/// connection, and with no reconnects allowed the client closes, which ends
/// its subscriptions' streams.
#[tokio::test]
async fn a_malformed_frame_ends_the_connection_and_the_subscription() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        next_frame(&mut io, &mut buf).await.expect("CONNECT");
        io.write_all(&encode(&[info(1024)])).await.unwrap();
        loop {
            match next_frame(&mut io, &mut buf).await {
                Some(Frame::Sub { .. }) => break,
                Some(_) => {}
                None => panic!("the client left before subscribing"),
            }
        }
        io.write_all(b"garbage!garbage!").await.unwrap();
        // Hold the socket until the client closes it.
        while next_frame(&mut io, &mut buf).await.is_some() {}
    });
    let client = ConnectOptions::new()
        .max_reconnects(0)
        .connect(&addr.to_string())
        .await
        .unwrap();
    let mut sub = client.subscribe("a").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
    assert!(matches!(end, Ok(None)), "the stream ended");
    assert!(!client.is_connected());
    tokio::time::timeout(Duration::from_secs(10), broker)
        .await
        .expect("the client closed the socket")
        .unwrap();
}

/// Keepalive against a broker that completes the handshake and then goes
/// silent (as a SIGSTOPped process or a network black hole does: the socket
/// stays open, nothing comes back): the client notices within a few ping
/// intervals and reconnects, here to a second connection that answers.
#[tokio::test]
async fn a_broker_that_goes_silent_is_noticed_and_the_client_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let broker = tokio::spawn(async move {
        let mut held = Vec::new();
        for n in 0.. {
            let (mut io, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            next_frame(&mut io, &mut buf).await.expect("CONNECT");
            io.write_all(&encode(&[info(1024)])).await.unwrap();
            let _ = accepted_tx.send(n);
            if n == 0 {
                // Silent from here on: never reads, never writes.
                held.push(io);
                continue;
            }
            // The second one answers PINGs.
            tokio::spawn(async move {
                while let Some(f) = next_frame(&mut io, &mut buf).await {
                    if let Frame::Ping(id) = f {
                        io.write_all(&encode(&[Frame::Pong(id)])).await.unwrap();
                    }
                }
            });
        }
    });
    let client = ConnectOptions::new()
        .ping_interval(Duration::from_secs(1))
        .max_pings_out(2)
        .connect(&addr.to_string())
        .await
        .unwrap();
    assert_eq!(accepted.recv().await, Some(0));
    let lost = client.disconnected();
    let e = tokio::time::timeout(Duration::from_secs(10), lost)
        .await
        .expect("the silent broker was noticed within 10 s");
    assert!(matches!(e, Error::Disconnected), "{e:?}");
    let second = tokio::time::timeout(Duration::from_secs(10), accepted.recv()).await;
    assert_eq!(second, Ok(Some(1)), "the client reconnected");
    client
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("connected again");
    client.flush().await.expect("the new connection works");
    broker.abort();
}

/// A request whose connection is lost fails at once, not at its timeout.
#[tokio::test]
async fn a_request_fails_at_once_when_its_connection_is_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        next_frame(&mut io, &mut buf).await.expect("CONNECT");
        io.write_all(&encode(&[info(1024)])).await.unwrap();
        // The request arrives; the broker goes away before any reply.
        loop {
            match next_frame(&mut io, &mut buf).await {
                Some(Frame::Pub { .. }) => break,
                Some(_) => {}
                None => panic!("the client left before its request"),
            }
        }
        drop(io);
        // Refuse reconnects: nothing listens any more.
        drop(listener);
    });
    let client = ConnectOptions::new()
        .connect(&addr.to_string())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let r = client
        .request_timeout("svc", "hi", Duration::from_secs(10))
        .await;
    let took = start.elapsed();
    assert!(matches!(r, Err(Error::Disconnected)), "{:?}", r.err());
    assert!(took < Duration::from_secs(5), "failed after {took:?}");
    broker.await.unwrap();
}
