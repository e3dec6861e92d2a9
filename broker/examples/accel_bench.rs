//! Fast path on vs off, through a real broker process, alternated in one run.
//!
//!   cargo build --release -p sockbus-broker --bin sockbus-broker --example accel_bench
//!   sudo target/release/examples/accel_bench [--rounds 3] [--requests 20000] [--messages 1000000] [--size 128]
//!
//! For each round and mode it starts `sockbus-broker --accel off` (found next
//! to this program) inside a cgroup of its own, and for "on" attaches the
//! fast path there for the broker's port (exactly what `--accel on` does,
//! but with the counters at hand). It measures request/reply round trips
//! (one requester, one replier, sequential), pub/sub 1→1 throughput
//! (128-byte messages) and CPU per message (broker + clients, user + system,
//! from /proc), then prints medians and on/off ratios. Needs root.
//!
//! `--direct` compares direct delivery instead (docs/fast-path.md, "Direct
//! delivery"): per round, rotating the order, a broker with `--accel off`
//! (plain TCP), `--accel on --accel-direct off` (the fast path) and
//! `--accel on --accel-direct on`, each attaching for itself; request/reply
//! round trips with the requester's own literal reply subject (so the reply
//! can go direct too), 1→1 pub/sub msgs/s, and how many messages the kernel
//! delivered directly (the broker's /metrics).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use sockbus_broker::accel::{AttachOptions, FastPath};

#[path = "shared/request_reply.rs"]
mod request_reply;

#[path = "shared/direct_rtt.rs"]
mod direct_rtt;

#[derive(Parser, Debug)]
struct Args {
    /// Rounds; each runs off and on (order alternating between rounds).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Request/reply round trips per measurement.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Pub/sub messages per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Only this mode (for profiling one side): on or off.
    #[arg(long)]
    only: Option<String>,
    /// Most messages the publisher runs ahead of the subscriber (and at most 16 MiB).
    #[arg(long, default_value_t = 50_000)]
    lead: u64,
    /// Busy-poll for this many µs after each read or write, in the broker
    /// (`--busy-poll`) and in the bench's clients (`sockbus_client::busy_poll`
    /// on a one-thread runtime); the raw ping-pong then polls too.
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Instead of the broker runs: request/reply round trips at the kernel
    /// level through a stand-in relay (plain TCP, fast path) and direct
    /// (kernel routes both ways), alternated per round.
    #[arg(long)]
    direct_kernel: bool,
    /// Plain TCP vs fast path vs direct delivery, through brokers that
    /// attach the fast path themselves (see the module documentation).
    #[arg(long)]
    direct: bool,
    /// With --direct: the SDK clients cut every send at a frame boundary
    /// (`ConnectOptions::frame_aligned_sends`), so every publish stays
    /// eligible for direct delivery.
    #[arg(long)]
    aligned_sends: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// Raw TCP ping-pong between two sockets, no broker: the transport alone.
    raw_p50_us: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    rr_cpu_us: f64,
    msgs_per_s: f64,
    cpu_ns_per_msg: f64,
    redirected_bytes: u64,
    redirects: u64,
}

fn cpu_ticks(pid: u32) -> u64 {
    // utime + stime of the whole process, in clock ticks.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds used so far by this process and the broker.
fn cpu_s(broker: u32) -> f64 {
    (cpu_ticks(std::process::id()) + cpu_ticks(broker)) as f64 / ticks_per_s()
}

fn spawn_broker(busy_poll_us: Option<u64>) -> (Child, u16) {
    spawn_broker_with(busy_poll_us, &["--accel", "off"])
}

/// The broker next to this program with `extra` arguments (which name the
/// fast path's mode).
fn spawn_broker_with(busy_poll_us: Option<u64>, extra: &[&str]) -> (Child, u16) {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("sockbus-broker"))
        .expect("target dir");
    let mut child = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--node-id", "bench"])
        .args(extra)
        .args(busy_poll_us.map(|us| format!("--busy-poll={us}us")))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(at) = line
            .contains("listening for clients")
            .then(|| line.find("addr=127.0.0.1:"))
            .flatten()
        {
            let port: String = line[at + 15..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            // Keep draining stderr so the broker never blocks on it.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while err.read_line(&mut sink).unwrap_or(0) > 0 {
                    sink.clear();
                }
            });
            return (child, port.parse().unwrap());
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("broker did not start");
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Polls (without blocking, like a busy-polling runtime) until `s` is readable.
fn poll_until_readable(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    while unsafe { libc::poll(&mut p, 1, 0) } == 0 {
        std::hint::spin_loop();
    }
}

