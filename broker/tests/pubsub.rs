//! Pub/sub, wildcards, queue groups, request/reply and reconnects, over real
//! TCP against a broker on an ephemeral port.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{nothing, recv, TestBroker};
use sockbus_broker::metrics::Metrics;
use sockbus_client::{ConnectOptions, Error, Headers};

#[tokio::test]
async fn subscriber_receives_every_message_in_publish_order() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("orders.created").await.unwrap();
    c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..10_000u32 {
        p.publish("orders.created", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..10_000u32 {
        let m = recv(&mut sub).await;
        assert_eq!(m.subject(), "orders.created");
        assert_eq!(
            m.payload.as_ref(),
            i.to_le_bytes(),
            "message {i} out of order"
        );
    }
    nothing(&mut sub).await;
}

#[tokio::test]
async fn headers_and_binary_payloads_pass_through_untouched() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("h.test").await.unwrap();
    c.flush().await.unwrap();
    let mut h = Headers::new();
    h.insert("Trace-Id", "abc-123")
        .insert("Trace-Id", "second")
        .insert("x", "");
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    c.publish_with_headers("h.test", &h, &payload)
        .await
        .unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(m.payload.as_ref(), &payload[..]);
    assert_eq!(m.headers(), h);
    assert_eq!(m.headers().get("Trace-Id"), Some("abc-123"));
}

#[tokio::test]
async fn star_matches_one_token_and_greater_matches_the_rest() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut star = c.subscribe("orders.*.created").await.unwrap();
    let mut gt = c.subscribe("orders.>").await.unwrap();
    let mut lit = c.subscribe("orders.eu.created").await.unwrap();
    c.flush().await.unwrap();
    for s in [
        "orders.eu.created",
        "orders.us.created",
        "orders.eu.deleted",
        "orders.eu.x.created",
        "orders",
        "other.eu.created",
    ] {
        c.publish(s, s).await.unwrap();
    }
    c.flush().await.unwrap();
    assert_eq!(recv(&mut star).await.subject(), "orders.eu.created");
    assert_eq!(recv(&mut star).await.subject(), "orders.us.created");
    nothing(&mut star).await;
    for want in [
        "orders.eu.created",
        "orders.us.created",
        "orders.eu.deleted",
        "orders.eu.x.created",
    ] {
        assert_eq!(recv(&mut gt).await.subject(), want);
    }
    nothing(&mut gt).await;
    assert_eq!(recv(&mut lit).await.subject(), "orders.eu.created");
    nothing(&mut lit).await;
}

#[tokio::test]
async fn invalid_subjects_get_a_clear_error() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for bad in ["a..b", "", "a b", "a.*", "a.>"] {
        let e = c.publish(bad, "x").await.unwrap_err();
        assert!(matches!(e, Error::InvalidSubject(_)), "{bad:?}: {e}");
    }
    for bad in ["a.>.b", "a..b", ">.a"] {
        let e = c.subscribe(bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidSubject(_)), "{bad:?}: {e}");
    }
}

/// NATS's rule: only a whole `*` or `>` token is a wildcard; `foo*`, `*bar`
/// and `>-` are literal tokens anyone can publish and subscribe to.
#[tokio::test]
async fn tokens_with_wildcard_characters_are_literal_and_deliver_exactly() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut lit = c.subscribe("orders.eu*").await.unwrap();
    let mut gt = c.subscribe(">-.x").await.unwrap();
    let mut star = c.subscribe("*bar.*").await.unwrap();
    c.flush().await.unwrap();
    for s in ["orders.eux", "orders.eu*", ">-.x", "*bar.a*", "xbar.a"] {
        c.publish(s, s.to_string()).await.unwrap();
    }
    c.flush().await.unwrap();
    assert_eq!(recv(&mut lit).await.subject(), "orders.eu*");
    assert_eq!(recv(&mut gt).await.subject(), ">-.x");
    assert_eq!(recv(&mut star).await.subject(), "*bar.a*");
    nothing(&mut lit).await;
    nothing(&mut gt).await;
    nothing(&mut star).await;
}

#[tokio::test]
async fn queue_group_delivers_each_message_to_exactly_one_member() {
    let b = TestBroker::start().await;
    let mut members = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let c = sockbus_client::connect(&b.url).await.unwrap();
        members.push(c.queue_subscribe("work.>", "workers").await.unwrap());
        c.flush().await.unwrap();
        conns.push(c);
    }
    let watcher_c = sockbus_client::connect(&b.url).await.unwrap();
    let mut watcher = watcher_c.subscribe("work.>").await.unwrap();
    watcher_c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    const N: u32 = 3000;
    for i in 0..N {
        p.publish("work.item", i.to_string()).await.unwrap();
    }
    p.flush().await.unwrap();
    for _ in 0..N {
        recv(&mut watcher).await;
    }
    // Every queue member's buffer is complete once the plain watcher has all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = HashSet::new();
    for (i, m) in members.iter_mut().enumerate() {
        let mut n = 0;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), m.next()).await {
            let v: u32 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
            assert!(seen.insert(v), "message {v} delivered twice");
            n += 1;
        }
        assert!(n > N / 10, "member {i} got only {n} of {N}: not spread");
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "every message reaches exactly one member"
    );
}

