//! JetStream on the NATS port over real sockets, with async-nats's
//! jetstream module (a client nobody here wrote): streams managed through
//! `$JS.API` are sockbus's own streams, publishes get PubAcks, pull and
//! push consumers deliver with `$JS.ACK` subjects and honour acks, naks,
//! terms and ack waits, and the same streams serve sockbus SDK clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use common::{test_config, TestBroker};
use futures_util::StreamExt;
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::Config;

const WAIT: Duration = Duration::from_secs(20);

fn nats_config() -> Config {
    Config {
        nats: Some("127.0.0.1:0".parse().unwrap()),
        lame_duck_grace: Duration::ZERO,
        ..test_config()
    }
}

async fn start(cfg: Config) -> (TestBroker, async_nats::Client) {
    let b = TestBroker::with(cfg).await;
    let nc = connect(&b).await;
    (b, nc)
}

fn url(b: &TestBroker) -> String {
    format!("nats://{}", b.state.config().nats.expect("NATS port"))
}

async fn connect(b: &TestBroker) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(WAIT))
        .connect(url(b))
        .await
        .unwrap()
}

fn js(nc: &async_nats::Client) -> jetstream::Context {
    let mut c = jetstream::new(nc.clone());
    c.set_timeout(WAIT);
    c
}

fn orders() -> stream::Config {
    stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    }
}

/// Sends a raw `$JS.API` request and returns the JSON answer.
async fn api(nc: &async_nats::Client, subject: &str, body: &str) -> serde_json::Value {
    let m = tokio::time::timeout(
        WAIT,
        nc.request(subject.to_string(), body.to_string().into()),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    serde_json::from_slice(&m.payload).unwrap()
}

/// Up to `n` messages of one fetch (a pull that expires after `expires`).
async fn fetch(c: &consumer::PullConsumer, n: usize, expires: Duration) -> Vec<jetstream::Message> {
    let mut msgs = c
        .fetch()
        .max_messages(n)
        .expires(expires)
        .messages()
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, msgs.next())
        .await
        .expect("a fetch ends in time")
    {
        got.push(m.unwrap());
    }
    got
}

/// Fetches until `n` messages arrived (a loaded machine may split them
/// over several pulls).
async fn fetch_n(c: &consumer::PullConsumer, n: usize) -> Vec<jetstream::Message> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} messages",
            got.len()
        );
        got.extend(fetch(c, n - got.len(), Duration::from_secs(2)).await);
    }
    got
}