/// Round trips of `size` bytes between two sockets of this process (two
/// threads, blocking I/O, or polling with `--busy-poll-us`): what the
/// transport costs without a broker.
fn raw_ping_pong(args: &Args, accel: bool, cgroup: &std::path::Path) -> f64 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _fp = accel.then(|| {
        FastPath::attach(&AttachOptions {
            ports: vec![port],
            cgroup: Some(cgroup.to_path_buf()),
            max_sockets: None,
        })
        .expect("attach the fast path (run as root)")
    });
    let size = args.size;
    let n = args.requests + 1000;
    let spin = args.busy_poll_us.is_some();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = vec![0u8; size];
        for _ in 0..n {
            if spin {
                poll_until_readable(&s);
            }
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        }
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    let mut b = vec![0u8; size];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&b).unwrap();
        if spin {
            poll_until_readable(&c);
        }
        c.read_exact(&mut b).unwrap();
        lat.push(t.elapsed());
    }
    echo.join().unwrap();
    let mut lat = lat.split_off(1000);
    lat.sort_unstable();
    percentile(&lat, 0.5)
}

async fn measure(args: &Args, accel: bool, cgroup: &std::path::Path) -> Sample {
    let raw_p50_us = raw_ping_pong(args, accel, cgroup);
    let (mut broker, port) = spawn_broker(args.busy_poll_us);
    let poller = args
        .busy_poll_us
        .map(|us| sockbus_client::busy_poll(Duration::from_micros(us)));
    let fp = accel.then(|| {
        FastPath::attach(&AttachOptions {
            ports: vec![port],
            cgroup: Some(cgroup.to_path_buf()),
            max_sockets: None,
        })
        .expect("attach the fast path (run as root)")
    });
    let url = format!("sockbus://127.0.0.1:{port}");
    let mut s = Sample {
        raw_p50_us,
        ..Sample::default()
    };

    // Request/reply.
    {
        let broker_pid = broker.id();
        let (mut lat, cpu0) =
            request_reply::sdk_round_trips(&url, args.size, args.requests, move || {
                cpu_s(broker_pid)
            })
            .await;
        s.rr_cpu_us = (cpu_s(broker.id()) - cpu0) * 1e6 / args.requests as f64;
        lat.sort_unstable();
        s.rr_p50_us = percentile(&lat, 0.50);
        s.rr_p99_us = percentile(&lat, 0.99);
    }

    // Pub/sub 1 -> 1.
    {
        let sc = sockbus_client::connect(&url).await.unwrap();
        let mut sub = sc.subscribe("bench.ps").await.unwrap();
        sc.flush().await.unwrap();
        let n = args.messages;
        let got = Arc::new(AtomicU64::new(0));
        let more = Arc::new(tokio::sync::Notify::new());
        let g = got.clone();
        let m = more.clone();
        let reader = tokio::spawn(async move {
            let mut c = 0;
            while c < n {
                sub.next().await.unwrap();
                c += 1;
                if c % 1024 == 0 || c == n {
                    g.store(c, Ordering::Relaxed);
                    m.notify_one();
                }
            }
        });
        let p = sockbus_client::connect(&url).await.unwrap();
        p.flush().await.unwrap();
        let payload = vec![0u8; args.size];
        // At most 16 MiB ahead: the broker closes a subscriber that falls
        // more than --max-pending (64 MiB) behind as a slow consumer.
        let lead = args.lead.min((16 << 20) / args.size.max(1) as u64).max(1);
        let cpu0 = cpu_s(broker.id());
        let t = Instant::now();
        for i in 0..n {
            // Sleep (not spin) while too far ahead: spinning would burn the
            // CPU this measures and steal it from the broker.
            while i >= got.load(Ordering::Relaxed) + lead {
                more.notified().await;
            }
            p.publish("bench.ps", &payload).await.unwrap();
        }
        reader.await.unwrap();
        let el = t.elapsed().as_secs_f64();
        s.msgs_per_s = n as f64 / el;
        s.cpu_ns_per_msg = (cpu_s(broker.id()) - cpu0) * 1e9 / n as f64;
    }
    if let Some(fp) = &fp {
        let st = fp.stats().unwrap_or_default();
        s.redirected_bytes = st.bytes_redirected;
        s.redirects = st.redirect_verdicts;
    }
    drop(fp);
    drop(poller);
    let _ = broker.kill();
    let _ = broker.wait();
    s
}

