//! Keepalive: the broker PINGs a connection that has gone quiet and closes
//! one that leaves `--max-pings-out` PINGs unanswered (so idle sockets
//! cannot hold every connection slot); a connection that answers, or that
//! sends traffic of its own, stays open for as long as it likes.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{recv, Raw, TestBroker};
use sockbus_broker::metrics::Metrics;
use sockbus_protocol::frame::{code, encode_pub};
use sockbus_protocol::Frame;

/// A broker that PINGs after 1 s of silence and gives up after 2 unanswered.
async fn broker_1s() -> TestBroker {
    let mut cfg = common::test_config();
    cfg.ping_interval = Duration::from_secs(1);
    cfg.max_pings_out = 2;
    TestBroker::with(cfg).await
}

fn stale(b: &TestBroker) -> u64 {
    Metrics::get(&b.state.metrics().stale_connections)
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_as_stale() {
    let b = broker_1s().await;
    let mut raw = Raw::connect(b.addr).await;
    let start = Instant::now();
    let mut pings = 0;
    let err = loop {
        match raw.next().await {
            Some(Frame::Ping(_)) => pings += 1,
            Some(Frame::Err { code, text }) => break (code, text),
            other => panic!("expected PINGs then ERR, got {other:?} after {pings} PINGs"),
        }
    };
    assert_eq!(pings, 2, "two PINGs went unanswered");
    assert_eq!(err.0, code::STALE_CONNECTION, "{}", err.1);
    assert!(raw.closed().await, "the broker closed the connection");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "closed only once two PINGs went unanswered: {took:?}"
    );
    assert_eq!(stale(&b), 1, "counted in sockbus_stale_connections_total");
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected_across_several_intervals() {
    let b = broker_1s().await;
    let mut raw = Raw::connect(b.addr).await;
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(300), raw.next()).await {
            Ok(Some(Frame::Ping(id))) => {
                pings += 1;
                raw.send_frame(Frame::Pong(id)).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    // A PONG is traffic too: as in NATS, the interval after an answered
    // PING has been heard from, so the PINGs come every other interval.
    assert!(pings >= 2, "PINGed while idle: {pings}");
    // Still served.
    raw.send_frame(Frame::Ping(77)).await;
    assert_eq!(raw.next().await, Some(Frame::Pong(77)));
    assert_eq!(stale(&b), 0);
}

#[tokio::test]
async fn a_client_that_sends_traffic_is_not_pinged() {
    let b = broker_1s().await;
    let mut raw = Raw::connect(b.addr).await;
    let mut pubs = BytesMut::new();
    encode_pub(&mut pubs, "nobody.listens", None, &[], b"x").unwrap();
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        raw.send(&pubs).await;
        if let Ok(f) = tokio::time::timeout(Duration::from_millis(300), raw.next()).await {
            panic!("the broker sent {f:?} to a client that talks every 300 ms");
        }
    }
    assert_eq!(stale(&b), 0);
}

#[tokio::test]
async fn idle_sockets_holding_every_connection_slot_are_evicted() {
    let mut cfg = common::test_config();
    cfg.ping_interval = Duration::from_secs(1);
    cfg.max_pings_out = 1;
    cfg.max_connections = 2;
    let b = TestBroker::with(cfg).await;
    // Two sockets that complete the handshake and then never say a word.
    let _idle = [Raw::connect(b.addr).await, Raw::connect(b.addr).await];
    let e = sockbus_client::ConnectOptions::new()
        .connect(&b.url)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("connection limit"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match sockbus_client::connect(&b.url).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "still locked out: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut s = c.subscribe("in").await.unwrap();
    c.publish("in", "at last").await.unwrap();
    assert_eq!(recv(&mut s).await.payload.as_ref(), b"at last");
    assert_eq!(stale(&b), 2);
}

/// Broker and SDK both with 1 s keepalives: an idle, healthy connection
/// answers every PING both ways and is never dropped by either side.
#[tokio::test]
async fn a_healthy_idle_sdk_connection_survives_keepalives_on_both_sides() {
    let b = broker_1s().await;
    let c = sockbus_client::ConnectOptions::new()
        .ping_interval(Duration::from_secs(1))
        .max_pings_out(2)
        .connect(&b.url)
        .await
        .unwrap();
    let lost = c.disconnected();
    let mut s = c.subscribe("idle").await.unwrap();
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert!(c.is_connected());
    c.publish("idle", "still here").await.unwrap();
    assert_eq!(recv(&mut s).await.payload.as_ref(), b"still here");
    assert!(
        futures_util::FutureExt::now_or_never(lost).is_none(),
        "the connection was never lost"
    );
    assert_eq!(stale(&b), 0);
}

/// The SDK answers the broker's PINGs by itself: an idle client with the
/// SDK's own keepalive far off (2 minutes) is PINGed by the broker every
/// other second and is never closed as stale.
#[tokio::test]
async fn an_idle_sdk_client_answers_the_brokers_pings() {
    let b = broker_1s().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let lost = c.disconnected();
    let mut s = c.subscribe("idle").await.unwrap();
    c.flush().await.unwrap();
    // Three PINGs would be out (and the connection stale) by now without answers.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(stale(&b), 0);
    assert!(
        futures_util::FutureExt::now_or_never(lost).is_none(),
        "the connection was never lost"
    );
    c.publish("idle", "still here").await.unwrap();
    assert_eq!(recv(&mut s).await.payload.as_ref(), b"still here");
}