fn payloads(msgs: &[jetstream::Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

fn seqs(msgs: &[jetstream::Message]) -> Vec<(u64, i64)> {
    msgs.iter()
        .map(|m| {
            let i = m.info().unwrap();
            (i.stream_sequence, i.delivered)
        })
        .collect()
}

async fn publish_n(js: &jetstream::Context, subject: &str, from: u64, to: u64) {
    for i in from..=to {
        let ack = js
            .publish(subject.to_string(), format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, i);
    }
}

fn durable(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn streams_made_through_jetstream_are_sockbus_streams_and_the_other_way_round() {
    let (b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let info = js
        .create_stream(orders())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.name, "ORDERS");
    assert_eq!(info.config.subjects, ["orders.>"]);
    assert_eq!(info.state.messages, 0);
    // The sockbus SDK sees the same stream, and JetStream sees the SDK's.
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    assert_eq!(
        sb.stream_info("ORDERS").await.unwrap().config.subjects,
        ["orders.>"]
    );
    sb.stream_add(&sockbus_client::streams::StreamConfig::new(
        "PAYMENTS",
        ["payments.*"],
    ))
    .await
    .unwrap();
    let mut s = js.get_stream("PAYMENTS").await.unwrap();
    assert_eq!(s.info().await.unwrap().config.subjects, ["payments.*"]);
    let mut names: Vec<String> = js
        .stream_names()
        .map(|n| n.unwrap())
        .collect::<Vec<_>>()
        .await;
    names.sort();
    assert_eq!(names, ["ORDERS", "PAYMENTS"]);
    let mut listed: Vec<String> = js
        .streams()
        .map(|i| i.unwrap().config.name)
        .collect::<Vec<_>>()
        .await;
    listed.sort();
    assert_eq!(listed, ["ORDERS", "PAYMENTS"]);
    // Creating it again as it is answers it; otherwise 10058.
    js.create_stream(orders()).await.unwrap();
    let e = js
        .create_stream(stream::Config {
            subjects: vec!["other.>".into()],
            ..orders()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10058"), "{e}");
    // An update that changes nothing is answered (updates: below).
    js.update_stream(orders()).await.unwrap();
    // Overlapping subjects: 10065.
    let e = js
        .create_stream(stream::Config {
            name: "ALSO".into(),
            subjects: vec!["orders.eu".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10065"), "{e}");
    assert!(js.delete_stream("PAYMENTS").await.unwrap().success);
    assert!(
        sb.stream_info("PAYMENTS").await.is_err(),
        "gone for sockbus"
    );
    let e = js.get_stream("PAYMENTS").await.unwrap_err();
    assert!(
        e.to_string().contains("10059") || e.to_string().contains("not found"),
        "{e}"
    );
    let a = api(&nc, "$JS.API.STREAM.INFO.PAYMENTS", "").await;
    assert_eq!(a["error"]["err_code"], 10059, "{a}");
    assert_eq!(a["error"]["code"], 404, "{a}");
    assert_eq!(a["type"], "io.nats.jetstream.api.v1.stream_info_response");
    let a = api(&nc, "$JS.API.INFO", "").await;
    assert_eq!(
        (a["streams"].as_u64(), a["consumers"].as_u64()),
        (Some(1), Some(0)),
        "{a}"
    );
    let acct = js.query_account().await.unwrap();
    assert_eq!(acct.streams, 1);
}

#[tokio::test]
async fn a_publish_to_a_captured_subject_is_acked_after_it_is_stored_and_a_msg_id_is_stored_once() {
    let (b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 3).await;
    let ack = js
        .send_publish(
            "orders.eu",
            jetstream::context::Publish::build()
                .payload("once".into())
                .message_id("order-7"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        (ack.stream.as_str(), ack.sequence, ack.duplicate),
        ("ORDERS", 4, false)
    );
    let again = js
        .send_publish(
            "orders.eu",
            jetstream::context::Publish::build()
                .payload("twice".into())
                .message_id("order-7"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((again.sequence, again.duplicate), (4, true));
    let st = b.state.streams();
    assert_eq!(st[0].state.messages, 4, "the duplicate was not stored");
    // A publish without a reply subject is stored all the same.
    nc.publish("orders.us", "quiet".into()).await.unwrap();
    nc.flush().await.unwrap();
    let mut s = js.get_stream("ORDERS").await.unwrap();
    for _ in 0..200 {
        if s.info().await.unwrap().state.messages == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.info().await.unwrap().state.messages, 5);
    // A subject no stream captures: no responders, as from nats-server.
    let e = js
        .publish("nowhere.x", "x".into())
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        jetstream::context::PublishErrorKind::StreamNotFound,
        "{e}"
    );
}

#[tokio::test]
async fn expected_headers_that_do_not_hold_refuse_the_publish_with_jetstreams_error_codes() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    let send = |p: jetstream::context::Publish| {
        let js = js.clone();
        async move {
            js.send_publish("orders.eu", p.payload("x".into()))
                .await
                .unwrap()
                .await
        }
    };
    use jetstream::context::{Publish, PublishErrorKind};
    // Sequence 1, with a Msg-Id.
    send(Publish::build().message_id("a").expected_last_sequence(0))
        .await
        .unwrap();
    let e = send(Publish::build().expected_last_sequence(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::WrongLastSequence, "{e}");
    let e = send(Publish::build().expected_last_message_id("zzz"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::WrongLastMessageId, "{e}");
    let e = send(Publish::build().expected_stream("OTHER"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("10060") || e.kind() == PublishErrorKind::Other,
        "{e}"
    );
    // orders.eu was last stored at 1; another subject does not count.
    js.publish("orders.us", "y".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let e = send(Publish::build().expected_last_subject_sequence(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::WrongLastSequence, "{e}");
    // The ones that hold are stored.
    let ok = send(
        Publish::build()
            .expected_last_sequence(2)
            .expected_last_message_id("a")
            .expected_stream("ORDERS")
            .expected_last_subject_sequence(1),
    )
    .await
    .unwrap();
    assert_eq!(ok.sequence, 3);
    let ok = send(Publish::build().expected_last_subject_sequence(3))
        .await
        .unwrap();
    assert_eq!(ok.sequence, 4);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(
        s.info().await.unwrap().state.messages,
        4,
        "no refused publish stored"
    );
}

#[tokio::test]
async fn a_pull_consumer_fetches_and_an_acked_message_is_not_delivered_again() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 5).await;
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            ack_wait: Duration::from_millis(500),
            ..durable("worker")
        })
        .await
        .unwrap();
    let got = fetch_n(&c, 5).await;
    assert_eq!(payloads(&got), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(seqs(&got), [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    let i = got[0].info().unwrap();
    assert_eq!(
        (i.stream, i.consumer, i.consumer_sequence),
        ("ORDERS", "worker", 1)
    );
    for m in &got[..4] {
        m.ack().await.unwrap();
    }
    got[4].double_ack().await.unwrap();
    let mut c2 = c.clone();
    let info = c2.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 5);
    assert_eq!(info.delivered.stream_sequence, 5);
    // Past the ack wait nothing comes back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(fetch(&c, 5, Duration::from_millis(500)).await.is_empty());
    publish_n(&js, "orders.eu", 6, 6).await;
    assert_eq!(payloads(&fetch_n(&c, 1).await), ["m6"]);
    // Names and list.
    let names: Vec<String> = s.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names, ["worker"]);
    let a = api(&nc, "$JS.API.CONSUMER.LIST.ORDERS", "").await;
    assert_eq!(a["consumers"][0]["name"], "worker", "{a}");
    assert_eq!(a["total"], 1);
}

#[tokio::test]
async fn nak_term_and_the_ack_wait_decide_what_is_delivered_again() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 4).await;
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            ack_wait: Duration::from_secs(2),
            ..durable("w")
        })
        .await
        .unwrap();
    let got = fetch_n(&c, 4).await;
    got[0].ack_with(AckKind::Nak(None)).await.unwrap();
    got[1].ack_with(AckKind::Term).await.unwrap();
    got[2].ack().await.unwrap();
    got[3]
        .ack_with(AckKind::Nak(Some(Duration::from_millis(800))))
        .await
        .unwrap();
    // The nak'ed one at once, the delayed one after its delay.
    let before_again = std::time::Instant::now();
    let again = fetch_n(&c, 1).await;
    assert_eq!(seqs(&again), [(1, 2)]);
    let later = fetch_n(&c, 1).await;
    assert_eq!(seqs(&later), [(4, 2)]);
    // Never acked: back after ack_wait (2 s from its second delivery,
    // which came after `before_again`), with the count raised.
    let third = fetch_n(&c, 1).await;
    assert_eq!(seqs(&third), [(1, 3)]);
    assert!(
        before_again.elapsed() >= Duration::from_millis(1900),
        "redelivered before its ack wait: {:?}",
        before_again.elapsed()
    );
    // +WPI pushes the redelivery out; +TERM'ed 2 and acked 3 never return.
    third[0].ack_with(AckKind::Progress).await.unwrap();
    third[0].ack().await.unwrap();
    later[0].ack().await.unwrap();
    assert!(fetch(&c, 4, Duration::from_millis(2500)).await.is_empty());
}

#[tokio::test]
async fn a_durable_consumer_resumes_after_a_broker_restart() {
    let cfg = nats_config();
    let dir = cfg.data_dir.clone();
    let (b, nc) = start(cfg).await;
    let addr = b.state.config().nats.unwrap();
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 4).await;
    let c: consumer::PullConsumer = s.create_consumer(durable("d")).await.unwrap();
    let got = fetch_n(&c, 2).await;
    for m in &got {
        m.double_ack().await.unwrap();
    }
    drop(nc);
    b.stop().await;
    let b = TestBroker::with(Config {
        nats: Some(addr),
        data_dir: dir,
        ..nats_config()
    })
    .await;
    let nc = connect(&b).await;
    let js = self::js(&nc);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 4);
    let c: consumer::PullConsumer = s.get_consumer("d").await.unwrap();
    let rest = fetch_n(&c, 2).await;
    assert_eq!(
        payloads(&rest),
        ["m3", "m4"],
        "resumed after the acked ones"
    );
}

#[tokio::test]
async fn a_push_consumer_delivers_to_its_deliver_subject_and_honours_acks() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 3).await;
    let c: consumer::PushConsumer = s
        .create_consumer(consumer::push::Config {
            durable_name: Some("pusher".into()),
            deliver_subject: "deliver.orders".into(),
            ack_wait: Duration::from_secs(30),
            idle_heartbeat: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(WAIT, msgs.next())
            .await
            .expect("pushed in time")
            .unwrap()
            .unwrap();
        m.ack().await.unwrap();
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["m1", "m2", "m3"]);
    // Idle longer than the heartbeat: heartbeats keep the client content,
    // and nothing acked comes back.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    publish_n(&js, "orders.eu", 4, 4).await;
    let m = tokio::time::timeout(WAIT, msgs.next())
        .await
        .expect("pushed in time")
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"m4");
}

#[tokio::test]
async fn sdk_publishes_reach_nats_fetches_and_nats_publishes_reach_sdk_consumers() {
    let (b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    for i in 1..=3 {
        let a = sb
            .publish_durable("orders.eu", format!("sdk{i}"))
            .await
            .unwrap();
        assert_eq!(a.seq, i);
    }
    let c: consumer::PullConsumer = s.create_consumer(durable("nats")).await.unwrap();
    let got = fetch_n(&c, 3).await;
    assert_eq!(payloads(&got), ["sdk1", "sdk2", "sdk3"]);
    for m in &got {
        m.ack().await.unwrap();
    }
    publish_n(&js, "orders.us", 4, 5).await;
    let mut sc = sb
        .consumer(
            "ORDERS",
            sockbus_client::streams::ConsumerConfig::durable("sdk"),
        )
        .await
        .unwrap();
    let mut read = Vec::new();
    while read.len() < 5 {
        let m = tokio::time::timeout(WAIT, sc.next())
            .await
            .expect("in time")
            .unwrap();
        m.ack().await.unwrap();
        read.push(String::from_utf8(m.payload().to_vec()).unwrap());
    }
    assert_eq!(read, ["sdk1", "sdk2", "sdk3", "m4", "m5"]);
}

#[tokio::test]
async fn a_user_without_permission_on_the_jetstream_api_is_denied() {
    let users = Users::from_config(vec![
        UserConfig {
            name: "app".into(),
            password: Some("app".into()),
            publish: Some(vec!["orders.>".into()]),
            subscribe: Some(vec!["orders.>".into(), "_INBOX.>".into()]),
            ..Default::default()
        },
        UserConfig {
            name: "admin".into(),
            password: Some("admin".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    let b = TestBroker::with(Config {
        users: Some(Arc::new(users)),
        ..nats_config()
    })
    .await;
    let login = |u: &str| {
        async_nats::ConnectOptions::with_user_and_password(u.into(), u.into())
            .request_timeout(Some(Duration::from_secs(2)))
            .connect(url(&b))
    };
    let app = login("app").await.unwrap();
    let mut ctx = jetstream::new(app.clone());
    ctx.set_timeout(Duration::from_secs(2));
    assert!(ctx.create_stream(orders()).await.is_err(), "denied");
    let admin = login("admin").await.unwrap();
    js(&admin).create_stream(orders()).await.unwrap();
    assert_eq!(b.state.streams().len(), 1, "only the admin's stream");
    // The app may still publish into it, and gets its PubAck.
    let ack = ctx
        .publish("orders.eu", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 1);
}

#[tokio::test]
async fn streams_belong_to_their_account() {
    let u = |name: &str, account: Option<&str>| UserConfig {
        name: name.into(),
        password: Some(name.into()),
        account: account.map(String::from),
        ..Default::default()
    };
    let users = Users::from_config(vec![u("shop", Some("shop")), u("admin", None)]).unwrap();
    let b = TestBroker::with(Config {
        users: Some(Arc::new(users)),
        ..nats_config()
    })
    .await;
    let login = |u: &str| {
        async_nats::ConnectOptions::with_user_and_password(u.into(), u.into())
            .request_timeout(Some(WAIT))
            .connect(url(&b))
    };
    let shop = js(&login("shop").await.unwrap());
    let admin = js(&login("admin").await.unwrap());
    shop.create_stream(orders()).await.unwrap();
    assert!(admin.get_stream("ORDERS").await.is_err(), "not the admin's");
    // The admin account may have its own stream of that name.
    admin.create_stream(orders()).await.unwrap();
    publish_n(&shop, "orders.eu", 1, 2).await;
    publish_n(&admin, "orders.eu", 1, 1).await;
    let mut s = shop.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 2);
}

#[tokio::test]
async fn bad_requests_get_jetstream_errors_and_pull_statuses() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    // Garbage JSON.
    let a = api(&nc, "$JS.API.STREAM.CREATE.X", "{not json").await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = api(&nc, "$JS.API.STREAM.CREATE.X", r#"{"name":"Y"}"#).await;
    assert_eq!(a["error"]["err_code"], 10056, "{a}");
    let a = api(
        &nc,
        "$JS.API.STREAM.CREATE.X",
        r#"{"retention":"workqueue"}"#,
    )
    .await;
    assert!(
        a["error"]["description"]
            .as_str()
            .unwrap()
            .contains("not supported by sockbus: retention"),
        "{a}"
    );
    // A consumer on a missing stream.
    let a = api(&nc, "$JS.API.CONSUMER.CREATE.NOPE", r#"{"config":{}}"#).await;
    assert_eq!(a["error"]["err_code"], 10059, "{a}");
    let s = js.create_stream(orders()).await.unwrap();
    let a = api(&nc, "$JS.API.CONSUMER.INFO.ORDERS.nope", "").await;
    assert_eq!(a["error"]["err_code"], 10014, "{a}");
    // An unsupported API request is named.
    let a = api(&nc, "$JS.API.DIRECT.GET.ORDERS", "").await;
    assert!(
        a["error"]["description"]
            .as_str()
            .unwrap()
            .contains("DIRECT.GET"),
        "{a}"
    );

    let _c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            max_ack_pending: 2,
            ..durable("slow")
        })
        .await
        .unwrap();
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    let next = "$JS.API.CONSUMER.MSG.NEXT.ORDERS.slow";
    let status = |m: &async_nats::Message| m.status.map(|s| s.as_u16());
    // no_wait with nothing: 404 at once.
    nc.publish_with_reply(next, inbox.clone(), r#"{"batch":5,"no_wait":true}"#.into())
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&m), Some(404), "{m:?}");
    // Expiry: 408.
    nc.publish_with_reply(
        next,
        inbox.clone(),
        r#"{"batch":5,"expires":200000000}"#.into(),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&m), Some(408), "{m:?}");
    // Garbage pull request: 400.
    nc.publish_with_reply(next, inbox.clone(), "{\"batch\":-3}".into())
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&m), Some(400), "{m:?}");
    // A client that never acks holds at most max_ack_pending, even with a
    // huge batch; the pull then ends with its expiry.
    publish_n(&js, "orders.eu", 1, 5).await;
    nc.publish_with_reply(
        next,
        inbox.clone(),
        r#"{"batch":1000000000,"expires":1500000000}"#.into(),
    )
    .await
    .unwrap();
    let mut delivered = 0;
    loop {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        match status(&m) {
            None => delivered += 1,
            Some(s) => {
                assert_eq!(s, 408, "{m:?}");
                break;
            }
        }
    }
    assert_eq!(delivered, 2, "max_ack_pending bounds what is outstanding");
    // A pull waiting when its consumer is deleted hears 409; a pull for a
    // consumer that does not exist hears no responders (503).
    nc.publish_with_reply(next, inbox.clone(), r#"{"batch":1,"expires":0}"#.into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = api(&nc, "$JS.API.CONSUMER.DELETE.ORDERS.slow", "").await;
    assert_eq!(a["success"], true, "{a}");
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&m), Some(409), "{m:?}");
    nc.publish_with_reply(next, inbox.clone(), "1".into())
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&m), Some(503), "{m:?}");
}

#[tokio::test]
async fn deliver_policies_filters_and_ack_policies_choose_what_a_consumer_gets() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 2).await;
    publish_n(&js, "orders.us", 3, 3).await;
    publish_n(&js, "orders.eu", 4, 4).await;
    let make = |name: &str, cfg: consumer::pull::Config| {
        let s = s.clone();
        let name = name.to_string();
        async move {
            s.create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                ..cfg
            })
            .await
            .unwrap()
        }
    };
    use consumer::DeliverPolicy;
    let c = make(
        "from3",
        consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 3 },
            ..Default::default()
        },
    )
    .await;
    assert_eq!(payloads(&fetch_n(&c, 2).await), ["m3", "m4"]);
    let c = make(
        "last",
        consumer::pull::Config {
            deliver_policy: DeliverPolicy::Last,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(payloads(&fetch_n(&c, 1).await), ["m4"]);
    let c = make(
        "eu",
        consumer::pull::Config {
            filter_subject: "orders.eu".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(payloads(&fetch_n(&c, 3).await), ["m1", "m2", "m4"]);
    let new = make(
        "new",
        consumer::pull::Config {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        },
    )
    .await;
    assert!(fetch(&new, 5, Duration::from_millis(300)).await.is_empty());
    publish_n(&js, "orders.eu", 5, 5).await;
    assert_eq!(payloads(&fetch_n(&new, 1).await), ["m5"]);
    // ack_policy all: acking the last acks every earlier one.
    let all = make(
        "all",
        consumer::pull::Config {
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        },
    )
    .await;
    let got = fetch_n(&all, 5).await;
    got[4].double_ack().await.unwrap();
    let mut all2 = all.clone();
    assert_eq!(all2.info().await.unwrap().num_ack_pending, 0);
    // ack_policy none: nothing pending, nothing delivered twice.
    let none = make(
        "none",
        consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ack_wait: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(fetch_n(&none, 5).await.len(), 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fetch(&none, 5, Duration::from_millis(300)).await.is_empty());
    // A filter in the create subject (CONSUMER.CREATE.<stream>.<name>.<filter>)
    // and the older DURABLE.CREATE subject.
    let a = api(
        &nc,
        "$JS.API.CONSUMER.CREATE.ORDERS.us.orders.us",
        r#"{"stream_name":"ORDERS","config":{"name":"us","durable_name":"us","ack_policy":"explicit"}}"#,
    )
    .await;
    assert_eq!(a["config"]["filter_subject"], "orders.us", "{a}");
    assert_eq!(
        a["type"],
        "io.nats.jetstream.api.v1.consumer_create_response"
    );
    let a = api(
        &nc,
        "$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.old",
        r#"{"stream_name":"ORDERS","config":{"durable_name":"old","ack_policy":"explicit"}}"#,
    )
    .await;
    assert_eq!(a["name"], "old", "{a}");
    let a = api(
        &nc,
        "$JS.API.CONSUMER.CREATE.ORDERS.x",
        r#"{"stream_name":"ORDERS","config":{"name":"y"}}"#,
    )
    .await;
    assert_eq!(a["error"]["err_code"], 10017, "{a}");
    let a = api(
        &nc,
        "$JS.API.CONSUMER.CREATE.ORDERS.eu",
        r#"{"stream_name":"ORDERS","action":"create","config":{"durable_name":"eu","ack_policy":"none"}}"#,
    )
    .await;
    assert_eq!(a["error"]["err_code"], 10148, "{a}");
}

#[tokio::test]
async fn an_ephemeral_consumer_is_removed_after_its_inactive_threshold() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            inactive_threshold: Duration::from_millis(300),
            ..Default::default()
        })
        .await
        .unwrap();
    let name = c.cached_info().name.clone();
    let info = format!("$JS.API.CONSUMER.INFO.ORDERS.{name}");
    assert_eq!(api(&nc, &info, "").await["name"], name.as_str());
    let mut gone = false;
    for _ in 0..200 {
        if api(&nc, &info, "").await["error"]["err_code"] == 10014 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the ephemeral consumer {name} is still there");
    // A durable one stays.
    s.create_consumer(durable("stays")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        api(&nc, "$JS.API.CONSUMER.INFO.ORDERS.stays", "").await["name"],
        "stays"
    );
}

#[tokio::test]
async fn pulls_beyond_max_waiting_are_refused_with_409() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    let a = api(
        &nc,
        "$JS.API.CONSUMER.CREATE.ORDERS.w",
        r#"{"stream_name":"ORDERS","config":{"durable_name":"w","max_waiting":1}}"#,
    )
    .await;
    assert_eq!(a["config"]["max_waiting"], 1, "{a}");
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    let next = "$JS.API.CONSUMER.MSG.NEXT.ORDERS.w";
    nc.publish_with_reply(
        next,
        inbox.clone(),
        r#"{"batch":1,"expires":5000000000}"#.into(),
    )
    .await
    .unwrap();
    nc.publish_with_reply(
        next,
        inbox.clone(),
        r#"{"batch":1,"expires":5000000000}"#.into(),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    let st = m.status.map(|s| s.as_u16());
    assert_eq!(st, Some(409), "{m:?}");
    assert_eq!(
        m.description.as_deref(),
        Some("Exceeded MaxWaiting"),
        "{m:?}"
    );
    // The first one still gets the next message.
    publish_n(&js, "orders.eu", 1, 1).await;
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&m.payload[..], m.status), (&b"m1"[..], None), "{m:?}");
}

