//! sockbus-faults: brokers in network namespaces, faults on a seeded
//! schedule, a durable workload throughout and a checker at the end.
//! docs/reliability.md tells how to run it and what each fault does.

mod check;
mod net;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use net::{Net, Node};
use workload::{ConsLog, Phase, PubLog, STREAM};

/// Fault harness for sockbus streams (run as root).
#[derive(Parser, Debug, Clone)]
#[command(name = "sockbus-faults")]
struct Args {
    /// Brokers (3 or 5), each in its own network namespace.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Replicas of the test stream (1 on today's main; 3 or 5 once streams replicate).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// How long faults are injected per run (the drain and check come after).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Mean time between faults.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Seed of the fault schedule (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Runs, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Faults to draw from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,partition,isolate,link,corrupt,restart-all"
    )]
    faults: Vec<Fault>,
    #[arg(long, default_value_t = 3)]
    publishers: usize,
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Where consumers (and the final reads) go first: `spread` (consumer k
    /// on node k+1, every node read) or `leader` (the stream's leader, R1:
    /// its node; other nodes only as failover). Default: `spread` with
    /// replicas, `leader` with R1 (main serves a stream's consumers only
    /// on the node that holds it).
    #[arg(long, value_enum)]
    consume_via: Option<ConsumeVia>,
    /// The broker binary (default: sockbus-broker next to this one).
    #[arg(long)]
    broker: Option<PathBuf>,
    /// Work directory: data dirs and logs of every node (default: a new one under /tmp).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Append one JSON line per run here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ConsumeVia {
    Spread,
    Leader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// kill -9 a node, restart it 1-3 s later.
    Kill,
    /// SIGSTOP a node for 1-5 s, then SIGCONT.
    Pause,
    /// Split the nodes into a minority and a majority for 2-6 s.
    Partition,
    /// Cut the stream's leader (R1: its node) off from every other node for 2-6 s.
    Isolate,
    /// Take a node's veth link down for 2-6 s (clients lose it too).
    Link,
    /// Stop a node holding the stream, flip a byte in or truncate one of its segments, restart it.
    Corrupt,
    /// kill -9 every node at once, restart them all.
    RestartAll,
}

pub const ALL_FAULTS: [Fault; 7] = [
    Fault::Kill,
    Fault::Pause,
    Fault::Partition,
    Fault::Isolate,
    Fault::Link,
    Fault::Corrupt,
    Fault::RestartAll,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::Isolate => "isolate",
            Fault::Link => "link",
            Fault::Corrupt => "corrupt",
            Fault::RestartAll => "restart-all",
        }
    }
}

/// splitmix64: the schedule must replay from its seed, nothing more.
pub struct Rng(u64);
impl Rng {
    pub fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.draw() % n.max(1)
    }
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn main() {
    let args = Args::parse();
    std::process::exit(match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sockbus-faults: {e:#}");
            2
        }
    });
}

fn real_main(args: Args) -> Result<i32> {
    if !(3..=5).contains(&args.nodes) {
        bail!("--nodes must be 3, 4 or 5");
    }
    if args.replicas == 0 || args.replicas > args.nodes {
        bail!("--replicas must be between 1 and --nodes");
    }
    if let Some(why) = net::missing_capability() {
        bail!("cannot run: {why}");
    }
    let broker = match &args.broker {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("sockbus-broker"),
    };
    if !broker.is_file() {
        bail!(
            "no broker binary at {} (build it: cargo build -p sockbus-broker, or pass --broker)",
            broker.display()
        );
    }
    let broker = broker.canonicalize()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
    });
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("sockbus-faults-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let net = Net::create(args.nodes).context("cannot set up the network namespaces")?;
    // Clients run in the hub namespace: every thread started from here on is in it.
    net.enter_hub()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut totals = check::Totals::default();
    let mut code = 0;
    for r in 0..args.runs {
        let s = seed + r;
        let dir = work.join(format!("run-{s}"));
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "== run {}/{} seed {s}: {} nodes, R{}, {:?}, faults {} (replay: --seed {s} --runs 1)",
            r + 1,
            args.runs,
            args.nodes,
            args.replicas,
            args.duration,
            args.faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(",")
        );
        // SIGINT or SIGTERM ends the run: dropping it kills the brokers, and
        // the namespaces go with `net` on the way out.
        let out = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                r = run_once(&args, &net, &broker, &dir, s) => r,
                _ = term.recv() => bail!("interrupted (SIGTERM)"),
                _ = int.recv() => bail!("interrupted (SIGINT)"),
            }
        })?;
        out.print();
        if let Some(p) = &args.json {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            writeln!(f, "{}", out.json(s, &args))?;
        }
        if !out.violations.is_empty() {
            code = 1;
        }
        totals.add(&out);
    }
    totals.print(args.runs);
    println!("work dir (data dirs and broker logs): {}", work.display());
    drop(rt);
    drop(net);
    Ok(code)
}

