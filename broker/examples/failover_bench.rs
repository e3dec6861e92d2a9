//! Failover of a replicated stream under load (issue 17 item 8).
//!
//!   cargo build --release -p sockbus-broker --bin sockbus-broker --example failover_bench
//!   target/release/examples/failover_bench [--rounds 20] [--publishers 6] [--size 128]
//!   target/release/examples/failover_bench --nats [--nats-server PATH] ...
//!
//! Starts three brokers (the `sockbus-broker` next to this program's
//! directory) as a cluster on loopback, creates an R3 stream
//! (`fsync = always`), and runs publishers that each publish one message at
//! a time with a `Msg-Id`, retrying until acked, connected with all three
//! URLs (the SDK's failover list) and spread over the nodes. Each round
//! kill -9s the stream's leader and measures:
//!
//! - **election**: from the kill until a surviving node's `stream info`
//!   names a new leader;
//! - **publish gap**: the longest time without any publisher getting an
//!   ack, from the kill until publishing runs again (what a client sees);
//!
//! then restarts the killed broker and lets it catch up before the next
//! round. At the end every node must hold every acked message once (the
//! stream's message count against the distinct ids acked). Prints every
//! round and the p50 / p99 / max of both times.
//!
//! With `--nats` the same runs against three `nats-server` (JetStream, an
//! R3 file stream at its defaults; `nats-server` from PATH or
//! `--nats-server`), its publishers using async-nats with `Nats-Msg-Id`
//! and a 500 ms ack timeout before a retry (the sockbus SDK fails a
//! publish at once when its connection or the stream's leader is lost).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sockbus_client::streams::StreamConfig;
use sockbus_client::{Client, ConnectOptions, Headers};

const SECRET: &str = "failover-bench-secret";

struct Args {
    rounds: usize,
    publishers: usize,
    size: usize,
    nats: bool,
    nats_server: String,
}