#[tokio::test]
async fn a_push_consumer_with_a_deliver_group_gives_each_message_to_one_member() {
    let (b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    let a = api(
        &nc,
        "$JS.API.CONSUMER.CREATE.ORDERS.grp",
        r#"{"stream_name":"ORDERS","config":{"durable_name":"grp","deliver_subject":"deliver.grp","deliver_group":"g","ack_policy":"explicit"}}"#,
    )
    .await;
    assert_eq!(a["config"]["deliver_group"], "g", "{a}");
    let other = connect(&b).await;
    let mut m1 = nc.queue_subscribe("deliver.grp", "g".into()).await.unwrap();
    let mut m2 = other
        .queue_subscribe("deliver.grp", "g".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    other.flush().await.unwrap();
    publish_n(&js, "orders.eu", 1, 20).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut each = [0, 0];
    while seen.len() < 20 {
        let (m, i) = tokio::select! {
            m = m1.next() => (m, 0),
            m = m2.next() => (m, 1),
            _ = tokio::time::sleep(WAIT) => panic!("{} of 20 delivered", seen.len()),
        };
        let m = m.unwrap();
        assert!(seen.insert(m.payload.clone()), "delivered twice: {m:?}");
        each[i] += 1;
        // Acked, so nothing comes back.
        nc.publish(m.reply.unwrap(), "".into()).await.unwrap();
    }
    assert_eq!(each[0] + each[1], 20);
    drop(s);
    // Deleting the consumer stops the deliveries.
    let a = api(&nc, "$JS.API.CONSUMER.DELETE.ORDERS.grp", "").await;
    assert_eq!(a["success"], true, "{a}");
    publish_n(&js, "orders.eu", 21, 21).await;
    tokio::select! {
        m = m1.next() => panic!("delivered after delete: {m:?}"),
        m = m2.next() => panic!("delivered after delete: {m:?}"),
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
}

#[tokio::test]
async fn an_ack_with_next_acks_and_pulls_the_next_message_to_its_reply_subject() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 3).await;
    let _c: consumer::PullConsumer = s.create_consumer(durable("nxt")).await.unwrap();
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply(
        "$JS.API.CONSUMER.MSG.NEXT.ORDERS.nxt",
        inbox.clone(),
        "1".into(),
    )
    .await
    .unwrap();
    let mut m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    for want in ["m1", "m2", "m3"] {
        assert_eq!(std::str::from_utf8(&m.payload).unwrap(), want);
        let ack = m.reply.clone().expect("an ack subject");
        assert!(ack.starts_with("$JS.ACK.ORDERS.nxt.1."), "{ack}");
        if want == "m3" {
            m.reply = None;
            let a = api(&nc, "$JS.API.CONSUMER.INFO.ORDERS.nxt", "").await;
            assert_eq!(a["num_ack_pending"], 1, "m1 and m2 acked by +NXT: {a}");
            break;
        }
        nc.publish_with_reply(ack, inbox.clone(), "+NXT".into())
            .await
            .unwrap();
        m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_durable_push_consumer_delivers_again_after_a_broker_restart_from_where_it_was() {
    let cfg = nats_config();
    let dir = cfg.data_dir.clone();
    let (b, nc) = start(cfg).await;
    let addr = b.state.config().nats.unwrap();
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    let create = r#"{"stream_name":"ORDERS","config":{"durable_name":"p","deliver_subject":"deliver.p","ack_policy":"explicit"}}"#;
    let a = api(&nc, "$JS.API.CONSUMER.CREATE.ORDERS.p", create).await;
    assert_eq!(a["name"], "p", "{a}");
    let mut sub = nc.subscribe("deliver.p").await.unwrap();
    publish_n(&js, "orders.eu", 1, 2).await;
    for want in ["m1", "m2"] {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&m.payload[..], want.as_bytes());
        let r = nc
            .request(m.reply.unwrap(), "".into())
            .await
            .expect("the ack is confirmed once stored");
        assert!(r.status.is_none(), "{r:?}");
    }
    drop((sub, nc));
    b.stop().await;
    let b = TestBroker::with(Config {
        nats: Some(addr),
        data_dir: dir,
        ..nats_config()
    })
    .await;
    let nc = connect(&b).await;
    let js = self::js(&nc);
    // Created again as it is: answered, nothing changes.
    let a = api(&nc, "$JS.API.CONSUMER.CREATE.ORDERS.p", create).await;
    assert_eq!(a["config"]["deliver_subject"], "deliver.p", "{a}");
    let mut sub = nc.subscribe("deliver.p").await.unwrap();
    publish_n(&js, "orders.eu", 3, 3).await;
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"m3", "acked messages are not pushed again");
}

/// `STREAM.MSG.GET` (what `nats stream get` and async-nats's
/// `get_raw_message` use): a message by sequence with its headers, the
/// newest on a subject, the next on a subject from a sequence, and
/// JetStream's errors for a missing message and a request without a key.
#[tokio::test]
async fn stored_messages_are_read_back_by_sequence_and_by_subject() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("X-Kind", "first one");
    js.publish_with_headers("orders.a", h, "1".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for (s, p) in [("orders.b", "2"), ("orders.a", "3"), ("orders.b", "4")] {
        js.publish(s, p.into()).await.unwrap().await.unwrap();
    }
    let st = js.get_stream("ORDERS").await.unwrap();

    let m = st.get_raw_message(1).await.unwrap();
    assert_eq!((m.subject.as_str(), m.sequence), ("orders.a", 1));
    assert_eq!(&m.payload[..], b"1");
    assert_eq!(
        m.headers.get("X-Kind").map(|v| v.as_str()),
        Some("first one")
    );
    let m = st.get_raw_message(2).await.unwrap();
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("orders.b", &b"2"[..])
    );
    assert!(m.headers.is_empty());

    let m = st
        .get_last_raw_message_by_subject("orders.a")
        .await
        .unwrap();
    assert_eq!((m.sequence, &m.payload[..]), (3, &b"3"[..]));
    let m = st
        .get_last_raw_message_by_subject("orders.*")
        .await
        .unwrap();
    assert_eq!(m.sequence, 4);

    let e = st.get_raw_message(99).await.unwrap_err().to_string();
    assert!(e.contains("no message found"), "{e}");
    let e = st
        .get_last_raw_message_by_subject("orders.none")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no message found"), "{e}");

    // The next message on a subject from a sequence on, in the raw API.
    let a = api(
        &nc,
        "$JS.API.STREAM.MSG.GET.ORDERS",
        r#"{"seq": 2, "next_by_subj": "orders.a"}"#,
    )
    .await;
    assert_eq!(a["message"]["seq"], 3, "{a}");
    assert_eq!(
        a["type"],
        "io.nats.jetstream.api.v1.stream_msg_get_response"
    );
    let a = api(&nc, "$JS.API.STREAM.MSG.GET.ORDERS", "{}").await;
    assert_eq!(a["error"]["err_code"], 10003, "{a}");
    for garbage in [
        r#"{"seq": "one"}"#,
        r#"{"last_by_subj": "orders..a"}"#,
        "[1]",
    ] {
        let a = api(&nc, "$JS.API.STREAM.MSG.GET.ORDERS", garbage).await;
        assert_eq!(a["error"]["err_code"], 10025, "{garbage}: {a}");
    }
    let a = api(&nc, "$JS.API.STREAM.MSG.GET.NOPE", r#"{"seq": 1}"#).await;
    assert_eq!(a["error"]["err_code"], 10059, "{a}");
}

/// `STREAM.UPDATE` through a raw request: the answer's JSON.
async fn update(nc: &async_nats::Client, name: &str, cfg: serde_json::Value) -> serde_json::Value {
    api(
        nc,
        &format!("$JS.API.STREAM.UPDATE.{name}"),
        &cfg.to_string(),
    )
    .await
}

#[tokio::test]
async fn an_update_adds_a_subject_whose_publishes_are_then_captured_and_acked_and_removes_one() {
    let (b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 2).await;
    let info = js
        .update_stream(stream::Config {
            subjects: vec!["orders.>".into(), "returns.*".into()],
            description: Some("orders and returns".into()),
            ..orders()
        })
        .await
        .unwrap();
    assert_eq!(info.config.subjects, ["orders.>", "returns.*"]);
    assert_eq!(
        info.config.description.as_deref(),
        Some("orders and returns")
    );
    let ack = js
        .publish("returns.r1", "back".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", 3));
    // The sockbus SDK's durable publish is captured too.
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    let a = sb.publish_durable("returns.r2", b"x").await.unwrap();
    assert_eq!((a.stream.as_str(), a.seq), ("ORDERS", 4));
    assert_eq!(
        sb.stream_info("ORDERS").await.unwrap().config.subjects,
        ["orders.>", "returns.*"]
    );
    // Without `orders.>` a publish there is no longer stored: the request
    // finds no responder.
    js.update_stream(stream::Config {
        subjects: vec!["returns.*".into()],
        ..orders()
    })
    .await
    .unwrap();
    let r = js.publish("orders.eu", "lost".into()).await.unwrap().await;
    assert!(r.is_err(), "{r:?}");
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!((st.messages, st.last_sequence), (4, 4));
    // Another stream may now take `orders.>`.
    js.create_stream(stream::Config {
        name: "NEW".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js
        .publish("orders.eu", "new".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((ack.stream.as_str(), ack.sequence), ("NEW", 1));
}

#[tokio::test]
async fn an_update_lowering_max_msgs_drops_the_oldest_at_once_and_consumers_go_on_from_the_first() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 10).await;
    let c: consumer::PullConsumer = s.create_consumer(durable("d")).await.unwrap();
    let a = update(
        &nc,
        "ORDERS",
        serde_json::json!({"name": "ORDERS", "subjects": ["orders.>"], "max_msgs": 4}),
    )
    .await;
    assert_eq!(a["type"], "io.nats.jetstream.api.v1.stream_update_response");
    assert_eq!(a["config"]["max_msgs"], 4, "{a}");
    assert_eq!(
        (
            &a["state"]["messages"],
            &a["state"]["first_seq"],
            &a["state"]["last_seq"]
        ),
        (
            &serde_json::json!(4),
            &serde_json::json!(7),
            &serde_json::json!(10)
        ),
        "the answer shows the limit applied: {a}"
    );
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 4);
    let got = fetch_n(&c, 4).await;
    assert_eq!(payloads(&got), ["m7", "m8", "m9", "m10"]);
    // New messages push the oldest out, keeping exactly four.
    publish_n(&js, "orders.eu", 11, 12).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = s.info().await.unwrap().state.clone();
    assert_eq!((st.messages, st.first_sequence), (4, 9));
    // A byte limit is exact too: the oldest go until the rest fits.
    let a = update(
        &nc,
        "ORDERS",
        serde_json::json!({"name": "ORDERS", "subjects": ["orders.>"], "max_msgs": 4,
                           "max_bytes": 150}),
    )
    .await;
    let bytes = a["state"]["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes <= 150, "{a}");
    assert_eq!(a["state"]["last_seq"], 12, "{a}");
    let kept = a["state"]["messages"].clone();
    assert!(kept.as_u64().unwrap() < 4, "{a}");
    // Raising it again keeps what is there.
    let a = update(
        &nc,
        "ORDERS",
        serde_json::json!({"name": "ORDERS", "subjects": ["orders.>"], "max_msgs": -1}),
    )
    .await;
    assert_eq!(
        (&a["config"]["max_msgs"], &a["state"]["messages"]),
        (&serde_json::json!(-1), &kept),
        "{a}"
    );
}

#[tokio::test]
async fn an_update_survives_a_broker_restart() {
    let cfg = nats_config();
    let dir = cfg.data_dir.clone();
    let (b, nc) = start(cfg).await;
    let addr = b.state.config().nats.unwrap();
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 6).await;
    js.update_stream(stream::Config {
        subjects: vec!["orders.>".into(), "returns.*".into()],
        max_messages: 3,
        duplicate_window: Duration::from_secs(30),
        description: Some("kept".into()),
        ..orders()
    })
    .await
    .unwrap();
    drop(nc);
    b.stop().await;
    let b = TestBroker::with(Config {
        nats: Some(addr),
        data_dir: dir,
        ..nats_config()
    })
    .await;
    let nc = connect(&b).await;
    let js = self::js(&nc);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let info = s.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, ["orders.>", "returns.*"]);
    assert_eq!(info.config.max_messages, 3);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));
    assert_eq!(info.config.description.as_deref(), Some("kept"));
    assert_eq!(
        (
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence
        ),
        (3, 4, 6),
        "what the limit dropped stays dropped"
    );
    let ack = js
        .publish("returns.r", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", 7));
}

