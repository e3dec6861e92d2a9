//! Short runs of every scenario against real brokers: a sockbus broker in
//! this process, and nats-server when it is installed. They assert that
//! messages were delivered (counts), never a speed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sockbus_broker::{Config, Server};
use sockbus_loadtest::servers::{find_in_path, free_port, ScratchDir, ServerProc};
use sockbus_loadtest::{run, Length, RunCtx, Scenario, Spec, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Broker {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start_broker() -> Broker {
    let server = Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        node_id: "loadtest-smoke".into(),
        drain_timeout: Duration::from_secs(1),
        data_dir: std::env::temp_dir().join(format!(
            "sockbus-loadtest-smoke-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )),
        ..Config::default()
    })
    .await
    .expect("bind the broker");
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Broker { addr, stop }
}

const COUNT: u64 = 3_000;

/// A run short enough for CI, with every check the scenario has.
fn brief(scenario: Scenario) -> Spec {
    let mut s = Spec::new(scenario);
    s.warmup = Duration::from_millis(100);
    s.window = 500;
    s.length = Length::Count(COUNT);
    match scenario {
        Scenario::Fanout => s.subscribers = 3,
        Scenario::Queue => {
            s.publishers = 2;
            s.subscribers = 3;
        }
        Scenario::Reqrep => {
            s.window = 2;
            s.length = Length::Count(300);
            s.subscribers = 2;
        }
        Scenario::Latency => s.rate = 20_000,
        _ => {}
    }
    s
}

async fn assert_delivers(target: &Target, scenario: Scenario) {
    let spec = brief(scenario);
    let ctx = RunCtx::default();
    let out = tokio::time::timeout(Duration::from_secs(60), run(target, &spec, &ctx))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {}: no result within 60 s",
                target.kind(),
                scenario.name()
            )
        })
        .unwrap_or_else(|e| panic!("{} {}: {e:#}", target.kind(), scenario.name()));
    let r = &out.report;
    let what = format!("{} {}: {r:?}", target.kind(), scenario.name());
    assert_eq!(r.missing, 0, "{what}");
    assert_eq!(r.client_dropped, 0, "{what}");
    assert_eq!(r.errors, 0, "{what}");
    assert!(r.msgs_per_sec > 0.0 && r.elapsed_s > 0.0, "{what}");
    let subs = spec.subscribers as u64;
    match scenario {
        Scenario::Pubsub | Scenario::Fanout => {
            assert!(r.published >= COUNT, "{what}");
            assert!(r.delivered >= r.published * subs, "{what}");
        }
        Scenario::Queue => {
            assert_eq!(r.duplicates, Some(0), "{what}");
            assert!(r.delivered >= COUNT, "{what}");
        }
        Scenario::Reqrep => {
            assert_eq!(r.delivered, 300, "{what}");
            assert_eq!(r.latency.as_ref().map(|l| l.count), Some(300), "{what}");
        }
        Scenario::Latency => {
            assert_eq!(r.published, COUNT, "{what}");
            assert_eq!(r.delivered, COUNT * subs, "{what}");
            let l = r.latency.as_ref().expect("latency measured");
            assert_eq!(l.count, COUNT * subs, "{what}");
            assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us, "{what}");
        }
        Scenario::Durable => unreachable!(),
    }
}

