//! Many streams on one broker: 10,000 streams on a broker whose open-file
//! limit is 1024 (soft and hard, as `ulimit -n 1024` gives it), each
//! written and read back; new clients still served while they exist; all
//! of them recovered with their messages after a kill -9; the broker on a
//! bounded number of threads throughout. And kill -9 in the middle of
//! writes to many streams whose files the broker keeps closing and
//! reopening (a tiny open-file limit): nothing acked is lost.
//!
//! By default the first test runs 2,000 streams, not 10,000: on the CI
//! machine's disk most of a 10,000-stream run is file-system metadata work
//! (creating, then removing 10,000 directories) that takes minutes. 2,000
//! streams are still four times the 512 files the broker may keep open
//! under this limit, so the open-file cache closes and reopens files
//! throughout. `SOCKBUS_TEST_STREAMS=10000` runs the full 10,000 (what it
//! measured is in docs/benchmarks.md, "Many streams").

mod ports;

use ports::free_port;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sockbus_client::streams::{ConsumerConfig, StreamConfig};
use sockbus_client::{Client, ConnectOptions, Headers};

/// The open-file limit the broker runs under.
const NOFILE: u64 = 1024;
/// Requests in flight while creating, writing and reading the streams.
const WINDOW: usize = 64;

fn streams_wanted() -> usize {
    std::env::var("SOCKBUS_TEST_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn name(i: usize) -> String {
    format!("M{i}")
}

fn subject(i: usize) -> String {
    format!("many.{i}")
}

struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    /// Starts the broker binary with RLIMIT_NOFILE = 1024 (soft and hard,
    /// so it cannot raise it) and waits until it serves a client.
    async fn start(data: &Path, log: &Path, port: u16, max_streams: usize) -> (Broker, Duration) {
        Self::start_with(data, log, port, max_streams, NOFILE).await
    }

    async fn start_with(
        data: &Path,
        log: &Path,
        port: u16,
        max_streams: usize,
        nofile: u64,
    ) -> (Broker, Duration) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--accel",
            "off",
            "--http",
            "off",
            "--node-id",
            "many",
            "--max-streams",
            &max_streams.to_string(),
        ])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t = Instant::now();
        let child = cmd.spawn().expect("start the broker");
        let b = Broker { child, port };
        let c = b.client_within(Duration::from_secs(120), log).await;
        drop(c);
        (b, t.elapsed())
    }

    async fn client_within(&self, limit: Duration, log: &Path) -> Client {
        let deadline = Instant::now() + limit;
        loop {
            match ConnectOptions::new()
                .connect_timeout(Duration::from_secs(5))
                .request_timeout(Duration::from_secs(30))
                .connect(&format!("sockbus://127.0.0.1:{}", self.port))
                .await
            {
                Ok(c) => return c,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no client served within {limit:?}: {e}\n{}",
                        tail(log)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn proc_count(&self, what: &str) -> usize {
        std::fs::read_dir(format!("/proc/{}/{what}", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn threads(&self) -> usize {
        self.proc_count("task")
    }

    fn fds(&self) -> usize {
        self.proc_count("fd")
    }

    /// Soft and hard RLIMIT_NOFILE as the broker runs with them.
    fn nofile(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/limits", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    2 * cores + 16
}

/// Runs `f(i)` for every stream, `WINDOW` at a time, spread over the clients.
async fn each<F, Fut>(clients: &[Client], n: usize, f: F)
where
    F: Fn(Client, usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures_util::stream::iter(0..n)
        .map(|i| f(clients[i % clients.len()].clone(), i))
        .buffer_unordered(WINDOW)
        .collect::<Vec<()>>()
        .await;
}

/// Reads stream i's only message back and checks it.
async fn read_back(c: Client, i: usize) {
    let mut k = c
        .consumer(&name(i), ConsumerConfig::ephemeral().no_ack(true).batch(1))
        .await
        .unwrap_or_else(|e| panic!("consumer on {}: {e}", name(i)));
    let m = k
        .next_limited(Duration::from_secs(30), 1)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("nothing read back from {}", name(i)));
    assert_eq!(
        (m.seq, &m.payload()[..]),
        (1, format!("m{i}").as_bytes()),
        "{}",
        name(i)
    );
}

/// A client that connects now gets served: pub/sub round trip.
async fn new_clients_are_served(b: &Broker, log: &Path) {
    let sub = b.client_within(Duration::from_secs(10), log).await;
    let publ = b.client_within(Duration::from_secs(10), log).await;
    let mut s = sub.subscribe("hello.many").await.unwrap();
    sub.flush().await.unwrap();
    publ.publish("hello.many", "hi").await.unwrap();
    publ.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a new client's subscription got nothing")
        .expect("subscription ended");
    assert_eq!(&m.payload[..], b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_under_1024_open_files_are_written_read_back_and_recovered_on_few_threads(
) {
    let n = streams_wanted();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let port = free_port();
    let (b, _) = Broker::start(&data, &log, port, n).await;
    assert_eq!(
        b.nofile(),
        format!("{NOFILE} {NOFILE}"),
        "the limit applies"
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.client_within(Duration::from_secs(10), &log).await);
    }

    let t = Instant::now();
    each(&clients, n, |c, i| async move {
        c.stream_add(&StreamConfig::new(name(i), [subject(i)]))
            .await
            .unwrap_or_else(|e| panic!("create {}: {e}", name(i)));
    })
    .await;
    eprintln!("{n} streams created in {:?}", t.elapsed());
    let e = clients[0]
        .stream_add(&StreamConfig::new("ONE_MORE", ["one.more"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "holds {n} streams, its limit is {n} (--max-streams)"
        )),
        "{e}"
    );

    let t = Instant::now();
    each(&clients, n, |c, i| async move {
        let a = c
            .publish_durable(&subject(i), format!("m{i}"))
            .await
            .unwrap_or_else(|e| panic!("publish to {}: {e}", name(i)));
        assert_eq!((a.stream.as_str(), a.seq), (name(i).as_str(), 1));
    })
    .await;
    eprintln!("{n} streams written in {:?}", t.elapsed());
    new_clients_are_served(&b, &log).await;
    let (threads, fds) = (b.threads(), b.fds());
    eprintln!("with {n} streams written: {threads} threads, {fds} open files");
    assert!(threads < max_threads(), "{threads} threads");
    // Half the limit for stream files, the rest for a few clients.
    assert!(fds < NOFILE as usize / 2 + 64, "{fds} open files");

    let t = Instant::now();
    each(&clients, n, read_back).await;
    eprintln!("{n} streams read back in {:?}", t.elapsed());
    new_clients_are_served(&b, &log).await;
    assert!(b.threads() < max_threads(), "{} threads", b.threads());
    drop(clients);

    // kill -9 with every stream on disk; all of them come back, even
    // under a lower --max-streams (with a warning).
    b.kill9();
    let lower = (n / 2).max(1);
    let (b, startup) = Broker::start(&data, &log, port, lower).await;
    eprintln!("restart with {n} streams: served in {startup:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "{n} streams found on disk, more than --max-streams {lower}"
        )),
        "{}",
        tail(&log)
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.client_within(Duration::from_secs(10), &log).await);
    }
    let t = Instant::now();
    each(&clients, n, read_back).await;
    eprintln!(
        "{n} streams read back after the restart in {:?}",
        t.elapsed()
    );
    // Sequences carry on.
    each(&clients, n.min(100), |c, i| async move {
        let i = i * (n / n.min(100));
        let a = c.publish_durable(&subject(i), "again").await.unwrap();
        assert_eq!(a.seq, 2, "{}", name(i));
    })
    .await;
    let e = clients[0]
        .stream_add(&StreamConfig::new("ONE_MORE", ["one.more"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "holds {n} streams, its limit is {lower} (--max-streams)"
        )),
        "{e}"
    );
    new_clients_are_served(&b, &log).await;
    let (threads, fds) = (b.threads(), b.fds());
    eprintln!("after the restart: {threads} threads, {fds} open files");
    assert!(threads < max_threads(), "{threads} threads");
    assert!(fds < NOFILE as usize / 2 + 64, "{fds} open files");
}

/// Every message of stream i, in order: (seq, payload).
async fn stream_contents(c: &Client, i: usize) -> Vec<(u64, String)> {
    let total = c.stream_info(&name(i)).await.unwrap().state.messages as usize;
    let mut k = c
        .consumer(
            &name(i),
            ConsumerConfig::ephemeral().no_ack(true).batch(256),
        )
        .await
        .unwrap();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let m = k
            .next_limited(Duration::from_secs(10), total)
            .await
            .unwrap()
            .unwrap_or_else(|| {
                panic!("{}: read back stalled at {} of {total}", name(i), out.len())
            });
        out.push((m.seq, String::from_utf8_lossy(m.payload()).into_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_writing_to_many_streams_through_a_tiny_open_file_budget_loses_no_acked_message(
) {
    // 96 open files: 48 for stream files, shared by 200 streams.
    const STREAMS: usize = 200;
    const LIMIT: u64 = 96;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let port = free_port();
    let (mut b, _) = Broker::start_with(&data, &log, port, STREAMS, LIMIT).await;
    let c = b.client_within(Duration::from_secs(10), &log).await;
    for i in 0..STREAMS {
        let mut cfg = StreamConfig::new(name(i), [subject(i)]);
        // Small segments: rolls (new files) happen under the load too.
        cfg.segment_bytes = Some(4096);
        c.stream_add(&cfg).await.unwrap();
    }
    drop(c);
    let stop = Arc::new(AtomicBool::new(false));
    // payload -> (stream, acked seq)
    let acked: Arc<Mutex<HashMap<String, (usize, u64)>>> = Default::default();
    let mut pubs = Vec::new();
    for t in 0..8usize {
        let (stop, acked) = (stop.clone(), acked.clone());
        let c = ConnectOptions::new()
            .request_timeout(Duration::from_secs(2))
            .max_reconnect_delay(Duration::from_millis(50))
            .connect(&format!("sockbus://127.0.0.1:{port}"))
            .await
            .unwrap();
        pubs.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = (t * 7919 + n * 31) % STREAMS;
                let payload = format!("p{t}-{n:06}");
                let mut h = Headers::new();
                h.insert("Msg-Id", payload.clone());
                // Retried until acked: the Msg-Id keeps a retry single.
                loop {
                    match c
                        .publish_durable_with_headers(&subject(i), &h, &payload)
                        .await
                    {
                        Ok(a) => {
                            acked.lock().unwrap().insert(payload.clone(), (i, a.seq));
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                n += 1;
            }
        }));
    }
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.kill9();
        b = Broker::start_with(&data, &log, port, STREAMS, LIMIT)
            .await
            .0;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 500, "too little load: {} acked", acked.len());
    let c = b.client_within(Duration::from_secs(10), &log).await;
    let mut stored: HashMap<String, (usize, u64)> = HashMap::new();
    for i in 0..STREAMS {
        let msgs = stream_contents(&c, i).await;
        for (k, (seq, p)) in msgs.iter().enumerate() {
            assert_eq!(*seq, k as u64 + 1, "{}: dense sequences", name(i));
            assert!(
                stored.insert(p.clone(), (i, *seq)).is_none(),
                "{p} stored twice"
            );
        }
    }
    for (p, at) in &acked {
        assert_eq!(stored.get(p), Some(at), "acked {p} at {at:?}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("Too many open files"),
        "the broker ran out of files:\n{}",
        tail(&log)
    );
    drop(b);
}
