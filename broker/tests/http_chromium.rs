//! The live status page in a real browser: headless Chromium (Debian's
//! `chromium`) opens `GET /`, messages are published, and the counts the page
//! shows change by themselves, without a reload. Driven over the DevTools
//! protocol; a screenshot is kept in `target/.../tmp/status-page.png`.
//!
//! A second test subscribes with the browser's own `EventSource` and checks
//! that payloads full of line breaks and NULs arrive as exactly the
//! messages that were published.
//!
//! A third test opens the page of a clustered broker with streams and
//! consumers at 1280x900 and 390x844 (a phone), screenshots it (in a temp dir
//! under `target/.../tmp/`, and in `$SOCKBUS_SCREENSHOTS` when set) and
//! checks in the DOM that nothing spills out of its panel, no two panels
//! overlap, and the Streams panel's table shows the stream's figures.
//!
//! Without Chromium the tests say why and pass; with `CI=true` they fail.

mod common;
mod http_util;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use http_util::HttpBroker;
use serde_json::{json, Value};
use sockbus_client::streams::{ConsumerConfig, Fsync, StreamConfig};
use tokio_tungstenite::tungstenite::Message;

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SOCKBUS_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Chromium's path, or None after saying why the test is skipped; in CI
/// (`CI=true`) a missing Chromium fails the test instead.
fn chromium_or_skip() -> Option<PathBuf> {
    let bin = find_chromium();
    if bin.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "chromium is not installed (apt-get install -y chromium); CI must run this test"
            );
        }
        eprintln!("skipping: chromium not found on PATH (apt-get install -y chromium, or set SOCKBUS_CHROMIUM)");
    }
    bin
}

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Browser {
    fn launch(bin: &PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(url.trim().to_string()));
                    }
                } else if tx.is_some() {
                    seen.push(line);
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let ws_url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(u)) => u,
            Ok(Err(log)) => panic!("chromium exited without a DevTools endpoint:\n{log}"),
            Err(_) => panic!("chromium printed no DevTools endpoint within 60 s"),
        };
        Browser {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A minimal DevTools protocol client: one command at a time, events ignored.
struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    /// A new tab on `url`, attached.
    async fn open(browser: &Browser, url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
            .await
            .expect("connect to DevTools");
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            session: None,
        };
        let target = cdp.call("Target.createTarget", json!({"url": url})).await;
        let session = cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        cdp.session = Some(session["sessionId"].as_str().unwrap().to_string());
        cdp
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to chromium");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .expect("DevTools connection open")
                .expect("DevTools message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("DevTools JSON");
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value as JSON.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }
}