struct Cluster {
    nodes: Vec<Node>,
    broker: PathBuf,
    peers: String,
}

impl Cluster {
    fn start(&mut self, i: usize) -> Result<()> {
        self.nodes[i].start(&self.broker, &self.peers)
    }
    fn holders(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.data().join("streams").join(STREAM).is_dir())
            .map(|n| n.idx)
            .collect()
    }
}

async fn reachable(i: usize, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        let addr = format!("{}:{}", Net::ip(i), net::CLIENT_PORT);
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The stream info as JSON, asked through node `i`.
async fn stream_info_json(url: &str) -> Result<serde_json::Value> {
    let c = sockbus_client::ConnectOptions::new()
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(3))
        .max_reconnects(0)
        .connect(url)
        .await?;
    let m = c
        .request(
            &sockbus_protocol::api::subject::stream_info(STREAM),
            Vec::new(),
        )
        .await?;
    let _ = c.close().await;
    Ok(serde_json::from_slice(&m.payload)?)
}

async fn consumer_info(url: &str, name: &str) -> Result<serde_json::Value> {
    let c = sockbus_client::ConnectOptions::new()
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(3))
        .max_reconnects(0)
        .connect(url)
        .await?;
    let m = c
        .request(
            &sockbus_protocol::api::subject::consumer_info(STREAM, name),
            Vec::new(),
        )
        .await?;
    let _ = c.close().await;
    Ok(serde_json::from_slice(&m.payload)?)
}

/// Who leads the stream: the info's `leader` (or `cluster.leader`) once
/// streams replicate; on R1 the node that holds it.
async fn leader(c: &Cluster) -> usize {
    for n in &c.nodes {
        if let Ok(v) = stream_info_json(&n.url()).await {
            let l = v
                .get("leader")
                .or_else(|| v.get("cluster").and_then(|c| c.get("leader")))
                .and_then(|l| l.as_str());
            if let Some(l) = l {
                if let Some(i) = c.nodes.iter().position(|n| n.name() == l) {
                    return i;
                }
            }
            break;
        }
    }
    c.holders().first().copied().unwrap_or(0)
}

