//! The HTTP gateway over real HTTP: every route, every error, the header
//! mapping, SSE delivery (wildcards, queue groups, slow consumers) and the
//! limits that bound a misbehaving client.

mod common;
mod http_util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::{recv, test_config};
use http_util::{eventually, request, whatwg_events, HttpBroker, Sse};
use hyper::{Method, StatusCode};
use sockbus_broker::metrics::{Metrics, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn post_publish_reaches_native_subscribers_with_headers_and_reply() {
    let b = HttpBroker::start().await;
    let c = sockbus_client::connect(&b.broker.url).await.unwrap();
    let mut sub = c.subscribe("orders.*").await.unwrap();
    c.flush().await.unwrap();

    let r = request(
        b.http,
        Method::POST,
        "/v1/publish/orders.new",
        &[
            ("Sockbus-Header-Trace-Id", "abc 123"),
            ("Sockbus-Reply", "replies.1"),
            ("X-Other", "not carried"),
        ],
        Bytes::from_static(b"{\"id\":7}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert!(r.body.is_empty());

    let m = recv(&mut sub).await;
    assert_eq!(m.subject(), "orders.new");
    assert_eq!(&m.payload[..], b"{\"id\":7}");
    assert_eq!(m.reply(), Some("replies.1"));
    let h = m.headers();
    assert_eq!(h.get("trace-id"), Some("abc 123"), "{h:?}");
    assert_eq!(
        h.iter().count(),
        1,
        "only Sockbus-Header-* are carried: {h:?}"
    );

    // Percent-encoded subjects and empty bodies are fine.
    let r = b.post("/v1/publish/orders.caf%C3%A9", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let m = recv(&mut sub).await;
    assert_eq!(m.subject(), "orders.café");
    assert!(m.payload.is_empty());
}

#[tokio::test]
async fn bad_publishes_get_json_errors_with_the_right_status() {
    let mut cfg = test_config();
    cfg.max_payload = 1024;
    let b = HttpBroker::with(cfg).await;
    for (path, why) in [
        ("/v1/publish/a..b", "empty token"),
        ("/v1/publish/a.*", "wildcard"),
        ("/v1/publish/a.%3E", "wildcard"),
        ("/v1/publish/", "empty"),
        ("/v1/publish/a%20b", "space"),
        ("/v1/publish/%FF", "UTF-8"),
    ] {
        let r = b.post(path, "x").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        let e = r.error();
        assert!(e.contains("invalid subject"), "{path}: {e}");
        let _ = why;
    }
    let r = request(
        b.http,
        Method::POST,
        "/v1/publish/a",
        &[("Sockbus-Reply", "bad..reply")],
        Bytes::from_static(b"x"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("reply"), "{}", r.text());

    // $SB. is the broker's API on every front end: never routed from HTTP.
    for path in [
        "/v1/publish/$SB.API.STREAM.LIST",
        "/v1/publish/%24SB.ACK.s.c.1.1",
    ] {
        let r = b.post(path, "x").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.error().contains("reserved"), "{path}: {}", r.text());
    }

    // Over the limit with a Content-Length: refused before the body is read.
    let r = b.post("/v1/publish/a", vec![0u8; 1025]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let e = r.error();
    assert!(e.contains("1025") && e.contains("1024"), "{e}");
    // Exactly at the limit is fine.
    assert_eq!(
        b.post("/v1/publish/a", vec![0u8; 1024]).await.status,
        StatusCode::NO_CONTENT
    );

    // Chunked, no Content-Length: refused once the limit is passed.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let chunk = "x".repeat(800);
    let req = format!(
        "POST /v1/publish/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("maximum payload of 1024 bytes"), "{head}");
    assert_eq!(
        Metrics::get(&b.broker.state.metrics().msgs_in),
        1,
        "only the message at the limit was published"
    );
}

/// Reads from a raw socket until the response head and some body arrived.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tmp = [0u8; 4096];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
            Err(_) if !buf.is_empty() => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let b = HttpBroker::start().await;
    for path in ["/nope", "/v1/publish", "/v1", "/metrics/x", "/v2/publish/a"] {
        let r = b.get(path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(r.error().contains("no route"), "{path}");
    }
    for (method, path, allow) in [
        (Method::GET, "/v1/publish/a", "POST"),
        (Method::PUT, "/v1/publish/a", "POST"),
        (Method::POST, "/v1/subscribe/a", "GET"),
        (Method::HEAD, "/v1/subscribe/a", "GET"),
        (Method::POST, "/v1/streams", "GET, HEAD"),
        (Method::DELETE, "/v1/streams/s", "GET, HEAD"),
        (Method::POST, "/metrics", "GET, HEAD"),
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::POST, "/readyz", "GET, HEAD"),
        (Method::POST, "/", "GET, HEAD"),
        (Method::POST, "/v1/status", "GET, HEAD"),
    ] {
        let r = request(b.http, method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        if method != Method::HEAD {
            assert!(r.error().contains("not allowed"), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn sse_streams_wildcard_matches_with_subject_headers_and_multiline_data() {
    let b = HttpBroker::start().await;
    let mut sse = Sse::open(b.http, "/v1/subscribe/sensors.%3E").await;
    assert_eq!(sse.status, StatusCode::OK);
    assert_eq!(
        sse.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    assert_eq!(b.broker.state.subscriptions(), 1);

    let p = sockbus_client::connect(&b.broker.url).await.unwrap();
    let mut h = sockbus_client::Headers::new();
    h.insert("unit", "celsius");
    p.publish_with_headers("sensors.kitchen.temp", &h, "21.5")
        .await
        .unwrap();
    p.publish("other", "not for us").await.unwrap();
    p.publish("sensors.hall", "line one\nline two")
        .await
        .unwrap();
    p.flush().await.unwrap();
    // HTTP publishes reach SSE subscribers too.
    assert_eq!(
        b.post("/v1/publish/sensors.x", "from http").await.status,
        StatusCode::NO_CONTENT
    );

    let e = sse.next().await.unwrap();
    assert_eq!(e.get("subject"), Some("sensors.kitchen.temp"));
    assert_eq!(e.get("header"), Some("unit: celsius"));
    assert_eq!(e.data(), "21.5");
    let e = sse.next().await.unwrap();
    assert_eq!(e.get("subject"), Some("sensors.hall"));
    assert_eq!(e.data(), "line one\nline two");
    let e = sse.next().await.unwrap();
    assert_eq!(e.get("subject"), Some("sensors.x"));
    assert_eq!(e.data(), "from http");

    // The JSON format carries everything in data.
    let mut js = Sse::open(b.http, "/v1/subscribe/j.*?format=json").await;
    b.post("/v1/publish/j.1", "hi").await;
    let e = js.next().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&e.data()).unwrap();
    assert_eq!(v["subject"], "j.1");
    assert_eq!(v["data"], "hi");

    // Closing the stream removes the subscriptions.
    drop(sse);
    drop(js);
    let st = b.broker.state.clone();
    eventually("SSE subscriptions removed", || st.subscriptions() == 0).await;
}

#[tokio::test]
async fn sse_queue_groups_share_messages_between_members() {
    let b = HttpBroker::start().await;
    let mut a = Sse::open(b.http, "/v1/subscribe/work?queue=g").await;
    let mut c = Sse::open(b.http, "/v1/subscribe/work?queue=g").await;
    for i in 0..20 {
        b.post("/v1/publish/work", format!("{i}")).await;
    }
    // Each message goes to exactly one member; count by draining both.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 20 && Instant::now() < deadline {
        tokio::select! {
            Some(e) = a.next() => seen.push(("a", e.data())),
            Some(e) = c.next() => seen.push(("c", e.data())),
        }
    }
    let mut payloads: Vec<u32> = seen.iter().map(|(_, d)| d.parse().unwrap()).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        (0..20).collect::<Vec<_>>(),
        "each message exactly once"
    );
    assert!(
        seen.iter().any(|(w, _)| *w == "a") && seen.iter().any(|(w, _)| *w == "c"),
        "both members got some: {seen:?}"
    );
}

#[tokio::test]
async fn bad_subscriptions_are_400() {
    let b = HttpBroker::start().await;
    for (path, needle) in [
        ("/v1/subscribe/a..b", "invalid subject"),
        ("/v1/subscribe/a?queue=a%7Fb", "queue"),
        ("/v1/subscribe/a.%3E.b", "invalid subject"),
        ("/v1/subscribe/", "invalid subject"),
        ("/v1/subscribe/a?queue=", "queue"),
        ("/v1/subscribe/a?queue=a%20b", "queue"),
        ("/v1/subscribe/a?format=xml", "format"),
    ] {
        let r = b.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.error().contains(needle), "{path}: {}", r.text());
    }
    assert!(b.broker.state.subscriptions() == 0);
}

#[tokio::test]
async fn a_stalled_sse_client_is_cut_off_as_a_slow_consumer() {
    let mut cfg = test_config();
    cfg.max_payload = 16 * 1024;
    cfg.max_pending = 256 * 1024;
    let b = HttpBroker::with(cfg).await;
    // A raw client that asks for a stream and then never reads.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    s.write_all(b"GET /v1/subscribe/flood HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let st = b.broker.state.clone();
    eventually("SSE subscription", || st.subscriptions() == 1).await;

    let p = sockbus_client::connect(&b.broker.url).await.unwrap();
    let payload = vec![b'x'; 16 * 1024];
    // Far more than socket buffers plus the 256 KiB budget.
    for _ in 0..2048 {
        p.publish("flood", &payload).await.unwrap();
    }
    p.flush().await.unwrap();
    eventually("slow consumer verdict", || {
        Metrics::get(&st.metrics().slow_consumers) == 1
    })
    .await;
    eventually("subscription removed", || st.subscriptions() == 0).await;
    assert!(Metrics::get(&st.metrics().dropped_messages) > 0);
    // The connection is closed: reading drains what was sent, then EOF.
    let mut tmp = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "connection closed");
    eventually("SSE gauge back to 0", || {
        b.gateway.metrics.sse_subscribers() == 0
    })
    .await;
}

#[tokio::test]
async fn streams_routes_answer_json_until_streams_exist() {
    let b = HttpBroker::start().await;
    let r = b.get("/v1/streams").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({"streams": []}));
    let r = b.get("/v1/streams/orders").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error().contains("orders"));
}

struct Recovering;
impl Source for Recovering {
    fn name(&self) -> &'static str {
        "streams"
    }
    fn prometheus(&self, out: &mut String) {
        out.push_str("# HELP sockbus_test_figure A figure.\n# TYPE sockbus_test_figure gauge\nsockbus_test_figure 42\n");
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!([{"name": "orders", "messages": 3}])
    }
    fn ready(&self) -> Result<(), String> {
        Err("recovering segment 3 of 7".into())
    }
}

#[tokio::test]
async fn health_and_readiness_probes_follow_the_parts_of_the_broker() {
    let b = HttpBroker::start().await;
    let r = b.get("/healthz").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let r = b.get("/readyz").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let head = request(b.http, Method::HEAD, "/healthz", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);

    b.broker
        .state
        .metrics()
        .sources
        .register(Arc::new(Recovering));
    let r = b.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.error().contains("streams: recovering segment 3 of 7"),
        "{}",
        r.text()
    );
    assert_eq!(
        b.get("/healthz").await.status,
        StatusCode::OK,
        "alive while not ready"
    );
    // What a source reports shows up in /metrics and /v1/status.
    assert!(b
        .get("/metrics")
        .await
        .text()
        .contains("sockbus_test_figure 42"));
    let s = b.get("/v1/status").await.json();
    assert_eq!(s["streams"][0]["name"], "orders");
    assert_eq!(s["ready"], "streams: recovering segment 3 of 7");
}

/// Every sample line of a Prometheus text exposition: (name, labels, value).
fn parse_exposition(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {name}");
            }
            assert!(typed.insert(name), "family typed twice: {line}");
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        assert!(name.starts_with("sockbus_"), "{line}");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its # TYPE: {line}");
        out.push((name.to_string(), labels.to_string(), value));
    }
    out
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_conventional_names() {
    let b = HttpBroker::start().await;
    let c = sockbus_client::connect(&b.broker.url).await.unwrap();
    let mut sub = c.subscribe("m.>").await.unwrap();
    c.flush().await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            b.post("/v1/publish/m.x", "12345").await.status,
            StatusCode::NO_CONTENT
        );
    }
    for _ in 0..3 {
        recv(&mut sub).await;
    }
    b.post("/v1/publish/bad..subject", "x").await;
    let r = b.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let samples = parse_exposition(&r.text());
    let get = |name: &str, labels: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{}", r.text()))
    };
    assert_eq!(get("sockbus_connections", ""), 1.0);
    assert_eq!(get("sockbus_subscriptions", ""), 1.0);
    assert_eq!(get("sockbus_messages_in_total", ""), 3.0);
    assert_eq!(get("sockbus_bytes_in_total", ""), 15.0);
    assert_eq!(get("sockbus_messages_out_total", ""), 3.0);
    assert_eq!(get("sockbus_bytes_out_total", ""), 15.0);
    assert_eq!(get("sockbus_slow_consumers_total", ""), 0.0);
    assert_eq!(get("sockbus_dropped_messages_total", ""), 0.0);
    assert_eq!(
        get(
            "sockbus_http_requests_total",
            "route=\"/v1/publish/{subject}\",status=\"204\""
        ),
        3.0
    );
    assert_eq!(
        get(
            "sockbus_http_requests_total",
            "route=\"/v1/publish/{subject}\",status=\"400\""
        ),
        1.0
    );
    assert_eq!(
        get(
            "sockbus_http_request_duration_seconds_count",
            "route=\"/v1/publish/{subject}\""
        ),
        4.0
    );
    assert_eq!(
        get(
            "sockbus_http_request_duration_seconds_bucket",
            "route=\"/v1/publish/{subject}\",le=\"+Inf\""
        ),
        4.0
    );
    assert!(get("sockbus_http_connections", "") >= 1.0);
}

