//! Users and permissions over real sockets: who may connect, publish and
//! subscribe, answering requests without a publish permission, the stream
//! API as a permission, and refused subscriptions ending in the SDK.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{test_config, TestBroker};
use sockbus_broker::auth::{hash_secret, UserConfig, Users};
use sockbus_client::streams::StreamConfig;
use sockbus_client::{ConnectOptions, Error};
use sockbus_protocol::code;

fn list(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

/// `orders` (hashed password, restricted as in the issue), `ci` (plain
/// token, everything), `admin` (plain password, everything).
async fn broker() -> TestBroker {
    broker_with(0).await
}

async fn broker_with(max_subscriptions: usize) -> TestBroker {
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            password: Some(hash_secret(b"orders-pw").unwrap()),
            publish: list(&["orders.>"]),
            subscribe: list(&["orders.>", "_INBOX.>"]),
            publish_deny: list(&["orders.admin.>"]),
            ..Default::default()
        },
        UserConfig {
            name: "ci".into(),
            token: Some("ci-token".into()),
            ..Default::default()
        },
        UserConfig {
            name: "admin".into(),
            password: Some("admin-pw".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    TestBroker::with(sockbus_broker::Config {
        users: Some(Arc::new(users)),
        max_subscriptions: if max_subscriptions == 0 {
            test_config().max_subscriptions
        } else {
            max_subscriptions
        },
        ..test_config()
    })
    .await
}

fn opts() -> ConnectOptions {
    ConnectOptions::new()
        .max_reconnects(0)
        .request_timeout(Duration::from_secs(2))
}

fn url_as(b: &TestBroker, userinfo: &str) -> String {
    format!("sockbus://{userinfo}@{}", b.addr)
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_and_right_ones_connect() {
    let b = broker().await;
    for (what, r) in [
        ("none", opts().connect(&b.url).await),
        (
            "wrong password",
            opts().connect(&url_as(&b, "orders:nope")).await,
        ),
        (
            "unknown user",
            opts().connect(&url_as(&b, "nobody:orders-pw")).await,
        ),
        ("wrong token", opts().token("nope").connect(&b.url).await),
    ] {
        match r {
            Err(Error::Authorization(text)) => {
                assert!(!text.contains("nope"), "{what}: no secret echoed: {text}")
            }
            other => panic!("{what}: expected an authorization error, got {other:?}"),
        }
    }
    let refused = b
        .state
        .config()
        .users
        .as_ref()
        .unwrap()
        .failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 4, "each refusal counted");
    // Hashed password in the URL (twice: the second is a cache hit), plain
    // password with the option, token in the URL.
    for _ in 0..2 {
        let c = opts()
            .connect(&url_as(&b, "orders:orders-pw"))
            .await
            .unwrap();
        c.publish("orders.new", "x").await.unwrap();
        c.flush().await.unwrap();
    }
    let c = opts()
        .user_password("admin", "admin-pw")
        .connect(&b.url)
        .await
        .unwrap();
    c.flush().await.unwrap();
    let c = opts().connect(&url_as(&b, "ci-token")).await.unwrap();
    c.flush().await.unwrap();
}

#[tokio::test]
async fn a_refused_client_that_keeps_writing_still_reads_why() {
    // A client that writes after its CONNECT (a PING, PUBs) must still read
    // the refusal: the broker keeps reading until the client closes instead
    // of closing with unread bytes (a reset, then EPIPE on the next write).
    let b = broker().await;
    let mut raw = common::Raw::connect_only(b.addr).await;
    let mut f = bytes::BytesMut::new();
    let token = sockbus_protocol::Credentials::Token(b"nope").encode();
    sockbus_protocol::frame::encode_connect(&mut f, 0, 0, "raw", &token).unwrap();
    raw.send(&f).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        raw.send_frame(sockbus_protocol::Frame::Ping(1)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match raw.next().await {
        Some(sockbus_protocol::Frame::Err { code: c, .. }) => {
            assert_eq!(c, code::AUTHORIZATION_VIOLATION)
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(raw.closed().await);
}

#[tokio::test]
async fn a_denied_publish_is_refused_with_its_subject_and_the_connection_stays_usable() {
    let b = broker().await;
    let admin = opts().connect(&url_as(&b, "admin:admin-pw")).await.unwrap();
    let mut watch = admin.subscribe("orders.>").await.unwrap();
    admin.flush().await.unwrap();
    let c = opts()
        .connect(&url_as(&b, "orders:orders-pw"))
        .await
        .unwrap();
    for _ in 0..3 {
        c.publish("orders.admin.x", "no").await.unwrap();
        match c.flush().await {
            Err(Error::PermissionDenied { op, subject }) => {
                assert_eq!(
                    (op.as_str(), subject.as_str()),
                    ("publish", "orders.admin.x")
                )
            }
            other => panic!("expected permission denied, got {other:?}"),
        }
    }
    c.publish("billing.x", "no").await.unwrap();
    assert!(matches!(
        c.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
    c.publish("orders.new", "yes").await.unwrap();
    c.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.subject(), &m.payload[..]),
        ("orders.new", &b"yes"[..]),
        "only the allowed one arrives"
    );
    let user = b
        .state
        .config()
        .users
        .as_ref()
        .unwrap()
        .iter()
        .find(|u| u.name == "orders")
        .unwrap()
        .clone();
    assert_eq!(
        user.denied_publish
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn a_denied_subscription_ends_its_subscriber_with_the_typed_error() {
    let b = broker().await;
    let c = opts()
        .connect(&url_as(&b, "orders:orders-pw"))
        .await
        .unwrap();
    let mut denied = c.subscribe("billing.>").await.unwrap();
    let mut wide = c.subscribe(">").await.unwrap();
    let mut ok = c.subscribe("orders.*").await.unwrap();
    assert!(matches!(
        c.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
    for s in [&mut denied, &mut wide] {
        assert!(tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .is_none());
        match s.refusal() {
            Some(Error::PermissionDenied { op, .. }) => assert_eq!(op, "subscribe"),
            other => panic!("expected permission denied, got {other:?}"),
        }
    }
    assert!(ok.refusal().is_none());
    c.publish("orders.new", "x").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ok.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.subject(), "orders.new");
}

#[tokio::test]
async fn a_subscription_over_the_limit_ends_its_subscriber_and_the_others_keep_going() {
    let b = broker_with(2).await;
    let c = opts().connect(&url_as(&b, "ci-token")).await.unwrap();
    let mut a = c.subscribe("a").await.unwrap();
    let _b = c.subscribe("b").await.unwrap();
    let mut third = c.subscribe("c").await.unwrap();
    let _ = c.flush().await;
    assert!(tokio::time::timeout(Duration::from_secs(5), third.next())
        .await
        .unwrap()
        .is_none());
    match third.refusal() {
        Some(Error::Server { code: c, .. }) => assert_eq!(c, code::MAX_SUBSCRIPTIONS),
        other => panic!("expected MAX_SUBSCRIPTIONS, got {other:?}"),
    }
    // Dropped from the SDK's table: dropping it sends no UNSUB that would
    // free a slot it never had, and the limit still holds two.
    drop(third);
    let mut fourth = c.subscribe("d").await.unwrap();
    let _ = c.flush().await;
    assert!(tokio::time::timeout(Duration::from_secs(5), fourth.next())
        .await
        .unwrap()
        .is_none());
    c.publish("a", "x").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn a_user_may_answer_a_request_it_received_once_without_a_publish_permission() {
    let b = broker().await;
    let svc = opts()
        .connect(&url_as(&b, "orders:orders-pw"))
        .await
        .unwrap();
    let mut reqs = svc.subscribe("orders.get").await.unwrap();
    svc.flush().await.unwrap();
    let asker = opts().connect(&url_as(&b, "admin:admin-pw")).await.unwrap();
    let ask = tokio::spawn(async move { asker.request("orders.get", "?").await });
    let m = tokio::time::timeout(Duration::from_secs(5), reqs.next())
        .await
        .unwrap()
        .unwrap();
    let reply = m.reply().expect("a request").to_string();
    assert!(reply.starts_with("_INBOX."), "{reply}");
    svc.publish(&reply, "answer").await.unwrap();
    svc.flush().await.unwrap();
    assert_eq!(&ask.await.unwrap().unwrap().payload[..], b"answer");
    // Once per request.
    svc.publish(&reply, "again").await.unwrap();
    assert!(matches!(
        svc.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
    // An inbox it got no request from.
    svc.publish("_INBOX.someone.1", "x").await.unwrap();
    assert!(matches!(
        svc.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
}

#[tokio::test]
async fn a_request_to_a_subject_the_user_may_not_publish_to_fails_at_once_with_the_typed_error() {
    let b = broker().await;
    let admin = opts().connect(&url_as(&b, "admin:admin-pw")).await.unwrap();
    let mut reqs = admin.subscribe("orders.get").await.unwrap();
    let mut billing = admin.subscribe("billing.get").await.unwrap();
    admin.flush().await.unwrap();
    // A request timeout far longer than the test: only the broker's
    // refusal can end the denied request.
    let c = ConnectOptions::new()
        .max_reconnects(0)
        .request_timeout(Duration::from_secs(600))
        .connect(&url_as(&b, "orders:orders-pw"))
        .await
        .unwrap();
    let allowed = {
        let c = c.clone();
        tokio::spawn(async move { c.request("orders.get", "?").await })
    };
    // The allowed request is pending at the broker's responder first.
    let m = tokio::time::timeout(Duration::from_secs(60), reqs.next())
        .await
        .unwrap()
        .unwrap();
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(60), c.request("billing.get", "?"))
            .await
            .expect("the denied request ended by the broker's refusal, not its timeout");
        match r {
            Err(Error::PermissionDenied { op, subject }) => {
                assert_eq!((op.as_str(), subject.as_str()), ("publish", "billing.get"))
            }
            other => panic!("expected permission denied, got {other:?}"),
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), billing.next())
            .await
            .is_err(),
        "nothing reached billing"
    );
    // The other request, still waiting, is untouched and gets its answer.
    admin
        .publish(m.reply().expect("a request"), "answer")
        .await
        .unwrap();
    admin.flush().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), allowed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&reply.payload[..], b"answer");
    c.flush().await.ok();
}

#[tokio::test]
async fn stream_management_needs_a_publish_permission_on_its_api_subject() {
    let b = broker().await;
    let c = opts()
        .connect(&url_as(&b, "orders:orders-pw"))
        .await
        .unwrap();
    // Listing (how `sockbus pub` finds a stream) is open to every user.
    assert!(c.stream_list().await.unwrap().is_empty());
    // A denied request fails at once (the ERR names its reply subject).
    let r = c
        .stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await;
    assert!(
        matches!(&r, Err(Error::PermissionDenied { op, subject }) if op == "publish" && subject.starts_with("$SB.API.")),
        "{r:?}"
    );
    assert!(b.state.streams().is_empty(), "no stream was made");
    let user = b
        .state
        .config()
        .users
        .as_ref()
        .unwrap()
        .iter()
        .find(|u| u.name == "orders")
        .unwrap()
        .clone();
    assert_eq!(
        user.denied_publish
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let admin = opts().connect(&url_as(&b, "admin:admin-pw")).await.unwrap();
    admin
        .stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    assert!(c.stream_delete("ORDERS").await.is_err());
    assert_eq!(b.state.streams().len(), 1, "still there");
}
