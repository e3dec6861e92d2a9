//! Crash safety of durable streams with the real broker binary: kill -9
//! under load, a torn tail, a flipped byte, a full disk.

mod common;
mod ports;

use ports::free_port;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use sockbus_client::streams::{ConsumerConfig, StreamConfig};
use sockbus_client::{Client, ConnectOptions, Headers};

struct Proc {
    child: Child,
}

impl Proc {
    async fn start(dir: &Path, port: u16) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--accel",
                "off",
                "--node-id",
                "crash",
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the broker");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "broker did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Proc { child }
    }

    fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(port: u16) -> Client {
    ConnectOptions::new()
        .request_timeout(Duration::from_secs(2))
        .max_reconnect_delay(Duration::from_millis(50))
        .connect(&format!("sockbus://127.0.0.1:{port}"))
        .await
        .unwrap()
}

/// Everything in the stream, in order, read with an ephemeral no-ack consumer.
async fn read_stream(c: &Client, stream: &str) -> Vec<(u64, String)> {
    let total = c.stream_info(stream).await.unwrap().state.messages as usize;
    let mut k = c
        .consumer(stream, ConsumerConfig::ephemeral().no_ack(true).batch(512))
        .await
        .unwrap();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let m = k
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("read back stalled at {} of {total}", out.len()));
        out.push((m.seq, String::from_utf8_lossy(m.payload()).into_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_twenty_times_loses_no_acked_message_and_consumers_resume() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Some(Proc::start(dir.path(), port).await);
    let c = client(port).await;
    let mut cfg = StreamConfig::new("CRASH", ["crash.>"]);
    cfg.segment_bytes = Some(64 * 1024);
    c.stream_add(&cfg).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // (publisher, i) -> acked seq
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let mut pubs = Vec::new();
    for t in 0..4 {
        let (stop, acked) = (stop.clone(), acked.clone());
        let c = client(port).await;
        pubs.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!("p{t}-{i:06}");
                let mut h = Headers::new();
                h.insert("Msg-Id", payload.clone());
                // Retry until acked: the Msg-Id keeps a retried message single.
                loop {
                    match c
                        .publish_durable_with_headers(&format!("crash.{t}"), &h, &payload)
                        .await
                    {
                        Ok(a) => {
                            acked.lock().unwrap().insert(payload.clone(), a.seq);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                i += 1;
            }
        }));
    }
    // A durable consumer acking each message and waiting for each ack.
    let consumed: Arc<Mutex<Vec<u64>>> = Default::default();
    let cons = {
        let (stop, consumed) = (stop.clone(), consumed.clone());
        let c = client(port).await;
        tokio::spawn(async move {
            let cfg = ConsumerConfig::durable("worker")
                .batch(1)
                .pull_expires(Duration::from_millis(300));
            let mut k = loop {
                match c.consumer("CRASH", cfg.clone()).await {
                    Ok(k) => break k,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            // `confirmed`: every seq up to here is acked and the broker said so.
            let mut confirmed = 0u64;
            let mut maybe: Option<u64> = None;
            loop {
                let m = match k.next_timeout(Duration::from_millis(500)).await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        if stop.load(Ordering::Relaxed) {
                            return confirmed;
                        }
                        continue;
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let ok = m.seq == confirmed + 1
                    || (maybe == Some(confirmed + 1) && m.seq == confirmed + 2);
                assert!(
                    ok,
                    "consumer got seq {} after confirming {confirmed} (maybe {maybe:?})",
                    m.seq
                );
                if m.seq == confirmed + 2 {
                    confirmed += 1;
                    consumed.lock().unwrap().push(confirmed);
                }
                match m.ack_sync().await {
                    Ok(()) => {
                        confirmed = m.seq;
                        maybe = None;
                        consumed.lock().unwrap().push(m.seq);
                    }
                    Err(_) => maybe = Some(m.seq),
                }
            }
        })
    };

    let mut rng = rand::thread_rng();
    for cycle in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..600))).await;
        broker.take().unwrap().kill9();
        let before = acked.lock().unwrap().len();
        broker = Some(Proc::start(dir.path(), port).await);
        let _ = (cycle, before);
    }
    // Let everybody catch up, then stop the load.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let c = client(port).await;
    let last = c.stream_info("CRASH").await.unwrap().state.last_seq;
    // The backlog depends on how fast the publishers got through the
    // restarts (one ack round trip per message for the consumer): what must
    // hold is that the consumer keeps making progress until it has all.
    let mut seen = 0;
    let mut deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now_at = consumed.lock().unwrap().last().copied().unwrap_or(0);
        if now_at >= last {
            break;
        }
        if now_at > seen {
            seen = now_at;
            deadline = Instant::now() + Duration::from_secs(10);
        }
        if Instant::now() > deadline {
            let info = c.consumer_info("CRASH", "worker").await;
            panic!("consumer stalled for 10 s at {seen} of {last}; {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cons.await.unwrap();

    let stored = read_stream(&c, "CRASH").await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 200, "too little load: {} acked", acked.len());
    // In order, no gaps, nothing twice.
    for (i, (seq, _)) in stored.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
    }
    let mut seen = HashSet::new();
    let mut per_pub: HashMap<String, String> = HashMap::new();
    for (_, p) in &stored {
        assert!(seen.insert(p.clone()), "{p} stored twice");
        let (t, _) = p.split_once('-').unwrap();
        if let Some(prev) = per_pub.insert(t.to_string(), p.clone()) {
            assert!(prev < *p, "{prev} stored after {p}");
        }
    }
    // Every acked message is there, at the sequence its ack named.
    let by_payload: HashMap<&str, u64> = stored.iter().map(|(s, p)| (p.as_str(), *s)).collect();
    for (p, seq) in &acked {
        assert_eq!(by_payload.get(p.as_str()), Some(seq), "acked {p} at {seq}");
    }
    // The consumer saw every message exactly once as confirmed, in order.
    let consumed = consumed.lock().unwrap().clone();
    assert_eq!(consumed, (1..=last).collect::<Vec<_>>());
    drop(broker);
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_record_at_the_tail_is_cut_at_the_last_valid_crc() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    c.stream_add(&StreamConfig::new("T", ["t"])).await.unwrap();
    for i in 1..=10 {
        c.publish_durable("t", format!("m{i}")).await.unwrap();
    }
    b.kill9();
    let seg = segments(&dir.path().join("streams/T")).pop().unwrap();
    // The active segment is zero-filled ahead of the data (fsync = always).
    let bytes = std::fs::read(&seg).unwrap();
    let len = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    // Half a record, as a crash in the middle of a write leaves it.
    let mut torn = bytes[len as usize - 32..len as usize - 12].to_vec();
    torn[0] = 40;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&torn, len).unwrap();
    drop(f);
    let _b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let info = c.stream_info("T").await.unwrap().state;
    assert_eq!(
        (info.messages, info.last_seq, info.damaged_records),
        (10, 10, 0)
    );
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "torn bytes truncated"
    );
    assert_eq!(c.publish_durable("t", "m11").await.unwrap().seq, 11);
    let all = read_stream(&c, "T").await;
    assert_eq!(
        all.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        (1..=11).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

fn flip_byte_of(seg: &Path, needle: &str) {
    let mut bytes = std::fs::read(seg).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("{needle} not in {}", seg.display()));
    bytes[at + 2] ^= 0x01;
    std::fs::write(seg, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_detected_and_reported_and_every_other_message_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let mut cfg = StreamConfig::new("F", ["f"]);
    cfg.segment_bytes = Some(4096);
    c.stream_add(&cfg).await.unwrap();
    for i in 1..=200 {
        c.publish_durable("f", format!("msg-{i:04}-{}", "x".repeat(60)))
            .await
            .unwrap();
    }
    b.kill9();
    let segs = segments(&dir.path().join("streams/F"));
    assert!(segs.len() > 3);
    // One in a sealed segment (found by background verification or on read),
    // one in the active segment (found by the start-up scan).
    let sealed = segs
        .iter()
        .find(|s| {
            std::fs::read(s)
                .unwrap()
                .windows(8)
                .any(|w| w == b"msg-0050")
        })
        .unwrap();
    flip_byte_of(sealed, "msg-0050");
    flip_byte_of(segs.last().unwrap(), "msg-0199");
    let _b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let mut info = c.stream_info("F").await.unwrap().state;
    let deadline = Instant::now() + Duration::from_secs(10);
    while info.damaged_records < 2 {
        assert!(Instant::now() < deadline, "damage not reported: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = c.stream_info("F").await.unwrap().state;
    }
    assert_eq!(info.damaged_records, 2);
    assert_eq!(info.last_seq, 200);
    let got = read_stream(&c, "F").await;
    let seqs: Vec<u64> = got.iter().map(|x| x.0).collect();
    let want: Vec<u64> = (1..=200).filter(|s| *s != 50 && *s != 199).collect();
    assert_eq!(seqs, want);
    assert!(got
        .iter()
        .all(|(s, p)| p.starts_with(&format!("msg-{s:04}-"))));
    assert_eq!(c.publish_durable("f", "after").await.unwrap().seq, 201);
}

/// A sealed segment truncated in the middle (a minority's disk damage in
/// the fault harness) loses the records after the cut: the broker reports
/// exactly those sequences (they lie between the segment's last valid record
/// and the next segment's base), serves every other message, and
/// `sockbus-broker verify-stream` finds the same offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_segment_cut_short_reports_exactly_the_lost_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let mut cfg = StreamConfig::new("S", ["s"]);
    cfg.segment_bytes = Some(4096);
    c.stream_add(&cfg).await.unwrap();
    for i in 1..=200 {
        c.publish_durable("s", format!("msg-{i:04}-{}", "x".repeat(60)))
            .await
            .unwrap();
    }
    b.kill9();
    let sdir = dir.path().join("streams/S");
    let segs = segments(&sdir);
    let i = segs
        .iter()
        .position(|s| {
            std::fs::read(s)
                .unwrap()
                .windows(8)
                .any(|w| w == b"msg-0050")
        })
        .unwrap();
    assert!(i + 1 < segs.len(), "msg-0050 is in a sealed segment");
    let next_base: u64 = segs[i + 1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(next_base > 51, "the segment holds records after 50");
    let bytes = std::fs::read(&segs[i]).unwrap();
    let at = bytes.windows(8).position(|w| w == b"msg-0050").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[i])
        .unwrap();
    f.set_len(at as u64).unwrap();
    drop(f);
    let lost: Vec<u64> = (50..next_base).collect();

    let out = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .arg("verify-stream")
        .arg(&sdir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "verify-stream exits 3 on damage"
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["lost_seqs"], lost.len() as u64, "{summary}");
    assert_eq!(summary["records"], 200 - lost.len() as u64, "{summary}");

    let _b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let info = c.stream_info("S").await.unwrap().state;
    assert_eq!(
        (info.damaged_records, info.last_seq),
        (lost.len() as u64, 200),
        "{info:?}"
    );
    let got = read_stream(&c, "S").await;
    let want: Vec<u64> = (1..=200).filter(|s| !lost.contains(s)).collect();
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want);
    assert!(got
        .iter()
        .all(|(s, p)| p.starts_with(&format!("msg-{s:04}-"))));
    assert_eq!(c.publish_durable("s", "after").await.unwrap().seq, 201);
}