#[tokio::test]
async fn status_page_and_its_json_show_the_busiest_subjects() {
    let b = HttpBroker::start().await;
    let r = b.get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    assert!(html.contains("id=\"subjects\"") && html.contains("/v1/status"));

    let p = sockbus_client::connect(&b.broker.url).await.unwrap();
    for _ in 0..50 {
        p.publish("busy.one", "0123456789").await.unwrap();
    }
    for _ in 0..5 {
        p.publish("quiet.one", "x").await.unwrap();
    }
    p.flush().await.unwrap();
    b.post("/v1/publish/busy.http", "x").await;
    let s = b.get("/v1/status").await.json();
    assert_eq!(s["node"], "test");
    assert_eq!(s["connections"]["clients"], 1);
    assert_eq!(s["messages"]["in"], 56);
    let subjects = s["subjects"].as_array().unwrap();
    assert_eq!(subjects[0]["subject"], "busy.one", "{s:#}");
    assert_eq!(subjects[0]["msgs"], 50);
    assert_eq!(subjects[0]["bytes"], 500);
    assert!(subjects
        .iter()
        .any(|x| x["subject"] == "quiet.one" && x["msgs"] == 5));
    assert!(subjects
        .iter()
        .any(|x| x["subject"] == "busy.http" && x["msgs"] == 1));
    assert_eq!(s["streams"], serde_json::json!([]));
    assert_eq!(s["fast_path"]["active"], false);
    // Rates appear within a tick or two.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for _ in 0..100 {
            p.publish("busy.one", "x").await.unwrap();
        }
        p.flush().await.unwrap();
        let s = b.get("/v1/status").await.json();
        if s["subjects"][0]["msgs_per_sec"].as_f64().unwrap() > 0.0
            && s["messages"]["in_per_sec"].as_f64().unwrap() > 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "no rates: {s:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn at_the_connection_limit_probes_still_answer_and_everything_else_gets_503() {
    let mut cfg = test_config();
    cfg.http_max_connections = 2;
    let b = HttpBroker::with(cfg).await;
    let _one = TcpStream::connect(b.http).await.unwrap();
    let _two = TcpStream::connect(b.http).await.unwrap();
    let g = b.gateway.clone();
    eventually("two connections counted", || g.metrics.connections() == 2).await;

    // Liveness and readiness are answered (a kubelet would otherwise kill
    // or unlist a healthy broker under load)...
    let r = b.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    let r = b.get("/readyz?verbose").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"status": "ready"}));
    let r = request(b.http, Method::HEAD, "/healthz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());

    // ...everything else is refused, publishes included.
    for (method, path) in [
        (Method::POST, "/v1/publish/a"),
        (Method::GET, "/metrics"),
        (Method::POST, "/healthz"),
        (Method::GET, "/healthzz"),
        (Method::GET, "/v1/subscribe/a"),
    ] {
        let r = request(b.http, method.clone(), path, &[], Bytes::from_static(b"x")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
        assert!(r.error().contains("connection limit"), "{method} {path}");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(Metrics::get(&b.broker.state.metrics().msgs_in), 0);
    assert_eq!(
        g.metrics.connections(),
        2,
        "answers at the limit hold no slot"
    );

    // A client that connects and says nothing still gets its 503, within a second or so.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let start = Instant::now();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // A request line longer than a probe's is not read to its end.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let long = format!("GET /healthz{} HTTP/1.1\r\n", "x".repeat(100_000));
    let _ = s.write_all(long.as_bytes()).await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head:?}");

    drop(_one);
    eventually("a slot frees up", || g.metrics.connections() == 1).await;
    assert_eq!(
        b.post("/v1/publish/a", "x").await.status,
        StatusCode::NO_CONTENT
    );
    // The refusals are counted, the probes answered at the limit are not.
    eventually("the publish's connection closed", || {
        g.metrics.connections() == 1
    })
    .await;
    let metrics = parse_exposition(&b.get("/metrics").await.text());
    let value = |name: &str, labels: &str| {
        metrics
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|s| s.2)
    };
    assert_eq!(
        value("sockbus_http_connections_refused_total", ""),
        Some(7.0)
    );
    assert_eq!(
        value(
            "sockbus_http_requests_total",
            "route=\"/healthz\",status=\"200\""
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_after_the_header_timeout() {
    let mut cfg = test_config();
    cfg.http_header_timeout = Duration::from_millis(300);
    let b = HttpBroker::with(cfg).await;
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut tmp = [0u8; 1024];
    let mut open = true;
    // One header line every 100 ms: never finishes the head.
    for i in 0..50 {
        if s.write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            open = false;
            break;
        }
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), s.read(&mut tmp)).await
        {
            open = false;
            break;
        }
    }
    assert!(!open, "connection still open after {:?}", start.elapsed());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // An idle kept-alive connection is closed by the same timeout.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_head(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut tmp)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection closed: {n:?}"
    );
}