const SCENARIOS: [Scenario; 5] = [
    Scenario::Pubsub,
    Scenario::Fanout,
    Scenario::Queue,
    Scenario::Reqrep,
    Scenario::Latency,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_delivers_all_messages_through_a_sockbus_broker() {
    let broker = start_broker().await;
    let target = Target::parse(&format!("sockbus://{}", broker.addr)).unwrap();
    for s in SCENARIOS {
        assert_delivers(&target, s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_on_sockbus_reads_back_every_acked_message() {
    let broker = start_broker().await;
    let target = Target::parse(&format!("sockbus://{}", broker.addr)).unwrap();
    let mut spec = Spec::new(Scenario::Durable);
    spec.warmup = Duration::ZERO;
    spec.length = Length::Count(2_000);
    let r = run(&target, &spec, &RunCtx::default())
        .await
        .expect("durable run")
        .report;
    assert!(r.published >= 2_000, "{r:?}");
    assert_eq!(r.missing, 0, "{r:?}");
    assert!(r.read_back_msgs_per_sec.is_some_and(|x| x > 0.0), "{r:?}");
}

/// nats-server from PATH, or None (skipped) — except in CI, where the
/// comparison is part of what must work.
fn nats_server() -> Option<PathBuf> {
    match find_in_path("nats-server") {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but nats-server is not on PATH: install it with `apt-get install -y nats-server`")
        }
        None => {
            eprintln!("skipped: nats-server is not on PATH (apt-get install nats-server to run this test)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_delivers_all_messages_through_nats_server() {
    let Some(bin) = nats_server() else { return };
    let dir = ScratchDir::new("sockbus-loadtest-smoke-nats").unwrap();
    let addr = free_port().unwrap();
    let _nats = ServerProc::start(
        "nats-server",
        &bin,
        &[
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            addr.port().to_string(),
            "-js".into(),
            "-sd".into(),
            dir.0.join("js").display().to_string(),
        ],
        addr,
        &dir.0,
    )
    .expect("start nats-server");
    let target = Target::parse(&format!("nats://{addr}")).unwrap();
    for s in SCENARIOS {
        assert_delivers(&target, s).await;
    }
    // JetStream: every acked message is read back.
    let mut spec = Spec::new(Scenario::Durable);
    spec.warmup = Duration::ZERO;
    spec.length = Length::Count(2_000);
    let r = run(&target, &spec, &RunCtx::default())
        .await
        .expect("durable run")
        .report;
    assert!(r.published >= 2_000, "{r:?}");
    assert_eq!(r.missing, 0, "{r:?}");
    assert!(r.read_back_msgs_per_sec.is_some_and(|x| x > 0.0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_a_scenario_and_writes_json_and_svg() {
    let broker = start_broker().await;
    let dir = ScratchDir::new("sockbus-loadtest-smoke-cli").unwrap();
    let json = dir.0.join("run.json");
    let svg = dir.0.join("run.svg");
    let target = format!("sockbus://{}", broker.addr);
    let (json2, svg2) = (json.clone(), svg.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sockbus-loadtest"))
            .args(["run", "--target", &target, "--scenario", "latency"])
            .args(["--rate", "5000", "--count", "1000", "--warmup", "100ms"])
            .arg("--json")
            .arg(&json2)
            .arg("--svg")
            .arg(&svg2)
            .output()
            .expect("run the binary")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("p99 µs") && stdout.contains("sockbus"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["scenario"], "latency");
    assert_eq!(v["delivered"], 1000);
    assert!(v["latency"]["p99_us"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_ceiling_answers_204_to_a_post() {
    let addr = free_port().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sockbus-loadtest"))
        .args(["hyper-ceiling", "--listen", &addr.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = None;
    for _ in 0..250 {
        if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = conn.expect("hyper-ceiling listens");
    let body = [b'x'; 128];
    let req = format!(
        "POST /v1/publish/orders HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(resp.starts_with("HTTP/1.1 204"), "{resp}");
}

/// `compare` starts both servers itself (JetStream with file storage,
/// sockbus with a data directory), runs the durable scenario against each,
/// and reports both rates and the read-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_the_durable_scenario_against_both_servers() {
    let Some(_) = nats_server() else { return };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sockbus-loadtest"));
    let broker = exe.with_file_name("sockbus-broker");
    if !broker.exists() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but {} was not built (cargo test --workspace builds it)",
            broker.display()
        );
        eprintln!(
            "skipped: {} not built (run cargo test --workspace)",
            broker.display()
        );
        return;
    }
    let dir = ScratchDir::new("sockbus-loadtest-smoke-compare").unwrap();
    let json = dir.0.join("cmp.json");
    let json2 = json.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&exe)
            .args(["compare", "--scenarios", "durable", "--rounds", "1"])
            .args(["--duration", "500ms", "--warmup", "0s", "--no-progress"])
            .arg("--out-json")
            .arg(&json2)
            .output()
            .expect("run the binary")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{v}");
    for r in runs {
        assert_eq!(r["scenario"], "durable", "{r}");
        assert!(r["published"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["missing"], 0, "{r}");
        assert!(r["read_back_msgs_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `compare --tls` runs both servers over TLS with a certificate it makes,
/// and every message of the run arrives through each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_over_tls_runs_both_servers_over_tls() {
    let Some(_) = nats_server() else { return };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sockbus-loadtest"));
    if !exe.with_file_name("sockbus-broker").exists() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but sockbus-broker was not built (cargo test --workspace builds it)"
        );
        eprintln!("skipped: sockbus-broker not built (run cargo test --workspace)");
        return;
    }
    let dir = ScratchDir::new("sockbus-loadtest-smoke-compare-tls").unwrap();
    let json = dir.0.join("cmp.json");
    let json2 = json.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&exe)
            .args(["compare", "--tls", "--scenarios", "pubsub", "--rounds", "1"])
            .args(["--duration", "500ms", "--warmup", "0s", "--no-progress"])
            .arg("--out-json")
            .arg(&json2)
            .env_remove("SOCKBUS_TLS_CA")
            .output()
            .expect("run the binary")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["settings"]["tls"], true, "{v}");
    let runs = v["runs"].as_array().expect("runs");
    let targets: Vec<&str> = runs.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert!(targets[0].starts_with("sockbus+tls://"), "{targets:?}");
    assert!(targets[1].starts_with("tls://"), "{targets:?}");
    for r in runs {
        assert!(r["published"].as_u64().unwrap() > 0, "{r}");
        // Nothing lost over the whole run. The measured window's counts may
        // differ by the messages in flight at its start (counted as
        // published before it, delivered in it), so they are not compared.
        assert_eq!(r["missing"], 0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(
            r["delivered"].as_u64().unwrap() >= r["published"].as_u64().unwrap(),
            "{r}"
        );
    }
}

/// `--replicas` is checked before anything runs, and a replicated stream
/// asked of a broker outside a cluster fails with the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_replicas_are_checked_and_need_a_cluster() {
    let broker = start_broker().await;
    let target = format!("sockbus://{}", broker.addr);
    let run = |replicas: &'static str| {
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_sockbus-loadtest"))
                .args(["run", "--target", &target, "--scenario", "durable"])
                .args(["--count", "100", "--warmup", "0ms", "--replicas", replicas])
                .args(["--no-progress"])
                .output()
                .expect("run the binary")
        })
    };
    let out = run("2").await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--replicas must be 1, 3 or 5"),
        "{err}"
    );
    let out = run("3").await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cluster mode"),
        "{err}"
    );
}
