//! The live status page in a real browser: headless Chromium (Debian's
//! `chromium`) opens `GET /`, messages are published, and the counts the page
//! shows change by themselves, without a reload. Driven over the DevTools
//! protocol; a screenshot is kept in `target/.../tmp/status-page.png`.
//!
//! A second test subscribes with the browser's own `EventSource` and checks
//! that payloads full of line breaks and NULs arrive as exactly the
//! messages that were published.
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