fn args() -> Args {
    let mut a = Args {
        rounds: 20,
        publishers: 6,
        size: 128,
        nats: false,
        nats_server: "nats-server".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--nats" {
            a.nats = true;
            continue;
        }
        if k == "--nats-server" {
            a.nats_server = it.next().expect("--nats-server takes a path");
            continue;
        }
        let mut v = || {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("{k} takes a number"))
        };
        match k.as_str() {
            "--rounds" => a.rounds = v(),
            "--publishers" => a.publishers = v().max(1),
            "--size" => a.size = v(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Node {
    name: String,
    port: u16,
    cport: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self, bin: &Path, peers: &str) {
        if NATS.load(Ordering::Relaxed) {
            return self.spawn_nats(bin, peers);
        }
        let child = Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--cluster", &format!("127.0.0.1:{}", self.cport)])
            .args(["--peers", peers, "--cluster-secret", SECRET])
            .args(["--node-id", &self.name, "--http", "off", "--accel", "off"])
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
    }

    /// A JetStream server: `peers` are the cluster ports, comma-separated.
    fn spawn_nats(&mut self, bin: &Path, peers: &str) {
        let routes = peers
            .split(',')
            .map(|p| format!("\"nats-route://{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::create_dir_all(&self.dir).expect("a data directory");
        let conf = self.dir.with_extension("conf");
        std::fs::write(
            &conf,
            format!(
                "server_name: {}\nlisten: \"127.0.0.1:{}\"\njetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: failover, listen: \"127.0.0.1:{}\", routes: [ {routes} ] }}\n",
                self.name,
                self.port,
                self.dir.display(),
                self.cport
            ),
        )
        .expect("a config file");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_up(&self) {
        let end = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < end, "{} did not start", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn client(url: &str) -> Client {
    ConnectOptions::new()
        .request_timeout(Duration::from_secs(5))
        .max_reconnect_delay(Duration::from_millis(50))
        .connect(url)
        .await
        .expect("connect")
}

/// Which server the run is against (set once, before any node starts).
static NATS: AtomicBool = AtomicBool::new(false);

async fn nats_client(urls: &str) -> async_nats::Client {
    let addrs: Vec<&str> = urls.split(',').collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(addrs)
        .await
        .expect("connect to nats-server")
}

fn jetstream(c: async_nats::Client) -> async_nats::jetstream::Context {
    let mut js = async_nats::jetstream::new(c);
    js.set_timeout(Duration::from_millis(500));
    js
}

/// The stream's leader as `port` sees it (None while there is none).
async fn leader_seen_by(port: u16) -> Option<String> {
    if NATS.load(Ordering::Relaxed) {
        let c = tokio::time::timeout(Duration::from_secs(2), async {
            async_nats::connect(format!("nats://127.0.0.1:{port}")).await
        })
        .await
        .ok()?
        .ok()?;
        let js = jetstream(c);
        let s = tokio::time::timeout(Duration::from_secs(2), js.get_stream("FAIL"))
            .await
            .ok()?
            .ok()?;
        return s.cached_info().cluster.as_ref()?.leader.clone();
    }
    let c = tokio::time::timeout(
        Duration::from_secs(2),
        client(&format!("sockbus://127.0.0.1:{port}")),
    )
    .await
    .ok()?;
    let i = c.stream_info("FAIL").await.ok()?;
    i.cluster?.leader
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    NATS.store(a.nats, Ordering::Relaxed);
    let exe = std::env::current_exe().expect("current exe");
    let bin = if a.nats {
        PathBuf::from(&a.nats_server)
    } else {
        exe.parent()
            .and_then(|d| d.parent())
            .map(|d| d.join("sockbus-broker"))
            .expect("target dir")
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node {
            name: format!("n{i}"),
            port: free_port(),
            cport: free_port(),
            dir: tmp.path().join(format!("n{i}")),
            child: None,
        })
        .collect();
    let peers = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.cport))
        .collect::<Vec<_>>()
        .join(",");
    for n in &mut nodes {
        n.spawn(&bin, &peers);
    }
    for n in &nodes {
        n.wait_up().await;
    }
    let end = Instant::now() + Duration::from_secs(60);
    if a.nats {
        let js = jetstream(nats_client(&format!("nats://127.0.0.1:{}", nodes[0].port)).await);
        let cfg = async_nats::jetstream::stream::Config {
            name: "FAIL".into(),
            subjects: vec!["fail.>".into()],
            num_replicas: 3,
            ..Default::default()
        };
        while let Err(e) = js.create_stream(cfg.clone()).await {
            assert!(
                Instant::now() < end,
                "the cluster did not take the stream: {e}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        let admin = client(&format!("sockbus://127.0.0.1:{}", nodes[0].port)).await;
        let mut cfg = StreamConfig::new("FAIL", ["fail.>"]);
        cfg.replicas = Some(3);
        while let Err(e) = admin.stream_add(&cfg).await {
            assert!(
                Instant::now() < end,
                "the cluster did not take the stream: {e}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Publishers, each with all three URLs, the first one rotating.
    let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let payload = "x".repeat(a.size);
    let mut tasks = Vec::new();
    for p in 0..a.publishers {
        let scheme = if a.nats { "nats" } else { "sockbus" };
        let urls = (0..3)
            .map(|k| format!("{scheme}://127.0.0.1:{}", nodes[(p + k) % 3].port))
            .collect::<Vec<_>>()
            .join(",");
        let (acks, acked, stop, payload) =
            (acks.clone(), acked.clone(), stop.clone(), payload.clone());
        if a.nats {
            tasks.push(tokio::spawn(async move {
                let js = jetstream(nats_client(&urls).await);
                let payload = bytes::Bytes::from(payload);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("p{p}-{i}");
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", id.as_str());
                    loop {
                        let r = match js
                            .publish_with_headers(format!("fail.{p}"), h.clone(), payload.clone())
                            .await
                        {
                            Ok(ack) => ack.await.is_ok(),
                            Err(_) => false,
                        };
                        if r {
                            acks.lock().unwrap().push(Instant::now());
                            acked.lock().unwrap().insert(id);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    i += 1;
                }
            }));
            continue;
        }
        tasks.push(tokio::spawn(async move {
            let c = client(&urls).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("p{p}-{i}");
                let mut h = Headers::new();
                h.insert("Msg-Id", id.clone());
                loop {
                    match c
                        .publish_durable_with_headers(&format!("fail.{p}"), &h, payload.as_str())
                        .await
                    {
                        Ok(_) => {
                            acks.lock().unwrap().push(Instant::now());
                            acked.lock().unwrap().insert(id);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!(
        "{:>5} {:>8} {:>12} {:>15} {:>12}",
        "round", "leader", "election ms", "publish gap ms", "acked so far"
    );
    let mut elections = Vec::new();
    let mut gaps = Vec::new();
    for r in 1..=a.rounds {
        let Some(old) = leader_seen_by(nodes[0].port)
            .await
            .or(leader_seen_by(nodes[1].port).await)
        else {
            panic!("round {r}: no leader");
        };
        let li = nodes
            .iter()
            .position(|n| n.name == old)
            .expect("a node's name");
        let other = (li + 1) % 3;
        let t0 = Instant::now();
        nodes[li].kill9();
        let elected = loop {
            if let Some(l) = leader_seen_by(nodes[other].port).await {
                if l != old {
                    break t0.elapsed();
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "round {r}: no new leader"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Publishing runs again: acks keep coming for a while after the kill.
        let resumed_by = loop {
            let n = acks.lock().unwrap().iter().filter(|t| **t > t0).count();
            if n >= 100 * a.publishers {
                break Instant::now();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {r}: publishing did not resume"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let gap = {
            let v = acks.lock().unwrap();
            let mut times: Vec<Instant> = v
                .iter()
                .copied()
                .filter(|t| *t > t0 && *t <= resumed_by)
                .collect();
            times.sort();
            let mut prev = t0;
            let mut most = Duration::ZERO;
            for t in times {
                most = most.max(t - prev);
                prev = t;
            }
            most
        };
        let e = elected.as_secs_f64() * 1e3;
        let g = gap.as_secs_f64() * 1e3;
        println!(
            "{r:>5} {old:>8} {e:>12.0} {g:>15.0} {:>12}",
            acked.lock().unwrap().len()
        );
        elections.push(e);
        gaps.push(g);
        nodes[li].spawn(&bin, &peers);
        nodes[li].wait_up().await;
        // Caught up: it names the leader, then a little more time.
        let end = Instant::now() + Duration::from_secs(30);
        while leader_seen_by(nodes[li].port).await.is_none() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().len() as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ok = true;
    for n in &nodes {
        let url = format!("127.0.0.1:{}", n.port);
        let mut held = 0;
        for _ in 0..100 {
            held = if a.nats {
                // JetStream answers stream info from the leader: one count.
                let js = jetstream(nats_client(&format!("nats://{url}")).await);
                match js.get_stream("FAIL").await {
                    Ok(s) => s.cached_info().state.messages,
                    Err(_) => 0,
                }
            } else {
                client(&format!("sockbus://{url}"))
                    .await
                    .stream_info("FAIL")
                    .await
                    .map(|i| i.state.messages)
                    .unwrap_or(0)
            };
            if held >= acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("{}: {held} messages, {acked} distinct ids acked", n.name);
        ok &= held == acked;
    }
    println!(
        "election ms: p50 {:.0}, p99 {:.0}, max {:.0}; publish gap ms: p50 {:.0}, p99 {:.0}, max {:.0} ({} rounds, {} publishers)",
        pct(&mut elections, 0.5),
        pct(&mut elections, 0.99),
        pct(&mut elections, 1.0),
        pct(&mut gaps, 0.5),
        pct(&mut gaps, 0.99),
        pct(&mut gaps, 1.0),
        a.rounds,
        a.publishers
    );
    assert!(ok, "a node does not hold exactly the acked messages");
}
