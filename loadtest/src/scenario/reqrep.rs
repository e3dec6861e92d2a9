//! reqrep: R requesters, each with `window` requests outstanding, against
//! responders in a queue group (each request answered once). Measures the
//! round trip of every request completed in the measured phase.
//!
//! This is a closed loop: a slow reply delays the next request, so the
//! percentiles describe round trips at the rate achieved, not at a fixed
//! offered load (use `latency` for that).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{
    conn_settings, join_all, unique_subject, Clock, Length, Measured, Phase, RunCtx, Spec,
};
use crate::cpu::CpuSample;
use crate::driver::{Conn, Driver, Sub};
use crate::progress::Progress;
use crate::stats::Latencies;

const GROUP: &str = "loadtest-responders";
/// A requester gives up after this many failed requests in a row.
const MAX_ERRORS_IN_A_ROW: u64 = 100;

struct ReqResult {
    latencies: Latencies,
    completed: u64,
    errors: u64,
}

pub(crate) async fn run<D: Driver>(
    driver: &D,
    spec: &Spec,
    ctx: &RunCtx,
) -> anyhow::Result<Measured> {
    let subject = unique_subject(spec);
    let stop_resp = CancellationToken::new();
    let _stop_resp_on_error = stop_resp.clone().drop_guard();
    let reply = Bytes::from(vec![0x5Au8; spec.payload]);

    let mut responders = Vec::with_capacity(spec.subscribers);
    for i in 0..spec.subscribers {
        let conn = driver.connect(conn_settings("responder", i, spec)).await?;
        let mut sub = conn.subscribe(&subject, Some(GROUP)).await?;
        conn.sync().await?;
        let (stop, reply) = (stop_resp.clone(), reply.clone());
        responders.push(tokio::spawn(async move {
            let stopped = stop.cancelled();
            tokio::pin!(stopped);
            let mut answered = 0u64;
            loop {
                let msg = tokio::select! {
                    biased;
                    m = sub.next() => m,
                    _ = &mut stopped => break,
                };
                let Some(msg) = msg else { break };
                conn.respond(&msg, reply.clone()).await?;
                answered += 1;
            }
            anyhow::Ok(answered)
        }));
    }
    let mut requesters = Vec::with_capacity(spec.publishers);
    for i in 0..spec.publishers {
        requesters.push(driver.connect(conn_settings("requester", i, spec)).await?);
    }

    let phase = Phase::new(spec.warmup);
    let stop = Arc::new(AtomicBool::new(false));
    let tickets = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![0xA5u8; spec.payload]);
    let count = match spec.length {
        Length::Count(c) => c,
        Length::Duration(_) => u64::MAX,
    };
    let mut tasks = Vec::new();
    for conn in requesters {
        let topic = conn.topic(&subject);
        for _ in 0..spec.window {
            let (conn, topic, payload) = (conn.clone(), topic.clone(), payload.clone());
            let (stop, tickets, completed) = (stop.clone(), tickets.clone(), completed.clone());
            let (clock, t0_ns, timeout) = (phase.clock, phase.t0_ns, spec.request_timeout);
            tasks.push(tokio::spawn(async move {
                requester(
                    &conn, &topic, payload, clock, t0_ns, timeout, &stop, &tickets, count,
                    &completed,
                )
                .await
            }));
        }
    }

    let length = match spec.length {
        Length::Duration(d) => d,
        Length::Count(_) => Duration::ZERO,
    };
    let progress = Progress::new(ctx.progress, &ctx.label, spec.warmup + length);
    let mut measure_start = None;
    loop {
        let now = Instant::now();
        if measure_start.is_none() && now >= phase.t0() {
            measure_start = Some((now, CpuSample::take(ctx.broker_pid)));
        }
        let done = tasks.iter().all(|t| t.is_finished());
        let timed_out = match (measure_start, spec.length) {
            (Some((t0, _)), Length::Duration(d)) => now >= t0 + d,
            _ => false,
        };
        if done || timed_out {
            break;
        }
        progress.set_elapsed(phase.clock.at(0).elapsed());
        progress.message(format!("{} requests", completed.load(Relaxed)));
        let step = match measure_start {
            None => phase.t0().saturating_duration_since(now),
            Some((t0, _)) => (t0 + length).saturating_duration_since(now),
        };
        tokio::time::sleep(step.clamp(Duration::from_millis(1), Duration::from_millis(100))).await;
    }
    stop.store(true, Relaxed);
    let results = join_all(tasks).await?;
    let t_end = Instant::now();
    let cpu1 = CpuSample::take(ctx.broker_pid);
    progress.finish();
    stop_resp.cancel();
    join_all(responders).await?;
    let cpu0 = measure_start.map_or(cpu1, |(_, c)| c);
    // Requests count from their start time, so the phase starts at the
    // scheduled t0, not when this loop noticed it.
    let t0 = phase.t0();

    let mut latencies = Latencies::new();
    for r in &results {
        latencies.merge(&r.latencies);
    }
    let done: u64 = results.iter().map(|r| r.completed).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    Ok(Measured {
        elapsed: t_end.saturating_duration_since(t0),
        published: done + errors,
        delivered: done,
        cpu: Some((cpu0, cpu1)),
        latencies: Some(latencies),
        errors,
        ..Measured::default()
    })
}

#[allow(clippy::too_many_arguments)]
async fn requester<C: Conn>(
    conn: &C,
    topic: &C::Topic,
    payload: Bytes,
    clock: Clock,
    t0_ns: u64,
    timeout: Duration,
    stop: &AtomicBool,
    tickets: &AtomicU64,
    count: u64,
    completed: &AtomicU64,
) -> anyhow::Result<ReqResult> {
    let mut r = ReqResult {
        latencies: Latencies::new(),
        completed: 0,
        errors: 0,
    };
    let mut in_a_row = 0u64;
    while !stop.load(Relaxed) {
        let start = clock.now_ns();
        let measured = start >= t0_ns;
        if measured && tickets.fetch_add(1, Relaxed) >= count {
            break;
        }
        match conn.request(topic, payload.clone(), timeout).await {
            Ok(_) => {
                in_a_row = 0;
                if measured {
                    r.latencies.record_ns(clock.now_ns() - start);
                    r.completed += 1;
                    completed.fetch_add(1, Relaxed);
                }
            }
            Err(e) => {
                if measured {
                    r.errors += 1;
                }
                in_a_row += 1;
                if in_a_row >= MAX_ERRORS_IN_A_ROW {
                    return Err(e.context(format!("{in_a_row} requests in a row failed")));
                }
            }
        }
    }
    Ok(r)
}
