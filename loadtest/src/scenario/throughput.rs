//! pubsub, fanout and queue: closed loop, as fast as the in-flight window
//! allows, counting what the subscribers receive.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::gate::{Gate, Mode};
use super::{
    conn_settings, drain, join_all, u64_at, unique_subject, Length, Measured, Phase, RunCtx,
    Scenario, Spec,
};
use crate::cpu::CpuSample;
use crate::driver::{Conn, Driver, Incoming, Sub};
use crate::progress::Progress;

/// A publisher that sees no delivery for this long gives up.
const STALL: Duration = Duration::from_secs(10);
/// After the publishers stop, how long to wait for stragglers.
const QUIET: Duration = Duration::from_secs(3);
/// Queue group name used by the `queue` scenario.
const GROUP: &str = "loadtest";

struct SubResult {
    received: u64,
    seqs: Vec<u64>,
    dropped: u64,
}

pub(crate) async fn run<D: Driver>(
    driver: &D,
    spec: &Spec,
    ctx: &RunCtx,
) -> anyhow::Result<Measured> {
    let queue = spec.scenario == Scenario::Queue;
    let subject = unique_subject(spec);
    let mode = if queue { Mode::Sum } else { Mode::Min };
    let gate = Arc::new(Gate::new(spec.window, spec.subscribers, mode));
    let stop_subs = CancellationToken::new();
    let _stop_subs_on_error = stop_subs.clone().drop_guard();

    // Subscribers first, each on its own connection, all in place at the
    // broker before anything is published.
    let mut sub_tasks = Vec::with_capacity(spec.subscribers);
    for i in 0..spec.subscribers {
        let conn = driver.connect(conn_settings("sub", i, spec)).await?;
        let sub = conn.subscribe(&subject, queue.then_some(GROUP)).await?;
        conn.sync().await?;
        let (gate, stop) = (gate.clone(), stop_subs.clone());
        sub_tasks.push(tokio::spawn(async move {
            let r = receive(sub, i, &gate, &stop, queue).await;
            drop(conn);
            Ok(r)
        }));
    }
    if spec.spread {
        // Cluster: the subscriptions must reach the publishers' node over
        // the routes before anything is published.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let mut pub_conns = Vec::with_capacity(spec.publishers);
    for i in 0..spec.publishers {
        pub_conns.push(driver.connect(conn_settings("pub", i, spec)).await?);
    }

    let phase = Phase::new(spec.warmup);
    let stop_pubs = Arc::new(AtomicBool::new(false));
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let published = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![0xA5u8; spec.payload]);
    let mut pub_tasks = Vec::with_capacity(spec.publishers);
    for conn in pub_conns {
        let (gate, stop, limit, published) = (
            gate.clone(),
            stop_pubs.clone(),
            limit.clone(),
            published.clone(),
        );
        let topic = conn.topic(&subject);
        let payload = payload.clone();
        pub_tasks.push(tokio::spawn(async move {
            loop {
                if stop.load(Relaxed) {
                    break;
                }
                let n = gate.claim();
                if n > limit.load(Acquire) {
                    break;
                }
                gate.admit(n, STALL).await?;
                let body = if queue {
                    // The ordinal is unique across publishers: the
                    // exactly-once check counts it.
                    let mut b = BytesMut::from(&payload[..]);
                    b[..8].copy_from_slice(&n.to_le_bytes());
                    b.freeze()
                } else {
                    payload.clone()
                };
                // Counted before it is sent: a publish can be delivered
                // before `publish` returns, and the warm-up snapshot must
                // never see a delivery whose publish it has not counted.
                published.fetch_add(1, Relaxed);
                conn.publish(&topic, body).await?;
            }
            conn.sync().await
        }));
    }

    // Warm-up, then the measured phase.
    let total = spec.warmup
        + match spec.length {
            Length::Duration(d) => d,
            Length::Count(_) => Duration::ZERO,
        };
    let progress = Progress::new(ctx.progress, &ctx.label, total);
    wait_until(phase.t0(), &phase, &progress, &pub_tasks).await;
    let delivered0 = gate.delivered();
    let published0 = published.load(Relaxed);
    let cpu0 = CpuSample::take(ctx.broker_pid);
    let t0 = Instant::now();
    match spec.length {
        Length::Count(c) => {
            limit.store(gate.claimed() + c, Release);
            while !pub_tasks.iter().all(|t| t.is_finished()) {
                progress.set_elapsed(phase.clock.at(0).elapsed());
                progress.message(rate_msg(gate.delivered() - delivered0, t0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Length::Duration(d) => {
            wait_until(t0 + d, &phase, &progress, &pub_tasks).await;
            stop_pubs.store(true, Relaxed);
        }
    }
    stop_pubs.store(true, Relaxed);
    join_all(pub_tasks).await?;

    let total_published = published.load(Relaxed);
    let expected = match mode {
        Mode::Min => total_published * spec.subscribers as u64,
        Mode::Sum => total_published,
    };
    let t_end = drain(|| gate.delivered(), expected, QUIET, &progress).await;
    let cpu1 = CpuSample::take(ctx.broker_pid);
    progress.finish();
    stop_subs.cancel();
    let subs = join_all(sub_tasks).await?;

    let received: u64 = subs.iter().map(|s| s.received).sum();
    let mut m = Measured {
        elapsed: t_end.saturating_duration_since(t0),
        published: total_published - published0,
        delivered: received.saturating_sub(delivered0),
        cpu: Some((cpu0, cpu1)),
        client_dropped: subs.iter().map(|s| s.dropped).sum(),
        missing: expected.saturating_sub(received),
        ..Measured::default()
    };
    if queue {
        let (missing, duplicates) = exactly_once(subs.into_iter().map(|s| s.seqs), total_published);
        m.missing = missing;
        m.duplicates = Some(duplicates);
    }
    Ok(m)
}

async fn receive<S: Sub>(
    mut sub: S,
    idx: usize,
    gate: &Gate,
    stop: &CancellationToken,
    keep_seqs: bool,
) -> SubResult {
    let mut received = 0u64;
    let mut seqs = Vec::new();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = sub.next() => m,
            _ = &mut stopped => break,
        };
        let Some(msg) = msg else { break };
        received += 1;
        if keep_seqs {
            seqs.push(u64_at(msg.payload(), 0).unwrap_or(0));
        }
        gate.on_receive(idx, received);
    }
    SubResult {
        received,
        dropped: sub.dropped(),
        seqs,
    }
}

/// Sleeps until `when`, updating the bar; returns early if a publisher
/// failed (its error surfaces when it is joined).
async fn wait_until<T>(
    when: Instant,
    phase: &Phase,
    progress: &Progress,
    tasks: &[tokio::task::JoinHandle<T>],
) {
    while Instant::now() < when {
        if tasks.iter().any(|t| t.is_finished()) {
            return;
        }
        progress.set_elapsed(phase.clock.at(0).elapsed());
        let step = when
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
    }
}

fn rate_msg(n: u64, since: Instant) -> String {
    let s = since.elapsed().as_secs_f64();
    if s <= 0.0 {
        return String::new();
    }
    format!("{} msgs/s delivered", crate::report::si(n as f64 / s))
}

/// Checks that sequence numbers 1..=published arrived exactly once across
/// the queue members: returns (missing, duplicates). Anything outside the
/// range counts as a duplicate (it should not exist).
pub(crate) fn exactly_once(
    members: impl IntoIterator<Item = Vec<u64>>,
    published: u64,
) -> (u64, u64) {
    let mut all: Vec<u64> = members.into_iter().flatten().collect();
    all.sort_unstable();
    let mut unique_in_range = 0u64;
    let mut duplicates = 0u64;
    let mut prev = None;
    for s in all {
        if prev == Some(s) || s == 0 || s > published {
            duplicates += 1;
        } else {
            unique_in_range += 1;
        }
        prev = Some(s);
    }
    (published - unique_in_range, duplicates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_once_finds_missing_and_duplicate_messages() {
        assert_eq!(exactly_once([vec![1, 3], vec![2, 4]], 4), (0, 0));
        assert_eq!(exactly_once([vec![1, 3], vec![3, 4]], 4), (1, 1));
        assert_eq!(exactly_once([vec![], vec![]], 2), (2, 0));
        assert_eq!(exactly_once([vec![1, 2, 9]], 2), (0, 1));
    }
}
