//! The NATS front end (`--nats`) over real sockets, with async-nats (a NATS
//! client nobody here wrote) and a raw TCP client for what async-nats never
//! sends: NATS and sockbus SDK clients share one subject space, headers,
//! queue groups and request/reply cross between them, and errors, limits,
//! users and permissions behave as NATS clients expect.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{nothing, recv, test_config, TestBroker};
use futures_util::StreamExt;
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn nats_config() -> Config {
    Config {
        nats: Some("127.0.0.1:0".parse().unwrap()),
        lame_duck_grace: Duration::ZERO,
        ..test_config()
    }
}

async fn broker() -> (TestBroker, String) {
    start(nats_config()).await
}

async fn start(cfg: Config) -> (TestBroker, String) {
    let b = TestBroker::with(cfg).await;
    let url = format!("nats://{}", nats_addr(&b));
    (b, url)
}

fn nats_addr(b: &TestBroker) -> SocketAddr {
    b.state.config().nats.expect("NATS port")
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("timed out waiting for a NATS message")
        .expect("subscription ended")
}

/// Waits until the broker's router holds `n` subscriptions.
async fn wait_subs(b: &TestBroker, n: usize) {
    for _ in 0..1000 {
        if b.state.subscriptions() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} subscriptions, wanted {n}", b.state.subscriptions());
}

/// A hand-driven NATS connection: lines in, lines out.
struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    /// Connects, reads INFO, sends `connect` (a JSON object).
    async fn connect(addr: SocketAddr, connect: &str) -> Raw {
        let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = Raw {
            rd: BufReader::new(rd),
            wr,
        };
        let info = r.line().await;
        assert!(info.starts_with("INFO {"), "{info}");
        r.send(&format!("CONNECT {connect}\r\n")).await;
        r
    }

    async fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).await.unwrap();
    }

    /// The next line without CRLF; "" at EOF.
    async fn line(&mut self) -> String {
        let mut s = String::new();
        tokio::time::timeout(WAIT, self.rd.read_line(&mut s))
            .await
            .expect("timed out waiting for a line")
            .unwrap();
        s.trim_end().to_string()
    }

    /// Sends PING and returns every line before the PONG.
    async fn until_pong(&mut self) -> Vec<String> {
        self.send("PING\r\n").await;
        let mut v = Vec::new();
        loop {
            let l = self.line().await;
            assert!(!l.is_empty(), "closed; lines so far: {v:?}");
            if l == "PONG" {
                return v;
            }
            v.push(l);
        }
    }

    /// True once the broker closed the connection (EOF).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(WAIT, self.rd.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}

#[tokio::test]
async fn info_announces_what_nats_clients_check() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    drop(raw.until_pong().await);
    let (rd, _) = TcpStream::connect(nats_addr(&b))
        .await
        .unwrap()
        .into_split();
    let mut l = String::new();
    BufReader::new(rd).read_line(&mut l).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(l.strip_prefix("INFO ").unwrap()).unwrap();
    assert_eq!(info["proto"], 1);
    assert_eq!(info["headers"], true);
    assert_eq!(info["max_payload"], b.state.config().max_payload);
    let v = info["version"].as_str().unwrap();
    assert_eq!(v.split('.').count(), 3, "semver: {v}");
    assert!(info["server_id"].as_str().is_some_and(|s| !s.is_empty()));
}

