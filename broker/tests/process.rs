//! The `sockbus-broker` binary as an operator runs it: configuration errors,
//! SIGTERM draining, and memory that stays bounded under a stalled reader.

mod common;
mod ports;

use ports::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Raw;
use sockbus_protocol::{frame, Frame};

struct Broker {
    child: Child,
    url: String,
    addr: std::net::SocketAddr,
}

impl Broker {
    async fn spawn(extra: &[&str]) -> Broker {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args(["--listen", &addr.to_string(), "--accel", "off"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn broker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "broker did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Broker {
            child,
            url: format!("sockbus://{addr}"),
            addr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "broker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bad_configuration_exits_with_one_clear_line() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        err
    };
    assert!(run(&["--max-payload", "0"]).contains("--max-payload"));
    assert!(run(&["--listen", "nowhere"]).contains("--listen"));
    assert!(run(&["--config", "/nonexistent/sockbus.toml"]).contains("cannot read config file"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "max-payload = \"12 parsecs\"\n").unwrap();
    assert!(run(&["--config", f.to_str().unwrap()]).contains("invalid config file"));
    assert!(run(&["--cluster-secret-file", "/nonexistent/secret"])
        .contains("--cluster-secret-file /nonexistent/secret"));
    assert!(run(&["--cluster-secret", " "]).contains("--cluster-secret is empty"));
    let empty = dir.path().join("empty-secret");
    std::fs::write(&empty, "\n").unwrap();
    assert!(run(&["--cluster-secret-file", empty.to_str().unwrap()]).contains("is empty"));
    // Secure by default: no users, a non-loopback address, no --allow-anonymous.
    let e = run(&["--listen", "0.0.0.0:0", "--http", "off"]);
    assert!(
        e.contains("not a loopback address") && e.contains("--allow-anonymous"),
        "{e}"
    );
    std::fs::write(
        &f,
        "[[users]]\nname = \"a\"\npassword = \"x\"\n[[users]]\nname = \"a\"\ntoken = \"y\"\n",
    )
    .unwrap();
    assert!(run(&["--config", f.to_str().unwrap()]).contains("configured twice"));
}

#[tokio::test]
async fn settings_come_from_environment_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("b.toml");
    let port = free_port();
    std::fs::write(
        &f,
        format!("listen = \"127.0.0.1:{port}\"\nmax-payload = \"2KiB\"\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .env("SOCKBUS_CONFIG", &f)
        .env("SOCKBUS_MAX_PAYLOAD", "3000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("sockbus://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        if let Ok(c) = sockbus_client::connect(&url).await {
            break c;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(c.max_payload(), 3000, "environment wins over the file");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn sigterm_drains_queued_messages_and_exits_zero() {
    let mut b = Broker::spawn(&[]).await;
    let sub_c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = sub_c.subscribe("drain.>").await.unwrap();
    sub_c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    const N: u32 = 20_000;
    for i in 0..N {
        p.publish("drain.x", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    // Everything is accepted; stop the broker before the subscriber read it all.
    b.sigterm();
    let mut got = 0u32;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        assert_eq!(m.payload.as_ref(), got.to_le_bytes());
        got += 1;
        if got == N {
            break;
        }
    }
    assert_eq!(got, N, "every accepted message was delivered before exit");
    let st = b.wait_exit(Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "SIGTERM exits 0");
}

#[tokio::test]
async fn broker_memory_stays_bounded_when_a_subscriber_stops_reading() {
    let b = Broker::spawn(&["--max-pending", "16MiB"]).await;
    let mut stalled = Raw::connect(b.addr).await;
    stalled
        .send_frame(Frame::Sub {
            sid: 1,
            subject: "mem".into(),
            queue: None,
        })
        .await;
    let p = sockbus_client::connect(&b.url).await.unwrap();
    let c = sockbus_client::connect(&b.url).await.unwrap();
    c.flush().await.unwrap();
    let base = b.status_kib("VmRSS:");
    let payload = vec![7u8; 4096];
    // 256 MiB published at a subscriber that reads nothing.
    for i in 0..65_536 {
        p.publish("mem", &payload).await.unwrap();
        if i % 4096 == 0 {
            p.flush().await.unwrap();
        }
    }
    p.flush().await.unwrap();
    let peak = b.status_kib("VmHWM:");
    assert!(
        peak < base + 96 * 1024,
        "broker peak RSS {peak} KiB grew more than 96 MiB over {base} KiB with a 16 MiB budget"
    );
    assert!(
        stalled.closed().await,
        "stalled subscriber was disconnected"
    );
}

/// Sends SUBs for sids `sids` (subjects `mem.<sid>`, distinct literals) and
/// waits until the broker has handled them all.
async fn subscribe_all(raw: &mut Raw, sids: std::ops::Range<u32>) {
    let mut b = BytesMut::new();
    for sid in sids {
        frame::encode_sub(&mut b, sid, &format!("mem.{sid}"), None).unwrap();
        if b.len() >= 64 * 1024 {
            raw.send(&b).await;
            b.clear();
        }
    }
    raw.send(&b).await;
    handled(raw).await;
}

async fn unsubscribe_all(raw: &mut Raw, sids: std::ops::Range<u32>) {
    let mut b = BytesMut::new();
    for sid in sids {
        frame::encode_unsub(&mut b, sid, 0);
        if b.len() >= 64 * 1024 {
            raw.send(&b).await;
            b.clear();
        }
    }
    raw.send(&b).await;
    handled(raw).await;
}

/// Waits for the PONG to a PING sent after everything else.
async fn handled(raw: &mut Raw) {
    raw.send_frame(Frame::Ping(7)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match raw.next().await {
            Some(Frame::Pong(7)) => return,
            Some(Frame::Err { code, text }) => panic!("broker refused: ERR {code} {text}"),
            _ => assert!(Instant::now() < deadline, "no PONG"),
        }
    }
}

/// Waits up to 5 s for the broker's RSS to come back to `limit` KiB; returns the last reading.
async fn rss_back_to(b: &Broker, limit: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rss = b.status_kib("VmRSS:");
        if rss <= limit || Instant::now() >= deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_of_many_subscriptions_is_given_back_when_they_end() {
    const N: u32 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::spawn(&[
        "--max-subscriptions",
        "0",
        "--http",
        "off",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    // What stays after the first connection and release (runtime, buffers,
    // the trimming thread) is part of the base.
    let mut warm = Raw::connect(b.addr).await;
    subscribe_all(&mut warm, 0..5_000).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = b.status_kib("VmRSS:");
    // Within 10 %, as an operator would judge it; the floor covers a small
    // base (a few pages of thread stacks and allocator bookkeeping).
    let limit = base + (base / 10).max(1024);

    // A connection with N subscriptions closes.
    let mut raw = Raw::connect(b.addr).await;
    subscribe_all(&mut raw, 0..N).await;
    let full = b.status_kib("VmRSS:");
    assert!(
        full > base + 20 * 1024,
        "{N} subscriptions should take memory: {full} KiB held vs {base} KiB before"
    );
    drop(raw);
    let after_close = rss_back_to(&b, limit).await;
    assert!(
        after_close <= limit,
        "RSS {after_close} KiB after the connection with {N} subscriptions closed; \
         {base} KiB before, {full} KiB with them"
    );

    // N subscriptions come and go by UNSUB on a connection that stays.
    let mut raw = Raw::connect(b.addr).await;
    subscribe_all(&mut raw, 0..N).await;
    unsubscribe_all(&mut raw, 0..N).await;
    let after_unsub = rss_back_to(&b, limit).await;
    assert!(
        after_unsub <= limit,
        "RSS {after_unsub} KiB after {N} UNSUBs; {base} KiB before"
    );
    // That connection is still fine.
    subscribe_all(&mut raw, 0..10).await;
}

/// A raw TCP client that sends CONNECT and then PINGs as fast as the
/// socket takes them, never reading and never granting credit, until the
/// broker closes the connection or `stop` is set. Returns the bytes it sent
/// and whether the broker closed it.
fn ping_flood(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, bool)> {
    use std::io::Write;
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut b = bytes::BytesMut::new();
        sockbus_protocol::frame::encode_connect(&mut b, 0, 0, "flood", b"").unwrap();
        s.write_all(&b).unwrap();
        let mut pings = bytes::BytesMut::new();
        for i in 0..4096 {
            sockbus_protocol::frame::encode_ping(&mut pings, i);
        }
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match s.write(&pings) {
                Ok(n) => sent += n,
                Err(_) => return (sent, true),
            }
        }
        (sent, false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_is_cut_off_while_others_are_served() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Default budget (64 MiB) and write timeout.
    let b = Broker::spawn(&["--http", &http.to_string()]).await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("rt").await.unwrap();
    c.flush().await.unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flood = ping_flood(b.addr, stop.clone());
    const LIMIT_KIB: u64 = 128 << 10;
    // Typically a few seconds; generous for a loaded machine (a debug
    // broker answers every PING until the budget is full).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round_trips = 0u32;
    // Round trips through the broker while the flood runs; the flood is
    // stopped early if the broker's memory passes the limit.
    while !flood.is_finished() {
        if Instant::now() > deadline || b.status_kib("VmRSS:") > LIMIT_KIB {
            stop.store(true, Ordering::Relaxed);
            break;
        }
        c.publish("rt", round_trips.to_le_bytes()).await.unwrap();
        let m = common::recv(&mut sub).await;
        assert_eq!(m.payload.as_ref(), round_trips.to_le_bytes());
        round_trips += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sent, closed) = flood.join().unwrap();
    let peak = b.status_kib("VmHWM:");
    assert!(
        peak < LIMIT_KIB,
        "broker peak RSS {} MiB under a PING flood of {} MiB",
        peak >> 10,
        sent >> 20
    );
    assert!(closed, "the broker closed the flooding connection");
    // The verdict is counted just after the outbox closes, and the flood's
    // socket can see the close first: poll (bounded) for the count.
    let counted = Instant::now() + Duration::from_secs(10);
    while metric(http, "sockbus_slow_consumers_total") < 1.0 && Instant::now() < counted {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(http, "sockbus_slow_consumers_total"), 1.0);
    // Others are still served after it.
    c.publish("rt", b"after").await.unwrap();
    assert_eq!(common::recv(&mut sub).await.payload.as_ref(), b"after");
    eprintln!(
        "flood sent {} MiB; broker peak RSS {} MiB; {round_trips} round trips meanwhile",
        sent >> 20,
        peak >> 10
    );
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[0] + f[1]) as f64 / hz
}

fn metric(http: std::net::SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

#[tokio::test]
async fn busy_polling_broker_serves_every_message_and_sleeps_when_idle() {
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b = Broker::spawn(&["--busy-poll", "200us", "--http", &http.to_string()]).await;
    let _poll = sockbus_client::busy_poll(Duration::from_micros(200));
    assert_eq!(metric(http, "sockbus_busy_poll_window_seconds"), 0.0002);
    let polls_before = metric(http, "sockbus_busy_poll_polls_total");

    // Request/reply: every request gets its own answer.
    let svc = sockbus_client::connect(&b.url).await.unwrap();
    let replier = common::echo_replier(svc, "bp.echo").await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0u32..5_000 {
        let r = c.request("bp.echo", i.to_le_bytes()).await.unwrap();
        assert_eq!(r.payload.as_ref(), i.to_le_bytes());
    }
    // Pub/sub: all of them, in order.
    let mut sub = c.subscribe("bp.data").await.unwrap();
    c.flush().await.unwrap();
    let p = sockbus_client::connect(&b.url).await.unwrap();
    const N: u32 = 50_000;
    for i in 0..N {
        p.publish("bp.data", i.to_le_bytes()).await.unwrap();
    }
    p.flush().await.unwrap();
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("message within 10s")
            .unwrap();
        assert_eq!(m.payload.as_ref(), i.to_le_bytes());
    }
    replier.abort();
    assert!(
        metric(http, "sockbus_busy_poll_polls_total") > polls_before,
        "the broker polled while traffic flowed"
    );

    // Idle: the poller goes to sleep, so the broker stops using CPU.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu0 = cpu_seconds(b.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_cpu = cpu_seconds(b.pid()) - cpu0;
    assert_eq!(metric(http, "sockbus_busy_poll_sleeping"), 1.0);
    assert!(
        idle_cpu < 0.25,
        "an idle busy-polling broker used {idle_cpu:.2} s of CPU in 1 s"
    );
}
