//! A broker with its HTTP gateway on ephemeral ports, and a small HTTP/1.1
//! client (hyper) for the gateway tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use sockbus_broker::http::HttpServer;
use sockbus_broker::Config;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::common::{test_config, TestBroker};

pub struct HttpBroker {
    pub broker: TestBroker,
    pub http: SocketAddr,
    pub gateway: std::sync::Arc<sockbus_broker::http::Gateway>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl HttpBroker {
    pub async fn start() -> HttpBroker {
        Self::with(test_config()).await
    }

    pub async fn with(config: Config) -> HttpBroker {
        let broker = TestBroker::with(config).await;
        let server = HttpServer::bind("127.0.0.1:0".parse().unwrap(), broker.state.clone())
            .await
            .expect("bind HTTP");
        let http = server.local_addr();
        let gateway = server.gateway();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        HttpBroker {
            broker,
            http,
            gateway,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn get(&self, path: &str) -> Resp {
        request(self.http, Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Resp {
        request(self.http, Method::POST, path, &[], body.into()).await
    }

    /// Stops the HTTP gateway and waits until it has drained.
    pub async fn stop_http(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("run");
        }
    }
}

impl Drop for HttpBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `error` of a JSON error body, after checking its content type.
    pub fn error(&self) -> String {
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "errors are JSON"
        );
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {}", self.text()))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

fn build(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).unwrap()
}

/// One request on a fresh connection; the whole response.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Resp {
    let mut send = connect(addr).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(build(addr, method, path, headers, body)),
    )
    .await
    .expect("response within 10 s")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body within 10 s")
        .expect("body")
        .to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An open `text/event-stream` response.
pub struct Sse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    buf: String,
}

/// One SSE event: its fields in order (comments excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub fields: Vec<(String, String)>,
}

impl Event {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The event's data as an EventSource would see it: data lines joined by "\n".
    pub fn data(&self) -> String {
        self.all("data").join("\n")
    }
}

impl Sse {
    pub async fn open(addr: SocketAddr, path: &str) -> Sse {
        Self::open_with(addr, path, &[]).await
    }

    /// [`Sse::open`] with request headers (`authorization`).
    pub async fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut send = connect(addr).await;
        let resp = send
            .send_request(build(addr, Method::GET, path, headers, Bytes::new()))
            .await
            .expect("SSE response");
        let (parts, body) = resp.into_parts();
        let mut s = Sse {
            status: parts.status,
            headers: parts.headers,
            body,
            buf: String::new(),
        };
        if s.status == StatusCode::OK {
            // The first block is the ": subscribed to ..." comment, sent once
            // the subscription is in the router.
            let hello = s.block().await.expect("subscription comment");
            assert!(hello.starts_with(": subscribed to "), "{hello:?}");
        }
        s
    }

    /// The next raw block (up to a blank line), or None at the end of the stream.
    pub async fn block(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let b = self.buf[..i].to_string();
                self.buf.drain(..i + 2);
                return Some(b);
            }
            let f = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("SSE data within 10 s")?;
            let f = f.ok()?;
            if let Ok(d) = f.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&d));
            }
        }
    }

    /// The next event, skipping comment-only blocks (keep-alives).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let b = self.block().await?;
            let fields: Vec<(String, String)> = b
                .lines()
                .filter(|l| !l.starts_with(':'))
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap_or((l, ""));
                    (k.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string())
                })
                .collect();
            if !fields.is_empty() {
                return Some(Event { fields });
            }
        }
    }
}

/// Polls until `f` holds, for at most 10 s.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event as a browser's `EventSource` dispatches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatched {
    /// The event type (`message` unless an `event:` field said otherwise).
    pub kind: String,
    pub data: String,
    pub last_event_id: String,
}

/// Parses a whole `text/event-stream` body the way the WHATWG HTML standard
/// says a browser does ("Interpreting an event stream"): UTF-8 with one
/// leading BOM stripped, lines ended by CRLF, a lone LF or a lone CR,
/// comments, `event`/`data`/`id`/`retry` fields (others ignored), dispatch
/// on a blank line, an unfinished event at the end discarded. Returns the
/// dispatched events and the last `retry` value.
pub fn whatwg_events(body: &[u8]) -> (Vec<Dispatched>, Option<u64>) {
    let text = String::from_utf8_lossy(body);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = Vec::new();
    let mut rest = text;
    // Only complete lines: an unterminated last line is not processed yet.
    while let Some(i) = rest.find(['\r', '\n']) {
        lines.push(&rest[..i]);
        let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[i + skip..];
    }
    let (mut events, mut retry) = (Vec::new(), None);
    let (mut data, mut kind, mut id_buf) = (String::new(), String::new(), String::new());
    for line in lines {
        if line.is_empty() {
            // Dispatch: the last event ID is set even when no event fires.
            let last_id = id_buf.clone();
            if data.is_empty() {
                kind.clear();
                continue;
            }
            if data.ends_with('\n') {
                data.pop();
            }
            events.push(Dispatched {
                kind: if kind.is_empty() {
                    "message".into()
                } else {
                    std::mem::take(&mut kind)
                },
                data: std::mem::take(&mut data),
                last_event_id: last_id,
            });
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => kind = value.to_string(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => id_buf = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                retry = value.parse().ok()
            }
            _ => {}
        }
    }
    (events, retry)
}

impl Sse {
    /// Reads the raw stream until the WHATWG parser dispatches an event
    /// for which `last` holds; returns every event dispatched since the
    /// subscription comment (the stream's bytes are kept in full).
    pub async fn whatwg_until(&mut self, last: impl Fn(&Dispatched) -> bool) -> Vec<Dispatched> {
        let mut raw = std::mem::take(&mut self.buf).into_bytes();
        loop {
            let (events, _) = whatwg_events(&raw);
            if events.iter().any(&last) {
                return events;
            }
            let f = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no last event within 10 s; stream so far: {:?}",
                        String::from_utf8_lossy(&raw)
                    )
                })
                .expect("stream ended")
                .expect("stream error");
            if let Ok(d) = f.into_data() {
                raw.extend_from_slice(&d);
            }
        }
    }
}
