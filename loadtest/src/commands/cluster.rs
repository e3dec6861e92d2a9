//! `compare-cluster`: three sockbus brokers in a full mesh beside a
//! three-node nats-server cluster, one publisher on node A and subscribers on
//! nodes B and C, alternating, medians of the rounds.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::report::{render, si, RunReport};
use crate::scenario::{self, Length, RunCtx, Scenario, Spec};
use crate::servers::{find_nats_server, find_sockbus_broker, free_port, ScratchDir, ServerProc};
use crate::stats::{median, ratio};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Rounds (each runs sockbus then NATS).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured length of each run.
    #[arg(long, default_value = "5s", value_parser = super::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    pub warmup: Duration,
    /// Messages in flight between the publisher and the slowest subscriber.
    #[arg(long, default_value_t = 100_000)]
    pub window: u64,
    /// Subscribers, spread over nodes B and C.
    #[arg(long, default_value_t = 2)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Write the result table as Markdown here.
    #[arg(long)]
    pub out_md: Option<std::path::PathBuf>,
    #[arg(long)]
    pub broker_bin: Option<std::path::PathBuf>,
    #[arg(long)]
    pub nats_bin: Option<std::path::PathBuf>,
}

/// Starts a 3-node cluster of each kind; returns the processes (stopped on
/// drop) and the client URL list, node A first.
fn start_clusters(
    args: &ClusterArgs,
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<ServerProc>, String, String)> {
    let broker = find_sockbus_broker(args.broker_bin.as_deref())?;
    let nats = find_nats_server(args.nats_bin.as_deref())?;
    let mut procs = Vec::new();

    let clients: Vec<_> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let routes: Vec<_> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let peers = routes
        .iter()
        .map(|r| format!("sockbus-route://{r}"))
        .collect::<Vec<_>>()
        .join(",");
    for i in 0..3 {
        let args: Vec<String> = [
            "--listen",
            &clients[i].to_string(),
            "--cluster",
            &routes[i].to_string(),
            "--peers",
            &peers,
            "--node-id",
            &format!("node{i}"),
            "--http",
            "off",
            "--accel",
            "off",
            "--data-dir",
            &dir.join(format!("data{i}")).display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let sub = dir.join(format!("sockbus{i}"));
        std::fs::create_dir_all(&sub)?;
        procs.push(ServerProc::start(
            "sockbus-broker",
            &broker,
            &args,
            clients[i],
            &sub,
        )?);
    }
    let sockbus_urls = clients
        .iter()
        .map(|a| format!("sockbus://{a}"))
        .collect::<Vec<_>>()
        .join(",");

    let nclients: Vec<_> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let nroutes: Vec<_> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    for i in 0..3 {
        let others = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("nats://{}", nroutes[j]))
            .collect::<Vec<_>>()
            .join(",");
        let args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            nclients[i].port().to_string(),
            "-cluster".into(),
            format!("nats://{}", nroutes[i]),
            "-cluster_name".into(),
            "loadtest".into(),
            "-routes".into(),
            others,
        ];
        let sub = dir.join(format!("nats{i}"));
        std::fs::create_dir_all(&sub)?;
        procs.push(ServerProc::start(
            "nats-server",
            &nats,
            &args,
            nclients[i],
            &sub,
        )?);
    }
    let nats_urls = nclients
        .iter()
        .map(|a| format!("nats://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok((procs, sockbus_urls, nats_urls))
}

pub async fn execute(args: ClusterArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let dir = ScratchDir::new("sockbus-loadtest-cluster")?;
    let (procs, sockbus_urls, nats_urls) = start_clusters(&args, &dir.0)?;
    // Let the meshes form before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut spec = Spec::new(Scenario::Fanout);
    spec.subscribers = args.subscribers;
    spec.window = args.window;
    spec.payload = args.payload;
    spec.length = Length::Duration(args.duration);
    spec.warmup = args.warmup;
    spec.spread = true;
    let pids = |kind: &str| -> Vec<u32> {
        procs
            .iter()
            .filter(|p| p.name.starts_with(kind))
            .map(ServerProc::pid)
            .collect()
    };
    let (sock_pids, nats_pids) = (pids("sockbus"), pids("nats"));
    let mut results: Vec<RunReport> = Vec::new();
    for round in 1..=args.rounds {
        for (kind, urls, pids) in [
            ("sockbus", &sockbus_urls, &sock_pids),
            ("nats", &nats_urls, &nats_pids),
        ] {
            let target = crate::driver::Target::parse(urls)?;
            let cpu0: f64 = pids
                .iter()
                .filter_map(|p| crate::cpu::process_cpu(*p).ok())
                .map(|d| d.as_secs_f64())
                .sum();
            let ctx = RunCtx {
                broker_pid: None,
                progress: false,
                label: format!("round {round} {kind}"),
            };
            let out = scenario::run(&target, &spec, &ctx)
                .await
                .with_context(|| format!("cluster run against {kind}"))?;
            let cpu1: f64 = pids
                .iter()
                .filter_map(|p| crate::cpu::process_cpu(*p).ok())
                .map(|d| d.as_secs_f64())
                .sum();
            let mut r = out.report;
            // All three nodes' CPU, over the whole run (warm-up included).
            r.broker_cpu_ms = Some((cpu1 - cpu0) * 1000.0 / (r.delivered.max(1) as f64 / 1e6));
            println!(
                "round {round}  {kind:<8} {} msgs/s delivered  {} cluster CPU ms/M{}",
                si(r.msgs_per_sec),
                r.broker_cpu_ms.map_or("-".into(), |c| format!("{c:.0}")),
                r.problems()
                    .map_or(String::new(), |p| format!("  problems: {p}"))
            );
            results.push(r);
        }
    }
    let med = |kind: &str, f: &dyn Fn(&RunReport) -> Option<f64>| {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.driver == kind)
            .filter_map(f)
            .collect();
        median(&v)
    };
    let rate = |r: &RunReport| Some(r.msgs_per_sec);
    let cpu = |r: &RunReport| r.broker_cpu_ms;
    let rows = vec![
        vec![
            "delivered msgs/s".to_string(),
            med("sockbus", &rate).map_or("-".into(), si),
            med("nats", &rate).map_or("-".into(), si),
            ratio(med("sockbus", &rate), med("nats", &rate))
                .map_or("-".into(), |x| format!("{x:.2}×")),
        ],
        vec![
            "cluster CPU ms per M delivered".to_string(),
            med("sockbus", &cpu).map_or("-".into(), |x| format!("{x:.0}")),
            med("nats", &cpu).map_or("-".into(), |x| format!("{x:.0}")),
            ratio(med("sockbus", &cpu), med("nats", &cpu))
                .map_or("-".into(), |x| format!("{x:.2}×")),
        ],
    ];
    let table = render(&["metric", "sockbus", "NATS", "sockbus/NATS"], &rows);
    println!("\n1 publisher on node A -> {} subscribers on nodes B and C, {} B, window {}; medians of {} rounds", args.subscribers, args.payload, args.window, args.rounds);
    println!("{table}");
    if let Some(p) = &args.out_md {
        let mut md =
            String::from("| metric | sockbus | NATS | sockbus/NATS |\n|---|---:|---:|---:|\n");
        for r in &rows {
            md.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        std::fs::write(p, md).with_context(|| format!("cannot write {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    drop(procs);
    Ok(())
}
