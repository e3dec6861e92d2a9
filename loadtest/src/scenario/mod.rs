//! Scenarios: what is sent, by whom, and what is measured. Each runs the
//! same way against either driver.
//!
//! Every run has a warm-up phase (traffic flows, nothing is counted) and a
//! measured phase; counters and CPU clocks are sampled at its start and at
//! the moment the last measured message was delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::cpu::CpuSample;
use crate::driver::nats::NatsDriver;
use crate::driver::sockbus::SockbusDriver;
use crate::driver::{ConnSettings, Target};
use crate::progress::Progress;
use crate::report::RunReport;
use crate::stats::Latencies;

pub mod durable;
pub mod gate;
mod latency;
mod reqrep;
mod throughput;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// P publishers → S subscribers on one subject; delivered msgs/s.
    Pubsub,
    /// 1 publisher → N subscribers (default 10).
    Fanout,
    /// Publishers → a queue group; checks each message arrives exactly once.
    Queue,
    /// R requesters → responders (a queue group); round-trip latency and rate.
    Reqrep,
    /// Open loop at --rate, latency from the intended send time.
    Latency,
    /// Publish with acks to a durable stream and read it back.
    Durable,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Pubsub => "pubsub",
            Scenario::Fanout => "fanout",
            Scenario::Queue => "queue",
            Scenario::Reqrep => "reqrep",
            Scenario::Latency => "latency",
            Scenario::Durable => "durable",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Scenario> {
        <Scenario as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| {
            anyhow::anyhow!(
                "unknown scenario {s:?} (pubsub, fanout, queue, reqrep, latency, durable)"
            )
        })
    }

    /// Subscribers (or queue members, or responders) when not given.
    pub fn default_subscribers(self) -> usize {
        match self {
            Scenario::Fanout => 10,
            Scenario::Queue => 4,
            _ => 1,
        }
    }

    /// In-flight window when not given: requests per requester for reqrep,
    /// storage acks for durable, messages otherwise.
    pub fn default_window(self) -> u64 {
        match self {
            Scenario::Reqrep => 1,
            Scenario::Durable => durable::DEFAULT_ACK_WINDOW,
            _ => DEFAULT_WINDOW,
        }
    }

    /// Whether the scenario reports latency percentiles.
    pub fn measures_latency(self) -> bool {
        matches!(self, Scenario::Reqrep | Scenario::Latency)
    }
}

/// How long the measured phase lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Duration(Duration),
    /// Messages published (requests completed, for reqrep) after warm-up.
    Count(u64),
}

/// Everything a run needs to know, validated.
#[derive(Debug, Clone)]
pub struct Spec {
    pub scenario: Scenario,
    pub payload: usize,
    pub length: Length,
    pub warmup: Duration,
    /// Closed-loop scenarios: messages in flight between the publishers and
    /// the slowest subscriber. reqrep: outstanding requests per requester.
    pub window: u64,
    pub publishers: usize,
    pub subscribers: usize,
    /// latency: messages per second, all publishers together.
    pub rate: u64,
    pub request_timeout: Duration,
    /// Cluster runs: the target is a comma-separated list of servers;
    /// publishers use the first, subscribers the others in turn.
    pub spread: bool,
    /// durable: copies of the stream (1; 3 or 5 on a cluster target).
    pub replicas: u32,
}

impl Spec {
    pub fn new(scenario: Scenario) -> Spec {
        Spec {
            scenario,
            payload: 128,
            length: Length::Duration(Duration::from_secs(5)),
            warmup: Duration::from_secs(1),
            window: scenario.default_window(),
            publishers: 1,
            subscribers: scenario.default_subscribers(),
            rate: 10_000,
            request_timeout: Duration::from_secs(5),
            spread: false,
            replicas: 1,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.publishers == 0 {
            bail!("--publishers must be at least 1");
        }
        if self.subscribers == 0 {
            bail!("--subscribers must be at least 1");
        }
        if self.window == 0 {
            bail!("--window must be at least 1");
        }
        if ![1, 3, 5].contains(&self.replicas) {
            bail!("--replicas must be 1, 3 or 5");
        }
        if matches!(self.length, Length::Count(0)) {
            bail!("--count must be at least 1");
        }
        if matches!(self.length, Length::Duration(d) if d.is_zero()) {
            bail!("--duration must be longer than 0");
        }
        match self.scenario {
            Scenario::Queue if self.payload < 8 => {
                bail!("queue: --payload must be at least 8 bytes (it carries a sequence number)")
            }
            Scenario::Latency if self.payload < latency::HEADER => bail!(
                "latency: --payload must be at least {} bytes (it carries the send time)",
                latency::HEADER
            ),
            Scenario::Latency if self.rate == 0 => bail!("latency: --rate must be at least 1"),
            _ => Ok(()),
        }
    }
}

pub const DEFAULT_WINDOW: u64 = 100_000;

/// What a run needs from its surroundings.
#[derive(Debug, Clone, Default)]
pub struct RunCtx {
    /// The broker process, for its CPU time (None: not measured).
    pub broker_pid: Option<u32>,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Prefix of the progress bar line.
    pub label: String,
}

/// A finished run: the report and the raw latency histogram (for merging
/// rounds into a chart).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: RunReport,
    pub latencies: Option<Latencies>,
}

