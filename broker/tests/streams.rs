//! Durable streams against a real in-process broker: stored publishes and
//! their acks, idempotent publish, consumers (start positions, filters, acks,
//! redelivery), retention, and state that survives a restart.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{test_config, TestBroker};
use sockbus_client::streams::{ConsumerConfig, Start, StreamConfig};
use sockbus_client::{Client, ConnectOptions, Headers};

async fn broker_in(dir: &Path) -> TestBroker {
    let mut cfg = test_config();
    cfg.data_dir = dir.to_path_buf();
    TestBroker::with(cfg).await
}

async fn client(b: &TestBroker) -> Client {
    ConnectOptions::new()
        .request_timeout(Duration::from_secs(10))
        .connect(&b.url)
        .await
        .unwrap()
}

async fn read_all(c: &mut sockbus_client::streams::PullConsumer, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = c
            .next_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("only {} of {n} messages arrived", out.len()));
        out.push((m.seq, String::from_utf8_lossy(m.payload()).into_owned()));
        m.ack().await.unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_publish_is_acked_with_stream_and_sequence_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let info = c
        .stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    assert_eq!(info.state.messages, 0);
    for i in 1..=100u64 {
        let a = c
            .publish_durable(&format!("orders.{}", i % 3), format!("m{i}"))
            .await
            .unwrap();
        assert_eq!(
            (a.stream.as_str(), a.seq, a.duplicate),
            ("ORDERS", i, false)
        );
    }
    // A plain publish to a captured subject is stored too, without an ack.
    c.publish("orders.plain", "p").await.unwrap();
    c.flush().await.unwrap();
    let mut cons = c
        .consumer("ORDERS", ConsumerConfig::ephemeral())
        .await
        .unwrap();
    let got = read_all(&mut cons, 101).await;
    for (i, (seq, p)) in got.iter().take(100).enumerate() {
        assert_eq!(
            (*seq, p.as_str()),
            (i as u64 + 1, format!("m{}", i + 1).as_str())
        );
    }
    assert_eq!(got[100], (101, "p".to_string()));
    let info = c.stream_info("ORDERS").await.unwrap();
    assert_eq!(
        (
            info.state.messages,
            info.state.first_seq,
            info.state.last_seq
        ),
        (101, 1, 101)
    );
    // Subscribers still see captured messages live.
    let mut sub = c.subscribe("orders.>").await.unwrap();
    c.flush().await.unwrap();
    c.publish_durable("orders.live", "x").await.unwrap();
    assert_eq!(common::recv(&mut sub).await.payload.as_ref(), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_durable_to_an_uncaptured_subject_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let e = c.publish_durable("nothing.here", "x").await.unwrap_err();
    assert!(e.to_string().contains("no stream captures subject"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_management_validates_and_lists_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("A", ["a.*"]))
        .await
        .unwrap();
    // Same config again: fine. Different: refused. Overlap: refused.
    c.stream_add(&StreamConfig::new("A", ["a.*"]))
        .await
        .unwrap();
    let e = c
        .stream_add(&StreamConfig::new("A", ["a.>"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = c
        .stream_add(&StreamConfig::new("B", ["a.x"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
    let e = c
        .stream_add(&StreamConfig::new("bad name", ["b"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
    let e = c
        .stream_add(&StreamConfig::new("C", ["c..x"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("empty token"), "{e}");
    c.stream_add(&StreamConfig::new("B", ["b.>"]))
        .await
        .unwrap();
    let names: Vec<String> = c
        .stream_list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.config.name)
        .collect();
    assert_eq!(names, ["A", "B"]);
    c.publish_durable("a.1", "x").await.unwrap();
    c.stream_delete("A").await.unwrap();
    let e = c.stream_info("A").await.unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    assert!(c.publish_durable("a.1", "x").await.is_err());
    assert!(!dir.path().join("streams/A").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_publish_with_the_same_msg_id_is_stored_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("S", ["s.>"]))
        .await
        .unwrap();
    let mut h = Headers::new();
    h.insert("Msg-Id", "order-1");
    let a1 = c
        .publish_durable_with_headers("s.x", &h, "once")
        .await
        .unwrap();
    let a2 = c
        .publish_durable_with_headers("s.x", &h, "once")
        .await
        .unwrap();
    assert_eq!((a1.seq, a1.duplicate), (1, false));
    assert_eq!((a2.seq, a2.duplicate), (1, true));
    c.close().await.unwrap();
    b.stop().await;
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let a3 = c
        .publish_durable_with_headers("s.x", &h, "once")
        .await
        .unwrap();
    assert_eq!((a3.seq, a3.duplicate), (1, true));
    let mut h2 = Headers::new();
    h2.insert("Msg-Id", "order-2");
    assert_eq!(
        c.publish_durable_with_headers("s.x", &h2, "two")
            .await
            .unwrap()
            .seq,
        2
    );
    assert_eq!(c.stream_info("S").await.unwrap().state.messages, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_start_at_first_last_sequence_or_time_and_filter_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("E", ["ev.>"]))
        .await
        .unwrap();
    for i in 1..=10 {
        c.publish_durable(
            if i % 2 == 0 { "ev.even" } else { "ev.odd" },
            format!("{i}"),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 11..=12 {
        c.publish_durable("ev.odd", format!("{i}")).await.unwrap();
    }
    let seqs = |v: Vec<(u64, String)>| v.into_iter().map(|x| x.0).collect::<Vec<_>>();
    let mut k = c
        .consumer("E", ConsumerConfig::ephemeral().start(Start::Last))
        .await
        .unwrap();
    assert_eq!(seqs(read_all(&mut k, 1).await), [12]);
    let mut k = c
        .consumer("E", ConsumerConfig::ephemeral().start(Start::Seq(9)))
        .await
        .unwrap();
    assert_eq!(seqs(read_all(&mut k, 4).await), [9, 10, 11, 12]);
    let mut k = c
        .consumer("E", ConsumerConfig::ephemeral().start(Start::Time(t)))
        .await
        .unwrap();
    assert_eq!(seqs(read_all(&mut k, 2).await), [11, 12]);
    let mut k = c
        .consumer("E", ConsumerConfig::ephemeral().filter("ev.even"))
        .await
        .unwrap();
    assert_eq!(seqs(read_all(&mut k, 5).await), [2, 4, 6, 8, 10]);
    assert!(k
        .next_timeout(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    let mut k = c
        .consumer("E", ConsumerConfig::ephemeral().start(Start::New))
        .await
        .unwrap();
    c.publish_durable("ev.new", "13").await.unwrap();
    assert_eq!(read_all(&mut k, 1).await, [(13, "13".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_redelivered_after_ack_wait_and_nak_and_stop_at_max_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("R", ["r"])).await.unwrap();
    c.publish_durable("r", "one").await.unwrap();
    c.publish_durable("r", "two").await.unwrap();
    let cfg = ConsumerConfig::durable("w")
        .ack_wait(Duration::from_millis(300))
        .max_deliver(3)
        .batch(1);
    let mut k = c.consumer("R", cfg).await.unwrap();
    let m = k.next().await.unwrap();
    assert_eq!((m.seq, m.deliveries), (1, 1));
    m.nak().await.unwrap();
    let m = k.next().await.unwrap();
    assert_eq!((m.seq, m.deliveries), (1, 2));
    // Not acked; message 2 meanwhile.
    let m = k.next().await.unwrap();
    assert_eq!((m.seq, m.deliveries), (2, 1));
    m.ack_sync().await.unwrap();
    // Message 1 comes back after the ack wait, a third and last time.
    let m = k.next().await.unwrap();
    assert_eq!((m.seq, m.deliveries), (1, 3));
    assert!(k
        .next_timeout(Duration::from_millis(800))
        .await
        .unwrap()
        .is_none());
    let info = c.consumer_info("R", "w").await.unwrap();
    assert_eq!(
        (info.num_ack_pending, info.ack_floor, info.num_redelivered),
        (0, 2, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_a_broker_restart_and_pending_acks_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("D", ["d.>"]))
        .await
        .unwrap();
    for i in 1..=10 {
        c.publish_durable("d.x", format!("{i}")).await.unwrap();
    }
    let mut k = c
        .consumer("D", ConsumerConfig::durable("job").batch(4))
        .await
        .unwrap();
    for want in 1..=3 {
        let m = k.next().await.unwrap();
        assert_eq!(m.seq, want);
        m.ack_sync().await.unwrap();
    }
    // Message 4 is delivered but never acked.
    assert_eq!(k.next().await.unwrap().seq, 4);
    drop(k);
    c.close().await.unwrap();
    b.stop().await;

    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let mut k = c
        .consumer("D", ConsumerConfig::durable("job").batch(4))
        .await
        .unwrap();
    let got: Vec<u64> = read_all(&mut k, 7).await.into_iter().map(|x| x.0).collect();
    assert_eq!(got, [4, 5, 6, 7, 8, 9, 10]);
    let info = c.stream_info("D").await.unwrap();
    assert_eq!((info.state.messages, info.state.consumers), (10, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_exactly_max_msgs_at_most_max_bytes_and_drops_expired_segments() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let payload = vec![b'x'; 1000];
    let mut cfg = StreamConfig::new("M", ["m"]);
    cfg.segment_bytes = Some(16 * 1024);
    cfg.max_msgs = Some(50);
    c.stream_add(&cfg).await.unwrap();
    let mut cfg = StreamConfig::new("Y", ["y"]);
    cfg.max_bytes = Some(100 * 1024);
    c.stream_add(&cfg).await.unwrap();
    let mut cfg = StreamConfig::new("G", ["g"]);
    cfg.segment_bytes = Some(4 * 1024);
    cfg.max_age_ms = Some(500);
    c.stream_add(&cfg).await.unwrap();
    for _ in 0..300 {
        c.publish_durable("m", &payload).await.unwrap();
        c.publish_durable("y", &payload).await.unwrap();
    }
    for _ in 0..20 {
        c.publish_durable("g", &payload).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = c.stream_info("M").await.unwrap().state;
    // Exactly the newest 50 are kept (whole segments, then a cut into one).
    assert_eq!(
        (m.messages, m.first_seq, m.last_seq),
        (50, 251, 300),
        "{m:?}"
    );
    let y = c.stream_info("Y").await.unwrap().state;
    // At most the limit, short of it by less than one record and the
    // segments' 16-byte headers.
    assert!(
        y.bytes <= 100 * 1024 && y.bytes > 100 * 1024 - 1100 - 16 * 10,
        "{y:?}"
    );
    assert_eq!(y.first_seq, 300 - y.messages + 1);
    let g = c.stream_info("G").await.unwrap().state;
    assert_eq!((g.messages, g.last_seq), (0, 20), "{g:?}");
    // The sequence goes on after everything expired.
    assert_eq!(c.publish_durable("g", "new").await.unwrap().seq, 21);
    // A consumer from the first message starts at the oldest kept one.
    let mut k = c.consumer("M", ConsumerConfig::ephemeral()).await.unwrap();
    assert_eq!(k.next().await.unwrap().seq, m.first_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_publishers_share_fsyncs_and_every_ack_is_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    let mut cfg = StreamConfig::new("P", ["p.>"]);
    cfg.segment_bytes = Some(64 * 1024);
    c.stream_add(&cfg).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..200 {
                seqs.push(
                    c.publish_durable(&format!("p.{t}"), format!("{t}:{i}:{}", "z".repeat(200)))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let s = t.await.unwrap();
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "one publisher's acks are in order"
        );
        all.extend(s);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=3200).collect::<Vec<u64>>());
    let info = c.stream_info("P").await.unwrap().state;
    assert!(info.segments > 5, "segments rolled: {info:?}");
    // Read back across segments, per publisher in order.
    let mut k = c
        .consumer("P", ConsumerConfig::ephemeral().filter("p.3"))
        .await
        .unwrap();
    let got = read_all(&mut k, 200).await;
    for (i, (_, p)) in got.iter().enumerate() {
        assert!(p.starts_with(&format!("3:{i}:")), "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_consumer_hands_back_prefetched_messages_for_the_next_reader() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("Q", ["q"])).await.unwrap();
    for i in 1..=20 {
        c.publish_durable("q", format!("{i}")).await.unwrap();
    }
    let mut k = c
        .consumer("Q", ConsumerConfig::durable("w").batch(10))
        .await
        .unwrap();
    let m = k.next().await.unwrap();
    m.ack_sync().await.unwrap();
    k.close().await.unwrap();
    // The next reader continues in order at once (not after the 30 s ack wait).
    let mut k = c
        .consumer("Q", ConsumerConfig::durable("w").batch(10))
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let got: Vec<u64> = read_all(&mut k, 19)
        .await
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(got, (2..=20).collect::<Vec<_>>());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_stream_on_everything_a_request_gets_exactly_its_reply_and_replies_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    // A stream of reply subjects only is refused with the reason.
    let e = c
        .stream_add(&StreamConfig::new("REPLIES", ["_INBOX.>"]))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("never capture reply subjects"),
        "{e}"
    );
    c.stream_add(&StreamConfig::new("ALL", [">"]))
        .await
        .unwrap();
    let _svc = common::echo_replier(client(&b).await, "svc.echo").await;

    for i in 0..20 {
        let r = c.request("svc.echo", format!("q{i}")).await.unwrap();
        assert_eq!(r.payload.as_ref(), format!("q{i}").as_bytes());
    }
    // The same requests on reply subjects we watch: what travels back to a
    // requester is its reply and nothing else.
    let mut inbox = c.subscribe("_INBOX.watched.>").await.unwrap();
    for i in 0..20 {
        c.publish_with_reply("svc.echo", &format!("_INBOX.watched.{i}"), format!("w{i}"))
            .await
            .unwrap();
    }
    // An ordinary publish is still stored.
    c.publish("orders.eu", "o").await.unwrap();
    c.flush().await.unwrap();
    for i in 0..20 {
        let m = common::recv(&mut inbox).await;
        assert_eq!(m.subject(), format!("_INBOX.watched.{i}"));
        assert_eq!(m.payload.as_ref(), format!("w{i}").as_bytes(), "reply {i}");
    }
    // The 40 requests and the order; none of the 40 replies.
    let mut stored = 0;
    for _ in 0..100 {
        stored = c.stream_info("ALL").await.unwrap().state.messages;
        if stored >= 41 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored, 41);
    // Stored, so an ack would have been sent by now: none was.
    tokio::time::sleep(Duration::from_millis(100)).await;
    common::nothing(&mut inbox).await;

    // A request only the stream took is stored, and its requester hears
    // "no responders" as it would without the stream.
    let e = c.request("nobody.home", "x").await.unwrap_err();
    assert!(matches!(e, sockbus_client::Error::NoResponders), "{e}");
    // A durable publish asks for its ack and gets it.
    let a = c.publish_durable("orders.us", "d").await.unwrap();
    assert_eq!((a.stream.as_str(), a.seq), ("ALL", 43));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_client_that_does_not_ask_explicitly_still_gets_an_ack_on_its_reply_subject() {
    use sockbus_protocol::Frame;
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    // CONNECT without CONNECT_EXPLICIT_ACKS, as SDKs before it.
    let mut raw = common::Raw::connect(b.addr).await;
    raw.send_frame(Frame::Sub {
        sid: 1,
        subject: "_INBOX.old.*".into(),
        queue: None,
    })
    .await;
    raw.send_frame(Frame::Pub {
        flags: 0,
        subject: "orders.eu".into(),
        reply: Some("_INBOX.old.1".into()),
        headers: vec![],
        payload: b"o".to_vec(),
    })
    .await;
    match raw.next().await {
        Some(Frame::Msg {
            sid: 1, payload, ..
        }) => {
            assert_eq!(payload, br#"{"stream":"ORDERS","seq":1}"#)
        }
        other => panic!("expected the ack, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_names_the_stream_a_publish_to_a_subject_would_be_stored_by() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    assert!(c.stream_for_subject("orders.eu").await.unwrap().is_none());
    c.stream_add(&StreamConfig::new("ORDERS", ["orders.*"]))
        .await
        .unwrap();
    c.stream_add(&StreamConfig::new("ALL", ["*.>"]))
        .await
        .unwrap_err(); // overlaps
    c.stream_add(&StreamConfig::new("REST", ["x.>"]))
        .await
        .unwrap();
    let name = |s: Option<sockbus_client::streams::StreamInfo>| s.map(|s| s.config.name);
    assert_eq!(
        name(c.stream_for_subject("orders.eu").await.unwrap()),
        Some("ORDERS".into())
    );
    assert_eq!(
        name(c.stream_for_subject("x.y.z").await.unwrap()),
        Some("REST".into())
    );
    assert_eq!(
        name(c.stream_for_subject("orders.eu.x").await.unwrap()),
        None
    );
    assert_eq!(
        name(c.stream_for_subject("_INBOX.x.1").await.unwrap()),
        None
    );
    assert!(c.stream_for_subject("orders.*").await.is_err(), "a pattern");
}

/// More streams than one answer can hold (a 4 KiB max payload here, as
/// 10,000 streams are against the default 1 MiB): the SDK's `stream_list`,
/// and so `sockbus stream ls`, pages through and returns every stream once,
/// in name order, where the broker used to refuse the whole list (413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_list_pages_through_more_streams_than_one_answer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.max_payload = 4096;
    cfg.max_pending = 64 << 10;
    let b = TestBroker::with(cfg).await;
    let c = client(&b).await;
    let mut want = Vec::new();
    for i in 0..60 {
        let name = format!("S{i:03}");
        c.stream_add(&StreamConfig::new(&name, [format!("pg.{i}")]))
            .await
            .unwrap();
        want.push(name);
    }
    let got: Vec<String> = c
        .stream_list()
        .await
        .expect("the list pages instead of failing")
        .into_iter()
        .map(|s| s.config.name)
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_updates_a_stream_in_place_and_purges_it_whole_or_by_subject() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker_in(dir.path()).await;
    let c = client(&b).await;
    c.stream_add(&StreamConfig::new("U", ["u.>"]))
        .await
        .unwrap();
    for i in 1..=6 {
        let subject = if i % 2 == 0 { "u.even" } else { "u.odd" };
        c.publish_durable(subject, format!("m{i}")).await.unwrap();
    }
    let mut cfg = StreamConfig::new("U", ["u.>", "v.*"]);
    cfg.max_msgs = Some(4);
    cfg.description = Some("updated".into());
    let info = c.stream_update(&cfg).await.unwrap();
    assert_eq!(info.config, cfg);
    assert_eq!((info.state.messages, info.state.first_seq), (4, 3));
    // Raising the limit again keeps what is left.
    cfg.max_msgs = None;
    assert_eq!(c.stream_update(&cfg).await.unwrap().state.messages, 4);
    assert_eq!(c.publish_durable("v.x", "m7").await.unwrap().seq, 7);
    // What cannot change, and a stream that is not there.
    let mut bad = cfg.clone();
    bad.fsync = sockbus_client::streams::Fsync::Never;
    let e = c.stream_update(&bad).await.unwrap_err().to_string();
    assert!(e.contains("can not change fsync"), "{e}");
    let e = c
        .stream_update(&StreamConfig::new("NOPE", ["n"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    // Purges: by subject, then everything; the sequence goes on.
    let by_subject = sockbus_client::streams::PurgeRequest {
        filter: Some("u.even".into()),
        ..Default::default()
    };
    assert_eq!(c.stream_purge("U", &by_subject).await.unwrap(), 2);
    let info = c.stream_info("U").await.unwrap();
    assert_eq!((info.state.messages, info.state.first_seq), (3, 3));
    assert_eq!(c.stream_purge("U", &Default::default()).await.unwrap(), 3);
    let info = c.stream_info("U").await.unwrap();
    assert_eq!(
        (
            info.state.messages,
            info.state.first_seq,
            info.state.last_seq
        ),
        (0, 8, 7)
    );
    assert_eq!(c.publish_durable("u.odd", "m8").await.unwrap().seq, 8);
}