/// A flipped byte in the last record of a sealed segment whose index is
/// intact: the segment is trusted at start-up, so the damage is found by the
/// background verification (or a read). No valid record follows it in its
/// segment, so only the next segment's base tells what was lost; it is
/// reported and counted like any other damaged record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_last_record_of_a_sealed_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let mut cfg = StreamConfig::new("L", ["l"]);
    cfg.segment_bytes = Some(4096);
    c.stream_add(&cfg).await.unwrap();
    for i in 1..=200 {
        c.publish_durable("l", format!("msg-{i:04}-{}", "x".repeat(60)))
            .await
            .unwrap();
    }
    b.kill9();
    let segs = segments(&dir.path().join("streams/L"));
    let next_base: u64 = segs[2]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let victim = next_base - 1;
    flip_byte_of(&segs[1], &format!("msg-{victim:04}"));
    let _b = Proc::start(dir.path(), port).await;
    let c = client(port).await;
    let mut info = c.stream_info("L").await.unwrap().state;
    let deadline = Instant::now() + Duration::from_secs(10);
    while info.damaged_records < 1 {
        assert!(Instant::now() < deadline, "damage not reported: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = c.stream_info("L").await.unwrap().state;
    }
    assert_eq!((info.damaged_records, info.last_seq), (1, 200));
    let got = read_stream(&c, "L").await;
    let want: Vec<u64> = (1..=200).filter(|s| *s != victim).collect();
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_publishes_clearly_corrupts_nothing_and_recovers_when_space_returns() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let mnt = tempfile::tempdir().unwrap();
    let why = if !is_root() {
        Some("not root: mounting a small tmpfs needs root".to_string())
    } else {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(mnt.path())
            .output();
        match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run mount: {e}")),
        }
    };
    if let Some(why) = why {
        assert!(!ci, "CI=true: the full-disk test must run, but {why}");
        eprintln!("skipping the full-disk test: {why}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let data = mnt.path().join("data");
    let filler = mnt.path().join("filler");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(&filler, vec![0u8; 512 * 1024]).unwrap();

    let port = free_port();
    let b = Proc::start(&data, port).await;
    let c = client(port).await;
    let mut cfg = StreamConfig::new("DISK", ["disk"]);
    cfg.segment_bytes = Some(256 * 1024);
    c.stream_add(&cfg).await.unwrap();
    let payload = |i: u64| format!("{i:08}-{}", "d".repeat(2000));
    let mut acked = 0u64;
    let err = loop {
        match c.publish_durable("disk", payload(acked + 1)).await {
            Ok(a) => {
                assert_eq!(a.seq, acked + 1);
                acked += 1;
            }
            Err(e) => break e.to_string(),
        }
        assert!(acked < 10_000, "the disk never filled");
    };
    assert!(err.contains("No space left on device"), "{err}");
    assert!(acked > 100, "{acked}");
    // Still full: still a clear error, nothing stored.
    assert!(c.publish_durable("disk", payload(acked + 1)).await.is_err());
    assert_eq!(c.stream_info("DISK").await.unwrap().state.last_seq, acked);
    // Space comes back: the stream works again, sequences continue.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        c.publish_durable("disk", payload(acked + 1))
            .await
            .unwrap()
            .seq,
        acked + 1
    );
    acked += 1;
    // And everything acked is intact after a crash.
    b.kill9();
    let _b = Proc::start(&data, port).await;
    let c = client(port).await;
    let info = c.stream_info("DISK").await.unwrap().state;
    assert_eq!((info.messages, info.damaged_records), (acked, 0));
    let got = read_stream(&c, "DISK").await;
    for (i, (seq, p)) in got.iter().enumerate() {
        assert_eq!(
            (*seq, p.as_str()),
            (i as u64 + 1, payload(i as u64 + 1).as_str())
        );
    }
}
