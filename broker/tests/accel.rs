//! The eBPF fast path, for real: programs loaded into this kernel, sockets
//! redirected, packets counted on the interfaces.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for cgroups and network
//! namespaces). Without it each test prints why it skips; with CI=true a
//! missing capability fails instead.
//!
//! Isolation: nothing attaches at the cgroup root. This test process moves
//! itself into a cgroup of its own (below the cgroup v2 root) and every test
//! attaches there, filtered on its own broker's port, so other processes on
//! the machine (other test suites running in parallel) are never touched.
//! Tests that count packets run their sockets in network namespaces they
//! create, whose interfaces carry only their traffic.

mod common;
mod ports;

use ports::free_port;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{nothing, recv, test_config, Raw, TestBroker};
use sockbus_broker::accel::{AttachOptions, FastPath, Stats};
use sockbus_protocol::frame::{self, encode_connect, encode_pub, encode_sub};
use sockbus_protocol::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- harness

/// True when this process may load BPF programs. Otherwise prints why the
/// test skips, or panics under CI=true.
fn privileged(test: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = PROBE.get_or_init(|| {
        // SAFETY: no arguments, cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let cg = test_cgroup()?;
        FastPath::attach(&AttachOptions {
            ports: vec![1],
            cgroup: Some(cg.clone()),
            max_sockets: None,
        })
        .map(drop)
        .map_err(|e| e.to_string())?;
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
        if !out.status.success() {
            return Err("`ip netns` does not work here".into());
        }
        Ok(())
    });
    match r {
        Ok(()) => true,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: the fast path cannot be tested here, and CI=true: {why}")
        }
        Err(why) => {
            // Straight to stderr: libtest would hide an eprintln! of a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping {test}: {why} (the fast path tests need root)"
            );
            false
        }
    }
}