#[tokio::test]
async fn nats_and_native_clients_exchange_messages_both_ways_with_headers() {
    let (b, url) = broker().await;
    let nc = async_nats::connect(&url).await.unwrap();
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    let mut nats_sub = nc.subscribe("orders.*.created").await.unwrap();
    let mut nats_all = nc.subscribe("orders.>").await.unwrap();
    let mut sb_sub = sb.subscribe("orders.>").await.unwrap();
    nc.flush().await.unwrap();
    sb.flush().await.unwrap();
    wait_subs(&b, 3).await;

    // sockbus -> NATS, with a header.
    let mut h = sockbus_client::Headers::new();
    h.insert("Trace-Id", "abc-1");
    sb.publish_with_headers("orders.eu.created", &h, "from-sockbus")
        .await
        .unwrap();
    sb.flush().await.unwrap();
    let m = next(&mut nats_sub).await;
    assert_eq!(m.subject.as_str(), "orders.eu.created");
    assert_eq!(&m.payload[..], b"from-sockbus");
    let hv = m.headers.as_ref().and_then(|h| h.get("Trace-Id")).unwrap();
    assert_eq!(hv.as_str(), "abc-1");
    assert_eq!(&next(&mut nats_all).await.payload[..], b"from-sockbus");
    assert_eq!(recv(&mut sb_sub).await.payload, "from-sockbus");

    // NATS -> sockbus, with a header; a subject only `>` matches.
    let mut hm = async_nats::HeaderMap::new();
    hm.insert("Trace-Id", "xyz-2");
    nc.publish_with_headers(
        "orders.us.shipped.late",
        hm,
        Bytes::from_static(b"from-nats"),
    )
    .await
    .unwrap();
    nc.flush().await.unwrap();
    let m = recv(&mut sb_sub).await;
    assert_eq!(m.subject(), "orders.us.shipped.late");
    assert_eq!(m.payload, "from-nats");
    assert_eq!(m.headers().get("Trace-Id"), Some("xyz-2"));
    let m = next(&mut nats_all).await;
    assert_eq!(&m.payload[..], b"from-nats");
    // Not `orders.*.created`.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), nats_sub.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_queue_group_mixing_nats_and_native_members_gets_each_message_once() {
    let (b, url) = broker().await;
    let nc = async_nats::connect(&url).await.unwrap();
    let mut nq = nc
        .queue_subscribe("work.>", "workers".to_string())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    let mut sq = sb.queue_subscribe("work.>", "workers").await.unwrap();
    sb.flush().await.unwrap();
    wait_subs(&b, 2).await;
    let p = async_nats::connect(&url).await.unwrap();
    const N: usize = 200;
    for i in 0..N {
        p.publish(format!("work.{i}"), Bytes::new()).await.unwrap();
    }
    p.flush().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let (mut n_nats, mut n_sb) = (0, 0);
    while seen.len() < N {
        tokio::select! {
            Some(m) = nq.next() => { assert!(seen.insert(m.subject.to_string()), "twice: {}", m.subject); n_nats += 1; }
            Some(m) = sq.next() => { assert!(seen.insert(m.subject().to_string()), "twice: {}", m.subject()); n_sb += 1; }
            _ = tokio::time::sleep(WAIT) => panic!("{} of {N} delivered", seen.len()),
        }
    }
    assert!(
        n_nats > 0 && n_sb > 0,
        "both kinds served: {n_nats} / {n_sb}"
    );
    nothing(&mut sq).await;
}

#[tokio::test]
async fn request_reply_crosses_between_nats_and_native_clients_both_ways() {
    let (b, url) = broker().await;
    let nc = async_nats::connect(&url).await.unwrap();
    let sb = sockbus_client::connect(&b.url).await.unwrap();

    // A NATS service, a sockbus requester.
    let mut svc = nc.subscribe("svc.nats").await.unwrap();
    let nc2 = nc.clone();
    let responder = tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            let mut reply = b"nats:".to_vec();
            reply.extend_from_slice(&m.payload);
            nc2.publish(m.reply.unwrap(), reply.into()).await.unwrap();
        }
    });
    nc.flush().await.unwrap();
    wait_subs(&b, 1).await;
    let r = sb.request("svc.nats", "ping").await.unwrap();
    assert_eq!(r.payload, "nats:ping");

    // A sockbus service, a NATS requester.
    let sbr = sb.clone();
    let mut ssvc = sb.subscribe("svc.sockbus").await.unwrap();
    sb.flush().await.unwrap();
    let responder2 = tokio::spawn(async move {
        while let Some(m) = ssvc.next().await {
            let mut reply = b"sockbus:".to_vec();
            reply.extend_from_slice(&m.payload);
            sbr.publish(m.reply().unwrap(), reply).await.unwrap();
        }
    });
    wait_subs(&b, 2).await;
    let r = tokio::time::timeout(WAIT, nc.request("svc.sockbus", "ping".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&r.payload[..], b"sockbus:ping");
    responder.abort();
    responder2.abort();
}

#[tokio::test]
async fn a_request_nobody_serves_gets_no_responders_at_once() {
    let (_b, url) = broker().await;
    let nc = async_nats::connect(&url).await.unwrap();
    let e = tokio::time::timeout(WAIT, nc.request("nobody.home", "x".into()))
        .await
        .expect("answered before the request timeout")
        .unwrap_err();
    assert_eq!(e.kind(), async_nats::RequestErrorKind::NoResponders, "{e}");
}