/// Runs one scenario against one target.
pub async fn run(target: &Target, spec: &Spec, ctx: &RunCtx) -> anyhow::Result<Outcome> {
    spec.validate()?;
    match (target, spec.scenario) {
        (Target::Sockbus(url), Scenario::Durable) => {
            let m = durable::run(&SockbusDriver::new(url), spec, ctx).await?;
            Ok(m.into_outcome(target, spec))
        }
        (Target::Nats(url), Scenario::Durable) => {
            let m = durable::run(&NatsDriver::new(url), spec, ctx).await?;
            Ok(m.into_outcome(target, spec))
        }
        (Target::Sockbus(url), _) => run_with(&SockbusDriver::new(url), target, spec, ctx).await,
        (Target::Nats(url), _) => run_with(&NatsDriver::new(url), target, spec, ctx).await,
    }
}

async fn run_with<D: crate::driver::Driver>(
    driver: &D,
    target: &Target,
    spec: &Spec,
    ctx: &RunCtx,
) -> anyhow::Result<Outcome> {
    let m = match spec.scenario {
        Scenario::Pubsub | Scenario::Fanout | Scenario::Queue => {
            throughput::run(driver, spec, ctx).await?
        }
        Scenario::Reqrep => reqrep::run(driver, spec, ctx).await?,
        Scenario::Latency => latency::run(driver, spec, ctx).await?,
        Scenario::Durable => unreachable!("dispatched in run()"),
    };
    Ok(m.into_outcome(target, spec))
}

/// The shared time base: payload timestamps are nanoseconds since `base`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            base: Instant::now(),
        }
    }
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    pub fn at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }
}

/// Raw results of the measured phase, turned into a [`RunReport`].
#[derive(Debug, Default)]
pub(crate) struct Measured {
    pub elapsed: Duration,
    pub published: u64,
    pub delivered: u64,
    pub cpu: Option<(CpuSample, CpuSample)>,
    pub latencies: Option<Latencies>,
    pub client_dropped: u64,
    pub missing: u64,
    pub duplicates: Option<u64>,
    pub errors: u64,
    /// durable: messages per second read back from the stream.
    pub read_back_per_sec: Option<f64>,
    pub notes: Vec<String>,
}

impl Measured {
    fn into_outcome(self, target: &Target, spec: &Spec) -> Outcome {
        let report = RunReport::new(target, spec, &self);
        Outcome {
            report,
            latencies: self.latencies,
        }
    }
}

/// Client buffers sized so the client never drops by design: everything in
/// flight fits, with room to spare.
pub(crate) fn conn_settings(role: &str, i: usize, spec: &Spec) -> ConnSettings {
    let in_flight = match spec.scenario {
        Scenario::Latency => (spec.rate as usize).max(65_536),
        _ => (spec.window as usize).saturating_mul(spec.publishers.max(1)),
    };
    let cap = in_flight.saturating_add(in_flight / 4).max(65_536);
    ConnSettings {
        server: if spec.spread && role == "sub" {
            1 + i
        } else {
            0
        },
        name: format!("loadtest-{}-{role}-{i}", spec.scenario.name()),
        sub_capacity: cap,
        sub_pending_bytes: cap.saturating_mul(spec.payload.max(64)).max(64 << 20),
    }
}

/// A subject no other run (or leftover message) shares.
pub(crate) fn unique_subject(spec: &Spec) -> String {
    static RUN: AtomicU64 = AtomicU64::new(0);
    format!(
        "loadtest.{}.{}.{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed),
        spec.scenario.name()
    )
}

/// Waits until `delivered()` reaches `expected`, or nothing arrived for
/// `quiet`; returns the time the last message was seen.
pub(crate) async fn drain(
    delivered: impl Fn() -> u64,
    expected: u64,
    quiet: Duration,
    progress: &Progress,
) -> Instant {
    let mut last = delivered();
    let mut last_at = Instant::now();
    loop {
        let now = delivered();
        if now != last {
            last = now;
            last_at = Instant::now();
        }
        if now >= expected {
            return Instant::now();
        }
        if last_at.elapsed() >= quiet {
            return last_at;
        }
        progress.message(format!("draining: {now}/{expected} delivered"));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) fn u64_at(payload: &[u8], at: usize) -> Option<u64> {
    payload
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Shared handles of a measured phase's end conditions.
pub(crate) struct Phase {
    pub clock: Clock,
    pub t0_ns: u64,
}

impl Phase {
    pub fn new(warmup: Duration) -> Phase {
        Phase {
            clock: Clock::start(),
            t0_ns: warmup.as_nanos() as u64,
        }
    }
    pub fn t0(&self) -> Instant {
        self.clock.at(self.t0_ns)
    }
}

/// Wait for every task; the first error wins, the rest are logged.
pub(crate) async fn join_all<T>(
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                if first_err.is_none() {
                    first_err = Some(e);
                } else {
                    tracing::debug!("further error: {e:#}");
                }
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(anyhow::anyhow!("a load task panicked: {e}"));
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
