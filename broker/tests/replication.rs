//! Replicated streams (R3) across three broker processes in cluster mode on
//! loopback: publishes through a follower, kill -9 of the leader mid-stream,
//! restarts, a replica that lost its data dir, garbage on the Raft channel,
//! a SIGSTOPped follower. Every acked message must be on every node exactly
//! once, in one order. A durable consumer resumes through another node
//! after kill -9 of the leader with no acked message again and none skipped.
//!
//! Set SOCKBUS_TEST_LOGS=dir to keep each broker's log there.

mod ports;

use ports::free_port;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sockbus_client::streams::{ConsumerConfig, StreamConfig, StreamInfo};
use sockbus_client::{Client, ConnectOptions, Headers};

const SECRET: &str = "replication-test-secret";

struct Node {
    name: String,
    port: u16,
    cport: u16,
    /// The NATS front end's port.
    nport: u16,
    /// HTTP (`/metrics`).
    hport: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// `SOCKBUS_RAFT_SNAPSHOT_EVERY` for this broker, when set.
    snap_every: Option<u64>,
}

struct Cluster {
    nodes: Vec<Node>,
    _tmp: tempfile::TempDir,
}

/// Pids of the brokers this test process runs, to tell a pause from a hang.
static BROKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// One of this test's brokers is stopped (SIGSTOP): on a shared machine a
/// benchmark may pause other processes for minutes.
fn a_broker_is_stopped() -> bool {
    let pids = BROKERS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    pids.iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}

/// A time limit that does not run while one of the test's brokers is
/// stopped, nor across a gap of more than 5 s between two checks (this
/// process was paused): a pause is never taken for a hang.
struct Deadline {
    left: Duration,
    last: Instant,
}

impl Deadline {
    fn after(d: Duration) -> Deadline {
        Deadline {
            left: d,
            last: Instant::now(),
        }
    }

    fn passed(&mut self) -> bool {
        let now = Instant::now();
        let dt = now - self.last;
        self.last = now;
        if dt < Duration::from_secs(5) && !a_broker_is_stopped() {
            self.left = self.left.saturating_sub(dt);
        }
        self.left.is_zero()
    }
}

impl Node {
    fn spawn(&mut self, peers: &[String]) {
        let log = match std::env::var_os("SOCKBUS_TEST_LOGS") {
            Some(d) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(&d).join(format!("{}-{}.log", self.name, self.port)))
                    .unwrap();
                Stdio::from(f)
            }
            None => Stdio::null(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--cluster",
                &format!("127.0.0.1:{}", self.cport),
                "--peers",
                &peers.join(","),
                "--cluster-secret",
                SECRET,
                "--nats",
                &format!("127.0.0.1:{}", self.nport),
                "--http",
                &format!("127.0.0.1:{}", self.hport),
                "--accel",
                "off",
                "--node-id",
                &self.name,
            ])
            .arg("--data-dir")
            .arg(&self.dir)
            .env(
                "RUST_LOG",
                std::env::var("SOCKBUS_TEST_RUST_LOG").unwrap_or("warn".into()),
            )
            .envs(
                self.snap_every
                    .map(|n| {
                        [
                            ("SOCKBUS_RAFT_SNAPSHOT_EVERY", n.to_string()),
                            ("SOCKBUS_RAFT_SEGMENT_BYTES", SEGMENT_BYTES.to_string()),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the broker");
        BROKERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        self.child = Some(child);
    }

    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("broker {} exited at start: {status}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "broker {} did not start",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Something answered on the port: it must be this broker, still running.
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "broker {} exited at start ({status}) while port {} answered",
                self.name, self.port
            );
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            BROKERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|p| *p != c.id());
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, None).await
    }

    /// `snap_every`: a snapshot (and Raft log purge) every that many entries.
    async fn start_with(n: usize, snap_every: Option<u64>) -> Cluster {
        Cluster::start_in(n, snap_every, None).await
    }

    /// `first_dir`: the first node's data directory (else one in the
    /// cluster's temporary directory, like the others').
    async fn start_in(n: usize, snap_every: Option<u64>, first_dir: Option<PathBuf>) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                port: free_port(),
                cport: free_port(),
                nport: free_port(),
                hport: free_port(),
                dir: tmp.path().join(format!("n{}", i + 1)),
                child: None,
                snap_every,
            })
            .collect();
        if let Some(d) = first_dir {
            nodes[0].dir = d;
        }
        let mut c = Cluster {
            nodes: Vec::new(),
            _tmp: tmp,
        };
        let peers: Vec<String> = nodes
            .iter()
            .map(|x| format!("127.0.0.1:{}", x.cport))
            .collect();
        for x in &mut nodes {
            x.spawn(&peers);
        }
        for x in &mut nodes {
            x.wait_up().await;
        }
        c.nodes = nodes;
        c
    }

    fn peers(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|x| format!("127.0.0.1:{}", x.cport))
            .collect()
    }

    async fn restart(&mut self, i: usize) {
        let peers = self.peers();
        self.nodes[i].spawn(&peers);
        self.nodes[i].wait_up().await;
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }
}

async fn client(port: u16) -> Client {
    ConnectOptions::new()
        .request_timeout(Duration::from_secs(5))
        .max_reconnect_delay(Duration::from_millis(50))
        .connect(&format!("sockbus://127.0.0.1:{port}"))
        .await
        .unwrap()
}

