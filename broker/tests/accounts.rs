//! Accounts over real sockets: the same subject in two accounts never
//! crosses (pub/sub, queue groups, `>`, request/reply, HTTP, streams,
//! cluster routes), streams belong to their account across a restart, and
//! each account's limits refuse with an error naming them and make room
//! again when freed.

mod common;
mod http_util;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{nothing, recv, test_config, TestBroker};
use http_util::{request, HttpBroker, Sse};
use hyper::{Method, StatusCode};
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::config::AccountLimits;
use sockbus_broker::Config;
use sockbus_client::streams::{ConsumerConfig, StreamConfig};
use sockbus_client::{ConnectOptions, Error};
use sockbus_protocol::code;

/// `shop1`, `shop2` in account `shop`; `bank1` in `bank`; `admin` in the
/// default account. Passwords are the user names.
fn users() -> Option<Arc<Users>> {
    let u = |name: &str, account: Option<&str>| UserConfig {
        name: name.into(),
        password: Some(name.into()),
        account: account.map(String::from),
        ..Default::default()
    };
    Some(Arc::new(
        Users::from_config(vec![
            u("shop1", Some("shop")),
            u("shop2", Some("shop")),
            u("bank1", Some("bank")),
            u("admin", None),
        ])
        .unwrap(),
    ))
}