/// A cgroup of this test process's own, below the cgroup v2 root; the
/// process moves into it once, before any test opens a socket.
fn test_cgroup() -> Result<&'static PathBuf, String> {
    static CG: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CG.get_or_init(|| {
        let root = sockbus_broker::accel::cgroup::find_or_mount()
            .map_err(|e| format!("no cgroup v2: {e}"))?
            .root;
        // Leftovers of earlier runs, empty once their process exited.
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with("sockbus-accel-test-")
                {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let dir = root.join(format!("sockbus-accel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("cannot move into {dir:?}: {e}"))?;
        Ok(dir)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Attaches the fast path at this process's cgroup for `ports`.
fn attach(ports: &[u16]) -> FastPath {
    FastPath::attach(&AttachOptions {
        ports: ports.to_vec(),
        cgroup: Some(test_cgroup().expect("test cgroup").clone()),
        max_sockets: None,
    })
    .expect("attach the fast path")
}

fn delta(after: Stats, before: Stats) -> Stats {
    Stats {
        sockets_added: after.sockets_added - before.sockets_added,
        add_failures: after.add_failures - before.add_failures,
        redirect_verdicts: after.redirect_verdicts - before.redirect_verdicts,
        bytes_redirected: after.bytes_redirected - before.bytes_redirected,
        misses: after.misses - before.misses,
        direct_msgs: after.direct_msgs - before.direct_msgs,
        direct_bytes: after.direct_bytes - before.direct_bytes,
        direct_fallbacks: after.direct_fallbacks - before.direct_fallbacks,
        direct_broken: after.direct_broken - before.direct_broken,
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("sbaccel-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Runs `f` on a thread that lives in this namespace: every socket it
    /// opens (a broker's listener, a client's connection) belongs here.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: a valid namespace fd; affects only this thread.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    fn cat(&self, file: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", file])
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// TCP segments sent with new data (TcpExt TCPOrigDataSent): data
    /// packets, not handshakes or acks.
    fn data_segments(&self) -> u64 {
        let text = self.cat("/proc/net/netstat");
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "TCPOrigDataSent")
            .and_then(|(_, v)| v.parse().ok())
            .expect("TCPOrigDataSent")
    }

    /// Packets sent on an interface of this namespace.
    fn tx_packets(&self, dev: &str) -> u64 {
        let text = self.cat("/proc/net/dev");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{dev}:")))
            .unwrap_or_else(|| panic!("no {dev} in {text}"));
        let fields: Vec<&str> = line.split(':').nth(1).unwrap().split_whitespace().collect();
        fields[9].parse().expect("tx packets")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p = vec![(i % 251) as u8; len.max(4)];
    p[..4].copy_from_slice(&i.to_le_bytes());
    p
}

// ------------------------------------------------- (a) proof of short-circuit

/// Publishes `n` messages through a broker in namespace `ns` and returns
/// (data segments, lo packets, fast path counters) of that phase alone.
fn pubsub_in_netns(ns: &Netns, accel: bool, n: u32, len: usize) -> (u64, u64, Stats) {
    ns.run(|| {
        rt().block_on(async {
            let b = TestBroker::start().await;
            let fp = accel.then(|| attach(&[b.addr.port()]));
            let s = sockbus_client::connect(&b.url).await.unwrap();
            let mut sub = s.subscribe("proof.lo").await.unwrap();
            s.flush().await.unwrap();
            let p = sockbus_client::connect(&b.url).await.unwrap();
            p.flush().await.unwrap();
            // Let any delayed ACK of the handshake go out before counting.
            tokio::time::sleep(Duration::from_millis(250)).await;
            let stats0 = fp.as_ref().map(|f| f.stats().unwrap()).unwrap_or_default();
            let (seg0, pkt0) = (ns.data_segments(), ns.tx_packets("lo"));
            for i in 0..n {
                p.publish("proof.lo", payload(i, len)).await.unwrap();
            }
            p.flush().await.unwrap();
            for i in 0..n {
                let m = recv(&mut sub).await;
                assert_eq!(m.payload.as_ref(), payload(i, len), "message {i}");
            }
            let (seg1, pkt1) = (ns.data_segments(), ns.tx_packets("lo"));
            let stats1 = fp.as_ref().map(|f| f.stats().unwrap()).unwrap_or_default();
            drop(fp);
            (seg1 - seg0, pkt1 - pkt0, delta(stats1, stats0))
        })
    })
}

#[test]
fn fast_path_moves_messages_without_a_single_packet_on_lo() {
    if !privileged("fast_path_moves_messages_without_a_single_packet_on_lo") {
        return;
    }
    let ns = Netns::new("proof");
    const N: u32 = 2000;
    const LEN: usize = 256;
    let (seg_on, pkt_on, on) = pubsub_in_netns(&ns, true, N, LEN);
    let (seg_off, pkt_off, _) = pubsub_in_netns(&ns, false, N, LEN);
    eprintln!(
        "{N} messages of {LEN} B: fast path on: {seg_on} data segments, {pkt_on} lo packets, {on:?}; \
         off: {seg_off} data segments, {pkt_off} lo packets"
    );
    assert_eq!(seg_on, 0, "no TCP data segment with the fast path on");
    assert_eq!(pkt_on, 0, "no packet at all on lo with the fast path on");
    assert!(
        seg_off > 0 && pkt_off >= seg_off,
        "plain TCP shows its data segments"
    );
    // Every message crossed twice (publisher -> broker -> subscriber).
    let frames = 2 * N as u64 * LEN as u64;
    assert!(
        on.bytes_redirected >= frames,
        "stats count the redirected bytes: {on:?}"
    );
    assert!(on.redirect_verdicts >= 2, "{on:?}");
    // One verdict stands for a connection's next 64 KiB of sends: the
    // program ran for a few sends, not for each of the thousands.
    assert!(on.redirect_verdicts < N as u64 / 10, "{on:?}");
    assert_eq!(on.misses, 0, "{on:?}");
}

// --------------------------------------- (b) broker behaviour on the fast path

/// A broker in this process whose connections all take the fast path.
async fn accelerated_broker() -> (TestBroker, FastPath) {
    let b = TestBroker::start().await;
    let fp = attach(&[b.addr.port()]);
    (b, fp)
}

fn assert_accelerated(fp: &FastPath, min_bytes: u64) {
    let s = fp.stats().unwrap();
    assert!(
        s.sockets_added >= 2 && s.bytes_redirected >= min_bytes && s.add_failures == 0,
        "connections took the fast path: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_subscriber_gets_every_message_in_publish_order() {
    if !privileged("accelerated_subscriber_gets_every_message_in_publish_order") {
        return;
    }
    let (b, fp) = accelerated_broker().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("orders.created").await.unwrap();
    c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..20_000u32 {
        p.publish("orders.created", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..20_000u32 {
        let m = recv(&mut sub).await;
        assert_eq!(
            m.payload.as_ref(),
            i.to_le_bytes(),
            "message {i} out of order"
        );
    }
    nothing(&mut sub).await;
    assert_accelerated(&fp, 2 * 20_000 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_queue_group_delivers_each_message_once() {
    if !privileged("accelerated_queue_group_delivers_each_message_once") {
        return;
    }
    let (b, fp) = accelerated_broker().await;
    let mut members = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = sockbus_client::connect(&b.url).await.unwrap();
        members.push(c.queue_subscribe("jobs", "workers").await.unwrap());
        c.flush().await.unwrap();
        clients.push(c);
    }
    let p = sockbus_client::connect(&b.url).await.unwrap();
    const N: u32 = 3000;
    for i in 0..N {
        p.publish("jobs", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    let mut seen = HashSet::new();
    let mut per_member = Vec::new();
    for m in &mut members {
        let mut n = 0;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), m.next()).await {
            let i = u32::from_le_bytes(msg.payload[..4].try_into().unwrap());
            assert!(seen.insert(i), "message {i} delivered twice");
            n += 1;
        }
        per_member.push(n);
    }
    assert_eq!(seen.len(), N as usize, "every message delivered once");
    assert!(per_member.iter().all(|&n| n > 0), "{per_member:?}");
    assert_accelerated(&fp, 2 * N as u64 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_request_reply_and_no_responders() {
    if !privileged("accelerated_request_reply_and_no_responders") {
        return;
    }
    let (b, fp) = accelerated_broker().await;
    let svc = sockbus_client::connect(&b.url).await.unwrap();
    let mut reqs = svc.subscribe("svc.echo").await.unwrap();
    svc.flush().await.unwrap();
    let replier = tokio::spawn(async move {
        while let Some(m) = reqs.next().await {
            let reply = m.reply().expect("a reply subject").to_string();
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&m.payload);
            svc.publish(&reply, out).await.unwrap();
        }
    });
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..500u32 {
        let r = c.request("svc.echo", i.to_le_bytes()).await.unwrap();
        assert_eq!(&r.payload[..5], b"echo:");
        assert_eq!(&r.payload[5..], i.to_le_bytes());
    }
    let err = c.request("svc.nobody", "x").await.unwrap_err();
    assert!(
        matches!(err, sockbus_client::Error::NoResponders),
        "{err:?}"
    );
    replier.abort();
    assert_accelerated(&fp, 4 * 500 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_large_payloads_arrive_intact() {
    if !privileged("accelerated_large_payloads_arrive_intact") {
        return;
    }
    let (b, fp) = accelerated_broker().await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("big").await.unwrap();
    c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    let max = p.max_payload() as usize;
    let sizes = [max, 1, max - 1, 700_000, 65_536, max];
    for (i, &len) in sizes.iter().enumerate() {
        let body: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
        p.publish("big", body).await.unwrap();
    }
    p.flush().await.unwrap();
    for (i, &len) in sizes.iter().enumerate() {
        let m = recv(&mut sub).await;
        assert_eq!(m.payload.len(), len, "message {i}");
        assert!(
            m.payload
                .iter()
                .enumerate()
                .all(|(j, &b)| b == (j * 31 + i) as u8),
            "message {i} corrupted"
        );
    }
    assert_accelerated(&fp, 2 * sizes.iter().sum::<usize>() as u64);
}

/// Starts the broker binary in this test's cgroup; returns it and its port.
fn spawn_broker(args: &[&str]) -> (Child, u16, std::sync::mpsc::Receiver<String>) {
    let (child, port, rx, _) = spawn_broker_env(args, &[]);
    (child, port, rx)
}

/// [`spawn_broker`] with extra environment variables; also returns the log
/// lines up to and including the one saying where it listens.
fn spawn_broker_env(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, u16, std::sync::mpsc::Receiver<String>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .args(["--listen", "127.0.0.1:0", "--node-id", "accel-test"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sockbus-broker");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        log.push_str(&line);
        log.push('\n');
        if let Some(at) = line
            .contains("listening for clients")
            .then(|| line.find("addr=127.0.0.1:"))
            .flatten()
        {
            let port: String = line[at + 15..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return (child, port.parse().unwrap(), rx, log);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("broker did not start:\n{log}");
}

/// Busy-polling (broker `--busy-poll`, SDK `busy_poll`) polls sockets for
/// readiness and never spins on `recv`, which on a redirected socket would
/// fight the sender for the socket lock: everything arrives, in order.
#[tokio::test]
async fn busy_polling_broker_and_clients_on_the_fast_path_deliver_everything() {
    if !privileged("busy_polling_broker_and_clients_on_the_fast_path_deliver_everything") {
        return;
    }
    let (child, port, _log) =
        spawn_broker(&["--accel", "off", "--http", "off", "--busy-poll", "200us"]);
    // Killed on every way out of the test, a failed assertion included.
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(child);
    let fp = attach(&[port]);
    let url = format!("sockbus://127.0.0.1:{port}");
    let _poll = sockbus_client::busy_poll(Duration::from_micros(200));
    let svc = sockbus_client::connect(&url).await.unwrap();
    let replier = common::echo_replier(svc, "bp.echo").await;
    let c = sockbus_client::connect(&url).await.unwrap();
    for i in 0..5_000u32 {
        let body = payload(i, 64 + (i as usize % 512));
        let r = c.request("bp.echo", &body).await.unwrap();
        assert_eq!(r.payload.as_ref(), &body[..], "reply {i}");
    }
    let mut sub = c.subscribe("bp.data").await.unwrap();
    c.flush().await.unwrap();
    let p = sockbus_client::connect(&url).await.unwrap();
    for i in 0..50_000u32 {
        p.publish("bp.data", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..50_000u32 {
        let m = recv(&mut sub).await;
        assert_eq!(m.payload.as_ref(), i.to_le_bytes(), "message {i}");
    }
    nothing(&mut sub).await;
    replier.abort();
    assert_accelerated(&fp, 5_000 * 64 * 4 + 50_000 * 4 * 2);
}

fn rss_peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_subscriber_that_never_reads_bounds_kernel_queue_and_broker_memory() {
    if !privileged("accelerated_subscriber_that_never_reads_bounds_kernel_queue_and_broker_memory")
    {
        return;
    }
    // A separate broker process, so its memory is its own.
    let (mut child, port, _log) = spawn_broker(&["--accel", "off", "--max-pending", "16MiB"]);
    let fp = attach(&[port]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // The stalled subscriber: declares the default window (8 MiB), never
    // reads, never grants credit.
    let mut raw = Raw::connect(addr).await;
    let mut b = BytesMut::new();
    encode_sub(&mut b, 1, "flood", None).unwrap();
    raw.send(&b).await;
    let p = sockbus_client::connect(&format!("sockbus://{addr}"))
        .await
        .unwrap();
    p.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let before = fp.stats().unwrap();
    const TOTAL: usize = 256 << 20;
    // Everything the kernel queued for the stalled reader is readable after.
    let queued = flood_then_drain(&p, &mut raw, TOTAL).await;
    let peak_kib = rss_peak_kib(child.id());
    let sent = delta(fp.stats().unwrap(), before);
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "published {} MiB; kernel queued {queued} B for the stalled subscriber; broker peak RSS {} MiB; {sent:?}",
        TOTAL >> 20,
        peak_kib >> 10
    );
    let window = 8 << 20;
    assert!(
        queued <= window,
        "the kernel queued {queued} B, more than the flow-control window ({window} B)"
    );
    assert!(
        queued >= window / 2,
        "the subscriber's window filled: {queued} B"
    );
    assert!(
        sent.bytes_redirected >= TOTAL as u64,
        "the traffic took the fast path: {sent:?}"
    );
    assert!(
        peak_kib < 96 << 10,
        "broker peak RSS {} MiB while {} MiB were published",
        peak_kib >> 10,
        TOTAL >> 20
    );
}

/// A client on the fast path cannot make the kernel hold more than the
/// broker's budget for it: a receive window beyond `--max-pending` is refused
/// at CONNECT (ERR FLOW_CONTROL), and one that declares the largest accepted
/// window and stops reading has at most that window queued in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_client_cannot_declare_a_window_beyond_the_budget() {
    if !privileged("accelerated_client_cannot_declare_a_window_beyond_the_budget") {
        return;
    }
    let (mut child, port, _log) = spawn_broker(&["--accel", "off", "--max-pending", "16MiB"]);
    let fp = attach(&[port]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut greedy = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = BytesMut::new();
    encode_connect(&mut b, 0, 1 << 30, "greedy", b"").unwrap();
    greedy.write_all(&b).await.unwrap();
    let mut buf = BytesMut::new();
    match read_frame(&mut greedy, &mut buf).await {
        Frame::Err { code, text } => {
            assert_eq!(code, sockbus_protocol::code::FLOW_CONTROL, "{text}")
        }
        other => panic!("a 1 GiB window was accepted: {other:?}"),
    }

    let window = 16usize << 20;
    let mut raw = Raw::connect_with_window(addr, window as u32).await;
    let mut b = BytesMut::new();
    encode_sub(&mut b, 1, "flood", None).unwrap();
    raw.send(&b).await;
    let p = sockbus_client::connect(&format!("sockbus://{addr}"))
        .await
        .unwrap();
    p.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = fp.stats().unwrap();
    const TOTAL: usize = 128 << 20;
    let queued = flood_then_drain(&p, &mut raw, TOTAL).await;
    let sent = delta(fp.stats().unwrap(), before);
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "kernel queued {queued} B for a stalled subscriber with a {window} B window; {sent:?}"
    );
    assert!(
        sent.bytes_redirected >= TOTAL as u64,
        "the traffic took the fast path: {sent:?}"
    );
    assert!(
        queued <= window,
        "the kernel queued {queued} B, more than the {window} B window"
    );
    assert!(
        queued >= window / 2,
        "the subscriber's window filled: {queued} B"
    );
}

/// Publishes `total` bytes to "flood" in 64 KiB messages, then reads what the
/// kernel queued for the stalled `raw` subscriber until it goes quiet:
/// the bytes it held.
async fn flood_then_drain(p: &sockbus_client::Client, raw: &mut Raw, total: usize) -> usize {
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..total / chunk.len() {
        p.publish("flood", &chunk).await.unwrap();
    }
    p.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = 0usize;
    let mut tmp = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), raw.stream.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => queued += n,
        }
    }
    queued
}

// -------------------------------------------- (c) pods: namespaces over veth

#[test]
fn connection_between_namespaces_over_veth_is_accelerated() {
    if !privileged("connection_between_namespaces_over_veth_is_accelerated") {
        return;
    }
    let a = Netns::new("poda");
    let bns = Netns::new("podb");
    let (va, vb) = (
        format!("sba{}", std::process::id() % 100_000),
        format!("sbb{}", std::process::id() % 100_000),
    );
    sh(&[
        "ip", "-n", &a.name, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
        &bns.name,
    ]);
    sh(&[
        "ip",
        "-n",
        &a.name,
        "addr",
        "add",
        "10.251.0.1/24",
        "dev",
        &va,
    ]);
    sh(&[
        "ip",
        "-n",
        &bns.name,
        "addr",
        "add",
        "10.251.0.2/24",
        "dev",
        &vb,
    ]);
    sh(&["ip", "-n", &a.name, "link", "set", &va, "up"]);
    sh(&["ip", "-n", &bns.name, "link", "set", &vb, "up"]);

    // The broker lives in pod A; its runtime runs until told to stop.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(|| {
            a.run(|| {
                rt().block_on(async {
                    let mut cfg = test_config();
                    cfg.listen = "10.251.0.1:0".parse().unwrap();
                    let b = TestBroker::with(cfg).await;
                    addr_tx.send(b.addr).unwrap();
                    let _ = stop_rx.await;
                    b.stop().await;
                })
            })
        });
        let addr: SocketAddr = addr_rx.recv().unwrap();
        let fp = attach(&[addr.port()]);
        const N: u32 = 2000;
        let (segs, pkts) = bns.run(|| {
            rt().block_on(async {
                let url = format!("sockbus://{addr}");
                let c = sockbus_client::connect(&url).await.unwrap();
                let mut sub = c.subscribe("pods.x").await.unwrap();
                c.flush().await.unwrap();
                let p = sockbus_client::connect(&url).await.unwrap();
                p.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (seg0, pkt0) = (bns.data_segments(), bns.tx_packets(&vb));
                for i in 0..N {
                    p.publish("pods.x", payload(i, 128)).await.unwrap();
                }
                p.flush().await.unwrap();
                for i in 0..N {
                    assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 128));
                }
                (bns.data_segments() - seg0, bns.tx_packets(&vb) - pkt0)
            })
        });
        let s = fp.stats().unwrap();
        let _ = stop_tx.send(());
        eprintln!("veth: {segs} data segments, {pkts} packets from pod B; {s:?}");
        assert!(s.sockets_added >= 4, "both ends of both connections: {s:?}");
        assert!(s.bytes_redirected >= 2 * N as u64 * 128, "{s:?}");
        assert_eq!(segs, 0, "no data segment left pod B");
        assert_eq!(pkts, 0, "no packet crossed the veth");
    });
}

/// Speaks just enough protocol over a socket bound to a chosen local port.
async fn raw_from_port(local: u16, server: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_reuseaddr(true).unwrap();
    sock.bind(format!("127.0.0.1:{local}").parse().unwrap())
        .unwrap();
    let mut s = sock.connect(server).await.unwrap();
    let mut b = BytesMut::new();
    encode_connect(&mut b, 0, 0, "raw", b"").unwrap();
    s.write_all(&b).await.unwrap();
    s
}

async fn read_frame(s: &mut tokio::net::TcpStream, buf: &mut BytesMut) -> Frame {
    loop {
        if let Some((f, len)) = frame::decode(buf, u32::MAX).unwrap() {
            let f = Frame::from(f);
            bytes::Buf::advance(buf, len);
            return f;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf))
            .await
            .expect("a frame within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed");
    }
}

#[test]
fn identical_loopback_connections_in_two_namespaces_never_cross() {
    if !privileged("identical_loopback_connections_in_two_namespaces_never_cross") {
        return;
    }
    // Same broker port, same client port, both on 127.0.0.1: the same
    // 4-tuple twice. The netns cookie in the key keeps them apart.
    const BROKER: u16 = 17_469;
    const CLIENT: u16 = 17_470;
    let n1 = Netns::new("lo1");
    let n2 = Netns::new("lo2");
    let fp = attach(&[BROKER]);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let run = |ns: &Netns,
               tag: &'static str,
               ready: std::sync::mpsc::Sender<()>,
               go: std::sync::mpsc::Receiver<()>| {
        ns.run(move || {
            rt().block_on(async move {
                let mut cfg = test_config();
                cfg.listen = format!("127.0.0.1:{BROKER}").parse().unwrap();
                let b = TestBroker::with(cfg).await;
                let mut s = raw_from_port(CLIENT, b.addr).await;
                let mut buf = BytesMut::new();
                assert!(matches!(
                    read_frame(&mut s, &mut buf).await,
                    Frame::Info { .. }
                ));
                let mut out = BytesMut::new();
                encode_sub(&mut out, 1, "ns.topic", None).unwrap();
                out.extend_from_slice(&{
                    let mut p = BytesMut::new();
                    sockbus_protocol::frame::encode_ping(&mut p, 1);
                    p
                });
                s.write_all(&out).await.unwrap();
                assert!(matches!(read_frame(&mut s, &mut buf).await, Frame::Pong(1)));
                ready.send(()).unwrap();
                go.recv().unwrap();
                let mut got = Vec::new();
                for i in 0..200u32 {
                    let mut p = BytesMut::new();
                    encode_pub(
                        &mut p,
                        "ns.topic",
                        None,
                        &[],
                        format!("{tag}-{i}").as_bytes(),
                    )
                    .unwrap();
                    s.write_all(&p).await.unwrap();
                    match read_frame(&mut s, &mut buf).await {
                        Frame::Msg { payload, .. } => got.push(String::from_utf8(payload).unwrap()),
                        other => panic!("{tag}: expected MSG, got {other:?}"),
                    }
                }
                b.stop().await;
                got
            })
        })
    };
    let (got1, got2) = std::thread::scope(|s| {
        let (r1, g1) = (ready_tx.clone(), go_rx);
        let (go2_tx, go2_rx) = std::sync::mpsc::channel::<()>();
        let h1 = s.spawn(|| run(&n1, "one", r1, g1));
        let h2 = s.spawn(|| run(&n2, "two", ready_tx, go2_rx));
        ready_rx.recv().unwrap();
        ready_rx.recv().unwrap();
        go_tx.send(()).unwrap();
        go2_tx.send(()).unwrap();
        (h1.join().unwrap(), h2.join().unwrap())
    });
    let s = fp.stats().unwrap();
    eprintln!("two namespaces, one 4-tuple: {s:?}");
    for (tag, got) in [("one", &got1), ("two", &got2)] {
        for (i, m) in got.iter().enumerate() {
            assert_eq!(
                m,
                &format!("{tag}-{i}"),
                "namespace {tag} got another's message"
            );
        }
    }
    assert!(s.sockets_added >= 4 && s.misses == 0, "{s:?}");
}

// ----------------------------------------------- (d) other traffic untouched

#[test]
fn tcp_on_other_ports_keeps_its_packets() {
    if !privileged("tcp_on_other_ports_keeps_its_packets") {
        return;
    }
    let ns = Netns::new("other");
    let (segs, stats) = ns.run(|| {
        rt().block_on(async {
            let b = TestBroker::start().await;
            let fp = attach(&[b.addr.port()]);
            // A plain TCP echo on another port, in the same cgroup and namespace.
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let echo_addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
            });
            let before = fp.stats().unwrap();
            let seg0 = ns.data_segments();
            let mut c = tokio::net::TcpStream::connect(echo_addr).await.unwrap();
            let mut back = vec![0u8; 1000];
            for i in 0..100u8 {
                c.write_all(&[i; 1000]).await.unwrap();
                c.read_exact(&mut back).await.unwrap();
                assert!(back.iter().all(|&x| x == i));
            }
            let segs = ns.data_segments() - seg0;
            (segs, delta(fp.stats().unwrap(), before))
        })
    });
    eprintln!("other port: {segs} data segments; fast path {stats:?}");
    assert!(segs >= 200, "the echo's 200 writes went over TCP: {segs}");
    assert_eq!(stats, Stats::default(), "the fast path never saw it");
}

// --------------------------------- (e) loader exit and restart, live traffic

/// Publishes `n` messages on `p` and checks `sub` gets them in order;
/// returns the data segments the namespace sent meanwhile.
async fn burst(
    ns: &Netns,
    p: &sockbus_client::Client,
    sub: &mut sockbus_client::Subscriber,
    subject: &str,
    n: u32,
) -> u64 {
    let seg0 = ns.data_segments();
    for i in 0..n {
        p.publish(subject, payload(i, 64)).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..n {
        assert_eq!(
            recv(sub).await.payload.as_ref(),
            payload(i, 64),
            "message {i}"
        );
    }
    ns.data_segments() - seg0
}

#[test]
fn connections_survive_the_loader_exiting_and_restarting() {
    if !privileged("connections_survive_the_loader_exiting_and_restarting") {
        return;
    }
    let ns = Netns::new("restart");
    ns.run(|| {
        rt().block_on(async {
            let b = TestBroker::start().await;
            let fp = attach(&[b.addr.port()]);
            let c = sockbus_client::connect(&b.url).await.unwrap();
            let mut sub = c.subscribe("live").await.unwrap();
            c.flush().await.unwrap();
            let p = sockbus_client::connect(&b.url).await.unwrap();
            p.flush().await.unwrap();
            assert_eq!(burst(&ns, &p, &mut sub, "live", 1000).await, 0, "on the fast path");

            // Publish continuously while the loader goes away.
            const N: u32 = 30_000;
            let publisher = {
                let p = p.clone();
                tokio::spawn(async move {
                    for i in 0..N {
                        p.publish("live", payload(i, 64)).await.unwrap();
                        if i % 500 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    p.flush().await.unwrap();
                })
            };
            let mut fp = Some(fp);
            for i in 0..N {
                if i == N / 3 {
                    // Dropped: both programs detach and the maps are freed.
                    fp.take();
                }
                let m = recv(&mut sub).await;
                assert_eq!(m.payload.as_ref(), payload(i, 64), "message {i} lost or reordered");
            }
            publisher.await.unwrap();
            let after_exit = burst(&ns, &p, &mut sub, "live", 1000).await;

            // The loader comes back: old connections keep working, new ones are accelerated.
            let fp2 = attach(&[b.addr.port()]);
            let after_restart = burst(&ns, &p, &mut sub, "live", 1000).await;
            let before = fp2.stats().unwrap();
            let c2 = sockbus_client::connect(&b.url).await.unwrap();
            let mut sub2 = c2.subscribe("live2").await.unwrap();
            c2.flush().await.unwrap();
            let p2 = sockbus_client::connect(&b.url).await.unwrap();
            p2.flush().await.unwrap();
            let new_conns = burst(&ns, &p2, &mut sub2, "live2", 1000).await;
            let s = delta(fp2.stats().unwrap(), before);
            eprintln!(
                "data segments for 1000 messages on old connections: after the loader exited {after_exit}, \
                 after it restarted {after_restart}; on new connections {new_conns}; restarted loader {s:?}"
            );
            assert!(s.sockets_added >= 4, "new connections were added: {s:?}");
            assert_eq!(new_conns, 0, "new connections take the restarted fast path");
        })
    });
}

// ------------------------------------------------ (f) unprivileged broker

#[test]
fn broker_starts_unprivileged_and_says_it_uses_plain_tcp() {
    // Needs root only to drop privileges.
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but not root: cannot test dropping privileges");
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipping broker_starts_unprivileged_and_says_it_uses_plain_tcp: not root"
        );
        return;
    }
    let bin = env!("CARGO_BIN_EXE_sockbus-broker");
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            bin,
            "--listen",
            "127.0.0.1:0",
            "--accel",
            "auto",
            "--data-dir",
            "/tmp/sockbus-accel-unpriv",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && err.read_line(&mut line).unwrap_or(0) > 0 {
        log.push_str(&line);
        if line.contains("listening for clients") {
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("listening for clients"),
        "broker did not start:\n{log}"
    );
    let fallback: Vec<&str> = log.lines().filter(|l| l.contains("fast path:")).collect();
    assert_eq!(fallback.len(), 1, "one line about the fast path:\n{log}");
    assert!(
        fallback[0].contains("off (plain TCP)") && fallback[0].contains("not permitted"),
        "it says it falls back and why:\n{log}"
    );

    // --accel on fails loudly with the reason.
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            bin,
            "--listen",
            "127.0.0.1:0",
            "--accel",
            "on",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--accel on") && stderr.contains("not permitted"),
        "{stderr}"
    );
}

// ------------------------------------------------------------ agent

#[test]
fn agent_attaches_serves_metrics_and_detaches_on_sigterm() {
    if !privileged("agent_attaches_serves_metrics_and_detaches_on_sigterm") {
        return;
    }
    // An empty cgroup of its own, so what is attached there is the agent's alone.
    let cg = test_cgroup().unwrap().join("agent");
    std::fs::create_dir_all(&cg).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = l.local_addr().unwrap();
    drop(l);
    let mut agent = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .args(["accel", "agent", "--ports", "17471,17472", "--metrics"])
        .arg(metrics.to_string())
        .arg("--cgroup")
        .arg(&cg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(metrics).ok()?;
        use std::io::Write;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some(b) = get("/metrics") {
            break b;
        }
        assert!(Instant::now() < deadline, "agent never served metrics");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("sockbus_accel_active 1"), "{body}");
    assert!(
        body.contains("sockbus_accel_redirect_verdicts_total"),
        "{body}"
    );
    assert!(get("/healthz").unwrap().contains("ok"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    let mut log = String::new();
    agent
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("fast path: on"), "{log}");
    assert!(log.contains("fast path: detached"), "{log}");
    if let Ok(t) = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg)
        .output()
    {
        let t = String::from_utf8_lossy(&t.stdout);
        assert!(
            !t.contains("sockbus_sock_op"),
            "still attached after SIGTERM:\n{t}"
        );
    }
    let _ = std::fs::remove_dir(&cg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_connections_are_accelerated_too() {
    if !privileged("ipv6_loopback_connections_are_accelerated_too") {
        return;
    }
    let mut cfg = test_config();
    cfg.listen = "[::1]:0".parse().unwrap();
    let b = TestBroker::with(cfg).await;
    let fp = attach(&[b.addr.port()]);
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("v6").await.unwrap();
    c.flush().await.unwrap();
    for i in 0..1000u32 {
        c.publish("v6", payload(i, 100)).await.unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..1000u32 {
        assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 100));
    }
    let s = fp.stats().unwrap();
    assert!(
        s.sockets_added >= 2 && s.bytes_redirected >= 2 * 1000 * 100 && s.misses == 0,
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_socket_map_leaves_new_connections_on_plain_tcp_and_counts_them() {
    if !privileged("a_full_socket_map_leaves_new_connections_on_plain_tcp_and_counts_them") {
        return;
    }
    let b = TestBroker::start().await;
    // Room for one connection (two sockets) only.
    let fp = FastPath::attach(&AttachOptions {
        ports: vec![b.addr.port()],
        cgroup: Some(test_cgroup().unwrap().clone()),
        max_sockets: Some(2),
    })
    .expect("attach");
    let c1 = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c1.subscribe("full").await.unwrap();
    c1.flush().await.unwrap();
    let c2 = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..1000u32 {
        c2.publish("full", payload(i, 64)).await.unwrap();
    }
    c2.flush().await.unwrap();
    for i in 0..1000u32 {
        assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 64));
    }
    let s = fp.stats().unwrap();
    assert_eq!(s.sockets_added, 2, "{s:?}");
    assert_eq!(
        s.add_failures, 2,
        "both ends of the second connection: {s:?}"
    );
    assert!(
        s.bytes_redirected >= 1000 * 64,
        "the first connection still redirects: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_loader_for_the_same_port_is_refused_per_socket_and_breaks_nothing() {
    if !privileged("a_second_loader_for_the_same_port_is_refused_per_socket_and_breaks_nothing") {
        return;
    }
    let b = TestBroker::start().await;
    let first = attach(&[b.addr.port()]);
    let second = attach(&[b.addr.port()]);
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("two").await.unwrap();
    c.flush().await.unwrap();
    for i in 0..1000u32 {
        c.publish("two", payload(i, 64)).await.unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..1000u32 {
        assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 64));
    }
    let (a, z) = (first.stats().unwrap(), second.stats().unwrap());
    eprintln!("two loaders: first {a:?}, second {z:?}");
    // Each socket joins exactly one map; the other loader counts a failure.
    assert_eq!(a.sockets_added + z.sockets_added, 2, "{a:?} {z:?}");
    assert_eq!(a.add_failures + z.add_failures, 2, "{a:?} {z:?}");
    assert!(a.bytes_redirected + z.bytes_redirected >= 2 * 1000 * 64);
}

#[test]
fn broker_with_accel_on_detaches_on_sigterm_even_with_its_log_pipe_gone() {
    if !privileged("broker_with_accel_on_detaches_on_sigterm_even_with_its_log_pipe_gone") {
        return;
    }
    let cg = test_cgroup().unwrap().join("broker-on");
    std::fs::create_dir_all(&cg).unwrap();
    let cg_arg = cg.to_string_lossy().into_owned();
    let (mut child, _port, log) = spawn_broker(&["--accel", "on", "--accel-cgroup", &cg_arg]);
    let attached = || {
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("sockbus_sock_op"))
    };
    if let Ok(a) = attached() {
        assert!(a, "--accel on attached at {cg:?}");
    }
    // Nobody reads the broker's stderr any more: its next log line fails.
    drop(log);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    if let Ok(a) = attached() {
        assert!(!a, "still attached after the broker exited");
    }
    let _ = std::fs::remove_dir(&cg);
}

// ------------------------------------------------------------ self-test

/// The self-test passes on this kernel; its time is printed (docs/fast-path.md
/// quotes it).
#[test]
fn self_test_passes_on_this_kernel() {
    if !privileged("self_test_passes_on_this_kernel") {
        return;
    }
    let fp = attach(&[17_473]);
    let before = fp.stats().unwrap();
    let took = sockbus_broker::accel::selftest::run(&fp).expect("self-test");
    let s = delta(fp.stats().unwrap(), before);
    eprintln!("self-test passed in {took:?}; {s:?}");
    // The test's bytes were counted as redirected: more than its 4 MiB write.
    assert!(s.bytes_redirected >= 4 << 20, "{s:?}");
    assert_eq!(fp.sockets(), 0, "the test pair left the map when it closed");
}

#[test]
fn direct_self_test_check_passes_on_this_kernel() {
    if !privileged("direct_self_test_check_passes_on_this_kernel") {
        return;
    }
    let fp = attach(&[17_474]);
    let before = fp.stats().unwrap();
    let took = sockbus_broker::accel::selftest::run_direct(&fp).expect("direct check");
    let s = delta(fp.stats().unwrap(), before);
    eprintln!("direct check passed in {took:?}; {s:?}");
    assert_eq!(s.direct_msgs, 1, "{s:?}");
    assert_eq!(
        fp.sockets(),
        0,
        "the test's sockets left the map when they closed"
    );
}

/// The JSON `/v1/status` of the broker whose HTTP port is `http`.
fn status_json(http: u16) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).expect("HTTP");
    write!(s, "GET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("status is no JSON ({e}):\n{out}"))
}

/// `--accel-direct` is off by default and says so in the one start-up line,
/// /metrics and /v1/status; `on` turns it on; a failed direct self-test
/// check turns it off by itself, naming the check, while the rest of the
/// fast path stays on.
#[test]
fn accel_direct_is_off_by_default_on_on_request_and_off_when_its_check_fails() {
    let test = "accel_direct_is_off_by_default_on_on_request_and_off_when_its_check_fails";
    if !privileged(test) || !hooks_built(test) {
        return;
    }
    let cg = test_cgroup().unwrap().to_string_lossy().into_owned();
    for (extra, env, on, says) in [
        (
            Some("on"),
            None,
            true,
            "direct delivery on: self-test check direct passed",
        ),
        (
            None,
            None,
            false,
            "direct delivery off: off unless --accel-direct on",
        ),
        (
            Some("on"),
            Some("direct"),
            false,
            "direct delivery off: self-test failed: check direct: failed on purpose",
        ),
    ] {
        let http = free_port();
        let http_arg = format!("127.0.0.1:{http}");
        let mut args = vec!["--accel", "on", "--accel-cgroup", &cg, "--http", &http_arg];
        if let Some(v) = extra {
            args.extend(["--accel-direct", v]);
        }
        let env: Vec<(&str, &str)> = env
            .map(|h| ("SOCKBUS_ACCEL_SELFTEST_FAIL", h))
            .into_iter()
            .collect();
        let (child, _port, rx, mut log) = spawn_broker_env(&args, &env);
        let _child = KillOnDrop(child);
        log.push_str(&drain_log(&rx, Duration::from_millis(200)));
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("fast path:")).collect();
        assert_eq!(lines.len(), 1, "one line about the fast path:\n{log}");
        assert!(
            lines[0].contains("fast path: on: ") && lines[0].contains(says),
            "{says}:\n{log}"
        );
        assert_eq!(metric(http, "sockbus_accel_direct_active"), u64::from(on));
        assert_eq!(metric(http, "sockbus_accel_active"), 1);
        let st = status_json(http);
        let fp = find_key(&st, "fast_path").unwrap_or_else(|| panic!("no fast_path: {st}"));
        assert_eq!(fp["direct"], serde_json::json!(on), "{fp}");
        assert!(
            fp["direct_reason"]
                .as_str()
                .is_some_and(|r| says.rsplit(": ").next().is_some_and(|w| r.contains(w))),
            "{fp}"
        );
    }
}

/// The first object under `key`, however deep.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// Whether the broker binary has the test hooks (`SOCKBUS_ACCEL_SELFTEST_FAIL`,
/// `SOCKBUS_ACCEL_STALL_INJECT`): only builds with debug assertions do, and
/// the test binary is built with the same profile as the broker's.
fn hooks_built(test: &str) -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("skipping {test}: the test hooks exist only in debug builds");
    }
    cfg!(debug_assertions)
}

/// Kills the child on every way out of a test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every log line received so far (waiting up to `wait` for more).
fn drain_log(rx: &std::sync::mpsc::Receiver<String>, wait: Duration) -> String {
    let mut log = String::new();
    while let Ok(l) = rx.recv_timeout(wait) {
        log.push_str(&l);
        log.push('\n');
    }
    log
}

/// Publishes through the broker at `port` and gets it back: the broker serves.
async fn serves(port: u16) {
    let url = format!("sockbus://127.0.0.1:{port}");
    let c = sockbus_client::connect(&url).await.expect("connect");
    let mut sub = c.subscribe("after.selftest").await.unwrap();
    c.flush().await.unwrap();
    for i in 0..100u32 {
        c.publish("after.selftest", payload(i, 64)).await.unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..100u32 {
        assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 64));
    }
}

/// A self-test that fails makes `--accel auto` serve plain TCP and say which
/// check failed, in the one line about the fast path. `fionread` is failed
/// by the hook outright; `redirect` by a deliberately broken map (the
/// receiver removed from it), which the check detects from the data segments
/// on the wire; `hang` by a check that never finishes, which the time limit
/// catches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_self_test_makes_the_broker_serve_plain_tcp_and_name_the_check() {
    if !privileged("a_failed_self_test_makes_the_broker_serve_plain_tcp_and_name_the_check")
        || !hooks_built("a_failed_self_test_makes_the_broker_serve_plain_tcp_and_name_the_check")
    {
        return;
    }
    let cg = test_cgroup().unwrap().to_string_lossy().into_owned();
    for (hook, says) in [
        ("fionread", "failed on purpose"),
        ("redirect", "TCP data segments carried the test's bytes"),
        ("hang", "did not finish within 2s"),
    ] {
        let t = Instant::now();
        let (child, port, rx, mut log) = spawn_broker_env(
            &["--accel", "auto", "--accel-cgroup", &cg, "--http", "off"],
            &[("SOCKBUS_ACCEL_SELFTEST_FAIL", hook)],
        );
        let started = t.elapsed();
        let _child = KillOnDrop(child);
        serves(port).await;
        log.push_str(&drain_log(&rx, Duration::from_millis(200)));
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("fast path:")).collect();
        eprintln!("{hook}: started in {started:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "one line about the fast path:\n{log}");
        let check = if hook == "hang" { "insert" } else { hook };
        assert!(
            lines[0].contains("fast path: off (plain TCP): self-test failed: check ")
                && lines[0].contains(&format!("check {check}: "))
                && lines[0].contains(says),
            "{hook}: names the check and why:\n{log}"
        );
        assert!(
            !log.contains("stall guard"),
            "no guard without a fast path:\n{log}"
        );
    }
}

/// Runs `cmd` and waits up to 10 s for it to exit (killing it and failing
/// the test otherwise); returns its status and stderr.
fn exits_within(cmd: &mut Command, what: &str) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} kept running after its self-test failed:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