async fn create_stream(url: &str, replicas: usize) -> Result<()> {
    let c = sockbus_client::ConnectOptions::new()
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    let mut cfg = serde_json::to_value(sockbus_client::streams::StreamConfig {
        // Small segments, so runs have sealed segments to corrupt too.
        segment_bytes: Some(64 * 1024),
        duplicate_window_ms: Some(30 * 60 * 1000),
        ..sockbus_client::streams::StreamConfig::new(STREAM, [workload::SUBJECT])
    })?;
    if replicas != 1 {
        cfg["replicas"] = replicas.into();
    }
    // A replicated stream is placed on nodes this one has routes to: right
    // after start-up the routes may not be up yet, so that refusal is
    // retried for a while; any other is final.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = c
            .request(
                &sockbus_protocol::api::subject::stream_create(STREAM),
                serde_json::to_vec(&cfg)?,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        if v.get("error").is_none() && v.get("config").is_some() {
            break;
        }
        let waiting = v["error"]
            .as_str()
            .is_some_and(|e| e.contains("nodes connected"));
        if !waiting || tokio::time::Instant::now() >= deadline {
            bail!("stream create refused: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = c.close().await;
    Ok(())
}

async fn run_once(
    args: &Args,
    net: &Net,
    broker: &Path,
    dir: &Path,
    seed: u64,
) -> Result<check::Outcome> {
    let mut rng = Rng(seed);
    let peers = (0..args.nodes)
        .map(|i| format!("sockbus-route://{}:{}", Net::ip(i), net::ROUTE_PORT))
        .collect::<Vec<_>>()
        .join(",");
    let mut c = Cluster {
        nodes: (0..args.nodes)
            .map(|i| Node {
                idx: i,
                ns: net.nodes[i].clone(),
                dir: dir.join(format!("n{}", i + 1)),
                child: None,
                paused: false,
                starts: 0,
            })
            .collect(),
        broker: broker.to_path_buf(),
        peers,
    };
    net.heal()?;
    for i in 0..args.nodes {
        net.link(i, true)?;
        c.start(i)?;
    }
    for i in 0..args.nodes {
        if !reachable(i, Duration::from_secs(60)).await {
            bail!(
                "node n{} did not start listening within 60 s (log: {})",
                i + 1,
                c.nodes[i].dir.join("broker.log").display()
            );
        }
    }
    create_stream(&c.nodes[0].url(), args.replicas).await?;
    let urls: Vec<String> = c.nodes.iter().map(|n| n.url()).collect();
    let phase = Arc::new(Phase::default());
    let pubs: Vec<Arc<Mutex<PubLog>>> = (0..args.publishers).map(|_| Default::default()).collect();
    let cons: Vec<Arc<Mutex<ConsLog>>> = (0..args.consumers).map(|_| Default::default()).collect();
    let mut tasks = Vec::new();
    for (k, l) in pubs.iter().enumerate() {
        tasks.push(tokio::spawn(workload::publisher(
            k,
            urls.clone(),
            phase.clone(),
            l.clone(),
        )));
    }
    let via = args.consume_via.unwrap_or(if args.replicas > 1 {
        ConsumeVia::Spread
    } else {
        ConsumeVia::Leader
    });
    let home = leader(&c).await;
    let mut ctasks = Vec::new();
    for (k, l) in cons.iter().enumerate() {
        let first = match via {
            ConsumeVia::Spread => (k + 1) % args.nodes,
            ConsumeVia::Leader => home,
        };
        ctasks.push(tokio::spawn(workload::consumer(
            k + 1,
            first,
            urls.clone(),
            phase.clone(),
            l.clone(),
        )));
    }

    let mut events: Vec<String> = Vec::new();
    let mut counts: Vec<(Fault, u64)> = args.faults.iter().map(|f| (*f, 0)).collect();
    let mut violations: Vec<String> = Vec::new();
    let start = Instant::now();
    let say = |events: &mut Vec<String>, s: String| {
        let line = format!("  t={:6.1}s {s}", start.elapsed().as_secs_f64());
        println!("{line}");
        events.push(line);
    };
    let mut deck: Vec<Fault> = Vec::new();
    while start.elapsed() < args.duration {
        let wait = rng.millis(
            args.interval.as_millis() as u64 / 2,
            args.interval.as_millis() as u64 * 3 / 2,
        );
        tokio::time::sleep(wait).await;
        if start.elapsed() >= args.duration || args.faults.is_empty() {
            break;
        }
        for n in &mut c.nodes {
            if let Some(st) = n.exited() {
                violations.push(format!(
                    "node {} exited on its own ({st}); see its broker.log",
                    n.name()
                ));
                n.child = None;
            }
        }
        // A shuffled deck of the enabled faults: every one comes up once
        // before any comes up again, so even a short run sees them all.
        if deck.is_empty() {
            deck = args.faults.clone();
            for i in (1..deck.len()).rev() {
                deck.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let f = deck.pop().expect("refilled");
        counts.iter_mut().find(|(x, _)| *x == f).expect("listed").1 += 1;
        inject(f, &mut c, net, &mut rng, &mut events, &say).await?;
    }
    // Heal everything, then let the workload finish.
    net.heal()?;
    for i in 0..args.nodes {
        net.link(i, true)?;
        if c.nodes[i].paused {
            c.nodes[i].signal(libc::SIGCONT);
            c.nodes[i].paused = false;
        }
        if c.nodes[i].exited().is_some() {
            violations.push(format!(
                "node n{} exited on its own; see its broker.log",
                i + 1
            ));
            c.nodes[i].child = None;
        }
        if c.nodes[i].child.is_none() {
            c.start(i)?;
        }
    }
    say(
        &mut events,
        "healed: every node running and connected; publishers finish".into(),
    );
    phase.stop_publishing.store(true, Ordering::Relaxed);
    let give_up = tokio::spawn({
        let phase = phase.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            phase.give_up.store(true, Ordering::Relaxed);
        }
    });
    for t in tasks {
        let _ = t.await;
    }
    give_up.abort();
    // The stream's last sequence, as the cluster now reports it.
    let mut last_seq = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if let Ok(v) = stream_info_json(&c.nodes[leader(&c).await].url()).await {
            if let Some(s) = v.pointer("/state/last_seq").and_then(|s| s.as_u64()) {
                last_seq = s;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    phase.drain_to.store(last_seq.max(1), Ordering::Relaxed);
    say(&mut events, format!("consumers drain to seq {last_seq}"));
    // Consumers may be behind (an ack_sync is an fsync each): wait while
    // they make progress; stuck means nothing new for 30 s.
    let mut drain: Result<(), ()> = Ok(());
    let mut progress = (Instant::now(), 0usize);
    while ctasks.iter().any(|t| !t.is_finished()) {
        let seen: usize = cons.iter().map(|l| l.lock().unwrap().seen.len()).sum();
        if seen != progress.1 {
            progress = (Instant::now(), seen);
        } else if progress.0.elapsed() > Duration::from_secs(30) {
            drain = Err(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    phase.stop_consuming.store(true, Ordering::Relaxed);
    if drain.is_err() {
        say(
            &mut events,
            "consumers stopped short of the last seq (nothing new for 30 s)".into(),
        );
        // Evidence: where the broker has each consumer, and what the client saw.
        for (k, l) in cons.iter().enumerate() {
            let name = format!("c{}", k + 1);
            let info = consumer_info(&c.nodes[leader(&c).await].url(), &name).await;
            let l = l.lock().unwrap();
            let msg = format!(
                "consumer {name} stuck: client saw up to seq {}, {} errors (last: {:?}); broker: {}",
                l.seen.iter().map(|s| s.0).max().unwrap_or(0),
                l.errors,
                l.last_errors,
                info.map_or_else(|e| format!("{e:#}"), |v| v.to_string())
            );
            violations.push(msg);
        }
    }
    // Each node's view, online.
    let mut copies: Vec<(String, Vec<(u64, String)>)> = Vec::new();
    let mut notes = Vec::new();
    for n in &c.nodes {
        match workload::read_all(&n.url(), last_seq).await {
            Ok(v) => copies.push((format!("{} (read through it)", n.name()), v)),
            Err(e) if via == ConsumeVia::Leader && n.idx != home => {
                notes.push(format!("not read through {}: {e:#}", n.name()))
            }
            Err(e) => violations.push(format!(
                "cannot read the stream through {}: {e:#}",
                n.name()
            )),
        }
    }
    // Each replica's copy, offline from its data dir.
    for n in &mut c.nodes {
        n.stop(Duration::from_secs(10));
    }
    let mut damage = notes;
    for i in c.holders() {
        let n = &c.nodes[i];
        let sdir = n.data().join("streams").join(STREAM);
        let (recs, note) = check::offline_copy(broker, &sdir)?;
        if let Some(note) = note {
            damage.push(format!("{}: {note}", n.name()));
        }
        copies.push((format!("{} (data dir)", n.name()), recs));
    }
    let pubs: Vec<PubLog> = pubs
        .iter()
        .map(|p| std::mem::take(&mut *p.lock().unwrap()))
        .collect();
    let cons: Vec<ConsLog> = cons
        .iter()
        .map(|p| std::mem::take(&mut *p.lock().unwrap()))
        .collect();
    Ok(check::check(
        seed, counts, events, pubs, cons, copies, damage, violations,
    ))
}

async fn inject(
    f: Fault,
    c: &mut Cluster,
    net: &Net,
    rng: &mut Rng,
    events: &mut Vec<String>,
    say: &impl Fn(&mut Vec<String>, String),
) -> Result<()> {
    let n = c.nodes.len();
    match f {
        Fault::Kill => {
            let i = rng.below(n as u64) as usize;
            let hold = rng.millis(1000, 3000);
            say(
                events,
                format!("kill -9 {} (restart in {hold:?})", c.nodes[i].name()),
            );
            c.nodes[i].kill9();
            tokio::time::sleep(hold).await;
            c.start(i)?;
        }
        Fault::Pause => {
            let i = rng.below(n as u64) as usize;
            let hold = rng.millis(1000, 5000);
            say(
                events,
                format!("SIGSTOP {} for {hold:?}", c.nodes[i].name()),
            );
            c.nodes[i].signal(libc::SIGSTOP);
            c.nodes[i].paused = true;
            tokio::time::sleep(hold).await;
            c.nodes[i].signal(libc::SIGCONT);
            c.nodes[i].paused = false;
        }
        Fault::Partition => {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let minority = &order[..(n - 1) / 2];
            let majority = &order[(n - 1) / 2..];
            let hold = rng.millis(2000, 6000);
            let names = |v: &[usize]| {
                v.iter()
                    .map(|i| format!("n{}", i + 1))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            say(
                events,
                format!(
                    "partition {} | {} for {hold:?}",
                    names(minority),
                    names(majority)
                ),
            );
            for &a in minority {
                for &b in majority {
                    net.block(a, b)?;
                }
            }
            tokio::time::sleep(hold).await;
            net.heal()?;
        }
        Fault::Isolate => {
            let l = leader(c).await;
            let hold = rng.millis(2000, 6000);
            say(
                events,
                format!(
                    "isolate leader {} from every node for {hold:?}",
                    c.nodes[l].name()
                ),
            );
            for b in (0..n).filter(|&b| b != l) {
                net.block(l, b)?;
            }
            tokio::time::sleep(hold).await;
            net.heal()?;
        }
        Fault::Link => {
            let i = rng.below(n as u64) as usize;
            let hold = rng.millis(2000, 6000);
            say(
                events,
                format!("link down {} for {hold:?}", c.nodes[i].name()),
            );
            net.link(i, false)?;
            tokio::time::sleep(hold).await;
            net.link(i, true)?;
        }
        Fault::Corrupt => {
            let holders = c.holders();
            if holders.is_empty() {
                say(
                    events,
                    "corrupt: no node holds the stream yet, skipped".into(),
                );
                return Ok(());
            }
            // A minority: one node (with R1 that is the stream's only copy).
            let i = holders[rng.below(holders.len() as u64) as usize];
            c.nodes[i].kill9();
            let what = check::corrupt(&c.nodes[i].data().join("streams").join(STREAM), rng)?;
            say(
                events,
                format!("corrupt {}: kill -9, {what}, restart", c.nodes[i].name()),
            );
            c.start(i)?;
        }
        Fault::RestartAll => {
            say(events, "kill -9 every node, restart them all".into());
            for node in &mut c.nodes {
                node.kill9();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            for i in 0..n {
                c.start(i)?;
            }
        }
    }
    Ok(())
}
