//! The `sockbus-broker` binary with its HTTP gateway, as an operator runs it:
//! `--http` on, off and refused, JSON logs with a span per connection, and
//! SIGTERM ending SSE streams.

mod common;
mod http_util;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_util::{request, Sse};
use hyper::{Method, StatusCode};

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Proc {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args(["--accel", "off"])
            .args(args)
            .env("RUST_LOG", "sockbus_broker=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn broker");
        Proc {
            child,
            log,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<String> {
        let f = std::fs::File::open(&self.log).unwrap();
        BufReader::new(f).lines().map_while(Result::ok).collect()
    }

    async fn wait_port(&self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "nothing listening on {addr}: {:?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "broker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn http_gateway_serves_beside_the_native_port_and_logs_json_spans() {
    let native = free_addr();
    let http = free_addr();
    let mut p = Proc::spawn(&[
        "--listen",
        &native.to_string(),
        "--http",
        &http.to_string(),
        "--log-format",
        "json",
    ]);
    p.wait_port(http).await;
    p.wait_port(native).await;
    let r = request(http, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    let c = sockbus_client::connect(&format!("sockbus://{native}"))
        .await
        .unwrap();
    c.flush().await.unwrap();
    let r = request(
        http,
        Method::POST,
        "/v1/publish/p.x",
        &[],
        Bytes::from_static(b"1"),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let mut sse = Sse::open(http, "/v1/subscribe/p.%3E").await;
    drop(c);

    // SIGTERM ends the SSE stream and exits 0.
    let st = p.sigterm_and_wait();
    assert_eq!(st.code(), Some(0), "{:?}", p.lines());
    assert!(sse.next().await.is_none(), "SSE stream ended by shutdown");

    let lines = p.lines();
    let logs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let msg = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    assert!(
        logs.iter()
            .any(|v| msg(v).starts_with("HTTP gateway listening")),
        "{lines:#?}"
    );
    // One span per connection: HTTP requests carry http{id, peer}, native
    // clients conn{id, peer, client}.
    assert!(
        logs.iter().any(|v| v["span"]["name"] == "http"
            && v["span"]["peer"].is_string()
            && msg(v) == "request"),
        "{lines:#?}"
    );
    assert!(
        logs.iter()
            .any(|v| v["span"]["name"] == "conn" && v["span"]["client"].is_string()),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn http_off_runs_without_it_and_a_taken_explicit_address_is_refused() {
    let native = free_addr();
    let mut p = Proc::spawn(&["--listen", &native.to_string(), "--http", "off"]);
    p.wait_port(native).await;
    assert_eq!(p.sigterm_and_wait().code(), Some(0));
    assert!(
        p.lines().iter().any(|l| l.contains("HTTP gateway off")),
        "{:?}",
        p.lines()
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .args(["--accel", "off", "--listen", &free_addr().to_string()])
        .args(["--http", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("sockbus-broker: cannot listen for HTTP on"),
        "{err}"
    );
}
