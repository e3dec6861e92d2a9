//! latency: open loop at a fixed rate. Each payload carries the time it
//! was *meant* to be sent (see [`crate::stats::Schedule`]); subscribers
//! record `received - intended` in an HdrHistogram, so a stalled sender or
//! broker shows up in the percentiles instead of slowing the test down.
//!
//! Pacing runs on a plain OS thread per publisher: tokio timers tick in
//! milliseconds, far too coarse for 20 µs between messages, while
//! `nanosleep` with a 1 µs timer slack wakes within a few microseconds and
//! burns no CPU while it waits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, BytesMut};
use tokio_util::sync::CancellationToken;

use super::gate::{Gate, Mode};
use super::{
    conn_settings, drain, join_all, u64_at, unique_subject, Clock, Length, Measured, Phase, RunCtx,
    Spec,
};
use crate::cpu::CpuSample;
use crate::driver::{Conn, Driver, Incoming, Sub};
use crate::progress::Progress;
use crate::stats::{corrected_latency_ns, Latencies, Schedule};

/// Bytes at the start of each payload: intended send time, sequence number.
pub(crate) const HEADER: usize = 16;
const QUIET: Duration = Duration::from_secs(3);

struct SubResult {
    received: u64,
    measured: u64,
    latencies: Latencies,
    dropped: u64,
}

pub(crate) async fn run<D: Driver>(
    driver: &D,
    spec: &Spec,
    ctx: &RunCtx,
) -> anyhow::Result<Measured> {
    let subject = unique_subject(spec);
    // Counters only: an open loop never waits on the subscribers.
    let gate = Arc::new(Gate::new(u64::MAX / 4, spec.subscribers, Mode::Min));
    let stop_subs = CancellationToken::new();
    let _stop_subs_on_error = stop_subs.clone().drop_guard();

    let mut subs = Vec::with_capacity(spec.subscribers);
    for i in 0..spec.subscribers {
        let conn = driver.connect(conn_settings("sub", i, spec)).await?;
        let sub = conn.subscribe(&subject, None).await?;
        conn.sync().await?;
        subs.push((conn, sub));
    }
    let mut pubs = Vec::with_capacity(spec.publishers);
    for i in 0..spec.publishers {
        pubs.push(driver.connect(conn_settings("pub", i, spec)).await?);
    }

    let phase = Phase::new(spec.warmup);
    let t0_ns = phase.t0_ns;
    let mut sub_tasks = Vec::with_capacity(subs.len());
    for (i, (conn, sub)) in subs.into_iter().enumerate() {
        let (gate, stop, clock) = (gate.clone(), stop_subs.clone(), phase.clock);
        sub_tasks.push(tokio::spawn(async move {
            let r = receive(sub, i, &gate, &stop, clock, t0_ns).await;
            drop(conn);
            Ok(r)
        }));
    }

    // Split the rate across publishers; each paces its own schedule.
    let stop_pubs = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let mut pacers = Vec::with_capacity(pubs.len());
    let mut measured_expected = 0u64;
    let mut warm_total = 0u64;
    let p = pubs.len() as u64;
    for (i, conn) in pubs.into_iter().enumerate() {
        let rate = spec.rate / p + u64::from((i as u64) < spec.rate % p);
        let sched = Schedule::new(rate.max(1));
        let warm = if t0_ns == 0 { 0 } else { sched.due(t0_ns - 1) };
        let total = match spec.length {
            Length::Duration(d) => sched.due(t0_ns + d.as_nanos() as u64 - 1),
            Length::Count(c) => warm + c / p + u64::from((i as u64) < c % p),
        };
        measured_expected += total - warm;
        warm_total += warm;
        let pacer = Pacer {
            topic: conn.topic(&subject),
            conn,
            handle: tokio::runtime::Handle::current(),
            clock: phase.clock,
            sched,
            total,
            payload: spec.payload,
            stop: stop_pubs.clone(),
            published: published.clone(),
        };
        pacers.push(
            std::thread::Builder::new()
                .name(format!("loadtest-pacer-{i}"))
                .spawn(move || pacer.run())
                .context("cannot start a pacer thread")?,
        );
    }

    let length = match spec.length {
        Length::Duration(d) => d,
        Length::Count(c) => Duration::from_secs_f64(c as f64 / spec.rate as f64),
    };
    let progress = Progress::new(ctx.progress, &ctx.label, spec.warmup + length);
    let mut cpu0 = None;
    while !pacers.iter().all(|t| t.is_finished()) {
        let now = Instant::now();
        if cpu0.is_none() && now >= phase.t0() {
            cpu0 = Some(CpuSample::take(ctx.broker_pid));
        }
        progress.set_elapsed(phase.clock.at(0).elapsed());
        progress.message(format!("{} msgs published", published.load(Relaxed)));
        // Fine steps around t0 so the CPU sample lines up with it.
        let step = match cpu0 {
            None => phase
                .t0()
                .saturating_duration_since(now)
                .min(Duration::from_millis(100)),
            Some(_) => Duration::from_millis(100),
        };
        tokio::time::sleep(step.max(Duration::from_millis(1))).await;
    }
    let cpu0 = cpu0.unwrap_or_else(|| CpuSample::take(ctx.broker_pid));
    stop_pubs.store(true, Relaxed);
    for h in pacers {
        match h.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("a pacer thread panicked"),
        }
    }
    let total_published = published.load(Relaxed);
    let expected = total_published * spec.subscribers as u64;
    let t_end = drain(|| gate.delivered(), expected, QUIET, &progress).await;
    let cpu1 = CpuSample::take(ctx.broker_pid);
    progress.finish();
    stop_subs.cancel();
    let subs = join_all(sub_tasks).await?;

    let mut latencies = Latencies::new();
    for s in &subs {
        latencies.merge(&s.latencies);
    }
    let received: u64 = subs.iter().map(|s| s.received).sum();
    let measured: u64 = subs.iter().map(|s| s.measured).sum();
    let mut notes = Vec::new();
    let published_measured = total_published.saturating_sub(warm_total);
    if published_measured < measured_expected {
        notes.push(format!(
            "published {published_measured} of {measured_expected} scheduled messages"
        ));
    }
    // Measured messages are those *scheduled* from t0 on, so the phase
    // starts at the scheduled t0, not when this task noticed it (late
    // under load, which would inflate the rate).
    Ok(Measured {
        elapsed: t_end.saturating_duration_since(phase.t0()),
        published: published_measured,
        delivered: measured,
        cpu: Some((cpu0, cpu1)),
        latencies: Some(latencies),
        client_dropped: subs.iter().map(|s| s.dropped).sum(),
        missing: expected.saturating_sub(received),
        notes,
        ..Measured::default()
    })
}

