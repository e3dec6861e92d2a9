//! `sockbus-loadtest compare`: starts a sockbus broker and a nats-server on
//! free loopback ports, runs each scenario against both alternately
//! (sockbus, NATS, sockbus, NATS, ...) for several rounds, and reports the
//! medians and the sockbus/NATS ratios as a table, Markdown, JSON and SVG.
//!
//! Alternating within a scenario keeps the two sides close in time, so
//! noise from other work on a shared machine hits both alike.
//!
//! `--protocol nats` drives both sides with the same NATS client
//! (async-nats): sockbus through its NATS front end (`--nats`), so the two
//! brokers are compared with one client, not two.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::parse_duration;
use crate::chart::{percentile_svg, Series};
use crate::driver::Target;
use crate::report::{render, si, us, write_json, RunReport};
use crate::scenario::{self, Length, RunCtx, Scenario, Spec, DEFAULT_WINDOW};
use crate::servers::{
    find_nats_server, find_sockbus_broker, free_port, version_of, ScratchDir, ServerProc,
};
use crate::stats::{median, ratio, LatencySummary};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Scenarios to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pubsub,fanout,latency"
    )]
    pub scenarios: Vec<Scenario>,
    /// Rounds; each round runs every scenario once against each broker.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured phase of each run.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// In-flight window of pubsub, fanout and queue.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: u64,
    /// Storage acks outstanding in the durable scenario.
    #[arg(long, default_value_t = crate::scenario::durable::DEFAULT_ACK_WINDOW)]
    pub ack_window: u64,
    /// Subscribers of the fanout scenario.
    #[arg(long, default_value_t = 10)]
    pub fanout: usize,
    /// Offered rate of the latency scenario, msgs/s.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Markdown table (for docs/benchmarks.md).
    #[arg(long)]
    pub out_md: Option<PathBuf>,
    /// Every run and the summary, as JSON.
    #[arg(long)]
    pub out_json: Option<PathBuf>,
    /// Latency-percentile chart of the latency and reqrep scenarios.
    #[arg(long)]
    pub out_svg: Option<PathBuf>,
    /// sockbus-broker binary [default: next to this executable].
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// nats-server binary [default: from PATH].
    #[arg(long)]
    pub nats_bin: Option<PathBuf>,
    /// Both servers over TLS (a certificate for localhost made for the run,
    /// TLS 1.3 with each side's defaults): sockbus+tls:// and tls://.
    #[arg(long)]
    pub tls: bool,
    #[arg(long)]
    pub no_progress: bool,
    /// How the load reaches sockbus: `native` (the sockbus SDK on its own
    /// port) or `nats` (async-nats on its NATS port, the client nats-server gets).
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: Protocol,
}

/// The client protocol the sockbus side is driven with.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Native,
    Nats,
}

/// One line of the summary: a metric's medians on both sides and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub scenario: Scenario,
    pub shape: String,
    pub metric: &'static str,
    pub sockbus: Option<f64>,
    pub nats: Option<f64>,
    /// sockbus / NATS of the medians.
    pub ratio: Option<f64>,
    pub higher_is_better: bool,
    /// The project's target for this ratio, if it has one (issue 3).
    pub goal: Option<Goal>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Goal {
    pub at_least: Option<f64>,
    pub at_most: Option<f64>,
}

impl Goal {
    fn met(&self, r: f64) -> bool {
        self.at_least.is_none_or(|g| r >= g) && self.at_most.is_none_or(|g| r <= g)
    }
    fn describe(&self) -> String {
        match (self.at_least, self.at_most) {
            (Some(g), _) => format!("≥ {g}×"),
            (_, Some(g)) => format!("≤ {g}×"),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Serialize)]
struct CompareReport<'a> {
    date: String,
    command: String,
    machine: Machine,
    sockbus_broker: String,
    nats_server: String,
    settings: Settings,
    summary: &'a [SummaryRow],
    runs: Vec<RoundRun<'a>>,
}

#[derive(Debug, Serialize)]
struct RoundRun<'a> {
    round: usize,
    #[serde(flatten)]
    report: &'a RunReport,
}

#[derive(Debug, Clone, Serialize)]
struct Settings {
    rounds: usize,
    duration_s: f64,
    warmup_s: f64,
    payload_bytes: usize,
    window: u64,
    fanout: usize,
    latency_rate: u64,
    ack_window: u64,
    protocol: Protocol,
    /// Both servers over TLS (`--tls`).
    tls: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    /// 1-minute load average when compare started and ended: other work
    /// on a shared machine moves the numbers, the ratios less so.
    load_start: Option<f64>,
    load_end: Option<f64>,
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Machine {
    fn probe(load_start: Option<f64>) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            load_start,
            load_end: load_average(),
        }
    }
}