#[tokio::test]
async fn echo_false_keeps_a_clients_own_messages_from_it() {
    let (b, url) = broker().await;
    let nc = async_nats::ConnectOptions::new()
        .no_echo()
        .connect(&url)
        .await
        .unwrap();
    let mut own = nc.subscribe("e.x").await.unwrap();
    nc.flush().await.unwrap();
    let sb = sockbus_client::connect(&b.url).await.unwrap();
    wait_subs(&b, 1).await;
    nc.publish("e.x", "mine".into()).await.unwrap();
    nc.flush().await.unwrap();
    sb.publish("e.x", "theirs").await.unwrap();
    sb.flush().await.unwrap();
    assert_eq!(&next(&mut own).await.payload[..], b"theirs");
}

#[tokio::test]
async fn an_oversized_payload_gets_maximum_payload_violation_and_the_connection_stays_usable() {
    let (b, _) = start(Config {
        max_payload: 1024,
        ..nats_config()
    })
    .await;
    let mut raw = Raw::connect(nats_addr(&b), r#"{"verbose":false}"#).await;
    raw.send("SUB big 1\r\n").await;
    let body = vec![b'x'; 5000];
    raw.send(&format!(
        "PUB big {}\r\n{}\r\n",
        body.len(),
        String::from_utf8(body).unwrap()
    ))
    .await;
    raw.send("PUB big 2\r\nok\r\n").await;
    let lines = raw.until_pong().await;
    assert_eq!(
        lines,
        ["-ERR 'Maximum Payload Violation'", "MSG big 1 2", "ok"],
        "refused, skipped, and the next PUB delivered"
    );
}

#[tokio::test]
async fn verbose_gets_ok_for_each_operation_and_pedantic_gets_subject_errors() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), r#"{"verbose":true,"pedantic":true}"#).await;
    assert_eq!(raw.line().await, "+OK", "for CONNECT");
    raw.send("SUB a.* 7\r\nPUB a.b 2\r\nhi\r\nPUB a.* 1\r\nx\r\nSUB a..b 8\r\nUNSUB 7\r\n")
        .await;
    let lines = raw.until_pong().await;
    assert_eq!(
        lines,
        [
            "+OK",
            // Its own message is queued while the PUB is handled, before
            // the PUB's +OK (as nats-server does).
            "MSG a.b 7 2",
            "hi",
            "+OK",
            "-ERR 'Invalid Publish Subject'",
            "-ERR 'Invalid Subject'",
            "+OK"
        ]
    );
    // Not pedantic: an invalid publish subject is dropped quietly.
    let mut quiet = Raw::connect(nats_addr(&b), "{}").await;
    quiet.send("PUB a.* 1\r\nx\r\n").await;
    assert!(quiet.until_pong().await.is_empty());
}

#[tokio::test]
async fn garbage_gets_an_error_and_the_connection_is_closed() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(raw.line().await, "-ERR 'Unknown Protocol Operation'");
    assert!(raw.closed().await);
    // A control line with no end.
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send(&"A".repeat(10_000)).await;
    assert_eq!(raw.line().await, "-ERR 'Maximum Control Line Exceeded'");
    assert!(raw.closed().await);
    // A PUB whose payload is not followed by CRLF.
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("PUB a 2\r\nabcdef\r\n").await;
    assert_eq!(raw.line().await, "-ERR 'Parser Error'");
    assert!(raw.closed().await);
    // The broker still serves others.
    let mut ok = Raw::connect(nats_addr(&b), "{}").await;
    assert!(ok.until_pong().await.is_empty());
}

