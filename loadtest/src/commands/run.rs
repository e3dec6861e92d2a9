//! `sockbus-loadtest run`: one scenario against one broker.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse_duration;
use crate::chart::{percentile_svg, Series};
use crate::driver::Target;
use crate::report::{table, write_json};
use crate::scenario::{self, Length, RunCtx, Scenario, Spec};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Broker to load: sockbus://HOST:PORT or nats://HOST:PORT; credentials
    /// for a broker with users in the URL (sockbus://NAME:PASSWORD@HOST:PORT,
    /// sockbus://TOKEN@HOST:PORT), never shown in the report.
    #[arg(long)]
    pub target: String,
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Length of the measured phase (after warm-up).
    #[arg(long, value_parser = parse_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Messages to publish (requests to complete) in the measured phase.
    #[arg(long)]
    pub count: Option<u64>,
    /// Messages in flight: a publisher waits until the subscribers are within
    /// this many messages of it [default: 100000; reqrep: outstanding
    /// requests per requester, default 1; durable: storage acks outstanding, default 256].
    #[arg(long)]
    pub window: Option<u64>,
    /// durable: copies of the stream, 1, 3 or 5 (3 and 5 need a cluster
    /// target: sockbus brokers with --cluster/--peers, or nats-servers with
    /// JetStream in a cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Publishers (requesters for reqrep), one connection each.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribers (queue members, responders), one connection each
    /// [default: 1; fanout 10; queue 4].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// latency: messages per second offered, all publishers together.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Traffic before measuring starts.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// reqrep: a request not answered in this long counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub request_timeout: Duration,
    /// Process id of the broker, to report its CPU time per million messages.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency-percentile chart (SVG); latency and reqrep only.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Never draw the progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl RunArgs {
    pub fn spec(&self) -> anyhow::Result<Spec> {
        let mut spec = Spec::new(self.scenario);
        spec.payload = self.payload;
        spec.length = match (self.duration, self.count) {
            (_, Some(c)) => Length::Count(c),
            (Some(d), None) => Length::Duration(d),
            (None, None) => Length::Duration(Duration::from_secs(5)),
        };
        spec.warmup = self.warmup;
        spec.window = self.window.unwrap_or(spec.scenario.default_window());
        spec.publishers = self.publishers;
        spec.replicas = self.replicas;
        spec.subscribers = self
            .subscribers
            .unwrap_or(spec.scenario.default_subscribers());
        spec.rate = self.rate;
        spec.request_timeout = self.request_timeout;
        spec.validate()?;
        Ok(spec)
    }
}

pub async fn execute(args: RunArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    let spec = args.spec()?;
    if let Some(pid) = args.broker_pid {
        crate::cpu::process_cpu(pid)?;
    }
    let ctx = RunCtx {
        broker_pid: args.broker_pid,
        progress: !args.no_progress,
        label: format!("{} {}", target.kind(), spec.scenario.name()),
    };
    let outcome = tokio::select! {
        r = scenario::run(&target, &spec, &ctx) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    let r = &outcome.report;
    print!("{}", table(std::slice::from_ref(r)));
    println!(
        "CPU ms/M = CPU milliseconds per million messages delivered{}",
        if r.broker_cpu_ms.is_none() {
            " (broker CPU needs --broker-pid)"
        } else {
            ""
        }
    );
    println!(
        "{} published, {} delivered in {:.2} s; payload {} B; {}",
        r.published,
        r.delivered,
        r.elapsed_s,
        r.payload_bytes,
        match (r.window, r.rate) {
            (_, Some(rate)) => format!("offered {rate} msgs/s (open loop)"),
            (Some(w), _) if spec.scenario == Scenario::Reqrep => {
                format!("{w} outstanding request(s) per requester")
            }
            (Some(w), _) if spec.scenario == Scenario::Durable => format!(
                "up to {w} storage acks outstanding; read back at {}",
                r.read_back_msgs_per_sec
                    .map_or("-".into(), |x| format!("{} msgs/s", crate::report::si(x)))
            ),
            (Some(w), _) => format!("in-flight window {w}"),
            _ => String::new(),
        }
    );
    for n in &r.notes {
        println!("note: {n}");
    }
    if let Some(p) = &args.json {
        write_json(p, r)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.svg {
        let Some(l) = &r.latency else {
            anyhow::bail!(
                "--svg: the {} scenario measures no latency",
                spec.scenario.name()
            );
        };
        let svg = percentile_svg(
            &format!(
                "{} latency, {} B payload",
                spec.scenario.name(),
                spec.payload
            ),
            &[Series {
                label: r.driver.clone(),
                curve: l.curve.clone(),
                color: None,
                dashed: false,
            }],
        );
        std::fs::write(p, svg)?;
        println!("wrote {}", p.display());
    }
    if let Some(problems) = r.problems() {
        anyhow::bail!("{}: {problems}", spec.scenario.name());
    }
    Ok(())
}