/// Creates the stream once the cluster's routes are up (placement needs
/// every node seen).
async fn add_replicated(c: &Client, cfg: &StreamConfig) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.stream_add(cfg).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "stream add kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Polls `port`'s stream info until `f` holds.
async fn wait_info(
    port: u16,
    stream: &str,
    what: &str,
    f: impl Fn(&StreamInfo) -> bool,
) -> StreamInfo {
    let mut deadline = Deadline::after(Duration::from_secs(60));
    let mut last = None;
    loop {
        if let Ok(c) = tokio::time::timeout(Duration::from_secs(5), client(port)).await {
            if let Ok(i) = c.stream_info(stream).await {
                if f(&i) {
                    return i;
                }
                last = Some(i);
            }
        }
        assert!(
            !deadline.passed(),
            "{what}: not reached on port {port}; last info {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leader(port: u16, stream: &str) -> String {
    wait_info(port, stream, "a leader", |i| {
        i.cluster.as_ref().is_some_and(|c| c.leader.is_some())
    })
    .await
    .cluster
    .unwrap()
    .leader
    .unwrap()
}

/// Everything in the node's copy of the stream, in order.
async fn read_stream(port: u16, stream: &str) -> Vec<(u64, String)> {
    let c = client(port).await;
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

/// Publishes `payload` on `subject` with `Msg-Id: id`, retrying until
/// acked (as a publisher does across a failover or a paused broker): the
/// stream stores it once. Its sequence.
async fn publish_acked(c: &Client, subject: &str, id: &str, payload: &str) -> u64 {
    let mut h = Headers::new();
    h.insert("Msg-Id", id.to_string());
    let mut deadline = Deadline::after(Duration::from_secs(120));
    loop {
        match c.publish_durable_with_headers(subject, &h, payload).await {
            Ok(a) => return a.seq,
            Err(e) => {
                assert!(!deadline.passed(), "{id} not acked within 120 s: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    }
}

/// Publishes `p{t}-{i}` with Msg-Id until `stop`, retrying each until acked.
fn publishers(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<String, u64>>>,
    prefix: &'static str,
) -> Vec<tokio::task::JoinHandle<()>> {
    ports
        .into_iter()
        .enumerate()
        .map(|(t, port)| {
            let (stop, acked) = (stop.clone(), acked.clone());
            tokio::spawn(async move {
                let c = client(port).await;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let payload = format!("{prefix}{t}-{i:06}");
                    let mut h = Headers::new();
                    h.insert("Msg-Id", payload.clone());
                    let mut deadline = Deadline::after(Duration::from_secs(60));
                    loop {
                        match c
                            .publish_durable_with_headers(&format!("repl.{t}"), &h, &payload)
                            .await
                        {
                            Ok(a) => {
                                acked.lock().unwrap().insert(payload.clone(), a.seq);
                                break;
                            }
                            Err(e) => {
                                assert!(!deadline.passed(), "{payload} not acked within 60 s: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect()
}

/// Every node holds every acked message exactly once, at the sequence it
/// was acked with, and all nodes hold the same sequence of messages.
async fn check_all(cl: &Cluster, stream: &str, acked: &HashMap<String, u64>) {
    let all: Vec<usize> = (0..cl.nodes.len()).collect();
    check_on(cl, &all, stream, acked).await
}

async fn check_on(cl: &Cluster, which: &[usize], stream: &str, acked: &HashMap<String, u64>) {
    let mut first: Option<Vec<(u64, String)>> = None;
    for n in which.iter().map(|&i| &cl.nodes[i]) {
        let want = acked.values().copied().max().unwrap_or(0);
        let what = format!("{}: caught up to acked seq {want}", n.name);
        wait_info(n.port, stream, &what, |i| i.state.last_seq >= want).await;
        let got = read_stream(n.port, stream).await;
        let mut seen = HashSet::new();
        for (_, p) in &got {
            assert!(seen.insert(p.clone()), "{}: {p} stored twice", n.name);
        }
        let at: HashMap<&str, u64> = got.iter().map(|(s, p)| (p.as_str(), *s)).collect();
        for (p, seq) in acked {
            assert_eq!(
                at.get(p.as_str()),
                Some(seq),
                "{}: acked {p} at {seq}",
                n.name
            );
        }
        // Each publisher's messages in the order it published them.
        let mut last: HashMap<&str, &str> = HashMap::new();
        for (_, p) in &got {
            let (who, _) = p.split_once('-').unwrap();
            if let Some(prev) = last.insert(who, p) {
                assert!(prev < p.as_str(), "{}: {prev} before {p}", n.name);
            }
        }
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got, "{} differs from {}", n.name, cl.nodes[0].name),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_survives_kill_9_of_its_leader_and_a_restart() {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("R3", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "R3").await;
    let li = cl.index(&leader_name);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let info = wait_info(cl.nodes[followers[0]].port, "R3", "three replicas", |i| {
        i.cluster.as_ref().is_some_and(|c| c.replicas.len() == 3)
    })
    .await;
    assert_eq!(info.config.replicas, Some(3));

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    // Publishers on both followers (forwarded to the leader).
    let ports: Vec<u16> = followers
        .iter()
        .flat_map(|&i| [cl.nodes[i].port, cl.nodes[i].port])
        .collect();
    let pubs = publishers(ports, stop.clone(), acked.clone(), "p");
    let until = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "publishing stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(300).await;
    cl.nodes[li].kill9();
    let killed_at = Instant::now();
    // A new leader among the followers.
    let new_leader = wait_info(cl.nodes[followers[0]].port, "R3", "a new leader", |i| {
        i.cluster
            .as_ref()
            .and_then(|c| c.leader.as_deref())
            .is_some_and(|l| l != leader_name)
    })
    .await;
    let took = killed_at.elapsed();
    eprintln!(
        "new leader {:?} after {took:?}",
        new_leader.cluster.unwrap().leader
    );
    let n = acked.lock().unwrap().len();
    until(n + 300).await;
    cl.restart(li).await;
    let n = acked.lock().unwrap().len();
    until(n + 200).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    check_all(&cl, "R3", &acked).await;
}

/// The route token a broker named `node` sends (cluster/auth.rs).
fn route_token(node: &str) -> String {
    use hmac::{Hmac, Mac};
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let nonce: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(format!("sockbus-route-v1\n{node}\n{ms}\n{nonce}").as_bytes());
    let tag: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1:{ms}:{nonce}:{tag}")
}

/// Opens a Raft channel to `cport` as a broker that knows the secret,
/// sends `garbage` and reports whether the node closed the connection.
async fn garbage_on_raft_channel(cport: u16, garbage: &[u8]) -> bool {
    use sockbus_protocol::frame::{encode_connect, CONNECT_RAFT, CONNECT_ROUTE};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", cport))
        .await
        .unwrap();
    let mut hello = bytes::BytesMut::new();
    encode_connect(
        &mut hello,
        CONNECT_ROUTE | CONNECT_RAFT,
        1 << 20,
        "intruder",
        route_token("intruder").as_bytes(),
    )
    .unwrap();
    s.write_all(&hello).await.unwrap();
    s.write_all(garbage).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_goes_on_past_a_stopped_follower_garbage_and_a_replica_that_lost_its_data() {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("R3B", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "R3B").await;
    let li = cl.index(&leader_name);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (f1, f2) = (followers[0], followers[1]);

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let pubs = publishers(
        vec![cl.nodes[li].port, cl.nodes[f1].port],
        stop.clone(),
        acked.clone(),
        "q",
    );
    let until = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "publishing stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(100).await;

    // A follower frozen: the other two are a quorum.
    cl.nodes[f2].signal(libc::SIGSTOP);
    let n = acked.lock().unwrap().len();
    until(n + 200).await;
    cl.nodes[f2].signal(libc::SIGCONT);

    // Garbage from a peer that knows the secret: a frame that does not
    // decode, and a frame length far over the limit. The node drops the
    // connection and the group carries on.
    for garbage in [
        &[8u8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8][..],
        &[0xff, 0xff, 0xff, 0xff, 0][..],
    ] {
        assert!(
            garbage_on_raft_channel(cl.nodes[li].cport, garbage).await,
            "the leader kept a Raft connection sending garbage"
        );
    }
    let n = acked.lock().unwrap().len();
    until(n + 100).await;

    // A replica loses its disk: restarted with an empty data dir, it gets
    // the stream again and catches up from the leader's log.
    cl.nodes[f2].kill9();
    std::fs::remove_dir_all(&cl.nodes[f2].dir).unwrap();
    let n = acked.lock().unwrap().len();
    until(n + 100).await;
    cl.restart(f2).await;
    let n = acked.lock().unwrap().len();
    until(n + 100).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    check_all(&cl, "R3B", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gone_for_good_is_replaced_by_another_node() {
    let mut cl = Cluster::start(4).await;
    let c = client(cl.nodes[0].port).await;
    // Placed on the creating node n1 and two others it has routes to.
    let mut cfg = StreamConfig::new("R3C", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    // n1 created it and initialised the group; wait for its leader.
    let leader_name = leader(cl.nodes[0].port, "R3C").await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let pubs = publishers(vec![cl.nodes[0].port], stop.clone(), acked.clone(), "r");
    let until = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "publishing stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(100).await;
    // A replica that is not the leader goes for good; the node that holds
    // no replica takes its place.
    let info = wait_info(cl.nodes[0].port, "R3C", "three replicas", |i| {
        i.cluster.as_ref().is_some_and(|c| c.replicas.len() == 3)
    })
    .await;
    let members: Vec<String> = info
        .cluster
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.name)
        .collect();
    let gone_name = members
        .iter()
        .find(|m| **m != leader_name && **m != "n1")
        .unwrap()
        .clone();
    let spare = cl
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| !members.contains(n))
        .unwrap();
    let gone = cl.index(&gone_name);
    cl.nodes[gone].kill9();
    std::fs::remove_dir_all(&cl.nodes[gone].dir).unwrap();
    let n = acked.lock().unwrap().len();
    until(n + 100).await;
    let li = cl.index(&leader(cl.nodes[0].port, "R3C").await);
    let admin = client(cl.nodes[li].port).await;
    let info = admin
        .stream_replace_peer("R3C", &gone_name, &spare)
        .await
        .unwrap();
    let names: Vec<String> = info
        .cluster
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert!(names.contains(&spare), "{names:?}");
    assert!(!names.contains(&gone_name), "{names:?}");
    let n = acked.lock().unwrap().len();
    until(n + 100).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let live: Vec<usize> = (0..4).filter(|&i| i != gone).collect();
    check_on(&cl, &live, "R3C", &acked).await;
}

/// JetStream clients (async-nats) create a stream with `num_replicas: 3`
/// through one node's NATS port; it is sockbus's R3 stream: publishes
/// through another node get PubAcks in order, its info there names a
/// leader and the other replicas, and a pull consumer on the third node
/// reads every message from that node's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_num_replicas_3_is_a_replicated_stream_on_every_node() {
    use async_nats::jetstream::{self, consumer, stream};
    let cl = Cluster::start(3).await;
    let js = |i: usize| {
        let port = cl.nodes[i].nport;
        async move {
            let nc = async_nats::ConnectOptions::new()
                .request_timeout(Some(Duration::from_secs(20)))
                .connect(format!("nats://127.0.0.1:{port}"))
                .await
                .unwrap();
            let mut c = jetstream::new(nc);
            c.set_timeout(Duration::from_secs(20));
            c
        }
    };
    let (js1, js2, js3) = (js(0).await, js(1).await, js(2).await);
    let cfg = stream::Config {
        name: "JR3".into(),
        subjects: vec!["jr3.>".into()],
        num_replicas: 3,
        ..Default::default()
    };
    // Placement needs every node seen over the routes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match js1.create_stream(cfg.clone()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "create kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Through another node: three copies, a leader, the two others listed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let mut s = js2.get_stream("JR3").await.unwrap();
        let info = s.info().await.unwrap().clone();
        if info.cluster.as_ref().is_some_and(|c| c.leader.is_some()) {
            break info;
        }
        assert!(Instant::now() < deadline, "no leader: {:?}", info.cluster);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(info.config.num_replicas, 3);
    let c = info.cluster.unwrap();
    let leader = c.leader.unwrap();
    let mut others: Vec<String> = c.replicas.iter().map(|p| p.name.clone()).collect();
    others.sort();
    let mut want: Vec<String> = cl
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != leader)
        .collect();
    want.sort();
    assert_eq!(others, want, "the replicas besides the leader {leader}");

    for i in 1..=100u64 {
        let ack = js2
            .publish(format!("jr3.{i}"), format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!((ack.stream.as_str(), ack.sequence), ("JR3", i));
    }
    wait_info(cl.nodes[2].port, "JR3", "node 3 has all 100", |i| {
        i.state.last_seq >= 100
    })
    .await;
    let c3: consumer::PullConsumer = js3
        .get_stream("JR3")
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 100 {
        let mut batch = c3
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let mut n = 0;
        while let Some(m) = futures_util::StreamExt::next(&mut batch).await {
            let m = m.unwrap();
            got.push(String::from_utf8_lossy(&m.payload).into_owned());
            m.ack().await.unwrap();
            n += 1;
        }
        assert!(n > 0, "fetch on node 3 stalled at {}", got.len());
    }
    let want: Vec<String> = (1..=100).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);

    // Two copies: sockbus keeps an odd number, and says so.
    let two = stream::Config {
        name: "JR2".into(),
        subjects: vec!["jr2.>".into()],
        num_replicas: 2,
        ..Default::default()
    };
    let e = js1.create_stream(two).await.unwrap_err().to_string();
    assert!(e.contains("num_replicas must be 1, 3 or 5"), "{e}");

    // New limits go through the group's log: every node keeps the newest
    // ten. Other settings (subjects) and single-message deletes are
    // refused on a replicated stream (docs/storage.md).
    let info = js2
        .update_stream(stream::Config {
            max_messages: 10,
            ..cfg.clone()
        })
        .await
        .unwrap();
    assert_eq!((info.config.max_messages, info.state.messages), (10, 10));
    for n in &cl.nodes {
        let what = format!("{}: the newest 10", n.name);
        let i = wait_info(n.port, "JR3", &what, |i| i.state.messages == 10).await;
        assert_eq!(i.config.max_msgs, Some(10), "{}", n.name);
        assert_eq!(i.state.first_seq, 91, "{}", n.name);
    }
    let e = js2
        .update_stream(stream::Config {
            subjects: vec!["jr3.>".into(), "other.>".into()],
            max_messages: 10,
            ..cfg.clone()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("10052") && e.contains("replicated stream"),
        "{e}"
    );
    let mut s2 = js2.get_stream("JR3").await.unwrap();
    let info = s2.info().await.unwrap().clone();
    assert_eq!((info.config.max_messages, info.state.messages), (10, 10));
    // One message deleted through the group's log (before the purge in
    // it on every replica, so the purge removes the other 9).
    assert!(s2.delete_message(95).await.unwrap());

    // A purge goes through the group's log: every replica is emptied, and
    // the next message takes the next sequence.
    let purged = s2.purge().await.unwrap();
    assert!(purged.success);
    assert_eq!(purged.purged, 9);
    let ack = js3
        .publish("jr3.after", "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 101);
    for n in &cl.nodes {
        let what = format!("{}: purged, then one more", n.name);
        let i = wait_info(n.port, "JR3", &what, |i| i.state.last_seq >= 101).await;
        assert_eq!(
            (i.state.first_seq, i.state.messages),
            (101, 1),
            "{}",
            n.name
        );
    }
}

/// Everything a durable consumer gets until it has every seq in `want` at
/// least once (seq, deliveries, payload), acking nothing.
async fn consume_until(
    k: &mut sockbus_client::streams::PullConsumer,
    want: &HashSet<u64>,
) -> Vec<(u64, u32, String)> {
    let mut got = Vec::new();
    let mut have = HashSet::new();
    let mut deadline = Deadline::after(Duration::from_secs(60));
    while !want.is_subset(&have) {
        assert!(
            !deadline.passed(),
            "consuming stalled: still missing {:?}",
            want.difference(&have).collect::<Vec<_>>()
        );
        if let Some(m) = k.next_timeout(Duration::from_secs(2)).await.unwrap() {
            have.insert(m.seq);
            got.push((
                m.seq,
                m.deliveries,
                String::from_utf8_lossy(m.payload()).into_owned(),
            ));
        }
    }
    got
}

/// Issue 17 item 5: a durable consumer's state is in the stream's Raft
/// log. 200 messages; through a follower the consumer gets 120 and acks
/// (confirmed) the first 100; the leader is killed with -9; through
/// another node the same consumer gets 101..=200, each of them, none of
/// the acked ones, and the 20 delivered but unacked ones again (a second
/// delivery, after ack_wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_on_another_node_after_kill_9_of_the_leader_with_no_acked_message_again_and_none_skipped(
) {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RC", ["rc.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "RC").await;
    let li = cl.index(&leader_name);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (f, other) = (followers[0], followers[1]);
    let pc = client(cl.nodes[f].port).await;
    for i in 1..=200u64 {
        let a = pc
            .publish_durable(&format!("rc.{i}"), format!("m{i:03}"))
            .await
            .unwrap();
        assert_eq!(a.seq, i);
    }

    // Served by the leader, reached through a follower.
    let ack_wait = Duration::from_secs(2);
    let durable = || ConsumerConfig::durable("d").ack_wait(ack_wait).batch(16);
    let kc = client(cl.nodes[f].port).await;
    let mut k = kc.consumer("RC", durable()).await.unwrap();
    let mut delivered = Vec::new();
    while delivered.len() < 120 {
        let m = k
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no message within 10 s after {delivered:?}"));
        assert_eq!(m.deliveries, 1);
        assert_eq!(
            String::from_utf8_lossy(m.payload()),
            format!("m{:03}", m.seq)
        );
        if m.seq <= 100 {
            m.ack_sync().await.unwrap();
        }
        delivered.push(m.seq);
    }
    assert_eq!(delivered, (1..=120).collect::<Vec<_>>());
    // The other follower (whose state machine applied the consumer's
    // entries) has the acks and the unacked deliveries.
    let oc = client(cl.nodes[other].port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let i = oc.consumer_info("RC", "d").await.unwrap();
        if i.ack_floor == 100 && i.num_ack_pending >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "not replicated: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(k);
    let _ = kc.close().await;

    cl.nodes[li].kill9();
    // Through the follower that never served this client.
    let k2c = client(cl.nodes[other].port).await;
    let mut k2 = k2c.consumer("RC", durable()).await.unwrap();
    let want: HashSet<u64> = (101..=200).collect();
    let got = consume_until(&mut k2, &want).await;
    let again: Vec<&(u64, u32, String)> = got.iter().filter(|(s, _, _)| *s <= 100).collect();
    assert!(
        again.is_empty(),
        "acked messages delivered again: {again:?}"
    );
    for (seq, n, payload) in &got {
        assert_eq!(*payload, format!("m{seq:03}"));
        if (101..=120).contains(seq) {
            assert!(
                *n >= 2,
                "seq {seq} was delivered before the failover: {got:?}"
            );
        }
    }
    // Acked through the new leader: nothing left, ack floor at the end.
    drop(k2);
    let mut k3 = k2c.consumer("RC", durable()).await.unwrap();
    let mut acked = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 100 {
        assert!(Instant::now() < deadline, "acked {} of 100", acked.len());
        if let Some(m) = k3.next_timeout(Duration::from_secs(3)).await.unwrap() {
            assert!(m.seq > 100, "acked seq {} delivered again", m.seq);
            m.ack_sync().await.unwrap();
            acked.insert(m.seq);
        }
    }
    let i = k2c.consumer_info("RC", "d").await.unwrap();
    assert_eq!((i.ack_floor, i.num_ack_pending), (200, 0), "{i:?}");
    // The killed node comes back and catches up with the consumer too.
    cl.restart(li).await;
    let back = client(cl.nodes[li].port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(i) = back.consumer_info("RC", "d").await {
            if i.ack_floor == 200 && i.num_ack_pending == 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same through the NATS port with a JetStream client (async-nats): a
/// durable pull consumer of an R3 stream created through a follower, 30
/// fetched and the first 20 acked with `double_ack` (confirmed), kill -9 of
/// the leader; through the other follower the consumer goes on at 21 with
/// no acked message again, 21..=30 as second deliveries, and none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_durable_consumer_of_an_r3_stream_resumes_through_another_node_after_kill_9_of_the_leader(
) {
    use async_nats::jetstream::{self, consumer, stream};
    use futures_util::StreamExt;
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("JC", ["jc.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let li = cl.index(&leader(cl.nodes[0].port, "JC").await);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let nports: Vec<u16> = cl.nodes.iter().map(|n| n.nport).collect();
    let js = |i: usize| {
        let port = nports[i];
        async move {
            let nc = async_nats::ConnectOptions::new()
                .request_timeout(Some(Duration::from_secs(20)))
                .connect(format!("nats://127.0.0.1:{port}"))
                .await
                .unwrap();
            let mut c = jetstream::new(nc);
            c.set_timeout(Duration::from_secs(20));
            c
        }
    };
    let js1 = js(followers[0]).await;
    for i in 1..=50u64 {
        let ack = js1
            .publish(format!("jc.{i}"), format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, i);
    }
    let config = consumer::pull::Config {
        durable_name: Some("jd".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    };
    let s1: stream::Stream = js1.get_stream("JC").await.unwrap();
    let k1: consumer::PullConsumer = s1.create_consumer(config.clone()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 30 {
        let mut batch = k1
            .fetch()
            .max_messages(30 - got.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let before = got.len();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let seq = m.info().unwrap().stream_sequence;
            if seq <= 20 {
                m.double_ack().await.unwrap();
            }
            got.push(seq);
        }
        assert!(
            got.len() > before,
            "fetch through a follower stalled at {got:?}"
        );
    }
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
    // Wait until the other follower has applied the acks and deliveries.
    let oc = client(cl.nodes[followers[1]].port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let i = oc.consumer_info("JC", "jd").await.unwrap();
        if i.ack_floor == 20 && i.num_ack_pending == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "not replicated: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cl.nodes[li].kill9();
    let js2 = js(followers[1]).await;
    let k2: consumer::PullConsumer = js2
        .get_stream("JC")
        .await
        .unwrap()
        .get_consumer("jd")
        .await
        .unwrap();
    let mut seen: HashMap<u64, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (21..=50).any(|s| !seen.contains_key(&s)) {
        assert!(
            Instant::now() < deadline,
            "after the failover got only {seen:?}"
        );
        let mut batch = k2
            .fetch()
            .max_messages(50)
            .expires(Duration::from_secs(3))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let info = m.info().unwrap();
            let (seq, delivered) = (info.stream_sequence, info.delivered);
            assert!(seq > 20, "acked seq {seq} delivered again");
            assert_eq!(m.payload, format!("m{seq}").as_bytes());
            seen.entry(seq).or_insert(delivered);
            m.double_ack().await.unwrap();
        }
    }
    for seq in 21..=30 {
        assert!(seen[&seq] >= 2, "seq {seq} was delivered before: {seen:?}");
    }
    let i = oc.consumer_info("JC", "jd").await.unwrap();
    assert_eq!((i.ack_floor, i.num_ack_pending), (50, 0), "{i:?}");
}

/// The `raft/` directory of `stream` under a node's data dir.
fn raft_dir(node: &Node, stream: &str) -> PathBuf {
    fn find(dir: &Path, stream: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == stream) && p.join("raft").is_dir() {
                return Some(p.join("raft"));
            }
            if let Some(x) = find(&p, stream) {
                return Some(x);
            }
        }
        None
    }
    find(&node.dir, stream).unwrap_or_else(|| panic!("{}: no raft dir for {stream}", node.name))
}

/// Whole entries in a node's Raft log files (the active `log` and the
/// sealed `log.<last index>` segments, each `[len u32][crc u32][body]`
/// records, then zeros written ahead) and the bytes they take.
fn raft_log_entries(node: &Node, stream: &str) -> (usize, u64) {
    let dir = raft_dir(node, stream);
    let mut files = vec![dir.join("log")];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("log.").is_some_and(|n| n.len() == 20) {
            files.push(e.path());
        }
    }
    let (mut n, mut bytes) = (0usize, 0u64);
    for f in files {
        let b = std::fs::read(f).unwrap_or_default();
        let mut at = 0usize;
        while at + 8 <= b.len() {
            let len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            // Zeros after the entries: written ahead of the next appends.
            if len == 0 || at + 8 + len > b.len() {
                break;
            }
            at += 8 + len;
            n += 1;
        }
        bytes += at as u64;
    }
    (n, bytes)
}

/// The Raft log's segment size in the compaction tests: a purge deletes
/// whole sealed segments, so a log on disk holds the entries not purged
/// plus what shares their segments (SEGMENT_DISK_SLACK).
const SEGMENT_BYTES: u64 = 8192;
/// Entries of a 8 KiB segment and of the active file past it (an entry
/// here takes 100 bytes or more).
const SEGMENT_DISK_SLACK: usize = 2 * SEGMENT_BYTES as usize / 100;

/// Entries between snapshots in the compaction tests.
const SNAP_EVERY: u64 = 32;
/// At most this many entries in a Raft log with SNAP_EVERY: the entries
/// since the last snapshot, the quarter kept before it, a purge batch,
/// slack for what is appended but not yet applied, and the purged entries
/// that share a segment with the others.
const LOG_BOUND: usize = 128 + SEGMENT_DISK_SLACK;

/// Issue 17 item 1, compaction: with a snapshot every 32 entries, 1,500
/// acked publishes (far more entries than that) leave every replica's Raft
/// log under LOG_BOUND entries, every message readable on every replica,
/// and a replica killed with -9 and restarted comes back with all of them
/// and takes new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_raft_log_stays_bounded_under_steady_publishing_and_a_restarted_replica_keeps_every_message(
) {
    let mut cl = Cluster::start_with(3, Some(SNAP_EVERY)).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RB", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "RB").await;
    let li = cl.index(&leader_name);
    let f = (0..3).find(|&i| i != li).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let pubs = publishers(
        vec![cl.nodes[li].port, cl.nodes[f].port],
        stop.clone(),
        acked.clone(),
        "b",
    );
    let until = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(180);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "publishing stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut most = 0usize;
    for step in 1..=15 {
        until(step * 100).await;
        for n in &cl.nodes {
            let (entries, _) = raft_log_entries(n, "RB");
            most = most.max(entries);
            assert!(
                entries <= LOG_BOUND,
                "{}: {entries} entries in the Raft log after {} acked",
                n.name,
                step * 100
            );
        }
    }
    // A replica restarted (kill -9) with a purged Raft log.
    cl.nodes[f].kill9();
    let n = acked.lock().unwrap().len();
    until(n + 100).await;
    cl.restart(f).await;
    let n = acked.lock().unwrap().len();
    until(n + 200).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    check_all(&cl, "RB", &acked).await;
    for n in &cl.nodes {
        let (entries, bytes) = raft_log_entries(n, "RB");
        eprintln!(
            "{}: {entries} entries, {bytes} bytes in the Raft log",
            n.name
        );
        assert!(entries <= LOG_BOUND, "{}: {entries} entries", n.name);
        assert!(
            raft_dir(n, "RB").join("purged").exists(),
            "{}: never purged",
            n.name
        );
    }
    eprintln!(
        "{} acked, at most {most} Raft log entries on a replica",
        acked.len()
    );
}

/// Issue 17 item 1, snapshots: a replica killed with -9 while the others
/// go on and purge their Raft logs past its position catches up through a
/// snapshot when it comes back: every acked message in order, and the
/// durable consumer's state (acks, deliveries), which a failover to it
/// then serves with no acked message again and none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_raft_log_catches_up_through_a_snapshot_with_the_consumer_state(
) {
    let mut cl = Cluster::start_with(3, Some(SNAP_EVERY)).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RS", ["rs.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "RS").await;
    let li = cl.index(&leader_name);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (f, other) = (followers[0], followers[1]);
    let pc = client(cl.nodes[li].port).await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let publish = |from: u64, to: u64| {
        let pc = pc.clone();
        let mut got = Vec::new();
        async move {
            for i in from..=to {
                let p = format!("s0-{i:06}");
                let a = pc.publish_durable(&format!("rs.{i}"), &p).await.unwrap();
                assert_eq!(a.seq, i);
                got.push((p, a.seq));
            }
            got
        }
    };
    acked.extend(publish(1, 100).await);

    let ack_wait = Duration::from_secs(2);
    let durable = || ConsumerConfig::durable("d").ack_wait(ack_wait).batch(16);
    let kc = client(cl.nodes[li].port).await;
    let mut k = kc.consumer("RS", durable()).await.unwrap();
    let mut n = 0;
    while n < 60 {
        let m = k
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("a message within 10 s");
        if m.seq <= 50 {
            m.ack_sync().await.unwrap();
        }
        n += 1;
    }
    drop(k);
    let _ = kc.close().await;
    // The consumer's state as the group committed it (the leader's batches
    // delivered a few past the 60 taken here): the other follower has it.
    let oc = client(cl.nodes[other].port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let want_state = loop {
        let a = kc_info(&c, "RS").await;
        let b = kc_info(&oc, "RS").await;
        if let Some(st) = a.filter(|st| st.1 == 50 && Some(*st) == b) {
            break st;
        }
        assert!(Instant::now() < deadline, "consumer state: {a:?} vs {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The follower goes; the other two go on far past it and compact.
    cl.nodes[f].kill9();
    acked.extend(publish(101, 1100).await);
    let purged = raft_dir(&cl.nodes[li], "RS").join("purged");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !purged.exists() {
        assert!(Instant::now() < deadline, "the leader never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (entries, _) = raft_log_entries(&cl.nodes[li], "RS");
    assert!(entries <= LOG_BOUND, "leader: {entries} entries");

    cl.restart(f).await;
    check_on(&cl, &[f], "RS", &acked).await;
    installed_a_snapshot(&cl.nodes[f], "RS").await;
    let fc = client(cl.nodes[f].port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = kc_info(&fc, "RS").await;
        if got == Some(want_state) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer state on the replica: {got:?}, committed {want_state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The leader goes: the snapshotted replica and the other lead on, and
    // the consumer resumes with none of 1..=50 again.
    cl.nodes[li].kill9();
    let mut k2 = fc.consumer("RS", durable().batch(128)).await.unwrap();
    let want: HashSet<u64> = (51..=1100).collect();
    let got = consume_until(&mut k2, &want).await;
    let again: Vec<&(u64, u32, String)> = got.iter().filter(|(s, _, _)| *s <= 50).collect();
    assert!(
        again.is_empty(),
        "acked messages delivered again: {again:?}"
    );
    for (seq, _, payload) in &got {
        assert_eq!(*payload, format!("s0-{seq:06}"));
    }
}

/// `n` caught up through a snapshot: `raft/snapshot.data` is there. An
/// install renames it into place last, after the stream's records (which a
/// reader may already see) and a few fsyncs: waited for, bounded.
async fn installed_a_snapshot(n: &Node, stream: &str) {
    let path = raft_dir(n, stream).join("snapshot.data");
    let mut deadline = Deadline::after(Duration::from_secs(30));
    while !path.exists() {
        assert!(
            !deadline.passed(),
            "{} caught up without a snapshot",
            n.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Consumer `d`'s (next_seq, ack_floor, num_ack_pending) through `c`.
async fn kc_info(c: &Client, stream: &str) -> Option<(u64, u64, u64)> {
    let i = c.consumer_info(stream, "d").await.ok()?;
    Some((i.next_seq, i.ack_floor, i.num_ack_pending as u64))
}
/// Attack: kill -9 of a replica while it installs a snapshot (its stream
/// half replaced), three times. It comes back consistent: the install is
/// redone from the kept file, it holds every acked message once, in order,
/// and it goes on catching up through the next snapshots.
///
/// This test was once ignored as "stalls after the second redone install":
/// the brokers had been paused (SIGSTOP) by a benchmark on the shared
/// machine, and resumed only when the test, having given up, sent SIGCONT
/// before killing them. Its time limits now stop while a broker is stopped
/// ([`Deadline`]) and publishes are retried with their Msg-Id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_replica_installs_a_snapshot_leaves_it_consistent_after_restart() {
    let mut cl = Cluster::start_with(3, Some(SNAP_EVERY)).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RK", ["rk.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "RK").await;
    let li = cl.index(&leader_name);
    let f = (0..3).find(|&i| i != li).unwrap();
    let pc = client(cl.nodes[li].port).await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    // Big records, so the install takes long enough to be caught in it.
    let pad = "x".repeat(32 << 10);
    let mut next = 1u64;
    let mut publish = |count: u64| {
        let (pc, pad) = (pc.clone(), pad.clone());
        let from = next;
        next += count;
        async move {
            let mut got = Vec::new();
            for i in from..from + count {
                let p = format!("k0-{i:06}-{pad}");
                let seq = publish_acked(&pc, &format!("rk.{i}"), &format!("k0-{i}"), &p).await;
                got.push((p, seq));
            }
            got
        }
    };
    acked.extend(publish(50).await);
    let mut caught = 0;
    for round in 0..3 {
        cl.nodes[f].kill9();
        acked.extend(publish(600).await);
        let raft = raft_dir(&cl.nodes[f], "RK");
        cl.restart(f).await;
        // Killed as soon as the install starts (the received file moved in place).
        let mut deadline = Deadline::after(Duration::from_secs(60));
        let mut hit = false;
        while !deadline.passed() {
            if raft.join("snapshot.install").exists() {
                cl.nodes[f].kill9();
                hit = raft.join("snapshot.install").exists();
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        eprintln!("round {round}: killed mid-install: {hit}");
        if hit {
            caught += 1;
        }
        if cl.nodes[f].child.is_none() {
            cl.restart(f).await;
        }
        check_on(&cl, &[f], "RK", &acked).await;
    }
    check_all(&cl, "RK", &acked).await;
    eprintln!("{caught} of 3 kills landed inside an install");
    assert!(caught >= 1, "no kill landed inside an install");
}

/// What `n` holds of `stream` once it has `last` as its last sequence:
/// its first sequence, message count and every message.
async fn holds(n: &Node, stream: &str, last: u64) -> (u64, u64, Vec<(u64, String)>) {
    let what = format!("{}: last sequence {last}", n.name);
    let i = wait_info(n.port, stream, &what, |i| i.state.last_seq >= last).await;
    (
        i.state.first_seq,
        i.state.messages,
        read_stream(n.port, stream).await,
    )
}

/// Issue 17 item 3: retention on a replicated stream follows from the
/// applied entries, so every replica holds the same messages. With
/// `max_msgs = 100`, 1,000 acked publishes (a follower killed with -9 for
/// the second half, then restarted) leave every replica exactly the newest
/// 100 (the restarted follower brought up by a snapshot, its segments cut
/// elsewhere), and still exactly those after another restart. A lower
/// `max_msgs` through the native update leaves every replica the newest
/// 50. A `max_age` stream left idle expires on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_retention_leaves_every_replica_exactly_the_newest_messages_also_after_a_follower_restart(
) {
    let mut cl = Cluster::start_with(3, Some(SNAP_EVERY)).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RL", ["rl.>"]);
    cfg.replicas = Some(3);
    cfg.max_msgs = Some(100);
    add_replicated(&c, &cfg).await;
    let mut aged = StreamConfig::new("RA", ["ra.>"]);
    aged.replicas = Some(3);
    aged.max_age_ms = Some(1500);
    add_replicated(&c, &aged).await;
    let li = cl.index(&leader(cl.nodes[0].port, "RL").await);
    let f = (0..3).find(|&i| i != li).unwrap();
    let pc = client(cl.nodes[li].port).await;
    let publish = |from: u64, to: u64| {
        let pc = pc.clone();
        async move {
            for i in from..=to {
                let p = format!("l-{i:04}");
                let seq = publish_acked(&pc, &format!("rl.{i}"), &p, &p).await;
                assert_eq!(seq, i);
            }
        }
    };
    publish(1, 500).await;
    cl.nodes[f].kill9();
    publish(501, 1000).await;
    cl.restart(f).await;

    let want: Vec<(u64, String)> = (901..=1000).map(|i| (i, format!("l-{i:04}"))).collect();
    for n in &cl.nodes {
        let (first, msgs, got) = holds(n, "RL", 1000).await;
        assert_eq!((first, msgs), (901, 100), "{}", n.name);
        assert_eq!(got, want, "{}", n.name);
    }
    cl.nodes[f].kill9();
    cl.restart(f).await;
    let (first, msgs, got) = holds(&cl.nodes[f], "RL", 1000).await;
    assert_eq!(
        (first, msgs),
        (901, 100),
        "{} after a restart",
        cl.nodes[f].name
    );
    assert_eq!(got, want);
    installed_a_snapshot(&cl.nodes[f], "RL").await;

    // A lower limit, through a follower: the group cuts at that entry.
    let mut lower = cfg.clone();
    lower.max_msgs = Some(50);
    let info = client(cl.nodes[f].port)
        .await
        .stream_update(&lower)
        .await
        .unwrap();
    assert_eq!(info.config.max_msgs, Some(50));
    let want: Vec<(u64, String)> = (951..=1000).map(|i| (i, format!("l-{i:04}"))).collect();
    for n in &cl.nodes {
        let what = format!("{}: the newest 50", n.name);
        wait_info(n.port, "RL", &what, |i| i.state.messages == 50).await;
        let (first, msgs, got) = holds(n, "RL", 1000).await;
        assert_eq!((first, msgs), (951, 50), "{}", n.name);
        assert_eq!(got, want, "{}", n.name);
    }

    // Ten messages, then nothing: they expire on every replica.
    let pa = client(cl.nodes[li].port).await;
    for i in 1..=10u64 {
        let p = format!("a-{i}");
        publish_acked(&pa, &format!("ra.{i}"), &p, &p).await;
    }
    for n in &cl.nodes {
        let what = format!("{}: RA expired", n.name);
        let i = wait_info(n.port, "RA", &what, |i| {
            i.state.last_seq == 10 && i.state.messages == 0
        })
        .await;
        assert_eq!(i.state.first_seq, 11, "{}", n.name);
    }
}

/// Issue 17 item 2: a replica gone for good (killed, its data directory
/// removed) is replaced by an empty node after the leader compacted its
/// Raft log past everything, so the new replica can only be brought up by
/// a snapshot. It gets every acked message and the durable consumer's
/// committed state; then, with the old leader killed too, the consumer
/// served through the new node gets every acked message after its ack
/// floor, none it had acked, and none again once its ack was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_replaced_after_compaction_catches_up_by_snapshot_and_serves_every_acked_message_once(
) {
    let mut cl = Cluster::start_with(4, Some(SNAP_EVERY)).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RR", ["rr.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "RR").await;
    let li = cl.index(&leader_name);
    let pc = client(cl.nodes[li].port).await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let publish = |from: u64, to: u64| {
        let pc = pc.clone();
        async move {
            let mut got = Vec::new();
            for i in from..=to {
                let p = format!("r0-{i:06}");
                let seq = publish_acked(&pc, &format!("rr.{i}"), &p, &p).await;
                assert_eq!(seq, i);
                got.push((p, seq));
            }
            got
        }
    };
    acked.extend(publish(1, 200).await);

    // A durable consumer: 1..=50 acked (confirmed), some more delivered.
    // ack_wait well above the time a batch of 16 takes to ack, so only a
    // failover (or a paused broker) redelivers anything.
    let durable = || {
        ConsumerConfig::durable("d")
            .ack_wait(Duration::from_secs(10))
            .batch(16)
    };
    let kc = client(cl.nodes[li].port).await;
    let mut k = kc.consumer("RR", durable()).await.unwrap();
    for _ in 0..60 {
        let m = k
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("a message within 10 s");
        if m.seq <= 50 {
            m.ack_sync().await.unwrap();
        }
    }
    drop(k);
    let _ = kc.close().await;

    // A member that is not the leader goes for good.
    let info = wait_info(cl.nodes[li].port, "RR", "three replicas", |i| {
        i.cluster.as_ref().is_some_and(|c| c.replicas.len() == 3)
    })
    .await;
    let members: Vec<String> = info
        .cluster
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.name)
        .collect();
    let gone_name = members.iter().find(|m| **m != leader_name).unwrap().clone();
    let other_name = members
        .iter()
        .find(|m| **m != leader_name && **m != gone_name)
        .unwrap()
        .clone();
    let spare_name = cl
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| !members.contains(n))
        .unwrap();
    let (gone, other, spare) = (
        cl.index(&gone_name),
        cl.index(&other_name),
        cl.index(&spare_name),
    );
    // The consumer's committed state, as the surviving follower has it.
    let oc = client(cl.nodes[other].port).await;
    let mut deadline = Deadline::after(Duration::from_secs(30));
    let want_state = loop {
        let a = kc_info(&pc, "RR").await;
        let b = kc_info(&oc, "RR").await;
        if let Some(st) = a.filter(|st| st.1 == 50 && Some(*st) == b) {
            break st;
        }
        assert!(!deadline.passed(), "consumer state: {a:?} vs {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cl.nodes[gone].kill9();
    std::fs::remove_dir_all(&cl.nodes[gone].dir).unwrap();

    // The two left go on far past it and compact their Raft logs.
    acked.extend(publish(201, 800).await);
    let purged = raft_dir(&cl.nodes[li], "RR").join("purged");
    let mut deadline = Deadline::after(Duration::from_secs(30));
    while !purged.exists() {
        assert!(!deadline.passed(), "the leader never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (entries, _) = raft_log_entries(&cl.nodes[li], "RR");
    assert!(entries <= LOG_BOUND, "leader: {entries} entries");

    // The documented replacement, sent to the leader.
    let admin = ConnectOptions::new()
        .request_timeout(Duration::from_secs(120))
        .connect(&format!("sockbus://127.0.0.1:{}", cl.nodes[li].port))
        .await
        .unwrap();
    let info = admin
        .stream_replace_peer("RR", &gone_name, &spare_name)
        .await
        .unwrap();
    let names: Vec<String> = info
        .cluster
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert!(names.contains(&spare_name), "{names:?}");
    assert!(!names.contains(&gone_name), "{names:?}");
    acked.extend(publish(801, 850).await);

    check_on(&cl, &[spare, li, other], "RR", &acked).await;
    installed_a_snapshot(&cl.nodes[spare], "RR").await;
    let sc = client(cl.nodes[spare].port).await;
    let mut deadline = Deadline::after(Duration::from_secs(30));
    loop {
        let got = kc_info(&sc, "RR").await;
        // The state committed before the replacement, or later (none of
        // its deliveries are acked meanwhile, so the ack floor stays).
        if got.is_some_and(|g| g.1 == want_state.1 && g.0 >= want_state.0) {
            break;
        }
        assert!(
            !deadline.passed(),
            "consumer state on the new replica: {got:?}, committed {want_state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old leader goes too: the new replica and the other one lead on,
    // and the consumer is served through the new node.
    cl.nodes[li].kill9();
    let mut k = sc.consumer("RR", durable()).await.unwrap();
    let want: HashSet<u64> = (51..=850).collect();
    let mut have: HashSet<u64> = HashSet::new();
    let mut confirmed: HashSet<u64> = HashSet::new();
    // Delivered again after its ack was confirmed: (seq, deliveries).
    let mut again = Vec::new();
    let mut paused = false;
    let mut take = |m: &sockbus_client::streams::StreamMessage,
                    have: &mut HashSet<u64>,
                    confirmed: &HashSet<u64>| {
        assert!(m.seq > 50, "{} acked before, delivered again", m.seq);
        assert_eq!(
            String::from_utf8_lossy(m.payload()),
            format!("r0-{:06}", m.seq)
        );
        if confirmed.contains(&m.seq) {
            again.push((m.seq, m.deliveries));
        }
        have.insert(m.seq);
    };
    let mut deadline = Deadline::after(Duration::from_secs(120));
    while !want.is_subset(&have) {
        assert!(
            !deadline.passed(),
            "consuming through {spare_name} stalled: {} of {} received",
            have.len(),
            want.len()
        );
        paused |= a_broker_is_stopped();
        let Some(m) = k.next_timeout(Duration::from_secs(2)).await.unwrap() else {
            continue;
        };
        take(&m, &mut have, &confirmed);
        if m.ack_sync().await.is_ok() {
            confirmed.insert(m.seq);
        }
    }
    assert_eq!(have, want);
    // Every ack confirmed: past ack_wait, nothing may come again.
    let quiet = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet {
        paused |= a_broker_is_stopped();
        if let Some(m) = k.next_timeout(Duration::from_secs(1)).await.unwrap() {
            take(&m, &mut have, &confirmed);
            let _ = m.ack_sync().await;
        }
    }
    // A paused broker lets ack_wait run out on messages the client holds:
    // those come again (at-least-once), never otherwise.
    assert!(
        again.is_empty() || paused,
        "delivered again after their acks were confirmed: {again:?}"
    );
}

/// Issue 17 item 4: a purge of a replicated stream through the native API
/// is a Raft entry every replica applies at the same point: asked through
/// a follower, `keep` then `seq` leave every replica the same newest
/// messages, also a follower killed with -9 before the purges and
/// restarted after (it applies them from the log), and publishing goes on
/// at the next sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_an_r3_stream_removes_the_same_messages_on_every_replica_also_a_restarted_one() {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RP", ["rp.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let li = cl.index(&leader(cl.nodes[0].port, "RP").await);
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (f, down) = (followers[0], followers[1]);
    let pc = client(cl.nodes[li].port).await;
    for i in 1..=100u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&pc, &format!("rp.{i}"), &p, &p).await, i);
    }
    wait_info(cl.nodes[down].port, "RP", "all 100 on the follower", |i| {
        i.state.last_seq == 100
    })
    .await;
    cl.nodes[down].kill9();
    let fc = client(cl.nodes[f].port).await;
    let req = |seq: Option<u64>, keep: Option<u64>| sockbus_client::streams::PurgeRequest {
        filter: None,
        seq,
        keep,
    };
    assert_eq!(
        fc.stream_purge("RP", &req(None, Some(40))).await.unwrap(),
        60
    );
    assert_eq!(
        fc.stream_purge("RP", &req(Some(81), None)).await.unwrap(),
        20
    );
    for i in 101..=110u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&pc, &format!("rp.{i}"), &p, &p).await, i);
    }
    cl.restart(down).await;
    let want: Vec<(u64, String)> = (81..=110).map(|i| (i, format!("p-{i:03}"))).collect();
    for n in &cl.nodes {
        let (first, msgs, got) = holds(n, "RP", 110).await;
        assert_eq!((first, msgs), (81, 30), "{}", n.name);
        assert_eq!(got, want, "{}", n.name);
    }
}

/// The value of one `/metrics` series (name and labels as printed) of a node.
async fn metric(node: &Node, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = tokio::net::TcpStream::connect(("127.0.0.1", node.hport))
        .await
        .ok()?;
    t.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut b = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut b))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&b)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// How a test damages a killed replica's files.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One bit of a record in a sealed segment.
    FlipSealed,
    /// A sealed segment cut to half its length.
    TruncateSealed,
    /// One bit of an entry in the middle of the Raft log.
    FlipRaftLog,
    /// A repair cut short while emptying the copy: the repair marker says
    /// so, `applied` and the oldest segment are already gone.
    InterruptedWipe,
}

/// The stream's sealed segment files (all but the newest), by base.
fn sealed_segments(node: &Node, stream: &str) -> Vec<PathBuf> {
    let dir = raft_dir(node, stream).parent().unwrap().to_path_buf();
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let base = p
                .file_name()?
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()?;
            Some((base, p))
        })
        .collect();
    v.sort();
    v.pop();
    v.into_iter().map(|(_, p)| p).collect()
}

fn damage(node: &Node, stream: &str, how: Damage) {
    match how {
        Damage::FlipSealed | Damage::TruncateSealed => {
            let segs = sealed_segments(node, stream);
            assert!(
                segs.len() >= 3,
                "{}: only {} sealed segments",
                node.name,
                segs.len()
            );
            let path = &segs[segs.len() / 2];
            let mut b = std::fs::read(path).unwrap();
            // The written part (a sealed file may end in zero fill).
            let end = b.iter().rposition(|&x| x != 0).unwrap() + 1;
            if let Damage::FlipSealed = how {
                b[end / 2] ^= 0x10;
                std::fs::write(path, &b).unwrap();
            } else {
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len((end / 2) as u64).unwrap();
            }
            eprintln!(
                "{}: {how:?} {} ({end} bytes written)",
                node.name,
                path.display()
            );
        }
        Damage::InterruptedWipe => {
            let raft = raft_dir(node, stream);
            std::fs::write(
                raft.join("repair"),
                r#"{"target":0,"wipe":true,"reason":"test: a crash while emptying the copy"}"#,
            )
            .unwrap();
            std::fs::remove_file(raft.join("applied")).unwrap();
            std::fs::remove_file(&sealed_segments(node, stream)[0]).unwrap();
        }
        Damage::FlipRaftLog => {
            let path = raft_dir(node, stream).join("log");
            let mut b = std::fs::read(&path).unwrap();
            let mut frames = Vec::new();
            let mut at = 0usize;
            while at + 8 <= b.len() {
                let len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
                if len == 0 || at + 8 + len > b.len() {
                    break;
                }
                frames.push((at, len));
                at += 8 + len;
            }
            assert!(
                frames.len() >= 100,
                "{}: {} Raft log entries",
                node.name,
                frames.len()
            );
            let (at, len) = frames[frames.len() / 2];
            b[at + 8 + len / 2] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            eprintln!(
                "{}: flipped a bit of Raft log entry {} of {}",
                node.name,
                frames.len() / 2,
                frames.len()
            );
        }
    }
}

/// `sockbus-broker verify-stream DIR --records` of a stopped node's copy:
/// its records (seq, payload), after asserting it found no damage.
fn offline_records(node: &Node, stream: &str) -> Vec<(u64, String)> {
    let dir = raft_dir(node, stream).parent().unwrap().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_sockbus-broker"))
        .arg("verify-stream")
        .arg(&dir)
        .arg("--records")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: verify-stream found damage: {}",
        node.name,
        text.lines().last().unwrap_or_default()
    );
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("seq").is_some())
        .map(|v| {
            (
                v["seq"].as_u64().unwrap(),
                v["payload"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Issue 17 item 6: a replica killed with -9 whose files were then damaged
/// (`how`) reports it and repairs from its peers once restarted: its
/// `sockbus_stream_repairs_total` goes to 1, every acked message (before
/// the damage, while it was down, while it repaired) is served through it
/// exactly once at its acked sequence, and its offline copy has no damage
/// and equals the others'. `victim_leader`: it led the stream when killed.
async fn a_damaged_replica_repairs(
    stream: &str,
    how: Damage,
    victim_leader: bool,
    snap: Option<u64>,
) {
    let mut cl = Cluster::start_with(3, snap).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new(stream, ["repl.>"]);
    cfg.replicas = Some(3);
    cfg.segment_bytes = Some(16 * 1024);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, stream).await;
    let li = cl.index(&leader_name);
    let v = if victim_leader {
        li
    } else {
        (0..3).find(|&i| i != li).unwrap()
    };
    let others: Vec<usize> = (0..3).filter(|&i| i != v).collect();
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let phase = |ports: Vec<u16>, prefix: &'static str, n: usize| {
        let acked = acked.clone();
        async move {
            let stop = Arc::new(AtomicBool::new(false));
            let start = acked.lock().unwrap().len();
            let pubs = publishers(ports, stop.clone(), acked.clone(), prefix);
            let deadline = Instant::now() + Duration::from_secs(240);
            while acked.lock().unwrap().len() < start + n {
                assert!(Instant::now() < deadline, "publishing ({prefix}) stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.store(true, Ordering::Relaxed);
            for p in pubs {
                p.await.unwrap();
            }
        }
    };
    let all_ports: Vec<u16> = cl.nodes.iter().map(|n| n.port).collect();
    phase(all_ports.clone(), "a", 2000).await;
    // Every replica holds all of it before the victim goes.
    let want = acked.lock().unwrap().values().copied().max().unwrap();
    for n in &cl.nodes {
        wait_info(n.port, stream, "caught up", |i| i.state.last_seq >= want).await;
    }
    cl.nodes[v].kill9();
    damage(&cl.nodes[v], stream, how);
    let other_ports: Vec<u16> = others.iter().map(|&i| cl.nodes[i].port).collect();
    phase(other_ports, "b", 200).await;
    cl.restart(v).await;
    let victim = &cl.nodes[v];
    let series = format!("sockbus_stream_repairs_total{{stream=\"{stream}\"}}");
    // Publishing through every node, the repairing one included.
    phase(all_ports, "c", 300).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(victim, &series).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "{}: no repair counted ({series} = {:?})",
            victim.name,
            metric(victim, &series).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repairing = format!("sockbus_stream_repairing{{stream=\"{stream}\"}}");
    assert_eq!(metric(victim, &repairing).await, Some(0.0));
    for &o in &others {
        assert_eq!(
            metric(&cl.nodes[o], &series).await,
            Some(0.0),
            "{}: undamaged, nothing to repair",
            cl.nodes[o].name
        );
    }
    let acked = acked.lock().unwrap().clone();
    check_all(&cl, stream, &acked).await;
    // Offline, every copy is whole and the same.
    for n in &mut cl.nodes {
        n.kill9();
    }
    let first = offline_records(&cl.nodes[0], stream);
    assert!(
        first.len() >= acked.len(),
        "{} records offline",
        first.len()
    );
    for n in &cl.nodes[1..] {
        assert!(
            offline_records(n, stream) == first,
            "{}'s offline copy differs from {}'s",
            n.name,
            cl.nodes[0].name
        );
    }
    eprintln!(
        "{} acked, all on every replica after the repair",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_bit_flipped_in_a_sealed_segment_repairs_from_its_peers_with_every_acked_message(
) {
    a_damaged_replica_repairs("CF", Damage::FlipSealed, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_truncated_sealed_segment_repairs_through_a_snapshot_with_every_acked_message(
) {
    a_damaged_replica_repairs("CT", Damage::TruncateSealed, false, Some(SNAP_EVERY)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_damaged_raft_log_cuts_it_and_repairs_with_every_acked_message() {
    a_damaged_replica_repairs("CR", Damage::FlipRaftLog, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_and_found_damaged_at_restart_repairs_as_a_follower_with_every_acked_message(
) {
    a_damaged_replica_repairs("CL", Damage::FlipSealed, true, Some(SNAP_EVERY)).await;
}

/// Damage appearing under a running follower (one bit of a sealed segment
/// flipped while it serves): a reader through it never skips the damaged
/// record (it waits), the follower empties its copy and repairs it from its
/// peers, and the reader then gets every acked message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_under_a_running_follower_is_not_skipped_by_its_readers_and_is_repaired() {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("CX", ["repl.>"]);
    cfg.replicas = Some(3);
    cfg.segment_bytes = Some(16 * 1024);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "CX").await;
    let li = cl.index(&leader_name);
    let v = (0..3).find(|&i| i != li).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let ports: Vec<u16> = cl.nodes.iter().map(|n| n.port).collect();
    let pubs = publishers(ports, stop.clone(), acked.clone(), "x");
    let deadline = Instant::now() + Duration::from_secs(240);
    while acked.lock().unwrap().len() < 2000 {
        assert!(Instant::now() < deadline, "publishing stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let want = acked.values().copied().max().unwrap();
    for n in &cl.nodes {
        wait_info(n.port, "CX", "caught up", |i| i.state.last_seq >= want).await;
    }
    damage(&cl.nodes[v], "CX", Damage::FlipSealed);
    // The read meets the damage, waits for the repair, goes on.
    let got = read_stream(cl.nodes[v].port, "CX").await;
    let mut expect: Vec<(u64, String)> = acked.iter().map(|(p, s)| (*s, p.clone())).collect();
    expect.sort();
    assert_eq!(got.len(), expect.len(), "{} messages read", got.len());
    assert!(
        got == expect,
        "the read through the damaged follower differs"
    );
    let series = "sockbus_stream_repairs_total{stream=\"CX\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&cl.nodes[v], series).await != Some(1.0) {
        assert!(Instant::now() < deadline, "no repair counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_all(&cl, "CX", &acked).await;
    for n in &mut cl.nodes {
        n.kill9();
    }
    let first = offline_records(&cl.nodes[0], "CX");
    for n in &cl.nodes[1..] {
        assert!(
            offline_records(n, "CX") == first,
            "{}'s copy differs",
            n.name
        );
    }
}

/// A replica being repaired refuses to vote: with the leader killed, the
/// one healthy follower cannot get elected with its vote (the stream takes
/// no writes rather than risk a leader lacking entries the damaged replica
/// had acknowledged), and once the old leader is back the group goes on
/// with every acked message. The repair is made endless here by a repair
/// marker whose target entry never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_being_repaired_gives_no_vote_so_no_leader_is_elected_without_a_healthy_majority()
{
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("CV", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "CV").await;
    let li = cl.index(&leader_name);
    let fs: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (d, h) = (fs[0], fs[1]);
    let pc = client(cl.nodes[li].port).await;
    let mut acked = HashMap::new();
    for i in 0..200 {
        let p = format!("v0-{i:06}");
        let a = pc.publish_durable(&format!("repl.{i}"), &p).await.unwrap();
        acked.insert(p, a.seq);
    }
    cl.nodes[d].kill9();
    std::fs::write(
        raft_dir(&cl.nodes[d], "CV").join("repair"),
        r#"{"target":1000000000,"wipe":false,"reason":"test: never repaired"}"#,
    )
    .unwrap();
    cl.restart(d).await;
    let repairing = "sockbus_stream_repairing{stream=\"CV\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&cl.nodes[d], repairing).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "{} not repairing",
            cl.nodes[d].name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cl.nodes[li].kill9();
    // Several election timeouts: the healthy follower never wins.
    let (dn, hn) = (cl.nodes[d].name.clone(), cl.nodes[h].name.clone());
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for i in [d, h] {
            let c = client(cl.nodes[i].port).await;
            if let Ok(info) = c.stream_info("CV").await {
                let l = info.cluster.and_then(|c| c.leader);
                assert!(
                    l.as_deref() != Some(hn.as_str()) && l.as_deref() != Some(dn.as_str()),
                    "{} elected without a healthy majority",
                    l.unwrap()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cl.restart(li).await;
    let hc = client(cl.nodes[h].port).await;
    for i in 200..300 {
        let p = format!("v0-{i:06}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let a = loop {
            match hc.publish_durable(&format!("repl.{i}"), &p).await {
                Ok(a) => break a,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{p} not acked: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        acked.insert(p, a.seq);
    }
    check_on(&cl, &[li, h], "CV", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_emptying_its_damaged_copy_empties_it_again_and_repairs() {
    a_damaged_replica_repairs("CW", Damage::InterruptedWipe, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_holds_across_a_leader_change_and_the_new_leader_purges_and_publishes_on() {
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RL", ["rl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let old = leader(cl.nodes[0].port, "RL").await;
    let li = cl.index(&old);
    let f = (0..3).find(|&i| i != li).unwrap();
    let pc = client(cl.nodes[li].port).await;
    for i in 1..=100u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&pc, &format!("rl.{i}"), &p, &p).await, i);
    }
    let req = |seq: Option<u64>, keep: Option<u64>| sockbus_client::streams::PurgeRequest {
        filter: None,
        seq,
        keep,
    };
    assert_eq!(
        pc.stream_purge("RL", &req(None, Some(40))).await.unwrap(),
        60
    );
    // The leader dies right after the purge was acknowledged.
    cl.nodes[li].kill9();
    wait_info(cl.nodes[f].port, "RL", "a new leader", |i| {
        i.cluster
            .as_ref()
            .and_then(|c| c.leader.as_deref())
            .is_some_and(|l| l != old)
    })
    .await;
    // Through a surviving node: the purge is there, and the stream goes on.
    let fc = client(cl.nodes[f].port).await;
    for i in 101..=110u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&fc, &format!("rl.{i}"), &p, &p).await, i);
    }
    assert_eq!(
        fc.stream_purge("RL", &req(Some(71), None)).await.unwrap(),
        10,
        "61..=70 removed by the new leader"
    );
    // The old leader comes back as a follower and agrees.
    cl.restart(li).await;
    let want: Vec<(u64, String)> = (71..=110).map(|i| (i, format!("p-{i:03}"))).collect();
    for n in &cl.nodes {
        let what = format!("{}: 71..=110", n.name);
        let i = wait_info(n.port, "RL", &what, |i| {
            i.state.last_seq >= 110 && i.state.first_seq >= 71
        })
        .await;
        assert_eq!(
            (i.state.first_seq, i.state.messages),
            (71, 40),
            "{}",
            n.name
        );
        assert_eq!(read_stream(n.port, "RL").await, want, "{}", n.name);
    }
}

/// The stream's next sequence as the node's `raft/applied` records it (the
/// file's last field, a bincode u64): the last point whose records the
/// replica fdatasync'ed.
fn applied_next_seq(node: &Node, stream: &str) -> u64 {
    let b = std::fs::read(raft_dir(node, stream).join("applied")).unwrap();
    u64::from_le_bytes(b[b.len() - 8..].try_into().unwrap())
}

/// What a power loss may take from a stopped node's copy of `stream`: the
/// records of its active (newest) segment from sequence `from` on (sealed
/// segments were fdatasync'ed when sealed). Returns how many it cut.
fn cut_unsynced_tail(node: &Node, stream: &str, from: u64) -> usize {
    let dir = raft_dir(node, stream).parent().unwrap().to_path_buf();
    let active = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let base: u64 = p
                .file_name()?
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()?;
            Some((base, p))
        })
        .max()
        .unwrap()
        .1;
    let b = std::fs::read(&active).unwrap();
    // The segment header, then `[len u32][crc u32][seq u64]...` records.
    let mut at = 16usize;
    let mut cut = None;
    let mut n = 0;
    while at + 16 <= b.len() {
        let len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let seq = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
        if seq >= from {
            cut.get_or_insert(at);
            n += 1;
        }
        at += 4 + len;
    }
    if let Some(at) = cut {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap();
        f.set_len(at as u64).unwrap();
    }
    n
}

/// Issue 17 item 8: with `fsync = always` a replica applies publish
/// entries to the stream's log without fdatasync (its Raft log already
/// holds them fdatasync'ed, as a quorum's does before the ack) and its
/// `raft/applied` names only the last point it synced. A power loss of
/// every node right after the acks, taking from each one's stream log
/// everything not synced (simulated: all three killed with -9, then each
/// active segment cut back to the sequence its `applied` names), loses no
/// acked message: each replica applies those entries again from its Raft
/// log. The publishes come 200 in flight from one client, so the leader has
/// several entries in flight: each publisher's messages stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_of_every_replica_taking_the_unsynced_stream_log_tail_loses_no_acked_message()
{
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("PL", ["repl.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let leader_name = leader(cl.nodes[0].port, "PL").await;
    let lc = client(cl.nodes[cl.index(&leader_name)].port).await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    for r in 0..5 {
        let sends = (0..200).map(|i| {
            let p = format!("w0-{:06}", r * 200 + i);
            let mut h = Headers::new();
            h.insert("Msg-Id", p.clone());
            let lc = &lc;
            async move {
                let a = lc.publish_durable_with_headers("repl.0", &h, &p).await;
                (p, a)
            }
        });
        for (p, a) in futures_util::future::join_all(sends).await {
            let seq = a.unwrap_or_else(|e| panic!("{p} not acked: {e}")).seq;
            acked.insert(p, seq);
        }
    }
    // Past the interval between checkpoints, then one entry at a time: the
    // first is checkpointed, those after it are not yet.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let end = Instant::now() + Duration::from_millis(400);
    let mut i = 0;
    while i < 5 || Instant::now() < end {
        let p = format!("w1-{i:06}");
        let seq = publish_acked(&lc, "repl.1", &p, &p).await;
        acked.insert(p, seq);
        i += 1;
    }
    let want = acked.values().copied().max().unwrap();
    for n in &cl.nodes {
        wait_info(n.port, "PL", "applied everything", |i| {
            i.state.last_seq >= want
        })
        .await;
    }
    drop((c, lc));
    for n in &mut cl.nodes {
        n.kill9();
    }
    let mut lost = 0;
    for n in &cl.nodes {
        let from = applied_next_seq(n, "PL");
        let cut = cut_unsynced_tail(n, "PL", from);
        eprintln!(
            "{}: applied names next seq {from}, cut {cut} records (acked up to {want})",
            n.name
        );
        lost += cut;
    }
    assert!(
        lost > 0,
        "every replica had synced every record: nothing to apply again"
    );
    for i in 0..3 {
        cl.restart(i).await;
    }
    check_all(&cl, "PL", &acked).await;
    eprintln!("{} acked, all back on every replica", acked.len());
}

/// JetStream's `STREAM.MSG.DELETE` on an R3 stream goes through the
/// group: every replica removes the same message, also one restarted after
/// the leader's kill -9. A delete is an entry of a newer level than the
/// first releases wrote, so it is proposed only once every replica has
/// answered that it applies it: with one never heard from (stopped) it is
/// refused, naming it; once heard from, its answer vouches for it while
/// it is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_from_an_r3_stream_is_gone_on_every_replica_also_after_the_leader_dies() {
    use async_nats::jetstream;
    let mut cl = Cluster::start(3).await;
    let c = client(cl.nodes[0].port).await;
    let mut cfg = StreamConfig::new("RD", ["rd.>"]);
    cfg.replicas = Some(3);
    add_replicated(&c, &cfg).await;
    let old = leader(cl.nodes[0].port, "RD").await;
    let li = cl.index(&old);
    let others: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let (f, f2) = (others[0], others[1]);
    let lc = client(cl.nodes[li].port).await;
    for i in 1..=20u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&lc, &format!("rd.{i}"), &p, &p).await, i);
    }
    let js = |port: u16| async move {
        let nc = async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(20)))
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
        jetstream::new(nc).get_stream("RD").await.unwrap()
    };
    let sf = js(cl.nodes[f].nport).await;
    // A replica this node never heard from cannot be vouched for.
    cl.nodes[f2].signal(libc::SIGSTOP);
    let e = sf.delete_message(5).await.unwrap_err().to_string();
    assert!(
        e.contains(&cl.nodes[f2].name) && e.contains("cannot confirm"),
        "{e}"
    );
    cl.nodes[f2].signal(libc::SIGCONT);
    assert!(
        sf.delete_message(5).await.unwrap(),
        "5 deleted through a follower"
    );
    assert!(sf.delete_message(5).await.is_err(), "5 is gone already");
    let sl = js(cl.nodes[li].nport).await;
    assert!(
        sl.delete_message(12).await.unwrap(),
        "12 deleted through the leader"
    );
    // Heard from once, the stopped replica's answer vouches for it.
    cl.nodes[f2].signal(libc::SIGSTOP);
    assert!(
        sf.delete_message(13).await.unwrap(),
        "13 deleted with a replica stopped"
    );
    cl.nodes[f2].signal(libc::SIGCONT);
    // The leader dies right after; the new one goes on.
    cl.nodes[li].kill9();
    wait_info(cl.nodes[f].port, "RD", "a new leader", |i| {
        i.cluster
            .as_ref()
            .and_then(|c| c.leader.as_deref())
            .is_some_and(|l| l != old)
    })
    .await;
    let fc = client(cl.nodes[f].port).await;
    for i in 21..=22u64 {
        let p = format!("p-{i:03}");
        assert_eq!(publish_acked(&fc, &format!("rd.{i}"), &p, &p).await, i);
    }
    cl.restart(li).await;
    let want: Vec<(u64, String)> = (1..=22u64)
        .filter(|i| ![5, 12, 13].contains(i))
        .map(|i| (i, format!("p-{i:03}")))
        .collect();
    for n in &cl.nodes {
        let what = format!("{}: 19 messages up to 22", n.name);
        let i = wait_info(n.port, "RD", &what, |i| {
            i.state.last_seq >= 22 && i.state.messages == 19
        })
        .await;
        assert_eq!((i.state.first_seq, i.state.messages), (1, 19), "{}", n.name);
        assert_eq!(read_stream(n.port, "RD").await, want, "{}", n.name);
    }
}

/// A tmpfs of 64 MiB mounted for a test; unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// None (and why) when it cannot be mounted: not root.
    fn mount() -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (mounting a small tmpfs needs root)".into());
        }
        let d = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(d.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(Tmpfs(d))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills it up to `room` bytes; the filler's path.
    fn fill(&self, room: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut w = std::fs::File::create(&filler).unwrap();
        let mb = vec![0u8; 1 << 20];
        while w.write_all(&mb).is_ok() {}
        let len = w.metadata().unwrap().len();
        w.set_len(len.saturating_sub(room)).unwrap();
        w.sync_all().unwrap();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// The disk of one replica (the leader's, or a follower's) fills
/// mid-stream: publishing goes on (through a new leader when it was the
/// leader's), nothing acked is lost anywhere, and once space returns that
/// replica holds every acked message again.
async fn a_replica_disk_fills(on_leader: bool) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let fs = match Tmpfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            assert!(!ci, "CI=true: the full-disk test must run, but {why}");
            eprintln!("skipping the full-disk test: {why}");
            return;
        }
    };
    // Node 0's data lives on the tmpfs. Snapshots at the default spacing,
    // and the compaction tests' 8 KiB Raft log segments: a segment is sealed
    // and a new one started (zeros written, synced) after almost every
    // entry, also while the disk is full.
    let mut cl = Cluster::start_in(3, Some(4096), Some(fs.path().join("data"))).await;
    let c = client(cl.nodes[1].port).await;
    let mut cfg = StreamConfig::new("FULL", ["full.>"]);
    cfg.replicas = Some(3);
    cfg.segment_bytes = Some(256 * 1024);
    add_replicated(&c, &cfg).await;
    // Node 0 in the role wanted: a kill -9 and restart moves leadership.
    let mut tries = 0;
    loop {
        let li = cl.index(&leader(cl.nodes[1].port, "FULL").await);
        if (li == 0) == on_leader {
            break;
        }
        tries += 1;
        assert!(tries < 20, "node 0 never became the role wanted");
        cl.nodes[li].kill9();
        wait_info(cl.nodes[(li + 1) % 3].port, "FULL", "a new leader", |i| {
            i.cluster
                .as_ref()
                .and_then(|c| c.leader.as_deref())
                .is_some_and(|l| l != cl.nodes[li].name)
        })
        .await;
        cl.restart(li).await;
    }
    for n in 0..3 {
        wait_info(cl.nodes[n].port, "FULL", "three replicas", |i| {
            i.cluster.as_ref().is_some_and(|c| c.replicas.len() == 3)
        })
        .await;
    }
    let filler = fs.fill(3 << 19);

    // 6 MB through node 1: more than node 0 has room for.
    let pad = "f".repeat(3000);
    let mut acked = HashMap::new();
    for i in 0..2000u64 {
        let p = format!("p0-{i:06}-{pad}");
        let seq = publish_acked(&c, "full.x", &p, &p).await;
        acked.insert(p, seq);
    }
    check_on(&cl, &[1, 2], "FULL", &acked).await;
    let held = match client(cl.nodes[0].port).await.stream_info("FULL").await {
        Ok(i) => i.state.last_seq,
        Err(_) => 0,
    };
    eprintln!("the full replica holds up to {held} of 2000");
    assert!(held < 2000, "node 0's disk never filled");
    let lead = leader(cl.nodes[1].port, "FULL").await;
    assert_ne!(lead, cl.nodes[0].name, "a replica with a full disk leads");

    // Space returns: the replica gets every acked message.
    std::fs::remove_file(&filler).unwrap();
    check_on(&cl, &[0], "FULL", &acked).await;
    // And publishing goes on with all three.
    let p = format!("p0-{:06}-{pad}", 2000);
    let seq = publish_acked(&c, "full.x", &p, &p).await;
    acked.insert(p, seq);
    check_all(&cl, "FULL", &acked).await;
    drop(cl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_disk_fills_loses_no_acked_message_and_catches_up_when_space_returns() {
    a_replica_disk_fills(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_hands_over_loses_no_acked_message_and_catches_up_when_space_returns(
) {
    a_replica_disk_fills(true).await;
}