#[test]
fn a_failed_self_test_stops_accel_on_and_the_agent() {
    if !privileged("a_failed_self_test_stops_accel_on_and_the_agent")
        || !hooks_built("a_failed_self_test_stops_accel_on_and_the_agent")
    {
        return;
    }
    let cg = test_cgroup().unwrap().join("selftest-fail");
    std::fs::create_dir_all(&cg).unwrap();
    let attached = || {
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("sockbus_sock_op"))
    };
    let (status, stderr) = exits_within(
        Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args(["--listen", "127.0.0.1:0", "--http", "off", "--accel", "on"])
            .arg("--accel-cgroup")
            .arg(&cg)
            .env("SOCKBUS_ACCEL_SELFTEST_FAIL", "eof"),
        "the broker with --accel on",
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--accel on: cannot use the eBPF fast path: self-test failed: check eof"),
        "{stderr}"
    );

    let (status, log) = exits_within(
        Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args([
                "accel",
                "agent",
                "--ports",
                "17474",
                "--metrics",
                "127.0.0.1:0",
            ])
            .arg("--cgroup")
            .arg(&cg)
            .env("SOCKBUS_ACCEL_SELFTEST_FAIL", "large")
            .env("RUST_LOG", "info"),
        "the agent",
    );
    assert!(!status.success(), "{log}");
    assert!(log.contains("self-test failed: check large"), "{log}");
    if let Ok(a) = attached() {
        assert!(!a, "nothing stays attached");
    }
    let _ = std::fs::remove_dir(&cg);
}