#[tokio::test]
async fn updates_that_change_what_cannot_change_or_make_no_sense_get_nats_servers_errors() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    js.create_stream(stream::Config {
        name: "OTHER".into(),
        subjects: vec!["other.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let base = || serde_json::json!({"name": "ORDERS", "subjects": ["orders.>"]});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base();
        c[k] = v;
        c
    };
    let e = js
        .update_stream(stream::Config {
            storage: stream::StorageType::Memory,
            ..orders()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10052"), "{e}");
    let a = update(&nc, "ORDERS", with("storage", "memory".into())).await;
    assert_eq!(
        (
            &a["error"]["code"],
            &a["error"]["err_code"],
            &a["error"]["description"]
        ),
        (
            &serde_json::json!(500),
            &serde_json::json!(10052),
            &serde_json::json!("stream configuration update can not change storage type")
        ),
        "{a}"
    );
    let a = update(&nc, "ORDERS", with("num_replicas", 3.into())).await;
    assert_eq!(
        (&a["error"]["err_code"], &a["error"]["description"]),
        (
            &serde_json::json!(10061),
            &serde_json::json!("Replicas configuration can not be updated")
        ),
        "{a}"
    );
    let a = update(&nc, "ORDERS", with("name", "OTHER".into())).await;
    assert_eq!(a["error"]["err_code"], 10056, "{a}");
    let a = update(&nc, "ORDERS", with("retention", "workqueue".into())).await;
    assert_eq!(a["error"]["err_code"], 10052, "{a}");
    let a = update(&nc, "ORDERS", with("discard", "new".into())).await;
    assert_eq!(a["error"]["err_code"], 10052, "{a}");
    let a = update(&nc, "ORDERS", with("max_msgs", "ten".into())).await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = update(
        &nc,
        "ORDERS",
        with("subjects", serde_json::json!(["orders.>", "other.x"])),
    )
    .await;
    assert_eq!(a["error"]["err_code"], 10065, "{a}");
    let a = update(&nc, "ORDERS", with("subjects", serde_json::json!(["a..b"]))).await;
    assert_eq!(a["error"]["code"], 400, "{a}");
    let a = api(&nc, "$JS.API.STREAM.UPDATE.ORDERS", "{not json").await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = api(&nc, "$JS.API.STREAM.UPDATE.ORDERS", "[1,2]").await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = update(&nc, "NOPE", serde_json::json!({"name": "NOPE"})).await;
    assert_eq!(
        (&a["error"]["code"], &a["error"]["err_code"]),
        (&serde_json::json!(404), &serde_json::json!(10059)),
        "{a}"
    );
    // Nothing changed: the stream still captures what it did.
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let info = s.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, ["orders.>"]);
    assert_eq!(info.config.storage, stream::StorageType::File);
    let ack = js
        .publish("orders.eu", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, "ORDERS");
    let ack = js
        .publish("other.x", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, "OTHER");
}

#[tokio::test]
async fn an_update_setting_max_msg_size_refuses_larger_publishes_with_10054() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    let info = js
        .update_stream(stream::Config {
            max_message_size: 8,
            ..orders()
        })
        .await
        .unwrap();
    assert_eq!(info.config.max_message_size, 8);
    js.publish("orders.eu", "12345678".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let e = js
        .publish("orders.eu", "123456789".into())
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("10054") || e.to_string().contains("maximum"),
        "{e}"
    );
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_updates_are_all_acked_in_order_and_only_the_limit_drops_any() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    js.create_stream(orders()).await.unwrap();
    const N: u64 = 300;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 1..=N {
                let ack = js
                    .publish("orders.eu", format!("m{i}").into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                seqs.push(ack.sequence);
            }
            seqs
        })
    };
    // Updates while it publishes: subjects, limits, the window.
    for round in 0..10u64 {
        let mut subjects = vec!["orders.>".to_string()];
        if round % 2 == 0 {
            subjects.push(format!("extra{round}.*"));
        }
        js.update_stream(stream::Config {
            subjects,
            max_messages: if round == 9 {
                100
            } else {
                10_000 + round as i64
            },
            duplicate_window: Duration::from_secs(60 + round),
            ..orders()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seqs = publisher.await.unwrap();
    assert_eq!(
        seqs,
        (1..=N).collect::<Vec<_>>(),
        "every publish acked once, in order"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (100, N - 99, N),
        "the newest 100 acked messages are kept"
    );
    let c: consumer::PullConsumer = s.create_consumer(durable("all")).await.unwrap();
    let got = fetch_n(&c, 100).await;
    let want: Vec<String> = (N - 99..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&got), want);
}

#[tokio::test]
async fn a_purge_empties_the_stream_and_a_consumer_goes_on_with_new_messages() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let mut s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 5).await;
    let c: consumer::PullConsumer = s.create_consumer(durable("d")).await.unwrap();
    let got = fetch_n(&c, 2).await;
    got[0].double_ack().await.unwrap();
    // m2 stays delivered and unacked.
    let r = s.purge().await.unwrap();
    assert!(r.success);
    assert_eq!(r.purged, 5);
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.bytes, st.first_sequence, st.last_sequence),
        (0, 0, 6, 5),
        "{st:?}"
    );
    let mut c = c;
    let i = c.info().await.unwrap().clone();
    assert_eq!((i.num_ack_pending, i.num_pending), (0, 0), "{i:?}");
    publish_n(&js, "orders.eu", 6, 7).await;
    let got = fetch_n(&c, 2).await;
    assert_eq!(payloads(&got), ["m6", "m7"]);
    assert_eq!(seqs(&got), [(6, 1), (7, 1)]);
    // The raw answer is nats-server's.
    let a = api(&nc, "$JS.API.STREAM.PURGE.ORDERS", "").await;
    assert_eq!(a["type"], "io.nats.jetstream.api.v1.stream_purge_response");
    assert_eq!(
        (&a["success"], &a["purged"]),
        (&serde_json::json!(true), &serde_json::json!(2)),
        "{a}"
    );
}