/// A broker mode of `--direct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirectMode {
    Tcp,
    FastPath,
    Direct,
}

impl DirectMode {
    fn args(self) -> &'static [&'static str] {
        match self {
            DirectMode::Tcp => &["--accel", "off"],
            DirectMode::FastPath => &["--accel", "on", "--accel-direct", "off"],
            DirectMode::Direct => &["--accel", "on", "--accel-direct", "on"],
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct DirectSample {
    rr_p50_us: f64,
    rr_p99_us: f64,
    msgs_per_s: f64,
    cpu_ns_per_msg: f64,
    direct_msgs: u64,
    /// Frames of per-frame publishers that went to the broker instead.
    fallbacks: u64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `sockbus_accel_direct_messages_total` of the broker whose HTTP port is `http`.
fn direct_messages(http: u16) -> u64 {
    accel_metric(http, "sockbus_accel_direct_messages_total ")
}

/// The metric line `name` (with its trailing space) of the broker's /metrics.
fn accel_metric(http: u16, name: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) else {
        return 0;
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.parse().ok())
        .unwrap_or(0)
}

async fn measure_direct(args: &Args, mode: DirectMode, cgroup: &std::path::Path) -> DirectSample {
    let http = free_port();
    let cg = cgroup.to_string_lossy().into_owned();
    let http_arg = format!("127.0.0.1:{http}");
    let mut extra: Vec<&str> = mode.args().to_vec();
    extra.extend(["--accel-cgroup", &cg, "--http", &http_arg]);
    let (mut broker, port) = spawn_broker_with(args.busy_poll_us, &extra);
    let url = format!("sockbus://127.0.0.1:{port}");
    let mut s = DirectSample::default();
    let direct0 = direct_messages(http);
    let fb0 = accel_metric(http, "sockbus_accel_direct_fallbacks_total ");

    // Request/reply, the reply to the requester's own literal subject.
    {
        let svc = sockbus_client::ConnectOptions::new()
            .frame_aligned_sends(args.aligned_sends)
            .connect(&url)
            .await
            .unwrap();
        let mut reqs = svc.subscribe("bench.rr").await.unwrap();
        svc.flush().await.unwrap();
        let replier = tokio::spawn(async move {
            while let Some(m) = reqs.next().await {
                if let Some(r) = m.reply() {
                    let _ = svc.publish(r, &m.payload).await;
                }
            }
        });
        let c = sockbus_client::ConnectOptions::new()
            .frame_aligned_sends(args.aligned_sends)
            .connect(&url)
            .await
            .unwrap();
        let mut replies = c.subscribe("bench.reply").await.unwrap();
        c.flush().await.unwrap();
        let (n, size) = (args.requests, args.size);
        let mut lat = tokio::spawn(async move {
            let body = vec![0u8; size];
            let mut lat = Vec::with_capacity(n);
            for i in 0..n + 1000 {
                let t = Instant::now();
                c.publish_with_reply("bench.rr", "bench.reply", &body)
                    .await
                    .unwrap();
                replies.next().await.unwrap();
                // The first 1,000 warm up.
                if i >= 1000 {
                    lat.push(t.elapsed());
                }
            }
            lat
        })
        .await
        .unwrap();
        replier.abort();
        lat.sort_unstable();
        s.rr_p50_us = percentile(&lat, 0.50);
        s.rr_p99_us = percentile(&lat, 0.99);
    }

    // Pub/sub 1 -> 1.
    {
        let sc = sockbus_client::ConnectOptions::new()
            .frame_aligned_sends(args.aligned_sends)
            .connect(&url)
            .await
            .unwrap();
        let mut sub = sc.subscribe("bench.ps").await.unwrap();
        sc.flush().await.unwrap();
        let n = args.messages;
        let got = Arc::new(AtomicU64::new(0));
        let more = Arc::new(tokio::sync::Notify::new());
        let (g, m) = (got.clone(), more.clone());
        let reader = tokio::spawn(async move {
            let mut c = 0;
            while c < n {
                sub.next().await.unwrap();
                c += 1;
                if c % 1024 == 0 || c == n {
                    g.store(c, Ordering::Relaxed);
                    m.notify_one();
                }
            }
        });
        let p = sockbus_client::ConnectOptions::new()
            .frame_aligned_sends(args.aligned_sends)
            .connect(&url)
            .await
            .unwrap();
        p.flush().await.unwrap();
        let payload = vec![0u8; args.size];
        let lead = args.lead.min((16 << 20) / args.size.max(1) as u64).max(1);
        let cpu0 = cpu_s(broker.id());
        let t = Instant::now();
        for i in 0..n {
            while i >= got.load(Ordering::Relaxed) + lead {
                more.notified().await;
            }
            p.publish("bench.ps", &payload).await.unwrap();
        }
        reader.await.unwrap();
        s.msgs_per_s = n as f64 / t.elapsed().as_secs_f64();
        s.cpu_ns_per_msg = (cpu_s(broker.id()) - cpu0) * 1e9 / n as f64;
    }
    s.direct_msgs = direct_messages(http).saturating_sub(direct0);
    s.fallbacks = accel_metric(http, "sockbus_accel_direct_fallbacks_total ").saturating_sub(fb0);
    let _ = broker.kill();
    let _ = broker.wait();
    s
}

fn run_direct(args: &Args, cg: &std::path::Path, rt: &tokio::runtime::Runtime) {
    let modes = [DirectMode::Tcp, DirectMode::FastPath, DirectMode::Direct];
    let mut all: Vec<Vec<DirectSample>> = vec![Vec::new(); 3];
    println!(
        "{:>5} {:>9} {:>10} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "round",
        "mode",
        "rr p50 µs",
        "rr p99 µs",
        "msgs/s",
        "cpu ns/msg",
        "direct msgs",
        "fallbacks"
    );
    for r in 0..args.rounds {
        for k in 0..3 {
            // Rotate the order between rounds.
            let i = (k + r) % 3;
            let s = rt.block_on(measure_direct(args, modes[i], cg));
            println!(
                "{:>5} {:>9} {:>10.1} {:>10.1} {:>12.0} {:>12.0} {:>12} {:>10}",
                r + 1,
                format!("{:?}", modes[i]),
                s.rr_p50_us,
                s.rr_p99_us,
                s.msgs_per_s,
                s.cpu_ns_per_msg,
                s.direct_msgs,
                s.fallbacks
            );
            all[i].push(s);
        }
    }
    let m = |i: usize, f: fn(&DirectSample) -> f64| median(all[i].iter().map(f).collect());
    let (p50, mps) = (
        [0, 1, 2].map(|i| m(i, |s| s.rr_p50_us)),
        [0, 1, 2].map(|i| m(i, |s| s.msgs_per_s)),
    );
    let cpu = [0, 1, 2].map(|i| m(i, |s| s.cpu_ns_per_msg));
    println!(
        "\nmedians of {} rounds, {} B payloads: tcp / fast path / direct\n\
         req/rep p50 µs      {:>10.1} {:>10.1} {:>10.1}   direct/fast {:.2} (goal ≤ 0.5), direct/tcp {:.2} (goal ≤ 0.35)\n\
         pub/sub 1→1 msgs/s  {:>10.0} {:>10.0} {:>10.0}   direct/fast {:.2} (goal ≥ 1.5)\n\
         broker+client CPU ns/msg {:>5.0} {:>10.0} {:>10.0}",
        args.rounds,
        args.size,
        p50[0],
        p50[1],
        p50[2],
        p50[2] / p50[1],
        p50[2] / p50[0],
        mps[0],
        mps[1],
        mps[2],
        mps[2] / mps[1],
        cpu[0],
        cpu[1],
        cpu[2],
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let root = sockbus_broker::accel::cgroup::find_or_mount()
        .expect("cgroup v2")
        .root;
    let cg = root.join(format!("sockbus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("create the bench cgroup (run as root)");
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .expect("move into the bench cgroup");
    if args.direct_kernel {
        use direct_rtt::Mode;
        let modes = [Mode::TcpRelay, Mode::FastPathRelay, Mode::Direct];
        let mut p50 = vec![Vec::new(); 3];
        println!("{:>5} {:>14} {:>10}", "round", "mode", "rr p50 µs");
        for r in 0..args.rounds {
            for k in 0..3 {
                // Rotate the order between rounds.
                let i = (k + r) % 3;
                let v = direct_rtt::run(modes[i], args.requests, args.size, &cg);
                println!("{:>5} {:>14} {:>10.1}", r + 1, format!("{:?}", modes[i]), v);
                p50[i].push(v);
            }
        }
        let m: Vec<f64> = p50.into_iter().map(median).collect();
        println!(
            "median p50 µs: tcp relay {:.1}, fast path relay {:.1}, direct {:.1}; direct / fast path {:.2}, direct / tcp {:.2}",
            m[0], m[1], m[2], m[2] / m[1], m[2] / m[0]
        );
        let _ = std::fs::remove_dir(&cg);
        return;
    }
    let rt = if args.busy_poll_us.is_some() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    }
    .enable_all()
    .build()
    .unwrap();
    if args.direct {
        run_direct(&args, &cg, &rt);
        drop(rt);
        let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&cg);
        return;
    }
    let mut off = Vec::new();
    let mut on = Vec::new();
    println!(
        "{:>5} {:>4} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12} {:>14} {:>10}",
        "round",
        "mode",
        "raw p50 µs",
        "rr p50 µs",
        "rr p99 µs",
        "rr cpu µs",
        "msgs/s",
        "cpu ns/msg",
        "redirected MB",
        "redirects"
    );
    for r in 0..args.rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for accel in order {
            if args
                .only
                .as_deref()
                .is_some_and(|m| m != if accel { "on" } else { "off" })
            {
                continue;
            }
            let s = rt.block_on(measure(&args, accel, &cg));
            println!(
                "{:>5} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.0} {:>12.0} {:>14.1} {:>10}",
                r + 1,
                if accel { "on" } else { "off" },
                s.raw_p50_us,
                s.rr_p50_us,
                s.rr_p99_us,
                s.rr_cpu_us,
                s.msgs_per_s,
                s.cpu_ns_per_msg,
                s.redirected_bytes as f64 / 1e6,
                s.redirects
            );
            if accel {
                on.push(s)
            } else {
                off.push(s)
            }
        }
    }
    drop(rt);
    // Back to the root so the bench cgroup can go.
    let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
    let _ = std::fs::remove_dir(&cg);
    if off.is_empty() || on.is_empty() {
        return;
    }
    let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    type Row = (&'static str, fn(&Sample) -> f64, &'static str);
    let rows: [Row; 6] = [
        (
            "raw TCP ping-pong p50, no broker (µs)",
            |s| s.raw_p50_us,
            "transport only",
        ),
        ("req/rep p50 (µs)", |s| s.rr_p50_us, "on ≤ 0.6× off"),
        ("req/rep p99 (µs)", |s| s.rr_p99_us, ""),
        ("req/rep CPU per round trip (µs)", |s| s.rr_cpu_us, ""),
        ("pub/sub 1→1 (msgs/s)", |s| s.msgs_per_s, "on ≥ 0.95× off"),
        (
            "pub/sub CPU per message (ns)",
            |s| s.cpu_ns_per_msg,
            "on ≤ off",
        ),
    ];
    println!(
        "\nmedians of {} rounds, {} B payloads:\n{:<38} {:>12} {:>12} {:>8}  target",
        args.rounds, args.size, "", "off", "on", "on/off"
    );
    for (name, f, target) in rows {
        let (a, b) = (m(&off, f), m(&on, f));
        println!("{name:<38} {a:>12.1} {b:>12.1} {:>8.2}  {target}", b / a);
    }
}