#[tokio::test]
async fn request_gets_the_reply_and_no_responders_is_distinct_from_timeout() {
    let b = TestBroker::start().await;
    let server = sockbus_client::connect(&b.url).await.unwrap();
    let mut svc = server.subscribe("svc.echo").await.unwrap();
    server.flush().await.unwrap();
    let s2 = server.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&m.payload);
            s2.publish(m.reply().unwrap(), out).await.unwrap();
        }
    });
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..100 {
        let r = c.request("svc.echo", format!("{i}")).await.unwrap();
        assert_eq!(r.payload.as_ref(), format!("echo:{i}").as_bytes());
    }
    let e = c.request("svc.nobody", "x").await.unwrap_err();
    assert!(matches!(e, Error::NoResponders), "{e}");
    // A responder that never answers: timeout, not no-responders.
    let _silent = server.subscribe("svc.silent").await.unwrap();
    server.flush().await.unwrap();
    let e = c
        .request_timeout("svc.silent", "x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout), "{e}");
}

#[tokio::test]
async fn a_message_to_a_new_inbox_is_sent_once_even_beside_requests() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let svc = sockbus_client::connect(&b.url).await.unwrap();
    let _replier = common::echo_replier(svc, "svc.echo").await;
    // A request first: the client's reply multiplexer is subscribed.
    c.request("svc.echo", "x").await.unwrap();
    let inbox = c.new_inbox();
    let mut sub = c.subscribe(&inbox).await.unwrap();
    c.flush().await.unwrap();
    let out = || Metrics::get(&b.state.metrics().msgs_out);
    let before = out();
    c.publish(&inbox, "once").await.unwrap();
    assert_eq!(recv(&mut sub).await.payload.as_ref(), b"once");
    c.flush().await.unwrap();
    // One MSG frame left the broker for that publish: the inbox is not also
    // matched by the multiplexer's `_INBOX.<client>.*`.
    assert_eq!(out() - before, 1);
    // And requests still work beside it.
    assert_eq!(
        c.request("svc.echo", "y").await.unwrap().payload.as_ref(),
        b"y"
    );
}

/// A task waiting for a message reads the connection itself; a wait that is
/// started and then neither polled nor dropped must not hold up anything
/// else on that connection.
#[tokio::test]
async fn a_wait_that_is_never_polled_again_does_not_stall_the_connection() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let svc = sockbus_client::connect(&b.url).await.unwrap();
    let _replier = common::echo_replier(svc.clone(), "svc.echo").await;
    let mut quiet = c.subscribe("quiet").await.unwrap();
    let mut busy = c.subscribe("busy").await.unwrap();
    c.flush().await.unwrap();
    let stuck = quiet.next();
    tokio::pin!(stuck);
    // Polled until it waits on the socket, then left alone.
    assert!(tokio::time::timeout(Duration::from_millis(20), &mut stuck)
        .await
        .is_err());
    for i in 0..2_000u32 {
        svc.publish("busy", i.to_be_bytes()).await.unwrap();
    }
    for i in 0..2_000u32 {
        assert_eq!(recv(&mut busy).await.payload.as_ref(), i.to_be_bytes());
    }
    for i in 0..200 {
        let r = c.request("svc.echo", format!("{i}")).await.unwrap();
        assert_eq!(r.payload.as_ref(), format!("{i}").as_bytes());
    }
    // The abandoned wait still gets its message once polled again.
    svc.publish("quiet", "late").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the old wait completes")
        .expect("message");
    assert_eq!(m.payload.as_ref(), b"late");
}