#[tokio::test]
async fn a_purge_with_a_filter_removes_only_that_subject_and_it_stays_removed_after_a_restart() {
    let cfg = nats_config();
    let dir = cfg.data_dir.clone();
    let (b, nc) = start(cfg).await;
    let addr = b.state.config().nats.unwrap();
    let js = js(&nc);
    let mut s = js.create_stream(orders()).await.unwrap();
    for i in 1..=10u64 {
        let subject = if i % 2 == 0 { "orders.us" } else { "orders.eu" };
        js.publish(subject, format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let r = s.purge().filter("orders.us").await.unwrap();
    assert_eq!(r.purged, 5);
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (5, 1, 10)
    );
    let c: consumer::PullConsumer = s.create_consumer(durable("all")).await.unwrap();
    let got = fetch_n(&c, 5).await;
    assert_eq!(payloads(&got), ["m1", "m3", "m5", "m7", "m9"]);
    let a = api(&nc, "$JS.API.STREAM.MSG.GET.ORDERS", r#"{"seq":2}"#).await;
    assert_eq!(a["error"]["err_code"], 10037, "{a}");
    // keep: all but the newest N of that subject.
    let r = s.purge().filter("orders.eu").keep(2).await.unwrap();
    assert_eq!(r.purged, 3);
    drop(nc);
    b.stop().await;
    let b = TestBroker::with(Config {
        nats: Some(addr),
        data_dir: dir,
        ..nats_config()
    })
    .await;
    let nc = connect(&b).await;
    let js = self::js(&nc);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (2, 7, 10),
        "the first messages all gone, the floor moved: {st:?}"
    );
    let c: consumer::PullConsumer = s.create_consumer(durable("again")).await.unwrap();
    assert_eq!(payloads(&fetch_n(&c, 2).await), ["m7", "m9"]);
    let ack = js
        .publish("orders.us", "m11".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 11);
}

#[tokio::test]
async fn a_purge_up_to_a_sequence_or_keeping_the_newest_removes_the_oldest() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let mut s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 10).await;
    assert_eq!(s.purge().sequence(4).await.unwrap().purged, 3);
    let st = s.info().await.unwrap().state.clone();
    assert_eq!((st.messages, st.first_sequence), (7, 4));
    assert_eq!(s.purge().keep(2).await.unwrap().purged, 5);
    let st = s.info().await.unwrap().state.clone();
    assert_eq!((st.messages, st.first_sequence), (2, 9));
    // A filter that takes the whole stream is a purge of it all.
    assert_eq!(s.purge().filter(">").await.unwrap().purged, 2);
    let a = api(&nc, "$JS.API.STREAM.PURGE.ORDERS", r#"{"seq":3,"keep":1}"#).await;
    assert_eq!(a["error"]["err_code"], 10003, "{a}");
    let a = api(&nc, "$JS.API.STREAM.PURGE.ORDERS", r#"{"filter":"a..b"}"#).await;
    assert_eq!(a["error"]["err_code"], 10003, "{a}");
    let a = api(&nc, "$JS.API.STREAM.PURGE.ORDERS", "{not json").await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = api(&nc, "$JS.API.STREAM.PURGE.ORDERS", r#"{"seq":"x"}"#).await;
    assert_eq!(a["error"]["err_code"], 10025, "{a}");
    let a = api(&nc, "$JS.API.STREAM.PURGE.NOPE", "").await;
    assert_eq!(a["error"]["err_code"], 10059, "{a}");
}

#[tokio::test]
async fn a_deleted_message_is_gone_for_readers_and_counts_and_stays_gone_after_a_restart() {
    let cfg = nats_config();
    let dir = cfg.data_dir.clone();
    let (b, nc) = start(cfg).await;
    let addr = b.state.config().nats.unwrap();
    let js = js(&nc);
    let mut s = js.create_stream(orders()).await.unwrap();
    publish_n(&js, "orders.eu", 1, 5).await;
    assert!(s.delete_message(3).await.unwrap());
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (4, 1, 5)
    );
    assert_eq!(st.deleted_count, Some(1), "num_deleted");
    let a = api(&nc, "$JS.API.STREAM.MSG.GET.ORDERS", r#"{"seq":3}"#).await;
    assert_eq!(a["error"]["err_code"], 10037, "{a}");
    // Again: nats-server's "sequence not found".
    let a = api(&nc, "$JS.API.STREAM.MSG.DELETE.ORDERS", r#"{"seq":3}"#).await;
    assert_eq!(
        (&a["error"]["err_code"], &a["error"]["description"]),
        (
            &serde_json::json!(10043),
            &serde_json::json!("sequence 3 not found")
        ),
        "{a}"
    );
    let a = api(
        &nc,
        "$JS.API.STREAM.MSG.DELETE.ORDERS",
        r#"{"seq":1,"no_erase":true}"#,
    )
    .await;
    assert_eq!(
        a["type"],
        "io.nats.jetstream.api.v1.stream_msg_delete_response"
    );
    assert_eq!(a["success"], true, "{a}");
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence),
        (3, 2),
        "the first moved on"
    );
    for (body, code) in [
        ("{}", 10003),
        (r#"{"seq":0}"#, 10003),
        ("{not json", 10025),
        (r#"{"seq":99}"#, 10043),
    ] {
        let a = api(&nc, "$JS.API.STREAM.MSG.DELETE.ORDERS", body).await;
        assert_eq!(a["error"]["err_code"], code, "{body}: {a}");
    }
    let a = api(&nc, "$JS.API.STREAM.MSG.DELETE.NOPE", r#"{"seq":1}"#).await;
    assert_eq!(a["error"]["err_code"], 10059, "{a}");
    let c: consumer::PullConsumer = s.create_consumer(durable("d")).await.unwrap();
    assert_eq!(payloads(&fetch_n(&c, 3).await), ["m2", "m4", "m5"]);
    drop(nc);
    b.stop().await;
    let b = TestBroker::with(Config {
        nats: Some(addr),
        data_dir: dir,
        ..nats_config()
    })
    .await;
    let nc = connect(&b).await;
    let js = self::js(&nc);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (3, 2, 5)
    );
    let c: consumer::PullConsumer = s.create_consumer(durable("e")).await.unwrap();
    assert_eq!(payloads(&fetch_n(&c, 3).await), ["m2", "m4", "m5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_racing_publishes_removes_only_what_it_counts_and_every_later_ack_is_kept() {
    let (_b, nc) = start(nats_config()).await;
    let js = js(&nc);
    let mut s = js.create_stream(orders()).await.unwrap();
    const N: u64 = 300;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                let ack = js
                    .publish("orders.eu", format!("m{i}").into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert_eq!(ack.sequence, i);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let purged = s.purge().await.unwrap().purged;
    publisher.await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(st.last_sequence, N);
    assert_eq!(
        (st.messages, st.first_sequence),
        (N - purged, purged + 1),
        "exactly the {purged} oldest went: {st:?}"
    );
    let c: consumer::PullConsumer = s.create_consumer(durable("rest")).await.unwrap();
    let got = fetch_n(&c, (N - purged) as usize).await;
    let want: Vec<String> = (purged + 1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&got), want);
}