#[tokio::test]
async fn a_slow_request_body_gets_408_after_the_body_timeout() {
    let mut cfg = test_config();
    cfg.http_body_timeout = Duration::from_millis(300);
    let b = HttpBroker::with(cfg).await;
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let start = Instant::now();
    s.write_all(b"POST /v1/publish/a HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("did not arrive within 300ms"), "{head}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(Metrics::get(&b.broker.state.metrics().msgs_in), 0);
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let b = HttpBroker::start().await;
    let big = "y".repeat(40 * 1024);
    let mut s = TcpStream::connect(b.http).await.unwrap();
    let _ = s
        .write_all(format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head:.100}");
}

#[tokio::test]
async fn shutdown_ends_sse_streams_after_flushing_them() {
    let mut b = HttpBroker::start().await;
    let mut sse = Sse::open(b.http, "/v1/subscribe/bye").await;
    b.post("/v1/publish/bye", "last words").await;
    b.stop_http().await;
    let e = sse.next().await.expect("queued message delivered");
    assert_eq!(e.data(), "last words");
    assert!(sse.next().await.is_none(), "stream ended");
    assert!(b.broker.state.subscriptions() == 0);
}

#[tokio::test]
async fn publish_to_a_stream_subject_answers_200_with_stream_and_seq_once_stored() {
    let b = HttpBroker::start().await;
    let c = sockbus_client::connect(&b.broker.url).await.unwrap();
    c.stream_add(&sockbus_client::streams::StreamConfig::new(
        "ORDERS",
        ["orders.>"],
    ))
    .await
    .unwrap();
    let mut sub = c.subscribe("orders.>").await.unwrap();
    c.flush().await.unwrap();
    for seq in 1..=3u64 {
        let r = b.post("/v1/publish/orders.eu", format!("o{seq}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let j = r.json();
        assert_eq!(j["stream"], "ORDERS");
        assert_eq!(j["seq"], seq);
        // Stored and also routed to live subscribers.
        assert_eq!(
            recv(&mut sub).await.payload.as_ref(),
            format!("o{seq}").as_bytes()
        );
    }
    // Not captured: 204 as before.
    assert_eq!(
        b.post("/v1/publish/other.x", "x").await.status,
        StatusCode::NO_CONTENT
    );
    let list = b.get("/v1/streams").await.json();
    assert_eq!(list["streams"][0]["config"]["name"], "ORDERS", "{list}");
    assert_eq!(list["streams"][0]["state"]["messages"], 3, "{list}");
    let info = b.get("/v1/streams/ORDERS").await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(
        b.get("/v1/streams/NOPE").await.status,
        StatusCode::NOT_FOUND
    );
    let metrics = b.get("/metrics").await.text();
    assert!(
        metrics.contains("sockbus_stream_messages{stream=\"ORDERS\"} 3"),
        "{metrics}"
    );
}
#[test]
fn the_whatwg_parser_follows_the_standard() {
    // The examples of the standard's section 9.2.6 and the line-ending rules.
    let (e, retry) = whatwg_events(
        b"\xef\xbb\xbfdata: YHOO\ndata: +2\ndata: 10\n\n: c\r\nid: 1\rdata:first\r\n\r\ndata\ndata\n\ndata:\n\nevent: add\ndata: x\n\ndata: pending",
    );
    let d: Vec<(&str, &str, &str)> = e
        .iter()
        .map(|e| (e.kind.as_str(), e.data.as_str(), e.last_event_id.as_str()))
        .collect();
    assert_eq!(
        d,
        [
            ("message", "YHOO\n+2\n10", ""),
            ("message", "first", "1"),
            ("message", "\n", "1"),
            ("message", "", "1"),
            ("add", "x", "1"),
        ]
    );
    assert_eq!(retry, None);
    assert_eq!(whatwg_events(b"retry: 5\n\n").1, Some(5));
    assert!(whatwg_events(b"id: a\0b\n\n").0.is_empty());
}

/// Payloads that try to end their event early, forge fields or whole extra
/// events: a browser must see each as one event of its own text.
const HOSTILE_PAYLOADS: &[&[u8]] = &[
    b"\rid: 7\revent: x\r\rdata: forged",
    b"one\rtwo\nthree\r\nfour",
    b"\n\nid: 9\nevent: evil\ndata: forged\n\n",
    b"retry: 1\r: comment\r\revent: evil\rdata: x\r\r",
    b"ends with cr\r",
    b"\r\n\r\n",
    b"\r\r\n\n\r",
    b"nul\0inside\0",
    b"\0",
    b"",
    b" leading space",
    b"\xff\rid: 1\r\r",
];

/// What an EventSource shows for a payload in the raw format: its lines,
/// ended by CR, LF or CRLF alike, joined by LF (invalid UTF-8 replaced).
fn as_browser_sees(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let mut lines = Vec::new();
    let mut rest = &*text;
    while let Some(i) = rest.find(['\r', '\n']) {
        lines.push(&rest[..i]);
        rest = &rest[i + if rest[i..].starts_with("\r\n") { 2 } else { 1 }..];
    }
    lines.push(rest);
    lines.join("\n")
}

#[tokio::test]
async fn sse_payloads_cannot_forge_fields_or_events_in_either_format() {
    let b = HttpBroker::start().await;
    let mut raw = Sse::open(b.http, "/v1/subscribe/evil.%3E").await;
    let mut json = Sse::open(b.http, "/v1/subscribe/evil.%3E?format=json").await;
    let p = sockbus_client::connect(&b.broker.url).await.unwrap();
    for (i, payload) in HOSTILE_PAYLOADS.iter().enumerate() {
        // Natively and over HTTP: both reach SSE subscribers the same way.
        p.publish(&format!("evil.native.{i}"), *payload)
            .await
            .unwrap();
        p.flush().await.unwrap();
        let r = b
            .post(&format!("/v1/publish/evil.http.{i}"), *payload)
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    b.post("/v1/publish/evil.end", "the end").await;

    let want: Vec<String> = HOSTILE_PAYLOADS
        .iter()
        .flat_map(|p| [as_browser_sees(p), as_browser_sees(p)])
        .chain(["the end".to_string()])
        .collect();
    let events = raw.whatwg_until(|e| e.data == "the end").await;
    let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(got, want, "one event per message, its lines joined by LF");
    for e in &events {
        assert_eq!(e.kind, "message", "no forged event type: {e:?}");
        assert_eq!(e.last_event_id, "", "no forged id: {e:?}");
    }

    let events = json.whatwg_until(|e| e.data.contains("\"the end\"")).await;
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            assert_eq!((e.kind.as_str(), e.last_event_id.as_str()), ("message", ""));
            let v: serde_json::Value = serde_json::from_str(&e.data)
                .unwrap_or_else(|err| panic!("not one JSON object ({err}): {:?}", e.data));
            match (v["data"].as_str(), v["data_base64"].as_str()) {
                (Some(s), None) => s.as_bytes().to_vec(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
                _ => panic!("no data in {v}"),
            }
        })
        .collect();
    let want: Vec<Vec<u8>> = HOSTILE_PAYLOADS
        .iter()
        .flat_map(|p| [p.to_vec(), p.to_vec()])
        .chain([b"the end".to_vec()])
        .collect();
    assert_eq!(payloads, want, "format=json carries every byte exactly");
}

#[tokio::test]
async fn sse_subscriptions_under_the_reserved_sb_prefix_are_refused_wildcards_are_not() {
    let b = HttpBroker::start().await;
    for path in [
        "/v1/subscribe/$SB.%3E",
        "/v1/subscribe/%24SB.%3E",
        "/v1/subscribe/$SB.API.%3E",
        "/v1/subscribe/$SB.API.STREAM.LIST",
        "/v1/subscribe/$SB.ACK.*.*.*.*",
        "/v1/subscribe/$SB.*?queue=g",
    ] {
        let s = Sse::open(b.http, path).await;
        assert_eq!(s.status, StatusCode::BAD_REQUEST, "{path}");
        drop(s);
        let r = b.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert!(r.error().contains("reserved"), "{path}: {}", r.text());
    }
    assert_eq!(b.broker.state.subscriptions(), 0);
    // Patterns that merely could match $SB. subjects are ordinary ones.
    let mut open = Vec::new();
    for path in [
        "/v1/subscribe/%3E",
        "/v1/subscribe/*.API.%3E",
        "/v1/subscribe/*",
        "/v1/subscribe/$SB",
        "/v1/subscribe/SB.%3E",
        "/v1/subscribe/x.$SB.%3E",
    ] {
        let s = Sse::open(b.http, path).await;
        assert_eq!(s.status, StatusCode::OK, "{path}");
        open.push(s);
    }
    assert_eq!(b.broker.state.subscriptions(), open.len());
}

/// Sends raw requests on one connection and reads until `responses`
/// status lines arrived (or the connection closed).
async fn raw_exchange(b: &HttpBroker, req: &[u8], responses: usize) -> String {
    let mut s = TcpStream::connect(b.http).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() < responses {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&got)
        );
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&tmp[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn raw_wildcards_in_the_path_work_as_the_docs_show_them() {
    let b = HttpBroker::start().await;
    // What `curl -N 'http://127.0.0.1:7480/v1/subscribe/orders.>?queue=billing'` sends.
    let mut s = TcpStream::connect(b.http).await.unwrap();
    s.write_all(b"GET /v1/subscribe/orders.>?queue=billing HTTP/1.1\r\nHost: 127.0.0.1:7480\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains(": subscribed to orders.> (queue group billing)"),
        "{head}"
    );
    b.post("/v1/publish/orders.new", "raw >").await;
    let more = read_head(&mut s).await;
    assert!(more.contains("subject: orders.new"), "{more}");
    assert!(more.contains("data: raw >"), "{more}");

    // `*`, and the encoded forms, on both routes.
    for path in [
        "/v1/subscribe/orders.*",
        "/v1/subscribe/*.>",
        "/v1/subscribe/orders.%3E",
        "/v1/subscribe/%2A.%3e",
    ] {
        let r = raw_exchange(
            &b,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
            1,
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
    }
    // A wildcard where none belongs is still the subject's error, not the URL's.
    let r = raw_exchange(
        &b,
        b"POST /v1/publish/orders.> HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx",
        1,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("invalid subject"), "{r}");
    assert!(r.contains("wildcard"), "{r}");

    // On one keep-alive connection: bodies (which may hold `>` and things
    // that look like request lines) are passed through untouched, and each
    // following request line still has its `>` understood.
    let sub = sockbus_client::connect(&b.broker.url).await.unwrap();
    let mut got = sub.subscribe("k.>").await.unwrap();
    sub.flush().await.unwrap();
    let body = "GET /v1/subscribe/a.> HTTP/1.1\r\n\r\n>>";
    let req = format!(
        "POST /v1/publish/k.one HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}\
         GET /v1/streams/a> HTTP/1.1\r\nhost: x\r\n\r\n\
         POST /v1/publish/k.two?x=> HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n>\
         POST /v1/publish/k.> HTTP/1.1\r\nhost: x\r\nContent-Length: 2\r\n\r\n>>",
        body.len()
    );
    let r = raw_exchange(&b, req.as_bytes(), 4).await;
    let statuses: Vec<&str> = r
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &r[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["204", "404", "204", "400"], "{r}");
    assert!(r.contains("no stream named \\\"a>\\\""), "{r}");
    let m = recv(&mut got).await;
    assert_eq!((m.subject(), &m.payload[..]), ("k.one", body.as_bytes()));
    let m = recv(&mut got).await;
    assert_eq!((m.subject(), &m.payload[..]), ("k.two", &b">"[..]));

    // A target of 20,000 raw `>` triples when encoded: a head too large.
    let huge = format!(
        "GET /v1/subscribe/{} HTTP/1.1\r\nhost: x\r\n\r\n",
        ">".repeat(20_000)
    );
    let r = raw_exchange(&b, huge.as_bytes(), 1).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    assert_eq!(b.get("/healthz").await.status, StatusCode::OK);
}