struct Pacer<C: Conn> {
    conn: C,
    topic: C::Topic,
    handle: tokio::runtime::Handle,
    clock: Clock,
    sched: Schedule,
    total: u64,
    payload: usize,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
}

impl<C: Conn> Pacer<C> {
    fn run(self) -> anyhow::Result<()> {
        set_fine_timer_slack();
        let mut i = 0u64;
        let mut buf = BytesMut::new();
        while i < self.total && !self.stop.load(Relaxed) {
            let now = self.clock.now_ns();
            let due = self.sched.due(now).min(self.total);
            if i >= due {
                let next = self.sched.intended_ns(i);
                std::thread::sleep(Duration::from_nanos(next.saturating_sub(now)));
                continue;
            }
            // Everything due goes out now, each stamped with its own
            // intended time: lateness counts against the latency.
            let before = i;
            let sent = self.handle.block_on(async {
                while i < due {
                    buf.reserve(self.payload);
                    buf.put_u64_le(self.sched.intended_ns(i));
                    buf.put_u64_le(i);
                    buf.resize(self.payload, 0);
                    self.conn.publish(&self.topic, buf.split().freeze()).await?;
                    i += 1;
                }
                anyhow::Ok(())
            });
            self.published.fetch_add(i - before, Relaxed);
            sent?;
        }
        // Everything queued reaches the broker before the connection drops
        // (async-nats would otherwise lose what it had not written yet).
        self.handle.block_on(self.conn.sync())
    }
}

/// Lets `nanosleep` on this thread wake within ~1 µs of the deadline
/// (the default slack is 50 µs, more than two message intervals at 50k/s).
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0);
    }
}

async fn receive<S: Sub>(
    mut sub: S,
    idx: usize,
    gate: &Gate,
    stop: &CancellationToken,
    clock: Clock,
    t0_ns: u64,
) -> SubResult {
    let mut r = SubResult {
        received: 0,
        measured: 0,
        latencies: Latencies::new(),
        dropped: 0,
    };
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = sub.next() => m,
            _ = &mut stopped => break,
        };
        let Some(msg) = msg else { break };
        let now = clock.now_ns();
        if let Some(intended) = u64_at(msg.payload(), 0) {
            if intended >= t0_ns {
                r.latencies.record_ns(corrected_latency_ns(intended, now));
                r.measured += 1;
            }
        }
        r.received += 1;
        gate.on_receive(idx, r.received);
    }
    r.dropped = sub.dropped();
    r
}