fn users_config() -> Config {
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            password: Some("orders-pw".into()),
            publish: Some(vec!["orders.>".into()]),
            subscribe: Some(vec!["orders.>".into(), "_INBOX.>".into()]),
            ..Default::default()
        },
        UserConfig {
            name: "ci".into(),
            token: Some("ci-token".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    Config {
        users: Some(Arc::new(users)),
        ..nats_config()
    }
}

#[tokio::test]
async fn wrong_credentials_get_authorization_violation() {
    let (b, url) = start(users_config()).await;
    for opts in [
        async_nats::ConnectOptions::new(),
        async_nats::ConnectOptions::with_user_and_password("orders".into(), "wrong".into()),
        async_nats::ConnectOptions::with_token("nope".into()),
    ] {
        let e = tokio::time::timeout(WAIT, opts.connect(&url))
            .await
            .expect("refused in time")
            .unwrap_err();
        assert_eq!(
            e.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation,
            "{e}"
        );
    }
    let mut raw = Raw::connect(nats_addr(&b), r#"{"user":"orders","pass":"bad"}"#).await;
    assert_eq!(raw.line().await, "-ERR 'Authorization Violation'");
    assert!(raw.closed().await);
    // The right ones work.
    let nc = async_nats::ConnectOptions::with_token("ci-token".into())
        .connect(&url)
        .await
        .unwrap();
    nc.flush().await.unwrap();
}

#[tokio::test]
async fn a_refused_client_that_keeps_writing_still_reads_why() {
    // nats.js sends CONNECT and then PING; when the broker closed at once,
    // bytes that arrived after the close were answered with a reset and the
    // client's next write failed with EPIPE instead of showing the error.
    let (b, _) = start(users_config()).await;
    let mut raw = Raw::connect(nats_addr(&b), r#"{"user":"orders","pass":"bad"}"#).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        raw.wr
            .write_all(b"PING\r\n")
            .await
            .expect("the broker keeps reading until the client has its error");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(raw.line().await, "-ERR 'Authorization Violation'");
    assert!(raw.closed().await);
}

#[tokio::test]
async fn a_denied_publish_gets_a_permissions_violation_and_the_connection_stays() {
    let (b, _) = start(users_config()).await;
    let mut raw = Raw::connect(nats_addr(&b), r#"{"user":"orders","pass":"orders-pw"}"#).await;
    raw.send(
        "SUB orders.> 1\r\nPUB payments.x 1\r\nx\r\nSUB payments.> 2\r\nPUB orders.a 2\r\nok\r\n",
    )
    .await;
    let lines = raw.until_pong().await;
    assert_eq!(
        lines,
        [
            r#"-ERR 'Permissions Violation for Publish to "payments.x"'"#,
            r#"-ERR 'Permissions Violation for Subscription to "payments.>"'"#,
            "MSG orders.a 1 2",
            "ok"
        ]
    );
}

#[tokio::test]
async fn a_nats_subscriber_that_stops_reading_is_closed_as_a_slow_consumer() {
    if std::env::var_os("SOCKBUS_SUITE_ACCELERATED").is_some() {
        // sockmap-ebpf/suite-accelerated.sh puts every port on the fast
        // path, where the kernel queues without looking at the receiver's
        // socket buffer; the broker never accelerates its NATS port
        // (config refuses it: NATS has no credit window).
        eprintln!("not applicable on the fast path: the NATS port is never accelerated");
        return;
    }
    let (b, url) = start(Config {
        max_pending: 256 * 1024,
        ..nats_config()
    })
    .await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("SUB flood 1\r\n").await;
    assert!(raw.until_pong().await.is_empty());
    // Then it reads nothing more.
    let p = async_nats::connect(&url).await.unwrap();
    let payload = Bytes::from(vec![0u8; 1024]);
    let metrics = &b.state.metrics().slow_consumers;
    for _ in 0..200 {
        for _ in 0..500 {
            p.publish("flood", payload.clone()).await.unwrap();
        }
        p.flush().await.unwrap();
        if metrics.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            break;
        }
    }
    assert_eq!(metrics.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Its socket is closed: reading drains what was sent, then EOF.
    assert!(raw.closed().await);
    // The publisher is unaffected.
    p.flush().await.unwrap();
}

#[tokio::test]
async fn a_nats_client_reconnects_after_a_broker_restart_and_resubscribes() {
    let (b, url) = broker().await;
    let addr = nats_addr(&b);
    let nc = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(&url)
        .await
        .unwrap();
    let mut sub = nc.subscribe("r.x").await.unwrap();
    nc.flush().await.unwrap();
    b.stop().await;
    let b2 = TestBroker::with(Config {
        nats: Some(addr),
        ..nats_config()
    })
    .await;
    // Resubscribed once the router has it again.
    wait_subs(&b2, 1).await;
    let sb = sockbus_client::connect(&b2.url).await.unwrap();
    sb.publish("r.x", "after restart").await.unwrap();
    sb.flush().await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"after restart");
}

#[tokio::test]
async fn shutdown_tells_nats_clients_lame_duck_mode_before_the_drain() {
    let (b, _) = start(Config {
        lame_duck_grace: Duration::from_secs(1),
        ..nats_config()
    })
    .await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    assert!(raw.until_pong().await.is_empty());
    let stop = tokio::spawn(b.stop());
    let l = raw.line().await;
    let info: serde_json::Value = serde_json::from_str(l.strip_prefix("INFO ").unwrap()).unwrap();
    assert_eq!(info["ldm"], true);
    // Still served during the grace period.
    assert!(raw.until_pong().await.is_empty());
    stop.await.unwrap();
    assert!(raw.closed().await);
}

#[tokio::test]
async fn nats_clients_on_two_cluster_nodes_exchange_messages_and_requests() {
    let free = |ip: &str| {
        std::net::TcpListener::bind(format!("{ip}:0"))
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let routes = [free("127.0.0.1"), free("127.0.0.1")];
    let peers: Vec<String> = routes
        .iter()
        .map(|r| format!("sockbus-route://{r}"))
        .collect();
    let node = |name: &str, route: SocketAddr| Config {
        node_id: name.into(),
        cluster: Some(route),
        peers: peers.clone(),
        ..nats_config()
    };
    let (a, url_a) = start(node("a", routes[0])).await;
    let (_b, url_b) = start(node("b", routes[1])).await;
    // INFO names the peers' hosts with the NATS port (connect_urls).
    let (rd, _wr) = TcpStream::connect(nats_addr(&a))
        .await
        .unwrap()
        .into_split();
    let mut l = String::new();
    BufReader::new(rd).read_line(&mut l).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(l.strip_prefix("INFO ").unwrap()).unwrap();
    let want = format!("127.0.0.1:{}", nats_addr(&a).port());
    assert_eq!(info["connect_urls"], serde_json::json!([want]), "{info}");
    let na = async_nats::connect(&url_a).await.unwrap();
    let nb = async_nats::connect(&url_b).await.unwrap();
    let mut sub = nb.subscribe("x.>").await.unwrap();
    let mut svc = nb.subscribe("svc").await.unwrap();
    nb.flush().await.unwrap();
    // a sees b's interest (two patterns) once the route is up.
    wait_subs(&a, 2).await;
    let nb2 = nb.clone();
    let responder = tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            nb2.publish(m.reply.unwrap(), "from b".into())
                .await
                .unwrap();
        }
    });
    let mut h = async_nats::HeaderMap::new();
    h.insert("K", "v");
    na.publish_with_headers("x.y", h, "across".into())
        .await
        .unwrap();
    na.flush().await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(&m.payload[..], b"across");
    assert_eq!(m.headers.unwrap().get("K").unwrap().as_str(), "v");
    let r = tokio::time::timeout(WAIT, na.request("svc", "?".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&r.payload[..], b"from b");
    responder.abort();
}

#[tokio::test]
async fn a_client_that_never_sends_connect_is_closed_at_the_handshake_timeout() {
    let (b, _) = start(Config {
        handshake_timeout: Duration::from_millis(300),
        ..nats_config()
    })
    .await;
    let (rd, _wr) = TcpStream::connect(nats_addr(&b))
        .await
        .unwrap()
        .into_split();
    let mut rd = BufReader::new(rd);
    let mut l = String::new();
    rd.read_line(&mut l).await.unwrap();
    assert!(l.starts_with("INFO "), "{l}");
    l.clear();
    tokio::time::timeout(WAIT, rd.read_line(&mut l))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.trim_end(), "-ERR 'Authentication Timeout'");
}

#[tokio::test]
async fn limits_apply_to_nats_connections_and_subscriptions() {
    let (b, _) = start(Config {
        max_connections: 1,
        max_subscriptions: 2,
        ..nats_config()
    })
    .await;
    let mut one = Raw::connect(nats_addr(&b), "{}").await;
    one.send("SUB a 1\r\nSUB b 2\r\nSUB c 3\r\nPUB b 1\r\nx\r\n")
        .await;
    assert_eq!(
        one.until_pong().await,
        ["-ERR 'Maximum Subscriptions Exceeded'", "MSG b 2 1", "x"]
    );
    // A second connection is over --max-connections.
    let (rd, _wr) = TcpStream::connect(nats_addr(&b))
        .await
        .unwrap()
        .into_split();
    let mut l = String::new();
    tokio::time::timeout(WAIT, BufReader::new(rd).read_line(&mut l))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.trim_end(), "-ERR 'maximum connections exceeded'");
    // The first is still served.
    assert!(one.until_pong().await.is_empty());
}

