//! durable: publish to a file-backed stream with up to `window` storage
//! acks outstanding (the rate counts acked messages), then read the whole
//! stream back from the start without acks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use super::{conn_settings, unique_subject, Length, Measured, Phase, RunCtx, Spec};
use crate::cpu::CpuSample;
use crate::driver::{Driver, Durable};
use crate::progress::Progress;

/// Acks in flight when the user gives no --window (as in the peer notes).
pub const DEFAULT_ACK_WINDOW: u64 = 256;

pub(crate) async fn run<D>(driver: &D, spec: &Spec, ctx: &RunCtx) -> anyhow::Result<Measured>
where
    D: Driver,
    D::Conn: Durable,
{
    static N: AtomicU64 = AtomicU64::new(0);
    let subject = unique_subject(spec);
    let name = format!(
        "LOADTEST_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let conn = driver.connect(conn_settings("durable", 0, spec)).await?;
    conn.create_stream(&name, &subject, spec.replicas).await?;
    let r = measure(&conn, &name, &subject, spec, ctx).await;
    // Leave no stream behind, also when the run failed.
    let cleanup = conn.delete_stream(&name).await;
    let m = r?;
    cleanup?;
    Ok(m)
}

async fn measure<C: Durable>(
    conn: &C,
    name: &str,
    subject: &str,
    spec: &Spec,
    ctx: &RunCtx,
) -> anyhow::Result<Measured> {
    let topic = conn.topic(subject);
    let payload = Bytes::from(vec![0xA5u8; spec.payload]);
    let phase = Phase::new(spec.warmup);
    let length = match spec.length {
        Length::Duration(d) => d,
        Length::Count(_) => Duration::ZERO,
    };
    let progress = Progress::new(ctx.progress, &ctx.label, spec.warmup + length);
    let mut pending = FuturesUnordered::new();
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut start: Option<(Instant, u64, CpuSample)> = None;
    loop {
        let now = Instant::now();
        if start.is_none() && now >= phase.t0() {
            start = Some((now, acked, CpuSample::take(ctx.broker_pid)));
        }
        let done = match (start, spec.length) {
            (Some((t0, _, _)), Length::Duration(d)) => now >= t0 + d,
            (Some((_, a0, _)), Length::Count(c)) => sent - a0 >= c,
            (None, _) => false,
        };
        if done {
            break;
        }
        if (pending.len() as u64) < spec.window {
            pending.push(conn.publish_acked(&topic, payload.clone()).await?);
            sent += 1;
            continue;
        }
        if let Some(r) = pending.next().await {
            r?;
            acked += 1;
            if acked % 4096 == 0 {
                progress.set_elapsed(phase.clock.at(0).elapsed());
                progress.message(format!("{acked} acked"));
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
        acked += 1;
    }
    let t_end = Instant::now();
    let cpu1 = CpuSample::take(ctx.broker_pid);
    let (t0, acked0, cpu0) = start.unwrap_or((t_end, acked, cpu1));

    progress.message(format!("reading {acked} messages back"));
    let r0 = Instant::now();
    let read = conn
        .read_stream(name, acked, Duration::from_secs(5))
        .await?;
    let read_secs = r0.elapsed().as_secs_f64();
    progress.finish();
    Ok(Measured {
        elapsed: t_end.saturating_duration_since(t0),
        published: acked - acked0,
        delivered: acked - acked0,
        cpu: Some((cpu0, cpu1)),
        missing: acked.saturating_sub(read),
        read_back_per_sec: (read_secs > 0.0).then(|| read as f64 / read_secs),
        notes: vec![format!(
            "{acked} messages stored; read back {read} in {read_secs:.2} s"
        )],
        ..Measured::default()
    })
}
