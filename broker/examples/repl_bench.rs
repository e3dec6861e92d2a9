//! Replicated streams, R1 vs R3: acked publish rate and read-back on a
//! three-node sockbus cluster on loopback (docs/benchmarks.md).
//!
//! cargo build --release -p sockbus-broker --bin sockbus-broker --example repl_bench
//! target/release/examples/repl_bench [--msgs 50000] [--size 128] [--window 256]
//!
//! Starts three `sockbus-broker` processes (next to this binary) in cluster
//! mode, creates stream R1 (replicas 1) and R3 (replicas 3, fsync = always:
//! acked once two nodes have the entry fsynced), publishes `--msgs`
//! messages to each with `--window` durable publishes in flight from one
//! client on the node that created them (R3's leader), then reads each back
//! with a no-ack consumer there.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockbus_client::streams::{ConsumerConfig, StreamConfig};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let v: Vec<String> = std::env::args().collect();
    v.iter()
        .position(|a| a == name)
        .map(|i| v[i + 1].parse().expect("a number"))
        .unwrap_or(default)
}

async fn closed_loop(
    c: sockbus_client::Client,
    subject: &str,
    n: u64,
    window: u64,
    size: usize,
) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..window {
        let (next, c, subject) = (next.clone(), c.clone(), subject.to_string());
        tasks.push(tokio::spawn(async move {
            let p = vec![b'x'; size];
            while next.fetch_add(1, Ordering::Relaxed) < n {
                c.publish_durable(&subject, p.clone())
                    .await
                    .expect("durable publish");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn read_back(c: &sockbus_client::Client, stream: &str, n: u64) -> f64 {
    let mut k = c
        .consumer(stream, ConsumerConfig::ephemeral().no_ack(true).batch(1024))
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        k.next_timeout(Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a message");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (msgs, size, window) = (
        arg("--msgs", 50_000),
        arg("--size", 128) as usize,
        arg("--window", 256),
    );
    let bin: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("sockbus-broker");
    let tmp =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{}", p.1)).collect();
    let mut servers = Vec::new();
    for (i, (port, cport)) in ports.iter().enumerate() {
        let child = Command::new(&bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cluster",
                &format!("127.0.0.1:{cport}"),
            ])
            .args([
                "--peers",
                &peers.join(","),
                "--accel",
                "off",
                "--http",
                "off",
                "--node-id",
                &format!("b{i}"),
            ])
            .arg("--data-dir")
            .arg(tmp.path().join(format!("b{i}")))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        servers.push(Server(child));
    }
    let url = format!("sockbus://127.0.0.1:{}", ports[0].0);
    let c = loop {
        match sockbus_client::connect(&url).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    c.stream_add(&StreamConfig::new("R1", ["r1.>"]))
        .await
        .unwrap();
    let mut r3 = StreamConfig::new("R3", ["r3.>"]);
    r3.replicas = Some(3);
    let t = Instant::now();
    while let Err(e) = c.stream_add(&r3).await {
        assert!(t.elapsed() < Duration::from_secs(60), "R3 not created: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The creating node initialised the group; its first leader is soon known.
    while c
        .stream_info("R3")
        .await
        .unwrap()
        .cluster
        .and_then(|x| x.leader)
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{msgs} msgs of {size} B, {window} durable publishes in flight, one client");
    for (stream, subject) in [("R1", "r1.x"), ("R3", "r3.x")] {
        let p = closed_loop(c.clone(), subject, msgs, window, size).await;
        let r = read_back(&c, stream, msgs).await;
        println!(
            "{stream}: publish {:.1}k msgs/s, read-back {:.1}k msgs/s",
            p / 1e3,
            r / 1e3
        );
    }
    drop(servers);
}