/// A certificate for localhost and 127.0.0.1, self-signed: (cert PEM, key PEM).
fn self_signed() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn with_a_certificate_the_nats_port_requires_tls_and_clients_upgrade_after_info() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let (b, _) = start(Config {
        tls: Some(sockbus_broker::TlsFiles {
            cert: cert_path.clone(),
            key: key_path,
            client_ca: None,
            cluster_ca: None,
        }),
        ..nats_config()
    })
    .await;
    // INFO comes in the clear and says so.
    let (rd, _wr) = TcpStream::connect(nats_addr(&b))
        .await
        .unwrap()
        .into_split();
    let mut l = String::new();
    BufReader::new(rd).read_line(&mut l).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(l.strip_prefix("INFO ").unwrap()).unwrap();
    assert_eq!(info["tls_required"], true);
    // async-nats upgrades after INFO and works end to end.
    let url = format!("tls://localhost:{}", nats_addr(&b).port());
    let nc = async_nats::ConnectOptions::new()
        .add_root_certificates(cert_path)
        .require_tls(true)
        .connect(&url)
        .await
        .unwrap();
    let mut sub = nc.subscribe("sec.>").await.unwrap();
    nc.flush().await.unwrap();
    nc.publish("sec.a", "over tls".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"over tls");
    // A client that does not upgrade gets nothing more than INFO.
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("PING\r\n").await;
    assert!(raw.closed().await);
}

