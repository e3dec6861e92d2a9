//! 10,000 durable streams on one broker, sockbus vs NATS JetStream (file
//! storage), side by side in one run.
//!
//! ```text
//! cargo build --release -p sockbus-broker --bin sockbus-broker --example many_streams
//! target/release/examples/many_streams [--streams 10000] [--msgs 100000] [--size 64] [--window 256] [--nofile N]
//! ```
//!
//! Starts `sockbus-broker` (next to this binary, or `--broker PATH`) and
//! `nats-server -js -sd DIR`, one after the other, on a free loopback port
//! with a fresh data dir (`BENCH_DIR`, default `.`), and for each: creates
//! `--streams` streams (one subject each), publishes `--msgs` messages of
//! `--size` bytes spread over all of them with `--window` publishes in
//! flight, then the same number to one stream; reads the server's RSS,
//! threads and open files; restarts it and times how long until the last
//! stream answers again. `--nofile N` runs both servers with RLIMIT_NOFILE
//! N (soft and hard, as `ulimit -n N`). Prints a table.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockbus_client::streams::StreamConfig;

struct Args {
    streams: usize,
    msgs: u64,
    size: usize,
    window: usize,
    nofile: Option<u64>,
    broker: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        streams: 10_000,
        msgs: 100_000,
        size: 64,
        window: 256,
        nofile: None,
        broker: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("sockbus-broker")))
            .unwrap_or_else(|| "sockbus-broker".into()),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        match v[i].as_str() {
            "--streams" => a.streams = v[i + 1].parse().expect("--streams N"),
            "--msgs" => a.msgs = v[i + 1].parse().expect("--msgs N"),
            "--size" => a.size = v[i + 1].parse().expect("--size BYTES"),
            "--window" => a.window = v[i + 1].parse().expect("--window N"),
            "--nofile" => a.nofile = Some(v[i + 1].parse().expect("--nofile N")),
            "--broker" => a.broker = v[i + 1].clone().into(),
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

/// What a server process uses, from /proc.
struct Usage {
    rss_mib: f64,
    hwm_mib: f64,
    threads: usize,
    fds: usize,
}

impl Server {
    fn usage(&self) -> Usage {
        let pid = self.child.id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |f: &str| {
            s.lines()
                .find(|l| l.starts_with(f))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let count =
            |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count());
        Usage {
            rss_mib: kib("VmRSS:") / 1024.0,
            hwm_mib: kib("VmHWM:") / 1024.0,
            threads: count("task"),
            fds: count("fd"),
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut cmd: Command, nofile: Option<u64>) -> Server {
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Server {
        child: cmd.spawn().expect("start the server"),
    }
}

fn sockbus_cmd(bin: &Path, dir: &Path, port: u16, streams: usize) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--accel",
        "off",
        "--http",
        "off",
        "--max-streams",
        &streams.to_string(),
    ])
    .arg("--data-dir")
    .arg(dir)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null());
    c
}