// ------------------------------------------------------------ stall guard

fn metric(http: u16, name: &str) -> u64 {
    metric_as(http, name, None)
}

/// [`metric`] with an `Authorization` header value (a broker with users).
fn metric_as(http: u16, name: &str, auth: Option<&str>) -> u64 {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).expect("HTTP");
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{out}"))
}

/// A raw client named `name` that subscribes to `subject` and reads nothing
/// until told to.
async fn raw_named(port: u16, name: &str, subject: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut b = BytesMut::new();
    encode_connect(&mut b, 0, 0, name, b"").unwrap();
    encode_sub(&mut b, 1, subject, None).unwrap();
    frame::encode_ping(&mut b, 1);
    s.write_all(&b).await.unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_frame(&mut s, &mut buf).await,
        Frame::Info { .. }
    ));
    assert!(matches!(read_frame(&mut s, &mut buf).await, Frame::Pong(1)));
    s
}

/// Reads until 500 ms of silence; (bytes read, whether the broker closed).
async fn read_all(s: &mut tokio::net::TcpStream) -> (usize, bool) {
    let mut n = 0;
    let mut tmp = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (n, true),
            Ok(Ok(k)) => n += k,
            Err(_) => return (n, false),
        }
    }
}

/// A fast-path connection whose socket stops taking bytes is closed,
/// logged and counted; the broker's other connections carry on.
///
/// What is simulated: a kernel that stops taking a socket's bytes cannot be
/// produced on demand, so `SOCKBUS_ACCEL_STALL_INJECT` makes the guard's
/// sample of that one connection read "writer holding a batch, no new
/// claim", what a socket that refuses bytes looks like from the outlet.
/// Everything after the sample is real: the check that both ends are in the
/// socket hash (a plain-TCP connection would be left alone), the log line,
/// the counter in /metrics and the close the client sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_guard_closes_a_stalled_fast_path_connection_and_counts_it() {
    if !privileged("stall_guard_closes_a_stalled_fast_path_connection_and_counts_it")
        || !hooks_built("stall_guard_closes_a_stalled_fast_path_connection_and_counts_it")
    {
        return;
    }
    let cg = test_cgroup().unwrap().to_string_lossy().into_owned();
    let http = free_port();
    let http_arg = format!("127.0.0.1:{http}");
    let (child, port, rx, mut log) = spawn_broker_env(
        &[
            "--accel",
            "on",
            "--accel-cgroup",
            &cg,
            "--accel-stall-timeout",
            "1s",
            "--http",
            &http_arg,
        ],
        &[("SOCKBUS_ACCEL_STALL_INJECT", "stuck-client")],
    );
    let _child = KillOnDrop(child);
    let mut stuck = raw_named(port, "stuck-client", "stall.x").await;
    let url = format!("sockbus://127.0.0.1:{port}");
    let healthy = sockbus_client::ConnectOptions::new()
        .name("healthy")
        .connect(&url)
        .await
        .unwrap();
    let mut sub = healthy.subscribe("stall.x").await.unwrap();
    healthy.flush().await.unwrap();
    assert_eq!(metric(http, "sockbus_accel_stalls_total"), 0);
    // The guard gives up on the stuck connection after 1 s of no progress.
    let (_, closed) = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = read_all(&mut stuck).await;
            if r.1 {
                break r;
            }
        }
    })
    .await
    .expect("the stalled connection is closed within 5 s");
    assert!(closed);
    assert_eq!(metric(http, "sockbus_accel_stalls_total"), 1);
    log.push_str(&drain_log(&rx, Duration::from_millis(200)));
    let stall: Vec<&str> = log.lines().filter(|l| l.contains("send stall")).collect();
    assert_eq!(stall.len(), 1, "{log}");
    assert!(
        stall[0].contains("stuck-client") && stall[0].contains("closing the connection"),
        "{log}"
    );
    // The healthy client on the fast path is untouched.
    for i in 0..1000u32 {
        healthy.publish("stall.x", payload(i, 64)).await.unwrap();
    }
    healthy.flush().await.unwrap();
    for i in 0..1000u32 {
        assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 64));
    }
    assert_eq!(metric(http, "sockbus_accel_stalls_total"), 1);
    assert!(metric(http, "sockbus_accel_redirect_verdicts_total") > 0);
}

/// A subscriber that stops reading is not a stall: the credit window stops
/// the broker, the bytes wait in the broker's outbox, and the socket never
/// refuses any. Nothing simulated here. 32 MiB are published to a
/// subscriber that reads nothing for 3 s (three times the stall timeout);
/// its connection stays open and what was sent is there to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_path_subscriber_that_stops_reading_is_not_a_stall() {
    if !privileged("a_fast_path_subscriber_that_stops_reading_is_not_a_stall") {
        return;
    }
    let cg = test_cgroup().unwrap().to_string_lossy().into_owned();
    let http = free_port();
    let http_arg = format!("127.0.0.1:{http}");
    let (child, port, rx, mut log) = spawn_broker_env(
        &[
            "--accel",
            "on",
            "--accel-cgroup",
            &cg,
            "--accel-stall-timeout",
            "1s",
            "--http",
            &http_arg,
        ],
        &[],
    );
    let _child = KillOnDrop(child);
    let mut idle = raw_named(port, "idle-reader", "slow.x").await;
    let p = sockbus_client::connect(&format!("sockbus://127.0.0.1:{port}"))
        .await
        .unwrap();
    let chunk = vec![5u8; 64 * 1024];
    for _ in 0..512 {
        p.publish("slow.x", &chunk).await.unwrap();
    }
    p.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(http, "sockbus_accel_stalls_total"), 0);
    let (n, closed) = read_all(&mut idle).await;
    eprintln!("the idle subscriber reads {n} B after 3 s");
    assert!(!closed, "the idle subscriber's connection stays open");
    assert!(n >= 4 << 20, "its window's worth was waiting: {n} B");
    log.push_str(&drain_log(&rx, Duration::from_millis(200)));
    assert!(log.contains("stall guard: on"), "{log}");
    assert!(!log.contains("send stall"), "{log}");
    assert!(metric(http, "sockbus_accel_bytes_redirected_total") >= 4 << 20);
}