#[tokio::test]
async fn a_nats_client_that_vanishes_mid_operation_leaves_no_subscriptions_behind() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("SUB a 1\r\nSUB b q 2\r\nSUB c.> 3\r\n").await;
    assert!(raw.until_pong().await.is_empty());
    assert_eq!(b.state.subscriptions(), 3);
    // Half a PUB, then the socket is gone (a client killed with -9).
    raw.send("PUB a 100\r\nonly part").await;
    drop(raw);
    for _ in 0..1000 {
        if b.state.subscriptions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.state.subscriptions(), 0);
    // A payload size no broker takes is refused and skipped; one too long
    // to be a number ends the connection.
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("PUB a 999999999999\r\n").await;
    assert_eq!(raw.line().await, "-ERR 'Maximum Payload Violation'");
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    raw.send("PUB a 99999999999999999999\r\n").await;
    assert_eq!(raw.line().await, "-ERR 'Parser Error'");
    assert!(raw.closed().await);
}

#[tokio::test]
async fn a_silent_nats_client_is_pinged_then_closed_as_stale() {
    let (b, _) = start(Config {
        ping_interval: Duration::from_millis(200),
        max_pings_out: 2,
        ..nats_config()
    })
    .await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    // It says nothing more and answers no PING.
    assert_eq!(raw.line().await, "PING");
    assert_eq!(raw.line().await, "PING");
    assert_eq!(raw.line().await, "-ERR 'Stale Connection'");
    assert!(raw.closed().await);
    // One that answers stays.
    let mut alive = Raw::connect(nats_addr(&b), "{}").await;
    for _ in 0..4 {
        assert_eq!(alive.line().await, "PING");
        alive.send("PONG\r\n").await;
    }
    // Still connected (a keepalive PING may come in between).
    let lines = alive.until_pong().await;
    assert!(lines.iter().all(|l| l == "PING"), "{lines:?}");
}

#[tokio::test]
async fn a_nats_user_publishes_and_subscribes_inside_its_own_account() {
    let u = |name: &str, account: Option<&str>| UserConfig {
        name: name.into(),
        password: Some(name.into()),
        account: account.map(String::from),
        ..Default::default()
    };
    let users = Users::from_config(vec![
        u("shop1", Some("shop")),
        u("shop2", Some("shop")),
        u("admin", None),
    ])
    .unwrap();
    let (_b, url) = start(Config {
        users: Some(Arc::new(users)),
        ..nats_config()
    })
    .await;
    let connect = |user: &'static str| {
        let url = url.clone();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
                .connect(&url)
                .await
                .unwrap()
        }
    };
    let (shop1, shop2, admin) = (
        connect("shop1").await,
        connect("shop2").await,
        connect("admin").await,
    );
    let mut shop_all = shop1.subscribe(">").await.unwrap();
    let mut admin_all = admin.subscribe(">").await.unwrap();
    shop1.flush().await.unwrap();
    admin.flush().await.unwrap();
    // The default account's message first, then the shop's own: the shop's
    // first message must be its own (nothing crossed before it).
    admin.publish("orders.x", "default".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert_eq!(&next(&mut admin_all).await.payload[..], b"default");
    shop2.publish("orders.x", "shop".into()).await.unwrap();
    shop2.flush().await.unwrap();
    assert_eq!(&next(&mut shop_all).await.payload[..], b"shop");
    // And the admin, in the default account, never sees the shop's.
    admin
        .publish("orders.y", "default again".into())
        .await
        .unwrap();
    admin.flush().await.unwrap();
    assert_eq!(&next(&mut admin_all).await.payload[..], b"default again");
}

