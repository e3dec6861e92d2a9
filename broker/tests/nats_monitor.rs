//! NATS-style monitoring on the HTTP gateway: `/varz` and `/jsz` in the
//! shapes tools written for nats-server read (KEDA's NATS JetStream scaler
//! sums `num_pending + num_ack_pending` of one consumer), over real sockets.

mod common;
mod http_util;

use std::time::Duration;

use http_util::HttpBroker;
use hyper::StatusCode;
use serde_json::Value;
use sockbus_broker::Config;
use sockbus_client::streams::{ConsumerConfig, StreamConfig};

const WAIT: Duration = Duration::from_secs(10);

fn nats_config() -> Config {
    Config {
        nats: Some("127.0.0.1:0".parse().unwrap()),
        ..common::test_config()
    }
}

/// The consumer KEDA looks for, found the way its scaler finds it: account
/// by name, stream by name, consumer by name.
fn keda_consumer<'a>(jsz: &'a Value, account: &str, stream: &str, consumer: &str) -> &'a Value {
    let acc = jsz["account_details"]
        .as_array()
        .unwrap_or_else(|| panic!("no account_details: {jsz}"))
        .iter()
        .find(|a| a["name"] == account)
        .unwrap_or_else(|| panic!("no account {account}: {jsz}"));
    let s = acc["stream_detail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stream)
        .unwrap_or_else(|| panic!("no stream {stream}: {jsz}"));
    s["consumer_detail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == consumer)
        .unwrap_or_else(|| panic!("no consumer {consumer}: {jsz}"))
}

/// The scaler's lag: `num_pending + num_ack_pending` of the consumer.
fn lag(c: &Value) -> u64 {
    c["num_pending"].as_u64().unwrap() + c["num_ack_pending"].as_u64().unwrap()
}

#[tokio::test]
async fn jsz_answers_kedas_query_with_each_consumers_exact_lag() {
    let b = HttpBroker::with(nats_config()).await;
    let c = sockbus_client::connect(&b.broker.url).await.unwrap();
    c.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let mut all = c
        .consumer("ORDERS", ConsumerConfig::durable("worker").batch(1))
        .await
        .unwrap();
    let mut eu = c
        .consumer(
            "ORDERS",
            ConsumerConfig::durable("eu").filter("orders.eu").batch(1),
        )
        .await
        .unwrap();
    // 10 messages: 6 to orders.eu, 4 to orders.us.
    for i in 0..10 {
        let subject = if i % 5 < 3 { "orders.eu" } else { "orders.us" };
        c.publish_durable(subject, format!("o{i}")).await.unwrap();
    }
    // worker: 4 delivered, 3 of them acked. eu: 2 delivered and acked.
    for i in 0..4 {
        let m = all.next_limited(WAIT, 1).await.unwrap().expect("a message");
        if i < 3 {
            m.ack_sync().await.unwrap();
        }
    }
    for _ in 0..2 {
        let m = eu.next_limited(WAIT, 1).await.unwrap().expect("a message");
        assert_eq!(m.subject(), "orders.eu");
        m.ack_sync().await.unwrap();
    }
    // The query exactly as KEDA builds it for account "$G".
    let r = b.get("/jsz?acc=$G&consumers=true&config=true").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let jsz = r.json();
    let worker = keda_consumer(&jsz, "$G", "ORDERS", "worker");
    assert_eq!(worker["num_pending"], 6, "{worker}");
    assert_eq!(worker["num_ack_pending"], 1, "{worker}");
    assert_eq!(lag(worker), 7);
    assert_eq!(worker["stream_name"], "ORDERS");
    assert_eq!(worker["config"]["durable_name"], "worker");
    let eu_c = keda_consumer(&jsz, "$G", "ORDERS", "eu");
    assert_eq!(eu_c["num_pending"], 4, "{eu_c}");
    assert_eq!(eu_c["num_ack_pending"], 0, "{eu_c}");
    let stream = &jsz["account_details"][0]["stream_detail"][0];
    assert_eq!(stream["state"]["messages"], 10);
    assert_eq!(stream["state"]["last_seq"], 10);
    assert_eq!(stream["config"]["subjects"][0], "orders.>");
    // A standalone broker: KEDA's cluster path stays off.
    assert!(jsz["meta_cluster"]["cluster_size"].as_u64().unwrap_or(0) <= 1);
    assert_eq!(jsz["streams"], 1);
    assert_eq!(jsz["consumers"], 2);
    // The unacked message acked and the rest consumed: no lag left.
    for _ in 0..6 {
        let m = all.next_limited(WAIT, 1).await.unwrap().expect("a message");
        m.ack_sync().await.unwrap();
    }
    let jsz = b.get("/jsz?acc=$G&consumers=true&config=true").await.json();
    let worker = keda_consumer(&jsz, "$G", "ORDERS", "worker");
    // The 4th message (delivered first, never acked) is still pending an ack.
    assert_eq!(worker["num_pending"], 0, "{worker}");
    assert_eq!(worker["num_ack_pending"], 1, "{worker}");
    // An account that does not exist has no details; totals stay.
    let jsz = b.get("/jsz?acc=nobody&consumers=true").await.json();
    assert_eq!(jsz["account_details"].as_array().unwrap().len(), 0);
    // Without parameters: totals only, as nats-server answers.
    let jsz = b.get("/jsz").await.json();
    assert!(jsz.get("account_details").is_none());
    assert_eq!(jsz["messages"], 10);
}

/// Polls `/varz` until `ok` holds.
async fn varz_until(b: &HttpBroker, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = b.get("/varz").await.json();
        if ok(&v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn varz_counts_connections_and_messages_of_both_protocols() {
    let b = HttpBroker::with(nats_config()).await;
    let nats_addr = b.broker.state.config().nats.unwrap();
    let native = sockbus_client::connect(&b.broker.url).await.unwrap();
    let nats = async_nats::connect(format!("nats://{nats_addr}"))
        .await
        .unwrap();
    let mut sub = native.subscribe("v.>").await.unwrap();
    native.flush().await.unwrap();
    nats.publish("v.a", "hello".into()).await.unwrap();
    nats.flush().await.unwrap();
    common::recv(&mut sub).await;
    let v = b.get("/varz").await.json();
    assert_eq!(v["connections"], 2, "{v}");
    assert!(v["total_connections"].as_u64().unwrap() >= 2);
    assert_eq!(v["port"], nats_addr.port());
    assert!(v["server_id"].as_str().unwrap().starts_with("SOCKBUS-"));
    assert!(v["version"].as_str().unwrap().contains('.'));
    assert!(v["mem"].as_u64().unwrap() > 0);
    assert!(v["cores"].as_u64().unwrap() >= 1);
    assert!(v["max_payload"].as_u64().unwrap() > 0);
    assert!(v["subscriptions"].as_u64().unwrap() >= 1);
    // Counters are folded in as connections flush theirs: poll.
    varz_until(&b, "message counters", |v| {
        v["in_msgs"].as_u64().unwrap() >= 1 && v["out_msgs"].as_u64().unwrap() >= 1
    })
    .await;
    drop(nats);
    varz_until(&b, "the NATS connection leaves the count", |v| {
        v["connections"] == 1
    })
    .await;
}

#[tokio::test]
async fn with_users_the_monitoring_endpoints_need_an_operator_like_metrics() {
    use sockbus_broker::auth::{UserConfig, Users};
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            password: Some("orders-pw".into()),
            publish: Some(vec!["orders.>".into()]),
            subscribe: Some(vec!["orders.>".into()]),
            ..Default::default()
        },
        UserConfig {
            name: "keda".into(),
            token: Some("scrape".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    let b = HttpBroker::with(Config {
        users: Some(std::sync::Arc::new(users)),
        ..nats_config()
    })
    .await;
    for path in ["/varz", "/jsz?acc=$G&consumers=true&config=true"] {
        let r = http_util::request(b.http, hyper::Method::GET, path, &[], Default::default()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.text());
        let basic = format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                "orders:orders-pw"
            )
        );
        let r = http_util::request(
            b.http,
            hyper::Method::GET,
            path,
            &[("authorization", &basic)],
            Default::default(),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
        let r = http_util::request(
            b.http,
            hyper::Method::GET,
            path,
            &[("authorization", "Bearer scrape")],
            Default::default(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    }
}