/// What the page shows now: polls done, messages in, clients, the
/// `page.orders` row's message count, the readiness badge.
async fn shown(cdp: &mut Cdp) -> Value {
    let expr = r#"JSON.stringify({
        polls: Number(document.body.dataset.polls || 0),
        msgsIn: document.getElementById('msgs-in').textContent,
        clients: document.getElementById('clients').textContent,
        row: (document.querySelector('tr[data-subject="page.orders"] td:nth-child(5)') || {}).textContent || null,
        ready: document.getElementById('ready').textContent,
    })"#;
    let v = cdp.eval(expr).await;
    serde_json::from_str::<Value>(v.as_str().unwrap_or("{}")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium_shows_counts_that_change() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let b = HttpBroker::start().await;
    let c = sockbus_client::connect(&b.broker.url).await.unwrap();
    let _sub = c.subscribe("page.>").await.unwrap();
    for _ in 0..10 {
        c.publish("page.orders", "0123456789").await.unwrap();
    }
    c.flush().await.unwrap();

    let browser = Browser::launch(&bin);
    let mut cdp = Cdp::open(&browser, &b.url("/")).await;

    // The page fills itself from /v1/status.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let s = shown(&mut cdp).await;
        if s["polls"].as_u64().unwrap_or(0) >= 1 && s["row"].is_string() {
            break s;
        }
        assert!(Instant::now() < deadline, "page never showed data: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first["msgsIn"], "10", "{first}");
    assert_eq!(first["row"], "10", "{first}");
    assert_eq!(first["clients"], "1", "{first}");
    assert_eq!(first["ready"], "ready", "{first}");

    // Publish more, natively and over HTTP, for a couple of seconds so the
    // rates show; the open page must catch up without a reload.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut sent = 10u64;
    while Instant::now() < until {
        for _ in 0..200 {
            c.publish("page.orders", "0123456789").await.unwrap();
        }
        c.publish("page.audit", "x").await.unwrap();
        c.flush().await.unwrap();
        sent += 201;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.post("/v1/publish/page.http", "via http").await;
    sent += 1;
    let want = sent.to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let later = loop {
        let s = shown(&mut cdp).await;
        if s["msgsIn"].as_str().map(|t| t.replace(',', "")) == Some(want.clone()) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "page still shows {s}, want {want} messages in"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(later["polls"].as_u64() > first["polls"].as_u64(), "{later}");
    assert_ne!(
        later["row"], first["row"],
        "subject row count changed: {later}"
    );
    let rows = cdp
        .eval("[...document.querySelectorAll('#subjects tr[data-subject]')].map(r => r.dataset.subject)")
        .await;
    assert_eq!(rows[0], "page.orders", "busiest first: {rows}");
    assert!(
        rows.as_array().unwrap().contains(&json!("page.http")),
        "{rows}"
    );

    // Keep a screenshot as an artefact of the run.
    let shot = cdp
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64 PNG");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("status page screenshot: {}", path.display());
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
}

/// The two viewports a person opens the status page in.
const VIEWPORTS: &[(&str, u32, u32, bool)] = &[("1280", 1280, 900, false), ("390", 390, 844, true)];

/// A stream name at the length limit and subjects long enough to break a
/// careless layout: many patterns, and one token of 300 characters.
const LONG_NAME: &str = "telemetry-from-every-warehouse-sensor-in-the-eu-central-region-1";

fn long_subjects() -> Vec<String> {
    let mut v: Vec<String> = [
        "temperature",
        "humidity",
        "door-open",
        "forklift-battery",
        "conveyor-speed",
        "freezer-compressor",
        "dock-scale",
        "air-quality",
    ]
    .iter()
    .map(|s| format!("telemetry.warehouse-frankfurt-0001.sensors.{s}.>"))
    .collect();
    v.push(format!("telemetry.{}", "x".repeat(300)));
    v
}

/// Looks for anything a person would see as broken: the page wider than
/// the window, a panel (header, card, section) whose content is wider than
/// itself, an element drawn outside its panel (unless a scrolling or
/// clipping box inside the panel holds it), an element whose own content
/// spills out of it, and two panels overlapping. One line per problem.
const LAYOUT_PROBLEMS: &str = r##"(() => {
  const out = [];
  const rect = (e) => e.getBoundingClientRect();
  const name = (e) => {
    let n = e.tagName.toLowerCase();
    if (e.id) n += "#" + e.id;
    else if (typeof e.className === "string" && e.className) n += "." + e.className.trim().split(/\s+/).join(".");
    const t = (e.textContent || "").trim().slice(0, 40);
    return t ? `${n} "${t}"` : n;
  };
  const root = document.documentElement;
  if (root.scrollWidth > window.innerWidth + 1)
    out.push(`the page is ${root.scrollWidth}px wide in a ${window.innerWidth}px window`);
  const panels = [...document.querySelectorAll("header, .card, section")];
  for (const p of panels) {
    const pr = rect(p);
    if (pr.left < -1 || pr.right > window.innerWidth + 1)
      out.push(`${name(p)} reaches past the window (${Math.round(pr.left)}..${Math.round(pr.right)})`);
    if (p.scrollWidth > p.clientWidth + 1)
      out.push(`${name(p)}: content ${p.scrollWidth}px wide in a ${p.clientWidth}px panel`);
    for (const e of p.querySelectorAll("*")) {
      const er = rect(e);
      if (er.width === 0 && er.height === 0) continue;
      const style = getComputedStyle(e);
      if (style.overflowX === "visible" && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
        out.push(`${name(e)} in ${name(p)}: content ${e.scrollWidth}px wide in ${e.clientWidth}px`);
      let clipped = false;
      for (let a = e.parentElement; a && a !== p; a = a.parentElement) {
        if (getComputedStyle(a).overflowX !== "visible") { clipped = true; break; }
      }
      if (!clipped && (er.left < pr.left - 1 || er.right > pr.right + 1))
        out.push(`${name(e)} is drawn outside ${name(p)} (${Math.round(er.left)}..${Math.round(er.right)} vs ${Math.round(pr.left)}..${Math.round(pr.right)})`);
    }
  }
  for (let i = 0; i < panels.length; i++) {
    for (let j = i + 1; j < panels.length; j++) {
      const a = rect(panels[i]), b = rect(panels[j]);
      const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (w > 1 && h > 1) out.push(`${name(panels[i])} and ${name(panels[j])} overlap`);
    }
  }
  return out.slice(0, 20);
})()"##;

/// What the Streams panel shows for the test's streams and consumers.
const STREAM_TABLE: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  const txt = (s) => { const e = q(s); return e ? e.textContent.trim() : null; };
  return {
    ordersMessages: txt('tr[data-stream="ORDERS"] td.messages'),
    ordersBytes: txt('tr[data-stream="ORDERS"] td.bytes'),
    ordersLastSeq: txt('tr[data-stream="ORDERS"] td.last-seq'),
    ordersConsumers: txt('tr[data-stream="ORDERS"] td.consumers'),
    ordersFsync: txt('tr[data-stream="ORDERS"] td.fsync'),
    longName: (q('tr[data-stream="LONG"] .name') || {}).title || null,
    longMessages: txt('tr[data-stream="LONG"] td.messages'),
    longSubjects: [...document.querySelectorAll('tr[data-stream="LONG"] .chip')].map((e) => e.textContent),
    billingPending: txt('tr[data-consumer="billing"] td.pending'),
    billingAckPending: txt('tr[data-consumer="billing"] td.ack-pending'),
    shippingPending: txt('tr[data-consumer="shipping"] td.pending'),
    cluster: txt('#cluster'),
  };
})()"#;