/// A CA file and a broker certificate and key for localhost, in `dir`.
fn tls_files(dir: &std::path::Path) -> (PathBuf, sockbus_broker::TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "accel test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    (
        w("ca.crt", ca.pem()),
        sockbus_broker::TlsFiles {
            cert: w("tls.crt", leaf.pem()),
            key: w("tls.key", key.serialize_pem()),
            client_ca: None,
            cluster_ca: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_on_the_fast_path_deliver_every_message_in_order() {
    if !privileged("tls_connections_on_the_fast_path_deliver_every_message_in_order") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, files) = tls_files(dir.path());
    let mut cfg = common::test_config();
    cfg.tls = Some(files);
    let b = TestBroker::with(cfg).await;
    let fp = attach(&[b.addr.port()]);
    let url = format!("sockbus+tls://localhost:{}", b.addr.port());
    let opts = || sockbus_client::ConnectOptions::new().tls_ca(&ca);
    let c = opts().connect(&url).await.unwrap();
    let mut sub = c.subscribe("orders.created").await.unwrap();
    c.flush().await.unwrap();
    let p = opts().connect(&url).await.unwrap();
    for i in 0..20_000u32 {
        p.publish("orders.created", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..20_000u32 {
        let m = recv(&mut sub).await;
        assert_eq!(
            m.payload.as_ref(),
            i.to_le_bytes(),
            "message {i} out of order"
        );
    }
    nothing(&mut sub).await;
    // TLS records, not frames, crossed the sockmap: more bytes than the payloads.
    assert_accelerated(&fp, 2 * 20_000 * 4);
}

// ---------------------------------------------------------------- direct delivery
//
// The kernel side of direct delivery, driven by a broker stand-in: the test
// holds both ends of every connection, installs routes, grants and the
// barrier count itself, and plays the broker where a test needs one
// (forwarding what reaches the broker's end as MSG frames).

mod direct {
    use super::*;
    use sockbus_broker::accel::abi::{DirectRoute, SockKey, DIRECT_SUBJECT_MAX};
    use sockbus_broker::accel::direct::{socket_keys, DirectMaps, DIRECT_FRAME_MAX};
    use sockbus_protocol::frame::{
        encode_msg, encode_pub_flags, parse_header, HEADER_LEN, PUB_ROOM, PUB_ROOM_LEN,
    };
    use sockbus_protocol::subject::subject_hash;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const WAIT: Duration = Duration::from_secs(20);

    pub(super) struct Node {
        pub fp: FastPath,
        pub maps: Arc<Mutex<DirectMaps>>,
        l: TcpListener,
    }

    /// One connection: `c` the client's end, `b` the broker's end, `key`
    /// the client end's key.
    pub(super) struct Conn {
        pub c: TcpStream,
        pub b: TcpStream,
        pub key: SockKey,
    }

    pub(super) fn node() -> Node {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fp = attach(&[l.local_addr().unwrap().port()]);
        let mut maps = fp.direct().expect("direct maps");
        maps.set_enabled(true).unwrap();
        Node {
            fp,
            maps: Arc::new(Mutex::new(maps)),
            l,
        }
    }

    impl Node {
        pub fn conn(&self) -> Conn {
            let c = TcpStream::connect(self.l.local_addr().unwrap()).unwrap();
            let (b, _) = self.l.accept().unwrap();
            for s in [&c, &b] {
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.set_write_timeout(Some(WAIT)).unwrap();
                s.set_nodelay(true).unwrap();
            }
            let key = socket_keys(&c).unwrap().0;
            let fp_keys = socket_keys(&b).unwrap();
            // sock_ops put both ends in the socket hash and the client's end
            // in per-frame mode before its first byte.
            let t = Instant::now();
            while self.fp.sockets() < 2 || self.maps().publisher(&key).is_none() {
                assert!(t.elapsed() < WAIT, "sock_ops did not insert {key:?}");
                std::thread::yield_now();
            }
            assert!(
                self.maps().publisher(&fp_keys.0).is_none(),
                "broker end is no publisher"
            );
            Conn { c, b, key }
        }

        pub fn maps(&self) -> std::sync::MutexGuard<'_, DirectMaps> {
            self.maps.lock().unwrap()
        }

        /// A route for `subject` to `sub`, the publisher allowed and in
        /// step, the subscriber granted `grant` bytes.
        pub fn route(&self, subject: &str, publisher: &Conn, sub: &Conn, sid: u32, grant: u64) {
            let mut m = self.maps();
            m.add_route(subject, sub.key, sid).unwrap();
            m.allow(publisher.key).unwrap();
            m.set_done(publisher.key, 0).unwrap();
            m.grant(sub.key, grant).unwrap();
        }
    }

    pub(super) fn pub_frame(subject: &str, reply: Option<&str>, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_pub(&mut b, subject, reply, &[], payload).unwrap();
        b.to_vec()
    }

    pub(super) fn msg_frame(
        sid: u32,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_msg(
            &mut b,
            sid,
            0,
            subject,
            subject_hash(subject.as_bytes()),
            reply,
            &[],
            payload,
        );
        b.to_vec()
    }

    /// Reads one whole frame (header and body) from `s`.
    pub(super) fn read_frame(s: &mut TcpStream) -> Vec<u8> {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).expect("read a frame header");
        let hd = parse_header(&h).expect("a frame header").expect("12 bytes");
        let mut f = h.to_vec();
        f.resize(HEADER_LEN + hd.len as usize, 0);
        s.read_exact(&mut f[HEADER_LEN..])
            .expect("read a frame body");
        f
    }

    /// The next frame at `s`, or what went wrong reading it.
    fn try_read_frame(s: &mut TcpStream) -> Result<Vec<u8>, String> {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).map_err(|e| format!("header: {e}"))?;
        let hd = match parse_header(&h) {
            Ok(Some(hd)) => hd,
            other => return Err(format!("not a frame header: {other:?}")),
        };
        if hd.len > 1 << 20 {
            return Err(format!("a frame of {} bytes", hd.len));
        }
        let mut f = h.to_vec();
        f.resize(HEADER_LEN + hd.len as usize, 0);
        s.read_exact(&mut f[HEADER_LEN..])
            .map_err(|e| format!("body: {e}"))?;
        Ok(f)
    }

    /// The next frame at `s` is `want` (a marker proves nothing came before it).
    fn expect(s: &mut TcpStream, want: &[u8], what: &str) {
        let got = read_frame(s);
        assert!(
            got == want,
            "{what}: got {} bytes {:?}…, want {} bytes {:?}…",
            got.len(),
            &got[..got.len().min(40)],
            want.len(),
            &want[..want.len().min(40)]
        );
    }

    fn marker(n: u32) -> Vec<u8> {
        pub_frame("marker", None, &n.to_le_bytes())
    }

    /// PUB frames on a routed subject from an allowed publisher go straight
    /// into the subscriber's socket as MSG frames, byte for byte what the
    /// broker would send, one or many per send; the broker's end sees none.
    #[test]
    fn a_pub_on_a_routed_subject_arrives_at_the_subscriber_as_msg_without_the_broker() {
        if !privileged("direct_end_to_end") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.echo", &p, &s, 7, 1 << 20);
        let before = n.fp.stats().unwrap();
        p.c.write_all(&pub_frame("svc.echo", Some("_INBOX.abc.1"), b"ping"))
            .unwrap();
        expect(
            &mut s.c,
            &msg_frame(7, "svc.echo", Some("_INBOX.abc.1"), b"ping"),
            "one frame",
        );
        // Eight frames and a frame for the broker in one send.
        let mut batch = Vec::new();
        for i in 0..8u32 {
            batch.extend(pub_frame(
                "svc.echo",
                None,
                &payload(i, 100 + 500 * i as usize),
            ));
        }
        batch.extend(marker(1));
        p.c.write_all(&batch).unwrap();
        for i in 0..8u32 {
            expect(
                &mut s.c,
                &msg_frame(7, "svc.echo", None, &payload(i, 100 + 500 * i as usize)),
                "batch",
            );
        }
        expect(&mut p.b, &marker(1), "the broker sees only the marker");
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, 9);
        let m = n.maps();
        assert_eq!(m.subject("svc.echo").unwrap().msgs, 9);
        let st = m.publisher(&p.key).unwrap();
        assert_eq!(st.direct_msgs, 9);
        assert_eq!(
            st.passed,
            marker(1).len() as u64,
            "only the marker was handed to the broker"
        );
        assert_eq!(m.subscriber(&s.key).unwrap().msgs, 9);
        drop(m);
        // The subscriber's end of the broker got nothing either.
        s.b.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        assert!(matches!(s.b.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    /// A subject whose 32-bit hash equals the routed subject's goes to the
    /// broker, intact: the program compares the subject bytes.
    #[test]
    fn a_colliding_subject_hash_never_reaches_the_routed_subscriber() {
        if !privileged("direct_collision") {
            return;
        }
        // A real FNV-1a collision between two subjects.
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let s = format!("orders.{i}");
                seen.insert(subject_hash(s.as_bytes()), s.clone())
                    .map(|prev| (prev, s))
            })
            .unwrap();
        assert_eq!(subject_hash(a.as_bytes()), subject_hash(b.as_bytes()));
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route(&a, &p, &s, 3, 1 << 20);
        let fb = pub_frame(&b, None, b"not for a");
        p.c.write_all(&fb).unwrap();
        expect(&mut p.b, &fb, "the colliding subject goes to the broker");
        // Same length, same hash bucket, different bytes: also a route under
        // another subject's hash.
        let mut route = DirectRoute {
            sub: s.key,
            sid: 3,
            subject_len: 8,
            subject: [0; DIRECT_SUBJECT_MAX],
        };
        route.subject[..8].copy_from_slice(b"orders.x");
        n.maps()
            .add_route_hashed(subject_hash(b"orders.y"), route)
            .unwrap();
        let fy = pub_frame("orders.y", None, b"y");
        p.c.write_all(&fy).unwrap();
        expect(&mut p.b, &fy, "same length, other bytes");
        // The broker has handled both: the barrier opens.
        n.maps()
            .set_done(p.key, (fb.len() + fy.len()) as u64)
            .unwrap();
        p.c.write_all(&pub_frame(&a, None, b"for a")).unwrap();
        expect(
            &mut s.c,
            &msg_frame(3, &a, None, b"for a"),
            "the routed subject still goes direct",
        );
    }

    /// A header split over two sends loses nothing: the frame and everything
    /// after it go through the broker, intact and in order, for good.
    #[test]
    fn a_header_split_over_two_sends_goes_through_the_broker_intact() {
        if !privileged("direct_split_header") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.a", &p, &s, 1, 1 << 20);
        let before = n.fp.stats().unwrap();
        let f = pub_frame("svc.a", None, b"split");
        p.c.write_all(&f[..5]).unwrap();
        p.c.write_all(&f[5..]).unwrap();
        let mut all = Vec::new();
        for i in 0..20u32 {
            let g = pub_frame("svc.a", None, &payload(i, 64));
            p.c.write_all(&g).unwrap();
            all.push(g);
        }
        p.c.write_all(&marker(2)).unwrap();
        expect(&mut p.b, &f, "the split frame");
        for g in &all {
            expect(&mut p.b, g, "frames after the split");
        }
        expect(&mut p.b, &marker(2), "marker");
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, 0);
        assert_eq!(d.direct_broken, 1);
        // Nothing reached the subscriber.
        s.c.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        assert!(matches!(s.c.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    /// A frame above the bound, and a frame split inside its body over two
    /// sends, go to the broker whole; the frames after them still go direct.
    #[test]
    fn frames_above_the_bound_or_split_in_the_body_go_through_the_broker() {
        if !privileged("direct_bound") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.big", &p, &s, 9, 64 << 20);
        let big = pub_frame("svc.big", None, &payload(1, DIRECT_FRAME_MAX as usize));
        p.c.write_all(&big).unwrap();
        expect(&mut p.b, &big, "a frame above the bound");
        // The broker has handled it: the barrier opens again.
        n.maps().set_done(p.key, big.len() as u64).unwrap();
        let small = pub_frame("svc.big", None, b"small");
        p.c.write_all(&small).unwrap();
        expect(
            &mut s.c,
            &msg_frame(9, "svc.big", None, b"small"),
            "after the big one",
        );
        let split = pub_frame("svc.big", None, &payload(2, 4000));
        p.c.write_all(&split[..1000]).unwrap();
        p.c.write_all(&split[1000..]).unwrap();
        expect(&mut p.b, &split, "split in the body");
        n.maps()
            .set_done(p.key, (big.len() + split.len()) as u64)
            .unwrap();
        p.c.write_all(&small).unwrap();
        expect(
            &mut s.c,
            &msg_frame(9, "svc.big", None, b"small"),
            "after the split one",
        );
    }

    /// A publisher the broker did not allow never goes direct; revoking
    /// mid-stream sends the rest to the broker with nothing lost.
    #[test]
    fn a_publisher_not_allowed_never_goes_direct() {
        if !privileged("direct_denied") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.secret", &p, &s, 4, 1 << 20);
        n.maps().disallow(&p.key);
        let f = pub_frame("svc.secret", None, b"denied");
        p.c.write_all(&f).unwrap();
        expect(&mut p.b, &f, "denied publisher's frame reaches the broker");
        n.maps().allow(p.key).unwrap();
        n.maps().set_done(p.key, f.len() as u64).unwrap();
        p.c.write_all(&f).unwrap();
        expect(
            &mut s.c,
            &msg_frame(4, "svc.secret", None, b"denied"),
            "allowed",
        );
        n.maps().disallow(&p.key);
        p.c.write_all(&f).unwrap();
        expect(&mut p.b, &f, "revoked");
    }

    /// A subscriber that stops reading gets no more than its grant directly;
    /// the rest goes to the broker (whose flow control and slow-consumer rule
    /// apply), in order behind what went direct; nothing is lost.
    #[test]
    fn a_subscriber_that_stops_reading_gets_at_most_its_grant_directly() {
        if !privileged("direct_budget") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        let grant = 64 * 1024u64;
        n.route("svc.slow", &p, &s, 5, grant);
        let frames: Vec<Vec<u8>> = (0..500u32)
            .map(|i| pub_frame("svc.slow", None, &payload(i, 1000)))
            .collect();
        for f in &frames {
            p.c.write_all(f).unwrap();
        }
        p.c.write_all(&marker(3)).unwrap();
        let used = n.maps().subscriber(&s.key).unwrap().used;
        assert!(used <= grant, "used {used} of a grant of {grant}");
        let direct = n.maps().subscriber(&s.key).unwrap().msgs as usize;
        assert!(direct > 0 && direct < frames.len(), "{direct} went direct");
        for (i, f) in frames.iter().enumerate().skip(direct) {
            let _ = i;
            expect(&mut p.b, f, "over the grant");
        }
        expect(&mut p.b, &marker(3), "marker");
        for (i, _) in frames.iter().enumerate().take(direct) {
            expect(
                &mut s.c,
                &msg_frame(5, "svc.slow", None, &payload(i as u32, 1000)),
                "within the grant",
            );
        }
    }

    /// Groups frames into sends of at most 60 KiB that end on frame
    /// boundaries (as `frame_aligned_sends` does), written one by one.
    fn write_aligned(s: &mut TcpStream, frames: &[Vec<u8>]) {
        let mut send = Vec::new();
        for f in frames {
            if !send.is_empty() && send.len() + f.len() > 60 * 1024 {
                s.write_all(&send).unwrap();
                send.clear();
            }
            send.extend_from_slice(f);
        }
        if !send.is_empty() {
            s.write_all(&send).unwrap();
        }
    }

    /// Runs of frames in one send: the PUBs behind a direct one ride its
    /// verdict only while each passes every check. Here one send holds
    /// routed PUBs, a routed PUB with a reply subject (it starts a new run
    /// and still goes direct), one with headers (the broker checks headers:
    /// it and everything after it go to the broker, the barrier), then
    /// routed PUBs again: the subscriber gets exactly the frames before the
    /// one with headers, as MSG, in order; the broker exactly the rest, in
    /// order; the counters agree.
    #[test]
    fn a_run_of_frames_in_one_send_stops_at_the_first_frame_that_may_not_go_direct() {
        if !privileged("direct_run_stops") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.run", &p, &s, 11, 1 << 20);
        let before = n.fp.stats().unwrap();
        let mut direct = Vec::new();
        let mut send = Vec::new();
        for i in 0..20u32 {
            send.extend(pub_frame(
                "svc.run",
                None,
                &payload(i, 40 + 37 * i as usize),
            ));
            direct.push(msg_frame(
                11,
                "svc.run",
                None,
                &payload(i, 40 + 37 * i as usize),
            ));
        }
        send.extend(pub_frame("svc.run", Some("_INBOX.r.1"), &payload(20, 64)));
        direct.push(msg_frame(
            11,
            "svc.run",
            Some("_INBOX.r.1"),
            &payload(20, 64),
        ));
        for i in 21..30u32 {
            send.extend(pub_frame("svc.run", None, &payload(i, 100)));
            direct.push(msg_frame(11, "svc.run", None, &payload(i, 100)));
        }
        let mut broker = Vec::new();
        let mut with_headers = BytesMut::new();
        encode_pub(
            &mut with_headers,
            "svc.run",
            None,
            &[1, 0, b'k', 1, 0, b'v'],
            b"h",
        )
        .unwrap();
        broker.push(with_headers.to_vec());
        for i in 31..40u32 {
            broker.push(pub_frame("svc.run", None, &payload(i, 100)));
        }
        broker.push(pub_frame("other.subject", None, b"x"));
        broker.push(marker(4));
        for f in &broker {
            send.extend_from_slice(f);
        }
        p.c.write_all(&send).unwrap();
        for (i, m) in direct.iter().enumerate() {
            expect(&mut s.c, m, &format!("direct frame {i}"));
        }
        for (i, f) in broker.iter().enumerate() {
            expect(&mut p.b, f, &format!("broker frame {i}"));
        }
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, direct.len() as u64, "{d:?}");
        assert_eq!(d.direct_fallbacks, broker.len() as u64, "{d:?}");
        let passed: usize = broker.iter().map(Vec::len).sum();
        let st = n.maps().publisher(&p.key).unwrap();
        assert_eq!(st.passed, passed as u64);
        assert_eq!(st.direct_msgs, direct.len() as u64);
        assert_eq!(
            n.maps().subject("svc.run").unwrap().msgs,
            direct.len() as u64
        );
        // Nothing more at the subscriber.
        s.c.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        assert!(matches!(s.c.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    /// A subject with the routed subject's hash and length, right behind a
    /// routed frame in the same send, never joins its run: the program
    /// compares the subject bytes of every frame of a run, not only the
    /// first's. It goes to the broker, and the frames after it follow it
    /// there (the barrier).
    #[test]
    fn a_colliding_subject_inside_a_run_goes_to_the_broker() {
        if !privileged("direct_run_collision") {
            return;
        }
        // A real FNV-1a collision between two subjects of one length.
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (100_000u32..1_000_000)
            .find_map(|i| {
                let s = format!("orders.{i}");
                seen.insert(subject_hash(s.as_bytes()), s.clone())
                    .map(|prev| (prev, s))
            })
            .expect("a collision among 900,000 subjects");
        assert_eq!(
            (a.len(), subject_hash(a.as_bytes())),
            (b.len(), subject_hash(b.as_bytes()))
        );
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route(&a, &p, &s, 15, 1 << 20);
        let (f1, f2, f3) = (
            pub_frame(&a, None, b"one"),
            pub_frame(&b, None, b"two"),
            pub_frame(&a, None, b"three"),
        );
        p.c.write_all(&[f1, f2.clone(), f3.clone()].concat())
            .unwrap();
        expect(
            &mut s.c,
            &msg_frame(15, &a, None, b"one"),
            "the routed frame",
        );
        expect(&mut p.b, &f2, "the colliding subject");
        expect(&mut p.b, &f3, "behind it, the barrier");
        assert_eq!(n.maps().subscriber(&s.key).unwrap().msgs, 1);
    }

    /// The grant is counted for every frame of a run: a grant that ends in
    /// the middle of a send's routed frames lets exactly the frames within
    /// it go direct, the rest go to the broker in order, nothing is lost.
    #[test]
    fn a_grant_that_ends_inside_a_run_is_never_overshot() {
        if !privileged("direct_run_grant") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        let msg_len = msg_frame(12, "svc.g", None, &payload(0, 200)).len() as u64;
        // Room for 3.5 messages.
        n.route("svc.g", &p, &s, 12, msg_len * 7 / 2);
        let frames: Vec<Vec<u8>> = (0..12u32)
            .map(|i| pub_frame("svc.g", None, &payload(i, 200)))
            .collect();
        p.c.write_all(&frames.concat()).unwrap();
        for i in 0..3u32 {
            expect(
                &mut s.c,
                &msg_frame(12, "svc.g", None, &payload(i, 200)),
                "within the grant",
            );
        }
        for f in &frames[3..] {
            expect(&mut p.b, f, "beyond the grant");
        }
        let sub = n.maps().subscriber(&s.key).unwrap();
        assert_eq!((sub.msgs, sub.used), (3, 3 * msg_len));
    }

    /// Many routed frames of mixed sizes (16 B to 30 KiB), in sends of up to
    /// 60 KiB cut on frame boundaries, all go direct: runs cross the
    /// message's scatterlist elements, stop at the run's size bound and at
    /// its frame count, and every frame arrives whole, byte for byte, in
    /// order, with the broker seeing none of them.
    #[test]
    fn streams_of_routed_frames_arrive_whole_and_in_order() {
        if !privileged("direct_run_stream") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.stream", &p, &s, 13, 1 << 30);
        let before = n.fp.stats().unwrap();
        let size = |i: u32| match i % 50 {
            0 => 30_000,
            7 => 9_000,
            _ => 16 + (i as usize * 131) % 400,
        };
        let total = 3000u32;
        let frames: Vec<Vec<u8>> = (0..total)
            .map(|i| pub_frame("svc.stream", None, &payload(i, size(i))))
            .collect();
        let reader = std::thread::spawn({
            let mut c = s.c.try_clone().unwrap();
            move || {
                for i in 0..total {
                    let want = msg_frame(13, "svc.stream", None, &payload(i, size(i)));
                    let got = read_frame(&mut c);
                    assert!(
                        got == want,
                        "frame {i}: {} bytes, want {}",
                        got.len(),
                        want.len()
                    );
                }
            }
        });
        write_aligned(&mut p.c, &frames);
        p.c.write_all(&marker(5)).unwrap();
        reader.join().unwrap();
        expect(&mut p.b, &marker(5), "only the marker reaches the broker");
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, total as u64, "{d:?}");
        assert_eq!(d.direct_broken, 0, "{d:?}");
        s.c.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        assert!(matches!(s.c.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    /// A PUB with room for the sid (flag `PUB_ROOM`), the room holding
    /// `room`.
    pub(super) fn room_frame(
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
        room: [u8; 4],
    ) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_pub_flags(&mut b, PUB_ROOM, subject, reply, headers, payload).unwrap();
        b[HEADER_LEN..HEADER_LEN + PUB_ROOM_LEN].copy_from_slice(&room);
        b.to_vec()
    }

    /// A PUB with room becomes the MSG the broker would send in place: byte
    /// for byte, whatever its room held, one frame or a run of mixed sizes
    /// in one send, and the frame is as long as the PUB was (nothing pushed);
    /// the publisher is credited exactly the PUB bytes it sent.
    #[test]
    fn a_pub_with_room_becomes_that_msg_in_place_whatever_its_room_held() {
        if !privileged("direct_room_in_place") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.room", &p, &s, 0x0a0b0c0d, 1 << 20);
        let before = n.fp.stats().unwrap();
        let first = room_frame(
            "svc.room",
            Some("_INBOX.r.1"),
            &[],
            b"ping",
            [0xde, 0xad, 0xbe, 0xef],
        );
        p.c.write_all(&first).unwrap();
        let want = msg_frame(0x0a0b0c0d, "svc.room", Some("_INBOX.r.1"), b"ping");
        assert_eq!(
            first.len(),
            want.len(),
            "room makes a PUB as long as its MSG"
        );
        expect(&mut s.c, &want, "one frame with garbage in its room");
        let mut batch = Vec::new();
        let mut sent = first.len() as u64;
        for i in 0..20u32 {
            let f = room_frame(
                "svc.room",
                None,
                &[],
                &payload(i, 1 + 613 * i as usize % 2900),
                (i * 0x01010101).to_le_bytes(),
            );
            sent += f.len() as u64;
            batch.extend(f);
        }
        batch.extend(marker(3));
        p.c.write_all(&batch).unwrap();
        for i in 0..20u32 {
            expect(
                &mut s.c,
                &msg_frame(
                    0x0a0b0c0d,
                    "svc.room",
                    None,
                    &payload(i, 1 + 613 * i as usize % 2900),
                ),
                "run",
            );
        }
        expect(&mut p.b, &marker(3), "the broker sees only the marker");
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, 21, "{d:?}");
        let st = n.maps().publisher(&p.key).unwrap();
        assert_eq!(st.direct_pub_bytes, sent, "credited the PUB bytes sent");
        assert_eq!(st.direct_bytes, sent, "MSG bytes: rewritten in place");
    }

    /// Long runs: thousands of PUBs with room, of mixed sizes, in 60 KiB
    /// sends, arrive whole, byte for byte, in order, none lost, none at the
    /// broker; and PUBs with room and without, mixed in one send, both go
    /// direct and arrive in order.
    #[test]
    fn long_runs_of_pubs_with_room_arrive_whole_and_in_order() {
        if !privileged("direct_room_runs") {
            return;
        }
        let n = node();
        let (mut p, s) = (n.conn(), n.conn());
        n.route("svc.long", &p, &s, 21, 1 << 30);
        let before = n.fp.stats().unwrap();
        let size = |i: u32| match i % 97 {
            0 => 20_000,
            5 => 4_000,
            _ => (i as usize * 53) % 300,
        };
        let total = 3000u32;
        // Every 10th frame is an old-style PUB (no room).
        let frames: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                if i % 10 == 9 {
                    pub_frame("svc.long", None, &payload(i, size(i)))
                } else {
                    room_frame("svc.long", None, &[], &payload(i, size(i)), [0xff; 4])
                }
            })
            .collect();
        let reader = std::thread::spawn({
            let mut c = s.c.try_clone().unwrap();
            move || {
                for i in 0..total {
                    let want = msg_frame(21, "svc.long", None, &payload(i, size(i)));
                    let got = read_frame(&mut c);
                    assert!(
                        got == want,
                        "frame {i}: {} bytes, want {}",
                        got.len(),
                        want.len()
                    );
                }
            }
        });
        write_aligned(&mut p.c, &frames);
        p.c.write_all(&marker(6)).unwrap();
        reader.join().unwrap();
        expect(&mut p.b, &marker(6), "only the marker reaches the broker");
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, total as u64, "{d:?}");
        assert_eq!(d.direct_broken, 0, "{d:?}");
    }

    /// A PUB with room that may not go direct (headers, too big, not allowed,
    /// no grant left) reaches the broker exactly as sent, room and all, and
    /// the frames behind it keep their order.
    #[test]
    fn pubs_with_room_that_may_not_go_direct_reach_the_broker_as_sent() {
        if !privileged("direct_room_fallback") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.fb", &p, &s, 8, 4096);
        let in_step = |p: &Conn| {
            let passed = n.maps().publisher(&p.key).unwrap().passed;
            n.maps().set_done(p.key, passed).unwrap();
        };
        let mut hdr = Vec::new();
        sockbus_protocol::frame::push_header(&mut hdr, "k", "v").unwrap();
        let with_headers = room_frame("svc.fb", None, &hdr, b"h", [1; 4]);
        p.c.write_all(&with_headers).unwrap();
        expect(&mut p.b, &with_headers, "headers: to the broker, intact");
        in_step(&p);
        let big = room_frame(
            "svc.fb",
            None,
            &[],
            &vec![7u8; DIRECT_FRAME_MAX as usize],
            [2; 4],
        );
        p.c.write_all(&big).unwrap();
        expect(&mut p.b, &big, "above the bound: to the broker, intact");
        in_step(&p);
        // 4096 bytes of grant: the third 1,500-byte frame finds none left.
        let f = |i: u32| room_frame("svc.fb", None, &[], &payload(i, 1500), [3; 4]);
        let mut send = Vec::new();
        for i in 0..3 {
            send.extend(f(i));
        }
        p.c.write_all(&send).unwrap();
        expect(
            &mut s.c,
            &msg_frame(8, "svc.fb", None, &payload(0, 1500)),
            "granted",
        );
        expect(
            &mut s.c,
            &msg_frame(8, "svc.fb", None, &payload(1, 1500)),
            "granted",
        );
        expect(&mut p.b, &f(2), "no grant left: to the broker, intact");
        in_step(&p);
        n.maps().grant(s.key, 1 << 20).unwrap();
        n.maps().disallow(&p.key);
        let denied = room_frame("svc.fb", None, &[], b"denied", [4; 4]);
        p.c.write_all(&denied).unwrap();
        expect(&mut p.b, &denied, "not allowed: to the broker, intact");
    }

    /// Frames of a send that go to the broker share verdicts, and none is
    /// lost or reordered: a publisher without a route streams mixed frames
    /// in aligned sends, then a routed frame still goes direct once the
    /// broker has caught up.
    #[test]
    fn runs_of_frames_to_the_broker_keep_every_frame_and_its_alignment() {
        if !privileged("direct_run_broker") {
            return;
        }
        let n = node();
        let (mut p, mut s) = (n.conn(), n.conn());
        n.route("svc.later", &p, &s, 14, 1 << 20);
        let before = n.fp.stats().unwrap();
        let frames: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| match i % 3 {
                0 => pub_frame("no.route", None, &payload(i, 16 + (i as usize * 97) % 700)),
                1 => marker(i),
                _ => pub_frame("svc.later", Some("_INBOX.x.y"), &payload(i, 33)),
            })
            .collect();
        // The routed PUBs in there follow frames handed to the broker in the
        // same send: the barrier holds them back too (the first frame of
        // the stream is unrouted).
        let reader = std::thread::spawn({
            let mut b = p.b.try_clone().unwrap();
            let frames = frames.clone();
            move || {
                let mut got = 0u64;
                for (i, f) in frames.iter().enumerate() {
                    let g = read_frame(&mut b);
                    assert!(&g == f, "frame {i}: {} bytes, want {}", g.len(), f.len());
                    got += g.len() as u64;
                }
                got
            }
        });
        write_aligned(&mut p.c, &frames);
        let passed = reader.join().unwrap();
        let d = delta(n.fp.stats().unwrap(), before);
        assert_eq!(d.direct_msgs, 0, "{d:?}");
        assert_eq!(d.direct_broken, 0, "alignment kept: {d:?}");
        assert_eq!(d.direct_fallbacks, frames.len() as u64, "{d:?}");
        // One verdict per frame before runs; now up to BROKER_RUN_FRAMES + 1.
        assert!(
            d.redirect_verdicts < frames.len() as u64 / 4,
            "runs share verdicts: {d:?}"
        );
        assert_eq!(n.maps().publisher(&p.key).unwrap().passed, passed);
        n.maps().set_done(p.key, passed).unwrap();
        p.c.write_all(&pub_frame("svc.later", None, b"now"))
            .unwrap();
        expect(
            &mut s.c,
            &msg_frame(14, "svc.later", None, b"now"),
            "direct again",
        );
    }

    /// The subscriber closes with direct frames unread: those are gone (at
    /// most once, as for core pub/sub), and the publisher's next frames go
    /// to the broker intact; its sends never fail.
    #[test]
    fn a_subscriber_that_closes_with_frames_queued_sends_the_rest_to_the_broker() {
        if !privileged("direct_close") {
            return;
        }
        let n = node();
        let (mut p, s) = (n.conn(), n.conn());
        n.route("svc.gone", &p, &s, 6, 1 << 20);
        for i in 0..10u32 {
            p.c.write_all(&pub_frame("svc.gone", None, &payload(i, 100)))
                .unwrap();
        }
        let queued = n.maps().subscriber(&s.key).unwrap().msgs;
        assert_eq!(queued, 10);
        let sub_key = s.key;
        drop(s);
        let t = Instant::now();
        while n.fp.contains_key(&sub_key) {
            assert!(t.elapsed() < WAIT, "closed socket still in the map");
            std::thread::yield_now();
        }
        let f = pub_frame("svc.gone", None, b"after close");
        p.c.write_all(&f).unwrap();
        expect(&mut p.b, &f, "after the subscriber closed");
    }

    /// Two publishers into one subscriber, direct, while the broker writes
    /// to it too: every frame arrives whole and each sender's in order.
    ///
    /// Ignored: the stand-in broker here writes with `write_all`, which
    /// under load can split a frame over two sends (a partial write when
    /// the subscriber's queue is full), and a direct frame then lands
    /// between the two halves. Failed so in a fresh-clone CI run (frame 41
    /// of the stand-in). The real broker's half is tested in
    /// `broker_direct::two_direct_publishers_and_the_broker_into_one_subscriber_keep_every_message_whole_and_in_order`.
    #[test]
    #[ignore = "the stand-in broker's write_all can split a frame under load; needs the broker half's one-send-per-frame writer"]
    fn two_senders_and_the_broker_into_one_subscriber_keep_frames_whole() {
        if !privileged("direct_two_senders") {
            return;
        }
        let n = node();
        let (p1, p2, mut s) = (n.conn(), n.conn(), n.conn());
        n.route("svc.one", &p1, &s, 1, 1 << 40);
        n.route("svc.two", &p2, &s, 2, 1 << 40);
        const N: u32 = 300;
        let size = |i: u32| 100 + (i as usize * 7919) % (DIRECT_FRAME_MAX as usize - 200);
        let mut handles = Vec::new();
        for (mut c, subj) in [(p1.c, "svc.one"), (p2.c, "svc.two")] {
            handles.push(std::thread::spawn(move || {
                for i in 0..N {
                    c.write_all(&pub_frame(subj, None, &payload(i, size(i))))
                        .unwrap();
                }
                c
            }));
        }
        let mut b = s.b.try_clone().unwrap();
        handles.push(std::thread::spawn(move || {
            for i in 0..N {
                b.write_all(&msg_frame(3, "from.broker", None, &payload(i, size(i))))
                    .unwrap();
            }
            b
        }));
        let mut next = [0u32; 3];
        for _ in 0..3 * N {
            let f = read_frame(&mut s.c);
            let sid = u32::from_le_bytes(f[12..16].try_into().unwrap());
            let subj = ["svc.one", "svc.two", "from.broker"][(sid - 1) as usize];
            let i = next[(sid - 1) as usize];
            assert_eq!(
                f,
                msg_frame(sid, subj, None, &payload(i, size(i))),
                "sender {sid} frame {i}"
            );
            next[(sid - 1) as usize] += 1;
        }
        for h in handles {
            h.join().unwrap();
        }
    }

    /// Routes come and go while a publisher publishes numbered messages and a
    /// stand-in broker forwards whatever reaches it (reporting to the kernel
    /// what it has handled): the subscriber gets every message exactly once,
    /// in order. Without the barrier (`done` always equal to `passed`) the
    /// same churn inverts messages.
    #[test]
    fn route_churn_while_publishing_loses_duplicates_and_reorders_nothing() {
        if !privileged("direct_churn") {
            return;
        }
        // Every run must be free of inversions. Whether a run mixes both
        // paths depends on timing (after a route comes back, frames go
        // direct only once the stand-in broker has caught up with the
        // publisher, which on a loaded machine may not happen within a
        // run: seen in CI, "0 of 20000 went direct"), so up to five runs
        // are made until one does.
        let mut runs = Vec::new();
        for _ in 0..5 {
            let (inversions, direct, total) = churn(true);
            assert_eq!(inversions, 0, "{direct} of {total} went direct");
            runs.push((direct, total));
            if direct > 0 && direct < total {
                return;
            }
        }
        panic!("no run had messages both direct and through the broker (direct, total): {runs:?}");
    }

    #[test]
    fn without_the_barrier_route_churn_reorders() {
        if !privileged("direct_churn_no_barrier") {
            return;
        }
        // The same churn with the barrier cheated (the stand-in broker says it
        // handled everything the kernel passed it, at once): inversions show
        // that the churn test can see what the barrier prevents.
        let mut inv = 0;
        for _ in 0..5 {
            inv += churn(false).0;
            if inv > 0 {
                break;
            }
        }
        assert!(
            inv > 0,
            "no inversion without the barrier: the churn test proves nothing"
        );
    }

    /// Returns (inversions, messages that went direct, messages).
    fn churn(barrier: bool) -> (u64, u64, u64) {
        let n = node();
        let (p, mut s) = (n.conn(), n.conn());
        n.route("svc.churn", &p, &s, 8, 1 << 40);
        const N: u32 = 20_000;
        let stop = Arc::new(AtomicBool::new(false));
        // The publisher.
        let mut pc = p.c;
        let publisher = std::thread::spawn(move || {
            for i in 0..N {
                pc.write_all(&pub_frame("svc.churn", None, &i.to_le_bytes()))
                    .unwrap();
            }
            pc
        });
        // The stand-in broker: reads the publisher's frames, writes them to
        // the subscriber as MSG, then tells the kernel what it handled.
        let (mut pb, mut sb, pkey) = (p.b, s.b.try_clone().unwrap(), p.key);
        let maps = n.maps.clone();
        let handled = Arc::new(AtomicU64::new(0));
        let h2 = handled.clone();
        let fp_pub = n.fp.direct().unwrap();
        let broker = std::thread::spawn(move || {
            let mut got = 0u32;
            let mut fp_pub = fp_pub;
            loop {
                let f = read_frame(&mut pb);
                if f == marker(0) {
                    break;
                }
                let body = &f[HEADER_LEN..];
                let slen = u16::from_le_bytes([body[0], body[1]]) as usize;
                let payload = &f[f.len() - 4..];
                let _ = slen;
                sb.write_all(&msg_frame(8, "svc.churn", None, payload))
                    .unwrap();
                let done = h2.fetch_add(f.len() as u64, Ordering::SeqCst) + f.len() as u64;
                if barrier {
                    maps.lock().unwrap().set_done(pkey, done).unwrap();
                }
                got += 1;
                let _ = &mut fp_pub;
            }
            got
        });
        // Without the barrier: keep `done` equal to what the kernel passed.
        let cheat = (!barrier).then(|| {
            let maps = n.maps.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut m = maps.lock().unwrap();
                    if let Some(st) = m.publisher(&pkey) {
                        m.set_done(pkey, st.passed).unwrap();
                    }
                    drop(m);
                    std::thread::yield_now();
                }
            })
        });
        // Churn: the route comes and goes.
        let maps = n.maps.clone();
        let stop2 = stop.clone();
        let skey = s.key;
        let churner = std::thread::spawn(move || {
            let mut on = true;
            while !stop2.load(Ordering::Relaxed) {
                let mut m = maps.lock().unwrap();
                if on {
                    m.remove_route("svc.churn");
                } else {
                    m.add_route("svc.churn", skey, 8).unwrap();
                }
                drop(m);
                on = !on;
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let mut inversions = 0u64;
        let mut seen = vec![false; N as usize];
        let mut last: i64 = -1;
        // Without the barrier a direct frame can also land inside a frame the
        // stand-in broker is still writing (its write_all may take several
        // sends): the stream then stops being frames. That is one more thing
        // the barrier prevents, so it counts as a violation here (a hard
        // failure with the barrier) and the rest of the bytes are drained.
        let want_len = msg_frame(8, "svc.churn", None, &0u32.to_le_bytes()).len();
        s.c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut broken: Option<String> = None;
        for _ in 0..N {
            let f = match try_read_frame(&mut s.c) {
                Ok(f) if f.len() == want_len => f,
                Ok(f) => {
                    broken = Some(format!("a {}-byte frame, want {want_len}", f.len()));
                    break;
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let i = u32::from_le_bytes(f[f.len() - 4..].try_into().unwrap());
            if i >= N || seen[i as usize] {
                broken = Some(format!("message {i} out of range or twice"));
                break;
            }
            seen[i as usize] = true;
            if (i as i64) < last {
                inversions += 1;
            }
            last = last.max(i as i64);
        }
        if let Some(why) = &broken {
            assert!(!barrier, "with the barrier: {why}");
            // Drain until the publisher is done and the stand-in broker
            // has had a second of nothing to forward.
            s.c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) if publisher.is_finished() => break,
                    Err(_) => {}
                }
            }
            inversions += 1;
        }
        stop.store(true, Ordering::Relaxed);
        churner.join().unwrap();
        if let Some(c) = cheat {
            c.join().unwrap();
        }
        let mut pc = publisher.join().unwrap();
        pc.write_all(&marker(0)).unwrap();
        let via_broker = broker.join().unwrap() as u64;
        (inversions, N as u64 - via_broker, N as u64)
    }
}