#[tokio::test]
async fn sids_are_opaque_tokens_echoed_back_as_the_client_wrote_them() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    let long = "s".repeat(128);
    raw.send(&format!(
        "SUB a orders-1\r\nSUB a 007\r\nSUB a 4294967296\r\nSUB a 3000000000\r\nSUB a 5\r\nSUB a {long}\r\n"
    ))
    .await;
    // The same name twice is one subscription (the second SUB is ignored).
    raw.send("SUB a orders-1\r\nPUB a 2\r\nhi\r\n").await;
    let mut got: Vec<String> = raw
        .until_pong()
        .await
        .into_iter()
        .filter(|l| l != "hi")
        .collect();
    got.sort();
    let mut want = vec![
        "MSG a 007 2".to_string(),
        "MSG a 3000000000 2".into(),
        "MSG a 4294967296 2".into(),
        "MSG a 5 2".into(),
        "MSG a orders-1 2".into(),
        format!("MSG a {long} 2"),
    ];
    want.sort();
    assert_eq!(got, want);
    // UNSUB by name; UNSUB with a max counts down for a named sid too.
    raw.send("UNSUB orders-1\r\nUNSUB 007 2\r\nUNSUB nobody\r\nPUB a 1\r\nx\r\nPUB a 1\r\ny\r\n")
        .await;
    let got = raw.until_pong().await;
    assert_eq!(
        got.iter().filter(|l| l.contains("orders-1")).count(),
        0,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|l| l.contains(" 007 ")).count(),
        1,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|l| l.starts_with("MSG a 5 ")).count(),
        2,
        "{got:?}"
    );
    // A name over the bound is refused; the connection stays.
    raw.send(&format!("SUB a {}\r\n", "t".repeat(129))).await;
    assert_eq!(
        raw.until_pong().await,
        ["-ERR 'Invalid Subscription ID: longer than 128 bytes'"]
    );
    // A name reused after its UNSUB is a new subscription.
    raw.send("SUB a orders-1\r\nPUB a 1\r\nz\r\n").await;
    let got = raw.until_pong().await;
    assert!(got.contains(&"MSG a orders-1 1".to_string()), "{got:?}");
    assert_eq!(b.state.subscriptions(), 5);
}

#[tokio::test]
async fn a_client_churning_through_named_sids_leaves_nothing_behind() {
    let (b, _) = broker().await;
    let mut raw = Raw::connect(nats_addr(&b), "{}").await;
    // 5,000 distinct names, each subscribed and dropped (half by UNSUB,
    // half by reaching UNSUB's max).
    let mut batch = String::new();
    for i in 0..5000 {
        if i % 2 == 0 {
            batch.push_str(&format!("SUB churn sub-{i}\r\nUNSUB sub-{i}\r\n"));
        } else {
            batch.push_str(&format!("SUB churn sub-{i}\r\nUNSUB sub-{i} 1\r\n"));
        }
        if batch.len() > 32 * 1024 {
            raw.send(&batch).await;
            batch.clear();
        }
    }
    raw.send(&batch).await;
    raw.send("PUB churn 1\r\nx\r\n").await;
    let got = raw.until_pong().await;
    // Only the max-1 subscriptions are live for the one message, each once.
    assert_eq!(
        got.iter()
            .filter(|l| l.starts_with("MSG churn sub-"))
            .count(),
        2500
    );
    assert_eq!(b.state.subscriptions(), 0);
    raw.send("SUB churn last\r\nPUB churn 1\r\ny\r\n").await;
    assert_eq!(raw.until_pong().await, ["MSG churn last 1", "y"]);
}