async fn screenshot(cdp: &mut Cdp, width: u32, path: &std::path::Path) {
    let m = cdp.call("Page.getLayoutMetrics", json!({})).await;
    let height = m["cssContentSize"]["height"]
        .as_f64()
        .expect("content height");
    let shot = cdp
        .call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            }),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64 PNG");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    eprintln!("status page screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_streams_and_consumers_in_tables_that_fit_desktop_and_phone() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    // Two brokers in a cluster; the page is node A's. Each route listener
    // on a port the broker chooses (one picked in advance can be taken
    // before the broker binds it); b dials a.
    let mut cfg = common::test_config();
    cfg.node_id = "status-a".into();
    cfg.cluster = Some("127.0.0.1:0".parse().unwrap());
    let a = HttpBroker::with(cfg).await;
    let mut cfg = common::test_config();
    cfg.node_id = "status-b".into();
    cfg.cluster = Some("127.0.0.1:0".parse().unwrap());
    cfg.peers = vec![format!(
        "sockbus-route://{}",
        a.broker.route.expect("a's route port")
    )];
    let b = common::TestBroker::with(cfg).await;
    let routes =
        |s: &sockbus_broker::State| sockbus_broker::metrics::Metrics::get(&s.metrics().routes);
    let (sa, sb) = (a.broker.state.clone(), b.state.clone());
    http_util::eventually("a route between the two brokers", || {
        routes(&sa) == 1 && routes(&sb) == 1
    })
    .await;

    let c = sockbus_client::connect(&a.broker.url).await.unwrap();
    c.stream_add(&StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let mut long = StreamConfig::new(LONG_NAME, long_subjects());
    long.fsync = Fsync::Interval;
    long.fsync_interval_ms = Some(50);
    long.max_age_ms = Some(7 * 86_400_000);
    long.max_msgs = Some(1_000_000);
    c.stream_add(&long).await.unwrap();
    let mut audit = StreamConfig::new("AUDIT", ["audit.*"]);
    audit.fsync = Fsync::Never;
    c.stream_add(&audit).await.unwrap();

    for i in 0..25 {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        c.publish_durable(&format!("orders.{region}.new"), format!("order {i:04}"))
            .await
            .unwrap();
    }
    for s in ["temperature", "humidity", "door-open"] {
        c.publish_durable(
            &format!("telemetry.warehouse-frankfurt-0001.sensors.{s}.dock-7"),
            "21.5",
        )
        .await
        .unwrap();
    }
    // billing has read 10 of the 25 orders and acked 6 of those; shipping
    // (orders.eu.> only) has read nothing; the long stream has one reader.
    let mut billing = c
        .consumer("ORDERS", ConsumerConfig::durable("billing").batch(10))
        .await
        .unwrap();
    for i in 0..10 {
        let m = billing
            .next_limited(Duration::from_secs(5), 10 - i)
            .await
            .unwrap()
            .expect("an order within 5 s");
        if i < 6 {
            m.ack_sync().await.unwrap();
        }
    }
    let _shipping = c
        .consumer(
            "ORDERS",
            ConsumerConfig::durable("shipping").filter("orders.eu.>"),
        )
        .await
        .unwrap();
    let _dashboard = c
        .consumer(LONG_NAME, ConsumerConfig::ephemeral())
        .await
        .unwrap();

    let browser = Browser::launch(&bin);
    let mut cdp = Cdp::open(&browser, &a.url("/")).await;
    let dir = tempfile::Builder::new()
        .prefix("status-page-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    let keep = std::env::var_os("SOCKBUS_SCREENSHOTS").map(PathBuf::from);
    for &(tag, width, height, mobile) in VIEWPORTS {
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        // A fresh poll after the resize, showing both streams.
        let seen = cdp.eval("Number(document.body.dataset.polls || 0)").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = cdp
                .eval(
                    "[Number(document.body.dataset.polls || 0), document.getElementById('streams').textContent]",
                )
                .await;
            let text = v[1].as_str().unwrap_or("");
            if v[0].as_u64() > seen.as_u64() && text.contains("ORDERS") && text.contains("AUDIT") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "page never showed the streams: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let file = format!("status-{tag}.png");
        screenshot(&mut cdp, width, &dir.join(&file)).await;
        if let Some(keep) = &keep {
            std::fs::create_dir_all(keep).unwrap();
            std::fs::copy(dir.join(&file), keep.join(&file)).unwrap();
        }

        let problems = cdp.eval(LAYOUT_PROBLEMS).await;
        assert_eq!(
            problems,
            json!([]),
            "at {width}x{height} (screenshot {}):\n{problems:#}",
            dir.join(&file).display()
        );

        let t = cdp
            .eval(&STREAM_TABLE.replace("\"LONG\"", &format!("{LONG_NAME:?}")))
            .await;
        assert_eq!(t["ordersMessages"], "25", "{width}px: {t:#}");
        assert_eq!(t["ordersLastSeq"], "25", "{width}px: {t:#}");
        assert_eq!(t["ordersConsumers"], "2", "{width}px: {t:#}");
        assert_eq!(t["ordersFsync"], "always", "{width}px: {t:#}");
        let bytes = t["ordersBytes"].as_str().unwrap_or("");
        assert!(
            bytes.ends_with(" B") || bytes.ends_with(" KiB"),
            "bytes in human units: {t:#}"
        );
        assert_eq!(t["longName"], LONG_NAME, "{width}px: {t:#}");
        assert_eq!(t["longMessages"], "3", "{width}px: {t:#}");
        let shown: Vec<String> = serde_json::from_value(t["longSubjects"].clone()).unwrap();
        assert_eq!(shown, long_subjects(), "every subject is on the page");
        assert_eq!(t["billingPending"], "15", "{width}px: {t:#}");
        assert_eq!(t["billingAckPending"], "4", "{width}px: {t:#}");
        assert_eq!(t["shippingPending"], "≤ 25", "{width}px: {t:#}");
        let cluster = t["cluster"].as_str().unwrap_or("");
        assert!(cluster.contains("status-b"), "the peer is listed: {t:#}");
    }
}

/// Payloads that try to end their event early or forge fields and events.
const HOSTILE_PAYLOADS: &[&str] = &[
    "\rid: 7\revent: x\r\rdata: forged",
    "one\rtwo\nthree\r\nfour",
    "\n\nid: 9\nevent: evil\ndata: forged\n\n",
    "retry: 1\r: comment\r\revent: evil\rdata: x\r\r",
    "ends with cr\r",
    "\r\n\r\n",
    "nul\0inside\0",
    "\0",
    "",
    " leading space",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_in_headless_chromium_sees_exactly_the_published_messages() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let b = HttpBroker::start().await;
    let browser = Browser::launch(&bin);
    // Same origin as the gateway, so EventSource may read the streams.
    let mut cdp = Cdp::open(&browser, &b.url("/")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Scripts run in the page only once it has replaced about:blank.
        let v = cdp.eval("document.readyState + ' ' + location.href").await;
        if v == json!(format!("complete {}", b.url("/"))) {
            break;
        }
        assert!(Instant::now() < deadline, "page not loaded: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = cdp
        .eval(
            r#"(() => {
            window.got = {raw: [], json: [], errors: 0};
            for (const [k, url] of [["raw", "/v1/subscribe/evil.>"], ["json", "/v1/subscribe/evil.>?format=json"]]) {
                const es = new EventSource(url);
                es.onmessage = (e) => window.got[k].push({type: e.type, data: e.data, id: e.lastEventId});
                es.addEventListener("x", () => window.got[k].push({type: "x"}));
                es.addEventListener("evil", () => window.got[k].push({type: "evil"}));
                es.onerror = () => window.got.errors++;
            }
            return true;
        })()"#,
        )
        .await;
    assert_eq!(opened, json!(true));
    let st = b.broker.state.clone();
    http_util::eventually("both EventSources subscribed", || st.subscriptions() == 2).await;

    for p in HOSTILE_PAYLOADS {
        let r = b.post("/v1/publish/evil.one", p.to_string()).await;
        assert_eq!(r.status, hyper::StatusCode::NO_CONTENT);
    }
    b.post("/v1/publish/evil.one", "the end").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let v = cdp.eval("JSON.stringify(window.got)").await;
        let got: Value = serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or_default();
        let done = |k: &str| {
            got[k]
                .as_array()
                .and_then(|a| a.last())
                .and_then(|e| e["data"].as_str())
                .is_some_and(|d| d.contains("the end"))
        };
        if done("raw") && done("json") {
            break got;
        }
        assert!(Instant::now() < deadline, "events so far: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got["errors"], 0, "{got}");

    // Raw: one event per message, its lines (CR, LF or CRLF) joined by LF.
    let want: Vec<Value> = HOSTILE_PAYLOADS
        .iter()
        .map(|p| json!({"type": "message", "data": lines_joined_by_lf(p), "id": ""}))
        .chain([json!({"type": "message", "data": "the end", "id": ""})])
        .collect();
    assert_eq!(got["raw"], json!(want), "raw format");

    // JSON: the payload byte for byte.
    let data: Vec<Value> = got["json"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(
                (&e["type"], &e["id"]),
                (&json!("message"), &json!("")),
                "{e}"
            );
            let v: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
            v["data"].clone()
        })
        .collect();
    let want: Vec<Value> = HOSTILE_PAYLOADS
        .iter()
        .chain(&["the end"])
        .map(|p| json!(p))
        .collect();
    assert_eq!(data, want, "json format");
}

fn lines_joined_by_lf(p: &str) -> String {
    p.replace("\r\n", "\n").replace('\r', "\n")
}