impl CompareArgs {
    fn spec(&self, scenario: Scenario) -> Spec {
        let mut s = Spec::new(scenario);
        s.payload = self.payload;
        s.length = Length::Duration(self.duration);
        s.warmup = self.warmup;
        s.rate = self.rate;
        match scenario {
            Scenario::Reqrep => {}
            Scenario::Durable => s.window = self.ack_window,
            _ => s.window = self.window,
        }
        if scenario == Scenario::Fanout {
            s.subscribers = self.fanout;
        }
        s
    }
}

pub async fn execute(args: CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(!args.scenarios.is_empty(), "--scenarios is empty");
    for &s in &args.scenarios {
        args.spec(s).validate()?;
    }
    let nats_bin = find_nats_server(args.nats_bin.as_deref())?;
    let broker_bin = find_sockbus_broker(args.broker_bin.as_deref())?;
    if args.rounds < 3 {
        eprintln!(
            "note: medians of {} round(s) are not robust; use --rounds 3 or more for numbers to publish",
            args.rounds
        );
    }

    let load_start = load_average();
    let dir = ScratchDir::new("sockbus-loadtest-compare")?;
    let tls = if args.tls {
        let t = crate::tls::make_certificates(&dir.0)?;
        crate::driver::set_tls_ca(t.ca.clone());
        Some(t)
    } else {
        None
    };
    let sock_addr = free_port()?;
    let mut sock_args: Vec<String> = vec![
        "--listen".into(),
        sock_addr.to_string(),
        "--accel".into(),
        "off".into(),
        // Streams of the durable scenario (fsync = always, the default).
        "--data-dir".into(),
        dir.0.join("sockbus-data").display().to_string(),
    ];
    let sock_nats = match args.protocol {
        Protocol::Native => None,
        Protocol::Nats => {
            anyhow::ensure!(
                !args.tls,
                "--protocol nats with --tls: not supported yet (run them separately)"
            );
            let a = free_port()?;
            sock_args.extend(["--nats".into(), a.to_string()]);
            Some(a)
        }
    };
    let nats_addr = free_port()?;
    let mut nats_args: Vec<String> = vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        nats_addr.port().to_string(),
        // JetStream with file storage, for the durable scenario.
        "-js".into(),
        "-sd".into(),
        dir.0.join("nats-data").display().to_string(),
    ];
    if let Some(t) = &tls {
        let (cert, key) = (t.cert.display().to_string(), t.key.display().to_string());
        sock_args.extend([
            "--tls-cert".into(),
            cert.clone(),
            "--tls-key".into(),
            key.clone(),
        ]);
        nats_args.extend([
            "--tls".into(),
            "--tlscert".into(),
            cert,
            "--tlskey".into(),
            key,
        ]);
    }
    let sockbus = ServerProc::start("sockbus-broker", &broker_bin, &sock_args, sock_addr, &dir.0)?;
    let nats = ServerProc::start("nats-server", &nats_bin, &nats_args, nats_addr, &dir.0)?;
    let versions = (version_of(&broker_bin), version_of(&nats_bin));
    println!(
        "sockbus-broker ({}) pid {} on {}; nats-server ({}) pid {} on {}",
        versions.0,
        sockbus.pid(),
        sock_addr,
        versions.1,
        nats.pid(),
        nats_addr
    );

    // Over TLS by the certificate's name, localhost (bound to 127.0.0.1).
    let sides = match (&tls, sock_nats) {
        (None, None) => [
            (
                Target::Sockbus(format!("sockbus://{sock_addr}")),
                sockbus.pid(),
            ),
            (Target::Nats(format!("nats://{nats_addr}")), nats.pid()),
        ],
        (None, Some(a)) => [
            (Target::Nats(format!("nats://{a}")), sockbus.pid()),
            (Target::Nats(format!("nats://{nats_addr}")), nats.pid()),
        ],
        (Some(_), _) => [
            (
                Target::Sockbus(format!("sockbus+tls://localhost:{}", sock_addr.port())),
                sockbus.pid(),
            ),
            (
                Target::Nats(format!("tls://localhost:{}", nats_addr.port())),
                nats.pid(),
            ),
        ],
    };
    if tls.is_some() {
        println!(
            "both servers over TLS (certificate for localhost made in {})",
            dir.0.display()
        );
    }
    let runs = tokio::select! {
        r = all_rounds(&args, &sides) => r,
        s = shutdown_signal() => Err(anyhow::anyhow!("{s}: stopped both servers")),
    };
    // Stop the servers before reporting, also when a run failed.
    drop(sockbus);
    drop(nats);
    let runs = runs?;

    let summary = summarize(&args.scenarios, &runs, |s| args.spec(s));
    print!("\n{}", summary_table(&summary));
    println!("ratio = sockbus / NATS of the medians of {} rounds; msgs/s: higher is better, latency and CPU: lower is better", args.rounds);
    if let (Some(a), Some(b)) = (load_start, load_average()) {
        println!(
            "load average (1 min): {a:.1} at the start, {b:.1} at the end ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    for (round, r) in &runs {
        if let Some(p) = r.problems() {
            println!(
                "warning: round {round} {} {}: {p}",
                r.driver,
                r.scenario.name()
            );
        }
    }

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let settings = Settings {
        rounds: args.rounds,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        payload_bytes: args.payload,
        window: args.window,
        fanout: args.fanout,
        latency_rate: args.rate,
        ack_window: args.ack_window,
        protocol: args.protocol,
        tls: args.tls,
    };
    let report = CompareReport {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        command,
        machine: Machine::probe(load_start),
        sockbus_broker: versions.0,
        nats_server: versions.1,
        settings,
        summary: &summary,
        runs: runs
            .iter()
            .map(|(round, report)| RoundRun {
                round: *round,
                report,
            })
            .collect(),
    };
    if let Some(p) = &args.out_md {
        std::fs::write(p, markdown(&report))
            .with_context(|| format!("cannot write {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.out_json {
        write_json(p, &report)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.out_svg {
        let series = latency_series(&runs);
        if series.is_empty() {
            println!("no latency scenario ran: {} not written", p.display());
        } else {
            let title = format!(
                "latency percentiles, {} B payload (median of {} rounds at each percentile)",
                args.payload, args.rounds
            );
            std::fs::write(p, percentile_svg(&title, &series))
                .with_context(|| format!("cannot write {}", p.display()))?;
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// The two sides, in the order of `sides`, as the reports name them.
const SIDES: [&str; 2] = ["sockbus", "nats"];

/// Each scenario: A B A B ... for the given rounds. Returns (round, report).
async fn all_rounds(
    args: &CompareArgs,
    sides: &[(Target, u32); 2],
) -> anyhow::Result<Vec<(usize, RunReport)>> {
    let mut out = Vec::new();
    let total = args.scenarios.len() * args.rounds * 2;
    let mut n = 0;
    for &scenario in &args.scenarios {
        let spec = args.spec(scenario);
        for round in 1..=args.rounds {
            for (side, (target, pid)) in sides.iter().enumerate() {
                n += 1;
                let ctx = RunCtx {
                    broker_pid: Some(*pid),
                    progress: !args.no_progress,
                    label: format!(
                        "[{n}/{total}] {} round {round} {}",
                        scenario.name(),
                        SIDES[side]
                    ),
                };
                let outcome = scenario::run(target, &spec, &ctx).await.with_context(|| {
                    format!("{} round {round} against {}", scenario.name(), SIDES[side])
                })?;
                let mut report = outcome.report;
                // Named by broker, not by client: with --protocol nats
                // both sides use the NATS driver.
                report.driver = SIDES[side].into();
                println!("{}", one_line(round, &report));
                out.push((round, report));
            }
        }
    }
    Ok(out)
}

fn one_line(round: usize, r: &RunReport) -> String {
    let mut s = format!(
        "round {round}  {:<8} {:<7} {:>9} msgs/s {:>7.1} MB/s",
        r.scenario.name(),
        r.driver,
        si(r.msgs_per_sec),
        r.mb_per_sec
    );
    if let Some(l) = &r.latency {
        let _ = write!(
            s,
            "  p50 {} p99 {} p99.9 {} max {} µs",
            us(l.p50_us),
            us(l.p99_us),
            us(l.p999_us),
            us(l.max_us)
        );
    }
    if let Some(c) = r.broker_cpu_ms_per_million {
        let _ = write!(s, "  broker {c:.0} ms/M");
    }
    if let Some(c) = r.client_cpu_ms_per_million {
        let _ = write!(s, "  client {c:.0} ms/M");
    }
    if let Some(p) = r.problems() {
        let _ = write!(s, "  ({p})");
    }
    s
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = term.recv() => "terminated",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

type Metric = (&'static str, bool, fn(&RunReport) -> Option<f64>);

fn metrics(scenario: Scenario) -> Vec<Metric> {
    fn lat(r: &RunReport, f: fn(&LatencySummary) -> f64) -> Option<f64> {
        r.latency.as_ref().map(f)
    }
    let mut m: Vec<Metric> = vec![("msgs/s", true, |r| Some(r.msgs_per_sec))];
    if scenario.measures_latency() {
        m.push(("p50 µs", false, |r| lat(r, |l| l.p50_us)));
        m.push(("p90 µs", false, |r| lat(r, |l| l.p90_us)));
        m.push(("p99 µs", false, |r| lat(r, |l| l.p99_us)));
        m.push(("p99.9 µs", false, |r| lat(r, |l| l.p999_us)));
        m.push(("max µs", false, |r| lat(r, |l| l.max_us)));
    }
    if scenario == Scenario::Durable {
        m.push(("read-back msgs/s", true, |r| r.read_back_msgs_per_sec));
    }
    m.push(("broker CPU ms/M msgs", false, |r| {
        r.broker_cpu_ms_per_million
    }));
    m.push(("client CPU ms/M msgs", false, |r| {
        r.client_cpu_ms_per_million
    }));
    m
}

/// The targets issues 3 and 5 set for these ratios.
fn goal(scenario: Scenario, metric: &str) -> Option<Goal> {
    match (scenario, metric) {
        (Scenario::Durable, "msgs/s") => Some(Goal {
            at_least: Some(1.5),
            at_most: None,
        }),
        (Scenario::Durable, "read-back msgs/s") => Some(Goal {
            at_least: Some(2.0),
            at_most: None,
        }),
        (Scenario::Pubsub | Scenario::Fanout, "msgs/s") => Some(Goal {
            at_least: Some(1.5),
            at_most: None,
        }),
        (Scenario::Latency, "p99 µs") => Some(Goal {
            at_least: None,
            at_most: Some(0.5),
        }),
        _ => None,
    }
}

/// Medians per scenario, metric and side, and their ratio.
pub fn summarize(
    scenarios: &[Scenario],
    runs: &[(usize, RunReport)],
    spec_of: impl Fn(Scenario) -> Spec,
) -> Vec<SummaryRow> {
    let mut rows = Vec::new();
    for &scenario in scenarios {
        let of = |driver: &str, f: fn(&RunReport) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = runs
                .iter()
                .filter(|(_, r)| r.scenario == scenario && r.driver == driver)
                .filter_map(|(_, r)| f(r))
                .collect();
            median(&v)
        };
        let spec = spec_of(scenario);
        let shape = match scenario {
            Scenario::Queue => format!("{}→q{}", spec.publishers, spec.subscribers),
            Scenario::Latency => format!(
                "{}→{} @ {}/s",
                spec.publishers,
                spec.subscribers,
                si(spec.rate as f64)
            ),
            _ => format!("{}→{}", spec.publishers, spec.subscribers),
        };
        for (metric, higher_is_better, f) in metrics(scenario) {
            let (s, n) = (of("sockbus", f), of("nats", f));
            rows.push(SummaryRow {
                scenario,
                shape: shape.clone(),
                metric,
                sockbus: s,
                nats: n,
                ratio: ratio(s, n),
                higher_is_better,
                goal: goal(scenario, metric),
            });
        }
    }
    rows
}

fn fmt_value(metric: &str, v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if metric.ends_with("msgs/s") => si(v),
        Some(v) if metric.ends_with("µs") => us(v),
        Some(v) => format!("{v:.0}"),
    }
}

fn verdict(row: &SummaryRow) -> String {
    match (row.goal, row.ratio) {
        (Some(g), Some(r)) => format!(
            "goal {}: {}",
            g.describe(),
            if g.met(r) { "met" } else { "not met" }
        ),
        (Some(g), None) => format!("goal {}: no data", g.describe()),
        _ => String::new(),
    }
}

fn summary_table(rows: &[SummaryRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scenario.name().to_string(),
                r.shape.clone(),
                r.metric.to_string(),
                fmt_value(r.metric, r.sockbus),
                fmt_value(r.metric, r.nats),
                r.ratio.map_or("-".into(), |x| format!("{x:.2}×")),
                verdict(r),
            ]
        })
        .collect();
    render(
        &[
            "scenario",
            "shape",
            "metric",
            "sockbus",
            "NATS",
            "sockbus/NATS",
            "",
        ],
        &body,
    )
}

fn markdown(rep: &CompareReport<'_>) -> String {
    let s = &rep.settings;
    let mut md = String::new();
    let _ = writeln!(md, "### sockbus vs NATS, side by side\n");
    let _ = writeln!(md, "- command: `{}`", rep.command);
    let _ = writeln!(md, "- date: {}", rep.date);
    let load = |l: Option<f64>| l.map_or("?".into(), |l| format!("{l:.1}"));
    let _ = writeln!(
        md,
        "- machine: {} cores, {}, Linux {}; load average (1 min) {} at the start, {} at the end",
        rep.machine.cores,
        rep.machine.cpu,
        rep.machine.kernel,
        load(rep.machine.load_start),
        load(rep.machine.load_end)
    );
    let _ = writeln!(
        md,
        "- servers: {} (`--accel off`), {}; both on 127.0.0.1, started by `compare`{}",
        rep.sockbus_broker,
        rep.nats_server,
        if s.tls {
            "; both over TLS (a certificate for localhost made for the run; sockbus: rustls, NATS driver async-nats: rustls; nats-server: Go TLS)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "- load: {} B payloads; pubsub/fanout/queue closed loop with at most {} messages in flight \
         (publisher waits for the slowest subscriber); latency open loop at {} msgs/s, measured from the \
         intended send time; fanout to {} subscribers; durable: publish with {} storage acks outstanding \
         to a file-backed stream (sockbus fsync = always: acked means on disk; JetStream at its defaults, \
         which do not fsync each ack), then read the stream back; each run {} s after {} s warm-up",
        s.payload_bytes,
        s.window,
        s.latency_rate,
        s.fanout,
        s.ack_window,
        s.duration_s,
        s.warmup_s
    );
    let _ = writeln!(
        md,
        "- {} rounds, sockbus and NATS alternating within each scenario; medians shown; \
         ratio = sockbus / NATS (msgs/s: above 1 means sockbus is faster; latency and CPU: below 1 means sockbus is better)\n",
        s.rounds
    );
    let _ = writeln!(
        md,
        "| scenario | shape | metric | sockbus | NATS | sockbus/NATS | goal |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---|");
    for r in rep.summary {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario.name(),
            r.shape,
            r.metric,
            fmt_value(r.metric, r.sockbus),
            fmt_value(r.metric, r.nats),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}×")),
            verdict(r)
        );
    }
    let _ = writeln!(md, "\nEvery run:\n");
    let _ = writeln!(
        md,
        "| round | scenario | broker | msgs/s | MB/s | p50 µs | p99 µs | p99.9 µs | max µs | broker CPU ms/M | client CPU ms/M | problems |"
    );
    let _ = writeln!(
        md,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for rr in &rep.runs {
        let r = rr.report;
        let l = r.latency.as_ref();
        let lat = |f: fn(&LatencySummary) -> f64| l.map_or("-".into(), |l| us(f(l)));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            rr.round,
            r.scenario.name(),
            r.driver,
            si(r.msgs_per_sec),
            r.mb_per_sec,
            lat(|l| l.p50_us),
            lat(|l| l.p99_us),
            lat(|l| l.p999_us),
            lat(|l| l.max_us),
            r.broker_cpu_ms_per_million
                .map_or("-".into(), |x| format!("{x:.0}")),
            r.client_cpu_ms_per_million
                .map_or("-".into(), |x| format!("{x:.0}")),
            r.problems().unwrap_or_else(|| "none".into())
        );
    }
    md
}

/// One curve per scenario and broker: at each percentile, the median of
/// the rounds (the same statistic as the summary table).
fn latency_series(runs: &[(usize, RunReport)]) -> Vec<Series> {
    let mut keys: Vec<(Scenario, String)> = Vec::new();
    for (_, r) in runs {
        if r.latency.is_some() && !keys.contains(&(r.scenario, r.driver.clone())) {
            keys.push((r.scenario, r.driver.clone()));
        }
    }
    keys.into_iter()
        .map(|(scenario, driver)| {
            let curves: Vec<&Vec<crate::stats::CurvePoint>> = runs
                .iter()
                .filter(|(_, r)| r.scenario == scenario && r.driver == driver)
                .filter_map(|(_, r)| r.latency.as_ref().map(|l| &l.curve))
                .collect();
            let curve = curves[0]
                .iter()
                .enumerate()
                .map(|(i, p)| crate::stats::CurvePoint {
                    quantile: p.quantile,
                    latency_us: median(
                        &curves
                            .iter()
                            .filter_map(|c| c.get(i).map(|p| p.latency_us))
                            .collect::<Vec<_>>(),
                    )
                    .unwrap_or(0.0),
                })
                .collect();
            let nats = driver == "nats";
            Series {
                label: format!(
                    "{} · {}",
                    scenario.name(),
                    if nats { "NATS" } else { "sockbus" }
                ),
                curve,
                // One colour per broker; the second scenario drawn dashed.
                color: Some(if nats { "#d62728" } else { "#1f77b4" }),
                dashed: scenario != Scenario::Latency,
            }
        })
        .collect()
}