// ------------------------------------------- direct delivery, broker driven

/// Direct delivery driven by a real broker (`--accel on`, direct on by
/// default): routes follow subscriptions, the barrier and credit are the
/// broker's. Each test runs its own broker process, whose fast path counts
/// only its own connections.
mod broker_direct {
    use super::*;

    const DIRECT: &str = "sockbus_accel_direct_messages_total";

    pub(super) struct Direct {
        _child: KillOnDrop,
        pub port: u16,
        pub http: u16,
        pub url: String,
        /// `Authorization` for /metrics when the broker has users.
        pub auth: Option<&'static str>,
        _data: PathBuf,
    }

    /// A broker with the fast path and direct delivery on, in this test's
    /// cgroup, with `extra` arguments.
    pub(super) fn start(extra: &[&str]) -> Direct {
        let cg = test_cgroup().unwrap().to_string_lossy().into_owned();
        let http = free_port();
        let http_arg = format!("127.0.0.1:{http}");
        let data = common::scratch_dir();
        let data_arg = data.to_string_lossy().into_owned();
        let mut args = vec![
            "--accel",
            "on",
            "--accel-direct",
            "on",
            "--accel-cgroup",
            &cg,
            "--http",
            &http_arg,
            "--data-dir",
            &data_arg,
        ];
        args.extend_from_slice(extra);
        let (child, port, rx, log) = spawn_broker_env(&args, &[]);
        let log = log + &drain_log(&rx, Duration::from_millis(100));
        assert!(
            log.contains("direct delivery on"),
            "direct delivery is on:\n{log}"
        );
        // Keep reading its log so the pipe never fills.
        // (shown with --nocapture: the broker's side of a failure).
        std::thread::spawn(move || {
            while let Ok(l) = rx.recv() {
                eprintln!("broker: {l}");
            }
        });
        Direct {
            _child: KillOnDrop(child),
            port,
            http,
            url: format!("sockbus://127.0.0.1:{port}"),
            auth: None,
            _data: data,
        }
    }