fn nats_cmd(dir: &Path, port: u16) -> Command {
    let mut c = Command::new("nats-server");
    c.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Runs `f(i)` for i in 0..n, `window` at a time; returns per second.
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

/// One server's figures.
#[derive(Default)]
struct Figures {
    create: f64,
    many: f64,
    one: f64,
    loaded: Option<Usage>,
    startup: Duration,
    restarted: Option<Usage>,
    /// Why the run stopped early (a server that could not create them all).
    failed: Option<String>,
}

async fn connect_sockbus(port: u16) -> sockbus_client::Client {
    let t = Instant::now();
    loop {
        match sockbus_client::ConnectOptions::new()
            .request_timeout(Duration::from_secs(60))
            .connect(&format!("sockbus://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(300), "sockbus: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connect_nats(port: u16) -> async_nats::Client {
    let t = Instant::now();
    loop {
        match async_nats::connect(format!("127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(300), "nats: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn sockbus(a: &Args, dir: &Path, payload: &[u8]) -> Figures {
    let mut f = Figures::default();
    let port = free_port();
    let n = a.streams;
    let sb = spawn(sockbus_cmd(&a.broker, dir, port, n + 1), a.nofile);
    let c = connect_sockbus(port).await;
    let cc = c.clone();
    f.create = closed_loop(n as u64, 64, move |i| {
        let c = cc.clone();
        async move {
            c.stream_add(&StreamConfig::new(format!("M{i}"), [format!("many.{i}")]))
                .await
                .expect("create");
        }
    })
    .await;
    c.stream_add(&StreamConfig::new("ONE", ["one"]))
        .await
        .expect("create");
    let (cc, p) = (c.clone(), payload.to_vec());
    f.many = closed_loop(a.msgs, a.window, move |i| {
        let (c, p) = (cc.clone(), p.clone());
        async move {
            c.publish_durable(&format!("many.{}", i % n as u64), p)
                .await
                .expect("publish");
        }
    })
    .await;
    let (cc, p) = (c.clone(), payload.to_vec());
    f.one = closed_loop(a.msgs, a.window, move |_| {
        let (c, p) = (cc.clone(), p.clone());
        async move {
            c.publish_durable("one", p).await.expect("publish");
        }
    })
    .await;
    f.loaded = Some(sb.usage());
    drop(c);
    sb.stop();
    let t = Instant::now();
    let sb = spawn(sockbus_cmd(&a.broker, dir, port, n + 1), a.nofile);
    let c = connect_sockbus(port).await;
    c.stream_info(&format!("M{}", n - 1))
        .await
        .expect("the last stream after the restart");
    f.startup = t.elapsed();
    f.restarted = Some(sb.usage());
    drop(c);
    sb.stop();
    f
}

async fn nats(a: &Args, dir: &Path, payload: &[u8]) -> Figures {
    use async_nats::jetstream::stream::{Config, StorageType};
    let mut f = Figures::default();
    let port = free_port();
    let n = a.streams;
    let srv = spawn(nats_cmd(dir, port), a.nofile);
    let nc = connect_nats(port).await;
    let js = async_nats::jetstream::new(nc.clone());
    let jj = js.clone();
    // Under a low --nofile JetStream cannot create them all: reported, not a panic.
    let errors = Arc::new(std::sync::Mutex::new((0u64, None::<String>)));
    let ee = errors.clone();
    f.create = closed_loop(n as u64, 64, move |i| {
        let (js, errors) = (jj.clone(), ee.clone());
        async move {
            if let Err(e) = js
                .create_stream(Config {
                    name: format!("M{i}"),
                    subjects: vec![format!("many.{i}")],
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
            {
                let mut g = errors.lock().unwrap();
                g.0 += 1;
                g.1.get_or_insert_with(|| e.to_string());
            }
        }
    })
    .await;
    let (failed, first) = errors.lock().unwrap().clone();
    if let Some(e) = first {
        f.failed = Some(format!(
            "{} of {n} streams created; the others failed: {e}",
            n as u64 - failed
        ));
        f.loaded = Some(srv.usage());
        drop((js, nc));
        srv.stop();
        return f;
    }
    js.create_stream(Config {
        name: "ONE".into(),
        subjects: vec!["one".into()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create");
    let (jj, p) = (js.clone(), payload.to_vec());
    f.many = closed_loop(a.msgs, a.window, move |i| {
        let (js, p) = (jj.clone(), p.clone());
        async move {
            js.publish(format!("many.{}", i % n as u64), p.into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    })
    .await;
    let (jj, p) = (js.clone(), payload.to_vec());
    f.one = closed_loop(a.msgs, a.window, move |_| {
        let (js, p) = (jj.clone(), p.clone());
        async move {
            js.publish("one", p.into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    })
    .await;
    f.loaded = Some(srv.usage());
    drop((js, nc));
    srv.stop();
    let t = Instant::now();
    let srv = spawn(nats_cmd(dir, port), a.nofile);
    let nc = connect_nats(port).await;
    let js = async_nats::jetstream::new(nc.clone());
    let last = format!("M{}", n - 1);
    let t_ask = Instant::now();
    loop {
        match js.get_stream(&last).await {
            Ok(_) => break,
            Err(e) => {
                assert!(t_ask.elapsed() < Duration::from_secs(600), "nats: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    f.startup = t.elapsed();
    f.restarted = Some(srv.usage());
    drop((js, nc));
    srv.stop();
    f
}

fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M/s", r / 1e6)
    } else {
        format!("{:.1}k/s", r / 1e3)
    }
}

fn usage(u: &Option<Usage>) -> String {
    u.as_ref().map_or("-".into(), |u| {
        format!(
            "RSS {:.0} MiB (peak {:.0}), {} threads, {} open files",
            u.rss_mib, u.hwm_mib, u.threads, u.fds
        )
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let tmp =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let payload = vec![b'x'; a.size];
    let sb = sockbus(&a, &tmp.path().join("sockbus"), &payload).await;
    let ns = nats(&a, &tmp.path().join("nats"), &payload).await;
    let n = a.streams;
    let rows = [
        (
            format!("create {n} streams (64 requests in flight)"),
            rate(sb.create),
            rate(ns.create),
        ),
        (
            format!(
                "durable publish, {} B, {} in flight, spread over {n} streams",
                a.size, a.window
            ),
            rate(sb.many),
            rate(ns.many),
        ),
        (
            format!(
                "durable publish, {} B, {} in flight, one stream",
                a.size, a.window
            ),
            rate(sb.one),
            rate(ns.one),
        ),
        (
            "after the load".into(),
            usage(&sb.loaded),
            usage(&ns.loaded),
        ),
        (
            format!("restart: until stream {} answers", n - 1),
            format!("{:.2}s", sb.startup.as_secs_f64()),
            format!("{:.2}s", ns.startup.as_secs_f64()),
        ),
        (
            "after the restart".into(),
            usage(&sb.restarted),
            usage(&ns.restarted),
        ),
    ];
    println!(
        "\nsockbus fsync=always (ack after fdatasync); JetStream at its default (fsync every 2 min); nofile {}",
        a.nofile.map_or("unchanged".into(), |n| n.to_string())
    );
    for (who, f) in [("sockbus", &sb), ("NATS JetStream", &ns)] {
        if let Some(e) = &f.failed {
            println!("{who} stopped early: {e}");
        }
    }
    println!("{:<70} | {:<60} | NATS JetStream", "scenario", "sockbus");
    println!("{}", "-".repeat(200));
    for (what, s, n) in rows {
        println!("{what:<70} | {s:<60} | {n}");
    }
}