/// Requests and subscriptions of many tasks on one connection, on a runtime
/// with several workers: each waiting task may read the socket for the
/// others, and nothing may be lost or left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_waiting_on_one_connection_all_get_theirs() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let svc = sockbus_client::connect(&b.url).await.unwrap();
    let _replier = common::echo_replier(svc.clone(), "svc.echo").await;
    let mut subs = Vec::new();
    for k in 0..4 {
        subs.push(c.subscribe(&format!("feed.{k}")).await.unwrap());
    }
    c.flush().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut sub) in subs.into_iter().enumerate() {
        tasks.spawn(async move {
            for i in 0..3_000u32 {
                let m = recv(&mut sub).await;
                assert_eq!(m.payload.as_ref(), i.to_be_bytes(), "feed.{k}");
            }
        });
    }
    for t in 0..6 {
        let c = c.clone();
        tasks.spawn(async move {
            for i in 0..500 {
                let body = format!("{t}-{i}");
                let r = c.request("svc.echo", &body).await.unwrap();
                assert_eq!(r.payload.as_ref(), body.as_bytes());
            }
        });
    }
    for i in 0..3_000u32 {
        for k in 0..4 {
            svc.publish(&format!("feed.{k}"), i.to_be_bytes())
                .await
                .unwrap();
        }
    }
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every task got its replies and messages");
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_unsubscribe_after_counts() {
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let s1 = c.subscribe("u.a").await.unwrap();
    let mut s2 = c.subscribe("u.a").await.unwrap();
    s2.unsubscribe_after(3).unwrap();
    c.flush().await.unwrap();
    s1.unsubscribe().unwrap();
    c.flush().await.unwrap();
    assert_eq!(b.state.subscriptions(), 1);
    for i in 0..10 {
        c.publish("u.a", format!("{i}")).await.unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..3 {
        assert_eq!(
            recv(&mut s2).await.payload.as_ref(),
            format!("{i}").as_bytes()
        );
    }
    // The stream ends after the third message.
    let end = tokio::time::timeout(Duration::from_secs(2), s2.next())
        .await
        .unwrap();
    assert!(end.is_none());
    assert_eq!(
        b.state.subscriptions(),
        0,
        "broker removed the finished subscription"
    );
}

#[tokio::test]
async fn no_echo_client_does_not_receive_its_own_messages() {
    let b = TestBroker::start().await;
    let c = ConnectOptions::new()
        .no_echo(true)
        .connect(&b.url)
        .await
        .unwrap();
    let mut own = c.subscribe("e.x").await.unwrap();
    let other = sockbus_client::connect(&b.url).await.unwrap();
    let mut theirs = other.subscribe("e.x").await.unwrap();
    c.flush().await.unwrap();
    other.flush().await.unwrap();
    c.publish("e.x", "mine").await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(recv(&mut theirs).await.payload.as_ref(), b"mine");
    nothing(&mut own).await;
}

#[tokio::test]
async fn client_reconnects_after_broker_restart_and_restores_subscriptions() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    let c = ConnectOptions::new()
        .max_reconnect_delay(Duration::from_millis(100))
        .connect(&b.url)
        .await
        .unwrap();
    let mut sub = c.subscribe("r.>").await.unwrap();
    let mut q = c.queue_subscribe("rq", "g").await.unwrap();
    c.flush().await.unwrap();
    b.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!c.is_connected());
    // Published while no broker is up: kept and sent on the next connection.
    c.publish("r.offline", "while down").await.unwrap();
    let mut cfg = common::test_config();
    cfg.listen = addr;
    let b2 = TestBroker::with(cfg).await;
    c.wait_connected(Duration::from_secs(5)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(b2.state.subscriptions(), 2, "both subscriptions restored");
    let p = sockbus_client::connect(&b2.url).await.unwrap();
    p.publish("r.after", "back").await.unwrap();
    p.publish("rq", "queued").await.unwrap();
    p.flush().await.unwrap();
    assert_eq!(recv(&mut sub).await.payload.as_ref(), b"while down");
    assert_eq!(recv(&mut sub).await.payload.as_ref(), b"back");
    assert_eq!(recv(&mut q).await.payload.as_ref(), b"queued");
}

#[tokio::test]
async fn client_fails_over_to_the_next_url() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let b = TestBroker::start().await;
    let c = sockbus_client::connect(&format!("sockbus://{dead_addr},{}", b.url))
        .await
        .unwrap();
    assert_eq!(c.server().unwrap().1, b.addr);
}

#[tokio::test]
async fn connect_to_nothing_is_a_clear_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let e = sockbus_client::connect(&format!("sockbus://{addr}"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoServers(_)), "{e}");
    let e = sockbus_client::connect("http://x:1").await.unwrap_err();
    assert!(matches!(e, Error::InvalidUrl(_)), "{e}");
}

#[tokio::test]
async fn many_concurrent_connections_each_get_their_messages() {
    let b = TestBroker::start().await;
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for i in 0..200 {
        let c = sockbus_client::connect(&b.url).await.unwrap();
        subs.push(c.subscribe(&format!("many.{i}")).await.unwrap());
        c.flush().await.unwrap();
        clients.push(c);
    }
    let p = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..200 {
        p.publish(&format!("many.{i}"), format!("{i}"))
            .await
            .unwrap();
    }
    p.flush().await.unwrap();
    for (i, s) in subs.iter_mut().enumerate() {
        assert_eq!(recv(s).await.payload.as_ref(), format!("{i}").as_bytes());
    }
    assert!(sockbus_broker::metrics::Metrics::get(&b.state.metrics().connections) >= 201);
}
