//! Durable streams vs NATS JetStream (file storage), side by side in one run.
//!
//! ```text
//! cargo build --release -p sockbus-broker --bin sockbus-broker --example stream_bench
//! target/release/examples/stream_bench [--msgs 200000] [--size 128] [--window 256] [--replay-gb 2]
//! ```
//!
//! Starts `sockbus-broker` (next to this binary, or `--broker PATH`) and
//! `nats-server -js -sd DIR` on free loopback ports with fresh data dirs, then
//! measures, for each: durable publish rate with `--window` publishes in
//! flight (sockbus with fsync=always, JetStream at its default, which does not
//! fsync each ack); read-back rate with a pull consumer without and with an
//! ack per message; and the replay of a multi-GB stream after a broker
//! restart, with the broker's peak RSS. Prints a table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sockbus_client::streams::{ConsumerConfig, Fsync, StreamConfig};

struct Args {
    msgs: u64,
    size: usize,
    window: usize,
    replay_gb: f64,
    broker: PathBuf,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        msgs: 200_000,
        size: 128,
        window: 256,
        replay_gb: 2.0,
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
            "--msgs" => a.msgs = v[i + 1].parse().expect("--msgs N"),
            "--size" => a.size = v[i + 1].parse().expect("--size BYTES"),
            "--window" => a.window = v[i + 1].parse().expect("--window N"),
            "--replay-gb" => a.replay_gb = v[i + 1].parse().expect("--replay-gb GB"),
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

struct Server {
    child: Child,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Peak and current resident memory in MiB.
    fn rss(&self) -> (f64, f64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = |f: &str| {
            s.lines()
                .find(|l| l.starts_with(f))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
    }
    fn stop(mut self) {
        unsafe_kill(self.child.id());
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16) {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "server on {port} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_sockbus(bin: &Path, dir: &Path, port: u16) -> Server {
    let child = Command::new(bin)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--accel", "off"])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    wait_port(port).await;
    Server { child }
}

async fn start_nats(dir: &Path, port: u16) -> Server {
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start nats-server (apt-get install nats-server)");
    wait_port(port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Server { child }
}

/// Runs `window` tasks that each publish until `n` are done; returns msgs/s.
async fn closed_loop<F, Fut>(n: u64, window: usize, f: F) -> f64
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..window {
        let (next, f) = (next.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

struct Row {
    what: String,
    sockbus: String,
    nats: String,
    ratio: String,
}

fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M msgs/s", r / 1e6)
    } else {
        format!("{:.1}k msgs/s", r / 1e3)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let run = |what: &str| a.only.as_deref().is_none_or(|o| what.contains(o));
    let tmp =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let payload = vec![b'x'; a.size];
    let mut rows = Vec::new();

    let sb_port = free_port();
    let nats_port = free_port();
    let sb_dir = tmp.path().join("sockbus");
    let nats_dir = tmp.path().join("nats");
    let sb = start_sockbus(&a.broker, &sb_dir, sb_port).await;
    let nats = start_nats(&nats_dir, nats_port).await;
    let sbc = sockbus_client::connect(&format!("sockbus://127.0.0.1:{sb_port}"))
        .await
        .unwrap();
    let nc = async_nats::connect(format!("127.0.0.1:{nats_port}"))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nc.clone());

    let mut bench = StreamConfig::new("BENCH", ["bench.>"]);
    // BENCH_FSYNC=never|interval, to see what fsync costs (the default is always).
    bench.fsync = match std::env::var("BENCH_FSYNC").as_deref() {
        Ok("never") => Fsync::Never,
        Ok("interval") => Fsync::Interval,
        _ => Fsync::Always,
    };
    sbc.stream_add(&bench).await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();

    if run("publish") {
        // Alternate, best of 2 each, to be fair to a noisy machine.
        let mut best = (0f64, 0f64);
        for _ in 0..2 {
            let (c, p) = (sbc.clone(), payload.clone());
            let r = closed_loop(a.msgs / 2, a.window, move |_| {
                let (c, p) = (c.clone(), p.clone());
                async move {
                    c.publish_durable("bench.x", p)
                        .await
                        .expect("durable publish");
                }
            })
            .await;
            best.0 = best.0.max(r);
            let (j, p) = (js.clone(), payload.clone());
            let r = closed_loop(a.msgs / 2, a.window, move |_| {
                let (j, p) = (j.clone(), p.clone());
                async move {
                    j.publish("bench.x", p.into())
                        .await
                        .expect("publish")
                        .await
                        .expect("ack");
                }
            })
            .await;
            best.1 = best.1.max(r);
        }
        rows.push(Row {
            what: format!(
                "durable publish, {} B, {} in flight (sockbus fsync=always; JetStream default)",
                a.size, a.window
            ),
            sockbus: rate(best.0),
            nats: rate(best.1),
            ratio: format!("{:.2}x", best.0 / best.1),
        });
    }

    if run("read") {
        let total = sbc.stream_info("BENCH").await.unwrap().state.messages;
        let js_stream = js.get_stream("BENCH").await.unwrap();
        for ack in [false, true] {
            let mut r = (0f64, 0f64);
            let mut k = sbc
                .consumer(
                    "BENCH",
                    ConsumerConfig::ephemeral().no_ack(!ack).batch(1024),
                )
                .await
                .unwrap();
            let t = Instant::now();
            for _ in 0..total {
                let m = k.next().await.unwrap();
                if ack {
                    m.ack().await.unwrap();
                }
            }
            r.0 = total as f64 / t.elapsed().as_secs_f64();
            let cons = js_stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    ack_policy: if ack {
                        async_nats::jetstream::consumer::AckPolicy::Explicit
                    } else {
                        async_nats::jetstream::consumer::AckPolicy::None
                    },
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut msgs = cons
                .stream()
                .max_messages_per_batch(1024)
                .messages()
                .await
                .unwrap();
            let t = Instant::now();
            for _ in 0..total {
                let m = msgs.next().await.unwrap().unwrap();
                if ack {
                    m.ack().await.unwrap();
                }
            }
            r.1 = total as f64 / t.elapsed().as_secs_f64();
            rows.push(Row {
                what: format!(
                    "read-back of {total} msgs, pull batch 1024, {}",
                    if ack { "ack each" } else { "no acks" }
                ),
                sockbus: rate(r.0),
                nats: rate(r.1),
                ratio: format!("{:.2}x", r.0 / r.1),
            });
        }
    }
    drop(nc);
    nats.stop();

    if run("replay") && a.replay_gb > 0.0 {
        let size = 16 * 1024;
        let n = (a.replay_gb * (1u64 << 30) as f64 / size as f64) as u64;
        let mut cfg = StreamConfig::new("BIG", ["big.>"]);
        cfg.fsync = Fsync::Never;
        sbc.stream_add(&cfg).await.unwrap();
        let big = vec![b'b'; size];
        let t = Instant::now();
        let (c, p) = (sbc.clone(), big.clone());
        let w = closed_loop(n, 64, move |_| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                c.publish_durable("big.x", p)
                    .await
                    .expect("durable publish");
            }
        })
        .await;
        let gib = (n * size as u64) as f64 / (1u64 << 30) as f64;
        eprintln!(
            "wrote {gib:.2} GiB in {:.1}s ({w:.0} msgs/s)",
            t.elapsed().as_secs_f64()
        );
        drop(sbc);
        // Restart: recovery of a multi-GB stream, and a cold process for the RSS figure.
        sb.stop();
        let _ = Command::new("sync").status();
        let t = Instant::now();
        let sb = start_sockbus(&a.broker, &sb_dir, sb_port).await;
        let startup = t.elapsed();
        let sbc = sockbus_client::connect(&format!("sockbus://127.0.0.1:{sb_port}"))
            .await
            .unwrap();
        let mut k = sbc
            .consumer("BIG", ConsumerConfig::ephemeral().no_ack(true).batch(256))
            .await
            .unwrap();
        let t = Instant::now();
        let mut bytes = 0u64;
        let mut peak_rss: f64 = 0.0;
        for i in 0..n {
            let m = k.next().await.unwrap();
            bytes += m.payload().len() as u64;
            if i % 4096 == 0 {
                peak_rss = peak_rss.max(sb.rss().1);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let (hwm, _) = sb.rss();
        let own = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
                    / 1024.0
            })
            .unwrap_or(0.0);
        rows.push(Row {
            what: format!("replay of {gib:.2} GiB ({n} x 16 KiB) after restart (start-up {:.2}s)", startup.as_secs_f64()),
            sockbus: format!("{:.0} MiB/s, {}", bytes as f64 / secs / (1 << 20) as f64, rate(n as f64 / secs)),
            nats: "-".into(),
            ratio: format!("broker peak RSS {hwm:.0} MiB (sampled {peak_rss:.0}); bench client peak RSS {own:.0} MiB"),
        });
        sb.stop();
    } else {
        sb.stop();
    }

    println!(
        "\n{:<95} | {:>22} | {:>16} | ratio",
        "scenario", "sockbus", "NATS JetStream"
    );
    println!("{}", "-".repeat(150));
    for r in rows {
        println!(
            "{:<95} | {:>22} | {:>16} | {}",
            r.what, r.sockbus, r.nats, r.ratio
        );
    }
}