    impl Direct {
        pub fn direct(&self) -> u64 {
            metric_as(self.http, DIRECT, self.auth)
        }

        pub async fn client(&self) -> sockbus_client::Client {
            sockbus_client::connect(&self.url).await.expect("connect")
        }
    }

    /// Waits until the direct counter moved past `from` (a route is in
    /// place and the publisher's barrier open); false after 5 s.
    async fn direct_after(b: &Direct, from: u64, publish: impl AsyncFnMut(u32)) -> bool {
        let mut publish = publish;
        for i in 0..500u32 {
            publish(i).await;
            if b.direct() > from {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Request/reply between two same-node clients: the request goes
    /// straight into the service's socket, the reply (to the requester's
    /// own literal reply subject) straight into the requester's; both are
    /// counted in the BPF counters and visible in /metrics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_reply_between_two_same_node_clients_goes_direct() {
        if !privileged("request_reply_between_two_same_node_clients_goes_direct") {
            return;
        }
        let b = start(&[]);
        let svc = common::echo_replier(b.client().await, "svc.echo").await;
        let req = b.client().await;
        let mut replies = req.subscribe("reply.me").await.unwrap();
        req.flush().await.unwrap();
        let before = b.direct();
        const N: u32 = 2000;
        let t = Instant::now();
        for i in 0..N {
            req.publish_with_reply("svc.echo", "reply.me", payload(i, 32))
                .await
                .unwrap();
            let m = recv(&mut replies).await;
            assert_eq!(m.payload.as_ref(), payload(i, 32), "reply {i}");
        }
        let took = t.elapsed();
        let d = b.direct() - before;
        eprintln!(
            "{N} round trips in {took:?}: {d} of {} messages went direct",
            2 * N
        );
        // Every request and reply, but for the first few while the
        // barriers open.
        assert!(d >= 2 * u64::from(N) - 20, "{d} of {} went direct", 2 * N);
        svc.abort();
    }

    /// Messages that went direct count like any other: in
    /// `sockbus_messages_in_total` / `_out_total` and `sockbus_bytes_in_total`
    /// in /metrics, and on their subject's line of the status page, though
    /// the broker never saw them.
    /// A broker with direct delivery asks its clients for PUBs with room
    /// (INFO flag); PUBs with room (garbage in it) and without, mixed,
    /// reach an SDK subscriber whole and in order, most of them direct.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_direct_broker_asks_for_room_and_delivers_pubs_with_and_without_it() {
        if !privileged("direct_asks_for_room") {
            return;
        }
        let b = start(&[]);
        let s = b.client().await;
        let mut sub = s.subscribe("room.mix").await.unwrap();
        s.flush().await.unwrap();
        let mut raw = Raw::connect_only(format!("127.0.0.1:{}", b.port).parse().unwrap()).await;
        let mut hello = BytesMut::new();
        encode_connect(&mut hello, 0, 0, "raw", b"").unwrap();
        raw.send(&hello).await;
        match raw.next().await {
            Some(Frame::Info { flags, .. }) => assert_ne!(flags & frame::INFO_PUB_ROOM, 0),
            other => panic!("expected INFO, got {other:?}"),
        }
        let direct0 = b.direct();
        const N: u32 = 2000;
        for chunk in 0..N / 100 {
            let mut send = Vec::new();
            for i in chunk * 100..(chunk + 1) * 100 {
                if i % 3 == 0 {
                    send.extend(direct::pub_frame("room.mix", None, &payload(i, 90)));
                } else {
                    send.extend(direct::room_frame(
                        "room.mix",
                        None,
                        &[],
                        &payload(i, 90),
                        [0xee; 4],
                    ));
                }
            }
            raw.send(&send).await;
            // A PING answered: the broker has caught up (the barrier opens).
            raw.send_frame(Frame::Ping(chunk as u64)).await;
            loop {
                match raw.next().await {
                    Some(Frame::Pong(id)) if id == chunk as u64 => break,
                    Some(_) => {}
                    None => panic!("no PONG"),
                }
            }
        }
        for i in 0..N {
            assert_eq!(
                recv(&mut sub).await.payload.as_ref(),
                payload(i, 90),
                "message {i}"
            );
        }
        let direct = b.direct() - direct0;
        assert!(direct > u64::from(N) / 2, "{direct} of {N} went direct");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_messages_count_in_metrics_and_the_status_page_like_any_other() {
        if !privileged("direct_messages_count_in_metrics") {
            return;
        }
        let b = start(&[]);
        let s = b.client().await;
        let mut sub = s.subscribe("count.me").await.unwrap();
        s.flush().await.unwrap();
        let p = b.client().await;
        p.flush().await.unwrap();
        let (in0, out0, bytes0, direct0) = (
            metric(b.http, "sockbus_messages_in_total"),
            metric(b.http, "sockbus_messages_out_total"),
            metric(b.http, "sockbus_bytes_in_total"),
            b.direct(),
        );
        const N: u32 = 3000;
        for i in 0..N {
            p.publish("count.me", payload(i, 100)).await.unwrap();
            if i % 100 == 99 {
                // Let the barrier open now and then: most go direct.
                p.flush().await.unwrap();
            }
        }
        for i in 0..N {
            assert_eq!(recv(&mut sub).await.payload.as_ref(), payload(i, 100));
        }
        let direct = b.direct() - direct0;
        assert!(direct > u64::from(N) / 2, "{direct} of {N} went direct");
        // The pump adds what went direct every 5 ms.
        let n = u64::from(N);
        let mut got = (0, 0, 0);
        for _ in 0..100 {
            got = (
                metric(b.http, "sockbus_messages_in_total") - in0,
                metric(b.http, "sockbus_messages_out_total") - out0,
                metric(b.http, "sockbus_bytes_in_total") - bytes0,
            );
            if got.0 >= n && got.1 >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(got, (n, n, 100 * n), "messages in, out, payload bytes in");
        let st = status_json(b.http);
        let line = st["subjects"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["subject"] == "count.me"))
            .unwrap_or_else(|| panic!("count.me on the status page: {st}"));
        assert_eq!(line["msgs"], n, "status page line: {line}");
    }

    /// A second subscriber appearing (and leaving) mid-stream moves the
    /// subject's delivery to the broker and back: the first subscriber
    /// gets every message exactly once and in order, the second an
    /// in-order run of them; some went direct, some through the broker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_subscriber_mid_stream_moves_delivery_to_the_broker_with_no_loss_duplicate_or_reorder(
    ) {
        if !privileged("direct_second_subscriber") {
            return;
        }
        let b = start(&[]);
        let a = b.client().await;
        let mut sa = a.subscribe("feed.x").await.unwrap();
        a.flush().await.unwrap();
        let p = b.client().await;
        let before = b.direct();
        const N: u32 = 30_000;
        let other = b.client().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::with_capacity(N as usize);
            for _ in 0..N {
                let m = recv(&mut sa).await;
                got.push(u32::from_le_bytes(m.payload[..4].try_into().unwrap()));
            }
            nothing(&mut sa).await;
            got
        });
        let mut second: Vec<sockbus_client::Subscriber> = Vec::new();
        let mut b_got = Vec::new();
        for i in 0..N {
            p.publish("feed.x", i.to_le_bytes()).await.unwrap();
            if i % 5000 == 2500 {
                if let Some(mut s) = second.pop() {
                    // Leaves: the route comes back (behind the barrier).
                    other.flush().await.unwrap();
                    while let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_millis(50), s.next()).await
                    {
                        b_got.push(u32::from_le_bytes(m.payload[..4].try_into().unwrap()));
                    }
                    s.unsubscribe().unwrap();
                } else {
                    second.push(other.subscribe("feed.x").await.unwrap());
                    other.flush().await.unwrap();
                }
            }
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        p.flush().await.unwrap();
        let got = reader.await.unwrap();
        let want: Vec<u32> = (0..N).collect();
        if got != want {
            let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
            panic!("first subscriber: first difference at {first_bad:?}");
        }
        assert!(!b_got.is_empty(), "the second subscriber got nothing");
        assert!(
            b_got.windows(2).all(|w| w[0] < w[1]),
            "the second subscriber's messages are in order, none twice"
        );
        let d = b.direct() - before;
        eprintln!(
            "{d} of {N} went direct; the second subscriber got {}",
            b_got.len()
        );
        assert!(d > 0 && d < u64::from(N), "{d} of {N} went direct");
    }

    /// A queue group member, a stream capturing the subject, and a
    /// subscriber on another cluster node each take the route away at once:
    /// while they exist nothing goes direct and they get their messages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_group_a_stream_or_remote_interest_removes_the_route() {
        if !privileged("direct_route_removed") {
            return;
        }
        let route = free_port();
        let route_arg = format!("127.0.0.1:{route}");
        let b = start(&["--cluster", &route_arg]);
        let a = b.client().await;
        let mut sa = a.subscribe("case.x").await.unwrap();
        a.flush().await.unwrap();
        let p = b.client().await;
        let mut sent = 0u32;
        // The route works before each case.
        async fn direct_works(
            b: &Direct,
            p: &sockbus_client::Client,
            sa: &mut sockbus_client::Subscriber,
            sent: &mut u32,
        ) {
            let from = b.direct();
            let ok = direct_after(b, from, async |_| {
                p.publish("case.x", b"probe").await.unwrap();
                p.flush().await.unwrap();
                *sent += 1;
            })
            .await;
            assert!(ok, "nothing went direct with the route in place");
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), sa.next()).await
            {}
        }
        // While `other` wants the subject: 100 messages, none direct, all
        // at A and the other party's share where it should be.
        async fn none_direct(
            b: &Direct,
            p: &sockbus_client::Client,
            sa: &mut sockbus_client::Subscriber,
            what: &str,
        ) {
            let from = b.direct();
            for i in 0..100u32 {
                p.publish("case.x", i.to_le_bytes()).await.unwrap();
            }
            p.flush().await.unwrap();
            for i in 0..100u32 {
                let m = recv(sa).await;
                assert_eq!(m.payload.as_ref(), i.to_le_bytes(), "{what}: message {i}");
            }
            assert_eq!(b.direct(), from, "{what}: something went direct");
        }

        // Queue group.
        direct_works(&b, &p, &mut sa, &mut sent).await;
        let q = b.client().await;
        let mut sq = q.queue_subscribe("case.x", "workers").await.unwrap();
        q.flush().await.unwrap();
        none_direct(&b, &p, &mut sa, "queue group").await;
        for i in 0..100u32 {
            assert_eq!(recv(&mut sq).await.payload.as_ref(), i.to_le_bytes());
        }
        sq.unsubscribe().unwrap();
        q.flush().await.unwrap();

        // Stream.
        direct_works(&b, &p, &mut sa, &mut sent).await;
        let cfg = sockbus_client::streams::StreamConfig::new("CASES", ["case.>"]);
        a.stream_add(&cfg).await.unwrap();
        none_direct(&b, &p, &mut sa, "stream").await;
        // Stored by the stream's writer a moment after the publish.
        let t = Instant::now();
        loop {
            let stored = a.stream_info("CASES").await.unwrap().state.messages;
            if stored == 100 {
                break;
            }
            assert!(
                t.elapsed() < WAIT_REMOTE,
                "the stream stored {stored} of 100"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.stream_delete("CASES").await.unwrap();

        // Remote interest: a subscriber on another node of the cluster.
        direct_works(&b, &p, &mut sa, &mut sent).await;
        let mut cfg = common::test_config();
        cfg.node_id = "direct-b".into();
        cfg.cluster = Some(SocketAddr::from(([127, 0, 0, 1], free_port())));
        cfg.peers = vec![format!("sockbus-route://127.0.0.1:{route}")];
        let peer = TestBroker::with(cfg).await;
        let r = sockbus_client::connect(&peer.url).await.unwrap();
        let mut sr = r.subscribe("case.x").await.unwrap();
        r.flush().await.unwrap();
        // Until the interest has crossed, messages still go direct: wait
        // for the remote subscriber to get one.
        let t = Instant::now();
        loop {
            p.publish("case.x", b"probe").await.unwrap();
            p.flush().await.unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), sr.next()).await {
                break;
            }
            assert!(
                t.elapsed() < WAIT_REMOTE,
                "the remote interest never arrived"
            );
        }
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), sa.next()).await {}
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), sr.next()).await {}
        none_direct(&b, &p, &mut sa, "remote interest").await;
        for i in 0..100u32 {
            assert_eq!(recv(&mut sr).await.payload.as_ref(), i.to_le_bytes());
        }
        let _ = sent;
    }

    /// Directly delivered bytes count against the subscriber's window: a
    /// subscriber that stops reading gets at most half its window directly
    /// (the other half stays for the broker's writes), the rest goes through the
    /// broker, whose slow-consumer rule closes it; the publisher never
    /// blocks for good and the broker's memory stays bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_that_stops_reading_gets_its_window_directly_then_the_slow_consumer_rule()
    {
        if !privileged("direct_slow_subscriber") {
            return;
        }
        let b = start(&[
            "--max-payload",
            "64KiB",
            "--max-pending",
            "1MiB",
            "--write-timeout",
            "1s",
        ]);
        const WINDOW: u32 = 256 * 1024;
        let addr: SocketAddr = ([127, 0, 0, 1], b.port).into();
        let mut s = common::Raw::connect_with_window(addr, WINDOW).await;
        let mut f = BytesMut::new();
        encode_sub(&mut f, 1, "slow.x", None).unwrap();
        frame::encode_ping(&mut f, 1);
        s.send(&f).await;
        loop {
            match s.next().await {
                Some(Frame::Pong(1)) => break,
                // Credit for what the subscriber sent.
                Some(Frame::Credit(_)) => {}
                other => panic!("expected PONG, got {other:?}"),
            }
        }
        let p = b.client().await;
        let direct_bytes = || metric(b.http, "sockbus_accel_direct_bytes_total");
        let (msgs0, bytes0) = (b.direct(), direct_bytes());
        // 20 MB at a subscriber that reads nothing.
        let t = Instant::now();
        let publish = async {
            for i in 0..20_000u32 {
                p.publish("slow.x", payload(i, 1000)).await.unwrap();
            }
            p.flush().await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(30), publish)
            .await
            .expect("the publisher never blocks for good");
        let (msgs, bytes) = (b.direct() - msgs0, direct_bytes() - bytes0);
        eprintln!(
            "published in {:?}: {msgs} messages, {bytes} bytes direct",
            t.elapsed()
        );
        assert!(msgs > 0, "nothing went direct");
        // Half the window, and a frame that two CPUs may overshoot it by.
        assert!(
            bytes <= u64::from(WINDOW) / 2 + 2 * 1100,
            "{bytes} bytes direct for a window of {WINDOW}"
        );
        let t = Instant::now();
        while metric(b.http, "sockbus_slow_consumers_total") == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the broker never applied its slow-consumer rule"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(s.closed().await, "the slow subscriber was closed");
    }

    const WAIT_REMOTE: Duration = Duration::from_secs(15);

    /// A publisher whose permissions restrict what it may publish never
    /// goes direct, not even on a subject it may publish to; one it may not
    /// publish to never reaches the subscriber at all; an unrestricted
    /// publisher on the same subject does go direct.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_denied_publisher_never_reaches_the_subscriber_directly() {
        if !privileged("direct_denied_publisher") {
            return;
        }
        let dir = common::scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("users.toml");
        std::fs::write(
            &cfg,
            "[[users]]\nname = \"sub\"\npassword = \"s\"\n\n\
             [[users]]\nname = \"narrow\"\npassword = \"n\"\npublish = [\"svc.>\"]\n\n\
             [[users]]\nname = \"open\"\npassword = \"o\"\n",
        )
        .unwrap();
        let cfg_arg = cfg.to_string_lossy().into_owned();
        let mut b = start(&["--config", &cfg_arg]);
        b.auth = Some("Basic c3ViOnM="); // sub:s
        let at = |u: &str| format!("sockbus://{u}@127.0.0.1:{}", b.port);
        let s = sockbus_client::connect(&at("sub:s")).await.unwrap();
        let mut svc = s.subscribe("svc.a").await.unwrap();
        let mut secret = s.subscribe("secret.x").await.unwrap();
        s.flush().await.unwrap();
        let narrow = sockbus_client::connect(&at("narrow:n")).await.unwrap();
        let from = b.direct();
        for i in 0..200u32 {
            narrow.publish("svc.a", i.to_le_bytes()).await.unwrap();
        }
        narrow.flush().await.unwrap();
        for i in 0..200u32 {
            assert_eq!(recv(&mut svc).await.payload.as_ref(), i.to_le_bytes());
        }
        let _ = narrow.publish("secret.x", b"denied").await;
        let _ = narrow.flush().await;
        nothing(&mut secret).await;
        assert_eq!(b.direct(), from, "a restricted publisher went direct");
        // The route is there: an unrestricted publisher goes direct.
        let open = sockbus_client::connect(&at("open:o")).await.unwrap();
        let ok = direct_after(&b, from, async |i| {
            open.publish("svc.a", i.to_le_bytes()).await.unwrap();
            open.flush().await.unwrap();
        })
        .await;
        assert!(ok, "the unrestricted publisher never went direct");
    }

    /// Two same-node publishers go direct into one subscriber's socket (one
    /// subject each, so two routes into one socket) while the broker writes
    /// a third publisher's messages into it too (they carry headers, so
    /// they never go direct): every message arrives whole, with its bytes,
    /// and each publisher's in its order. The broker's messages are 30-60
    /// KB, so its sends to the subscriber are large.
    ///
    /// Found so (4 of 20 runs failed with a message whose bytes were
    /// partly another frame's; with the fix, 0 of 44): the fast path's verdict on the broker's socket covered the
    /// next 64 KiB of its sends, and where it ran out, inside a frame, the
    /// kernel redirected the rest of that send apart, so a direct frame
    /// could land inside one of the broker's. Now the broker's end of a
    /// connection gets one verdict per send while direct delivery is on,
    /// and the broker's sends to such a client hold whole frames, at most
    /// 64 KiB (`Outlet::one_send_per_frame`).
    ///
    /// Two rounds with a fresh subscriber each: one that keeps up (6,000
    /// messages per publisher, at most 256 in flight, the SDK's default of dropping what a full
    /// subscription cannot take), then one that naps 5 ms every 50 messages
    /// (2,000 per publisher, 1,500 in flight) (its grant runs out, the publishers' frames go
    /// through the broker, then direct again; `Overflow::Wait`, so the SDK
    /// drops nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_direct_publishers_and_the_broker_into_one_subscriber_keep_every_message_whole_and_in_order(
    ) {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        if !privileged("direct_two_publishers_and_the_broker") {
            return;
        }
        let b = start(&[]);
        // The direct publishers' messages small (so they go direct), the
        // broker's large.
        let size = |t: u32, i: u32| match t {
            2 => 30_000 + (i as usize * 7919) % 30_000,
            _ => 16 + (i as usize * 7919 + t as usize * 104_729) % 2_000,
        };
        let body = move |t: u32, i: u32| {
            let mut p = payload(i.wrapping_mul(3).wrapping_add(t), size(t, i));
            p[..4].copy_from_slice(&i.to_le_bytes());
            p.push(t as u8);
            p
        };
        for (n, inflight, nap) in [(6000u32, 256u32, 0u64), (2000, 1500, 5)] {
            let overflow = if nap == 0 {
                sockbus_client::Overflow::Drop
            } else {
                sockbus_client::Overflow::Wait
            };
            let s = sockbus_client::ConnectOptions::default()
                .when_subscription_full(overflow)
                .connect(&b.url)
                .await
                .unwrap();
            let mut one = s.subscribe("svc.one").await.unwrap();
            let mut two = s.subscribe("svc.two").await.unwrap();
            s.flush().await.unwrap();
            let from = b.direct();
            let got = Arc::new(AtomicU32::new(0));
            let sent = Arc::new(AtomicU32::new(0));
            let mut tasks = Vec::new();
            for t in 0..3u32 {
                let c = b.client().await;
                let (got, sent) = (got.clone(), sent.clone());
                let mut hdr = sockbus_client::Headers::new();
                hdr.insert("Via", "the broker");
                tasks.push(tokio::spawn(async move {
                    // Let the routes settle first, as a service's clients do.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for i in 0..n {
                        while sent.load(Ordering::Acquire) > got.load(Ordering::Acquire) + inflight
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        sent.fetch_add(1, Ordering::AcqRel);
                        match t {
                            0 => c.publish("svc.one", body(t, i)).await.unwrap(),
                            1 => c.publish("svc.two", body(t, i)).await.unwrap(),
                            _ => c
                                .publish_with_headers("svc.one", &hdr, body(t, i))
                                .await
                                .unwrap(),
                        }
                    }
                    c.flush().await.unwrap();
                    c
                }));
            }
            let mut next = [0u32; 3];
            let mut take = |m: sockbus_client::Message| {
                let p = m.payload.as_ref();
                let t = *p.last().expect("a payload") as usize;
                assert!(t < 3, "a payload with no sender's tag: {} bytes", p.len());
                let i = next[t];
                let want = body(t as u32, i);
                if p != want.as_slice() {
                    let seq = u32::from_le_bytes(p[..4].try_into().unwrap());
                    panic!(
                        "publisher {t}: message {i} expected ({} bytes), got {} bytes numbered {seq}",
                        want.len(),
                        p.len()
                    );
                }
                next[t] += 1;
                got.fetch_add(1, Ordering::AcqRel);
            };
            let (mut got_one, mut got_two) = (0u32, 0u32);
            while got_one < 2 * n || got_two < n {
                tokio::select! {
                    m = recv(&mut one), if got_one < 2 * n => { got_one += 1; take(m) }
                    m = recv(&mut two), if got_two < n => { got_two += 1; take(m) }
                }
                if nap > 0 && (got_one + got_two) % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(nap)).await;
                }
            }
            assert_eq!(next, [n, n, n]);
            assert_eq!((one.dropped(), two.dropped()), (0, 0));
            for t in tasks {
                t.await.unwrap();
            }
            let d = b.direct() - from;
            eprintln!(
                "{inflight} in flight: {d} of {} messages went direct",
                3 * n
            );
            if nap == 0 {
                assert!(d >= u64::from(n), "only {d} messages went direct");
            }
            assert!(
                d <= 2 * u64::from(n),
                "{d}: a message with headers went direct"
            );
        }
    }
}