fn config(limits: Vec<AccountLimits>) -> Config {
    Config {
        users: users(),
        accounts: limits,
        ..test_config()
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions::new()
        .max_reconnects(0)
        .request_timeout(Duration::from_secs(2))
}

async fn as_user(addr: std::net::SocketAddr, user: &str) -> sockbus_client::Client {
    opts()
        .connect(&format!("sockbus://{user}:{user}@{addr}"))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// Publishes `marker` in the subscriber's own account after whatever was
/// published elsewhere: the first message `sub` sees must be that marker,
/// so nothing from another account arrived before it (no sleeping).
async fn only_marker(
    sub: &mut sockbus_client::Subscriber,
    own: &sockbus_client::Client,
    subject: &str,
) {
    own.publish(subject, "marker").await.unwrap();
    own.flush().await.unwrap();
    let m = recv(sub).await;
    assert_eq!(&m.payload[..], b"marker", "got {:?} first", m.payload);
}

#[tokio::test]
async fn the_same_subject_in_two_accounts_never_crosses() {
    let b = TestBroker::with(config(vec![])).await;
    let shop1 = as_user(b.addr, "shop1").await;
    let shop2 = as_user(b.addr, "shop2").await;
    let bank = as_user(b.addr, "bank1").await;
    let admin = as_user(b.addr, "admin").await;

    let mut bank_all = bank.subscribe(">").await.unwrap();
    let mut bank_q = bank.queue_subscribe("orders.new", "workers").await.unwrap();
    let mut admin_all = admin.subscribe(">").await.unwrap();
    let mut shop_sub = shop2.subscribe("orders.new").await.unwrap();
    let mut shop_q = shop2
        .queue_subscribe("orders.new", "workers")
        .await
        .unwrap();
    for c in [&bank, &admin, &shop2] {
        c.flush().await.unwrap();
    }

    shop1.publish("orders.new", "shop").await.unwrap();
    shop1.flush().await.unwrap();
    assert_eq!(&recv(&mut shop_sub).await.payload[..], b"shop");
    assert_eq!(
        &recv(&mut shop_q).await.payload[..],
        b"shop",
        "the account's only member of the group gets it"
    );
    // Neither the other account's `>` nor its member of the same group,
    // nor the default account's `>`.
    only_marker(&mut bank_all, &bank, "x").await;
    only_marker(&mut admin_all, &admin, "x").await;
    bank.publish("orders.new", "bank").await.unwrap();
    bank.flush().await.unwrap();
    assert_eq!(&recv(&mut bank_q).await.payload[..], b"bank");
    // The bank's own `>` saw its marker and its publish, nothing else.
    assert_eq!(&recv(&mut bank_all).await.payload[..], b"bank");
    nothing(&mut shop_sub).await;

    // Request/reply: a responder in one account is nobody in another.
    let mut svc = bank.subscribe("svc.quote").await.unwrap();
    bank.flush().await.unwrap();
    match shop1.request("svc.quote", "?").await {
        Err(Error::NoResponders) => {}
        other => panic!("expected no responders across accounts, got {other:?}"),
    }
    let ask = {
        let bank = bank.clone();
        tokio::spawn(async move { bank.request("svc.quote", "?").await })
    };
    // Skip the bank's own `>` copies; the responder answers its request.
    let m = recv(&mut svc).await;
    bank.publish(m.reply().unwrap(), "42").await.unwrap();
    assert_eq!(&ask.await.unwrap().unwrap().payload[..], b"42");
}

#[tokio::test]
async fn http_publish_and_stream_listing_stay_in_the_users_account() {
    let b = HttpBroker::with(config(vec![])).await;
    let shop = as_user(b.broker.addr, "shop1").await;
    let bank = as_user(b.broker.addr, "bank1").await;
    let mut shop_sub = shop.subscribe("orders.new").await.unwrap();
    let mut bank_sub = bank.subscribe("orders.new").await.unwrap();
    shop.flush().await.unwrap();
    bank.flush().await.unwrap();
    // bank1:bank1
    let bank_auth = [("authorization", "Basic YmFuazE6YmFuazE=")];
    let r = request(
        b.http,
        Method::POST,
        "/v1/publish/orders.new",
        &bank_auth,
        Bytes::from_static(b"via http"),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(&recv(&mut bank_sub).await.payload[..], b"via http");
    only_marker(&mut shop_sub, &shop, "orders.new").await;

    // An SSE subscriber of the bank's hears the bank's publishes only.
    let mut sse = Sse::open_with(b.http, "/v1/subscribe/orders.*", &bank_auth).await;
    assert_eq!(sse.status, StatusCode::OK);
    shop.publish("orders.new", "shop").await.unwrap();
    shop.flush().await.unwrap();
    bank.publish("orders.new", "bank").await.unwrap();
    bank.flush().await.unwrap();
    let e = sse.next().await.expect("an event");
    assert_eq!(e.data(), "bank", "the first event is the bank's: {e:?}");

    shop.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let r = request(b.http, Method::GET, "/v1/streams", &bank_auth, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["streams"], serde_json::json!([]), "not the shop's");
    let r = request(
        b.http,
        Method::GET,
        "/v1/streams/ORDERS",
        &bank_auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn streams_are_per_account_and_keep_their_account_across_a_restart() {
    let cfg = config(vec![]);
    let dir = cfg.data_dir.clone();
    let b = TestBroker::with(cfg).await;
    let shop = as_user(b.addr, "shop1").await;
    let bank = as_user(b.addr, "bank1").await;
    let admin = as_user(b.addr, "admin").await;
    // Three streams named ORDERS on the same subjects, one per account.
    for c in [&shop, &bank, &admin] {
        c.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
            .await
            .unwrap();
    }
    for (c, n) in [(&shop, 3), (&bank, 1)] {
        for _ in 0..n {
            c.publish_durable("orders.new", "m").await.unwrap();
        }
    }
    let count = |c: &sockbus_client::Client| {
        let c = c.clone();
        async move { c.stream_info("ORDERS").await.unwrap().state.messages }
    };
    assert_eq!(count(&shop).await, 3);
    assert_eq!(count(&bank).await, 1);
    assert_eq!(count(&admin).await, 0);
    assert_eq!(bank.stream_list().await.unwrap().len(), 1);

    // The bank deletes its ORDERS: the shop's stays, and the bank can
    // neither read it nor consume it.
    bank.stream_delete("ORDERS").await.unwrap();
    assert!(bank.stream_info("ORDERS").await.is_err());
    assert!(bank.stream_delete("ORDERS").await.is_err());
    assert!(bank
        .consumer("ORDERS", ConsumerConfig::durable("spy"))
        .await
        .is_err());
    assert_eq!(count(&shop).await, 3);
    let mut mine = shop
        .consumer("ORDERS", ConsumerConfig::durable("reader"))
        .await
        .unwrap();
    let m = mine.next_timeout(Duration::from_secs(5)).await.unwrap();
    assert!(m.is_some(), "the shop's own consumer reads its stream");
    drop((shop, bank, admin));
    b.stop().await;

    // Same data directory: each stream comes back in its account.
    let b = TestBroker::with(Config {
        data_dir: dir.clone(),
        ..config(vec![])
    })
    .await;
    let shop = as_user(b.addr, "shop1").await;
    let bank = as_user(b.addr, "bank1").await;
    let admin = as_user(b.addr, "admin").await;
    assert_eq!(count(&shop).await, 3);
    assert_eq!(count(&admin).await, 0);
    assert!(bank.stream_list().await.unwrap().is_empty());
    assert!(
        dir.join("streams").join("ORDERS").is_dir(),
        "the default account's layout is the one main has"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn shop_limits() -> AccountLimits {
    AccountLimits {
        name: "shop".into(),
        max_connections: Some(2),
        max_subscriptions: Some(3),
        max_streams: Some(1),
        max_stored_bytes: Some(600),
    }
}

#[tokio::test]
async fn a_connection_over_the_accounts_limit_is_refused_naming_it_until_one_closes() {
    let b = TestBroker::with(config(vec![shop_limits()])).await;
    let one = as_user(b.addr, "shop1").await;
    let _two = as_user(b.addr, "shop2").await;
    let e = opts()
        .connect(&format!("sockbus://shop1:shop1@{}", b.addr))
        .await
        .unwrap_err();
    match &e {
        Error::Server { code: c, message } => {
            assert_eq!(*c, code::MAX_CONNECTIONS);
            assert!(
                message.contains("account \"shop\"") && message.contains("max-connections"),
                "{message}"
            );
        }
        other => panic!("expected MAX_CONNECTIONS, got {other:?}"),
    }
    // Other accounts are not limited by it.
    let _bank = as_user(b.addr, "bank1").await;
    one.close().await.unwrap();
    drop(one);
    let mut again = None;
    for _ in 0..500 {
        if let Ok(c) = opts()
            .connect(&format!("sockbus://shop1:shop1@{}", b.addr))
            .await
        {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    again.expect("a closed connection makes room");
}

#[tokio::test]
async fn subscriptions_over_the_accounts_limit_are_refused_naming_it_until_freed() {
    let b = TestBroker::with(config(vec![shop_limits()])).await;
    let one = as_user(b.addr, "shop1").await;
    let two = as_user(b.addr, "shop2").await;
    let _a = one.subscribe("a").await.unwrap();
    let _b = one.subscribe("b").await.unwrap();
    // The broker has both before `two` subscribes: which SUB is over the
    // limit must not depend on how two connections' frames interleave.
    one.flush().await.unwrap();
    let mut c = two.subscribe("c").await.unwrap();
    two.flush().await.unwrap();
    let mut over = two.subscribe("d").await.unwrap();
    let _ = two.flush().await;
    assert!(tokio::time::timeout(Duration::from_secs(5), over.next())
        .await
        .unwrap()
        .is_none());
    match over.refusal() {
        Some(Error::Server { code: c, message }) => {
            assert_eq!(c, code::MAX_SUBSCRIPTIONS);
            assert!(
                message.contains("account \"shop\"") && message.contains("max-subscriptions"),
                "{message}"
            );
        }
        other => panic!("expected MAX_SUBSCRIPTIONS, got {other:?}"),
    }
    // Closing the connection that held two frees them for the account.
    one.close().await.unwrap();
    drop(one);
    let mut ok = false;
    for i in 0..500 {
        let mut s = two.subscribe(&format!("e{i}")).await.unwrap();
        two.publish(&format!("e{i}"), "x").await.unwrap();
        let _ = two.flush().await;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), s.next()).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "room again once a connection closed");
    two.publish("c", "still").await.unwrap();
    assert_eq!(&recv(&mut c).await.payload[..], b"still");
}

#[tokio::test]
async fn streams_over_the_accounts_limit_answer_an_error_naming_it() {
    let b = TestBroker::with(config(vec![shop_limits()])).await;
    let shop = as_user(b.addr, "shop1").await;
    shop.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let e = shop
        .stream_add(&StreamConfig::new("MORE", ["more.>"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("account \"shop\"") && e.contains("max-streams"),
        "{e}"
    );
    // The bank has no limit of its own.
    let bank = as_user(b.addr, "bank1").await;
    for n in ["A", "B"] {
        bank.stream_add(&StreamConfig::new(n, [format!("{n}.>")]))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn publishes_past_the_accounts_stored_bytes_answer_an_error_naming_the_limit() {
    let b = TestBroker::with(config(vec![shop_limits()])).await;
    let shop = as_user(b.addr, "shop1").await;
    shop.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    // 600 bytes: a few 100-byte messages, then the account is full.
    let payload = vec![b'x'; 100];
    let mut stored = 0;
    let err = loop {
        match shop.publish_durable("orders.new", &payload).await {
            Ok(_) => stored += 1,
            Err(e) => break e.to_string(),
        }
        assert!(stored < 20, "the limit never bit");
    };
    assert!(stored >= 1, "some fit");
    assert!(
        err.contains("max-stored-bytes") && err.contains("account \"shop\""),
        "{err}"
    );
    // Deleting the stream frees the account's bytes.
    shop.stream_delete("ORDERS").await.unwrap();
    shop.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    shop.publish_durable("orders.new", &payload).await.unwrap();
}

#[tokio::test]
async fn metrics_show_each_accounts_figures_by_account_label() {
    let b = HttpBroker::with(config(vec![shop_limits()])).await;
    let shop = as_user(b.broker.addr, "shop1").await;
    let _s = shop.subscribe("orders.>").await.unwrap();
    shop.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    shop.flush().await.unwrap();
    // admin:admin
    let auth = [("authorization", "Basic YWRtaW46YWRtaW4=")];
    let r = request(b.http, Method::GET, "/metrics", &auth, Bytes::new()).await;
    let text = r.text();
    for line in [
        "sockbus_account_connections{account=\"shop\"} 1",
        "sockbus_account_streams{account=\"shop\"} 1",
        "sockbus_account_connections{account=\"bank\"} 0",
        "sockbus_account_connections{account=\"$default\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
    // The shop's subscription (its `_INBOX` for the API request too).
    assert!(
        text.lines().any(
            |l| l.starts_with("sockbus_account_subscriptions{account=\"shop\"} ")
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
    assert!(!text.contains("orders."), "no subject in the metrics");
    // The broker-wide routes are the default account's (the operator's):
    // a user of another account sees neither other accounts' figures nor
    // their subjects and streams.
    let shop_auth = [("authorization", "Basic c2hvcDE6c2hvcDE=")]; // shop1:shop1
    for path in ["/metrics", "/v1/status", "/"] {
        let r = request(b.http, Method::GET, path, &shop_auth, Bytes::new()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            r.error().contains("account \"shop\""),
            "{path}: {}",
            r.error()
        );
    }
    let r = request(b.http, Method::GET, "/v1/streams", &shop_auth, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "its own account's streams");
    assert_eq!(r.json()["streams"][0]["config"]["name"], "ORDERS");
}

fn free(ip: &str) -> std::net::SocketAddr {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until `b`'s routers hold at least `n` subscriptions (peers' interest included).
async fn wait_subs(b: &TestBroker, n: usize) {
    for _ in 0..1000 {
        if b.state.subscriptions() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "interest did not propagate: {} subscriptions, wanted {n}",
        b.state.subscriptions()
    );
}

#[tokio::test]
async fn over_a_cluster_route_a_message_reaches_only_its_own_accounts_subscribers() {
    let (ra, rb) = (free("127.0.0.2"), free("127.0.0.3"));
    let node = |name: &str, listen, route, peer| Config {
        node_id: name.into(),
        listen,
        cluster: Some(route),
        peers: vec![format!("sockbus-route://{peer}")],
        ..config(vec![])
    };
    let a = TestBroker::with(node("a", free("127.0.0.2"), ra, rb)).await;
    let b = TestBroker::with(node("b", free("127.0.0.3"), rb, ra)).await;

    // On node b: the same pattern in three accounts, and a queue group in two.
    let shop_b = as_user(b.addr, "shop1").await;
    let bank_b = as_user(b.addr, "bank1").await;
    let admin_b = as_user(b.addr, "admin").await;
    let mut shop_sub = shop_b.subscribe("orders.>").await.unwrap();
    let mut bank_sub = bank_b.subscribe("orders.>").await.unwrap();
    let mut admin_sub = admin_b.subscribe("orders.>").await.unwrap();
    let mut shop_q = shop_b.queue_subscribe("jobs", "w").await.unwrap();
    let mut bank_q = bank_b.queue_subscribe("jobs", "w").await.unwrap();
    for c in [&shop_b, &bank_b, &admin_b] {
        c.flush().await.unwrap();
    }
    wait_subs(&a, 5).await;

    // Published on node a in the bank's account.
    let bank_a = as_user(a.addr, "bank1").await;
    let shop_a = as_user(a.addr, "shop1").await;
    let admin_a = as_user(a.addr, "admin").await;
    bank_a.publish("orders.new", "bank").await.unwrap();
    bank_a.publish("jobs", "bank job").await.unwrap();
    bank_a.flush().await.unwrap();
    assert_eq!(&recv(&mut bank_sub).await.payload[..], b"bank");
    assert_eq!(&recv(&mut bank_q).await.payload[..], b"bank job");
    // The other accounts' subscribers on b see their own markers first.
    only_marker(&mut shop_sub, &shop_a, "orders.x").await;
    only_marker(&mut admin_sub, &admin_a, "orders.x").await;
    shop_a.publish("jobs", "shop job").await.unwrap();
    shop_a.flush().await.unwrap();
    assert_eq!(&recv(&mut shop_q).await.payload[..], b"shop job");
    nothing(&mut bank_q).await;

    // Request/reply across the route, within the account only.
    let mut svc = shop_b.subscribe("svc.quote").await.unwrap();
    shop_b.flush().await.unwrap();
    wait_subs(&a, 6).await;
    match bank_a.request("svc.quote", "?").await {
        Err(Error::NoResponders) => {}
        other => panic!("expected no responders from another account, got {other:?}"),
    }
    let ask = {
        let shop_a = shop_a.clone();
        tokio::spawn(async move { shop_a.request("svc.quote", "?").await })
    };
    let m = recv(&mut svc).await;
    shop_b.publish(m.reply().unwrap(), "7").await.unwrap();
    shop_b.flush().await.unwrap();
    assert_eq!(&ask.await.unwrap().unwrap().payload[..], b"7");
}

#[tokio::test]
async fn a_peer_cannot_reach_an_account_by_naming_it_badly_and_hears_each_accounts_subjects_prefixed(
) {
    use sockbus_protocol::frame::{self, encode_connect, encode_rmsg, encode_sub, CONNECT_ROUTE};
    use sockbus_protocol::subject::subject_hash;
    use sockbus_protocol::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let b = TestBroker::with(Config {
        cluster: Some("127.0.0.1:0".parse().unwrap()),
        ..config(vec![])
    })
    .await;
    // The route port the broker bound (it chose it).
    let route = b.route.expect("a cluster port");
    let shop = as_user(b.addr, "shop1").await;
    let bank = as_user(b.addr, "bank1").await;
    let admin = as_user(b.addr, "admin").await;
    let mut shop_sub = shop.subscribe("orders.>").await.unwrap();
    let mut bank_sub = bank.subscribe("orders.>").await.unwrap();
    let mut admin_sub = admin.subscribe("orders.>").await.unwrap();
    for c in [&shop, &bank, &admin] {
        c.flush().await.unwrap();
    }

    let mut peer = tokio::net::TcpStream::connect(route).await.unwrap();
    let mut out = bytes::BytesMut::new();
    encode_connect(&mut out, CONNECT_ROUTE, 0, "fake", b"").unwrap();
    // Interest: an unknown account, malformed prefixes, and the shop's.
    for (sid, p) in [
        (1, "$SB.ACC.nosuch.>"),
        (2, "$SB.ACC..x"),
        (3, "$SB.ACC.shop"),
        (4, "$SB.ACC.shop.orders.>"),
    ] {
        encode_sub(&mut out, sid, p, None).unwrap();
    }
    // Messages: an unknown account's, a malformed one, the bank's, the default's.
    for (subject, payload) in [
        ("$SB.ACC.nosuch.orders.new", "nosuch"),
        ("$SB.ACC..orders.new", "malformed"),
        ("$SB.ACC.bank.orders.new", "bank"),
        ("orders.new", "default"),
    ] {
        encode_rmsg(
            &mut out,
            frame::RMSG_PLAIN,
            subject,
            subject_hash(subject.as_bytes()),
            None,
            &[],
            &[],
            payload.as_bytes(),
        );
    }
    peer.write_all(&out).await.unwrap();
    assert_eq!(&recv(&mut bank_sub).await.payload[..], b"bank");
    assert_eq!(&recv(&mut admin_sub).await.payload[..], b"default");
    only_marker(&mut shop_sub, &shop, "orders.x").await;

    // The route is still up and hears the shop's publish with the prefix.
    shop.publish("orders.y", "to peer").await.unwrap();
    shop.flush().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = 'outer: loop {
        while let Some((f, len)) = frame::decode(&buf, u32::MAX).expect("valid frames") {
            let f = Frame::from(f);
            bytes::Buf::advance(&mut buf, len);
            if let Frame::RMsg {
                subject, payload, ..
            } = f
            {
                if payload == b"to peer" {
                    break 'outer subject;
                }
            }
        }
        let n = tokio::time::timeout_at(deadline, peer.read_buf(&mut buf))
            .await
            .expect("the shop's message reaches the peer")
            .unwrap();
        assert!(n > 0, "the broker closed the route");
    };
    assert_eq!(got, "$SB.ACC.shop.orders.y");
}
