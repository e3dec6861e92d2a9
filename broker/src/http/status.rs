//! The live status page's data: `GET /v1/status` (JSON the page polls every
//! second) and `/readyz`. Rates are computed once a second by a ticker, so a
//! poll only reads; several open pages cost nothing extra.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::metrics::Metrics;
use crate::server::State;
use crate::streams::StreamState;

/// How many subjects the status page lists.
const TOP_SUBJECTS: usize = 20;
const TICK: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Default)]
struct Totals {
    msgs_in: u64,
    bytes_in: u64,
    msgs_out: u64,
    bytes_out: u64,
}

impl Totals {
    fn read(m: &Metrics) -> Totals {
        Totals {
            msgs_in: m.msgs_in.load(Relaxed),
            bytes_in: m.bytes_in.load(Relaxed),
            msgs_out: m.msgs_out.load(Relaxed),
            bytes_out: m.bytes_out.load(Relaxed),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct PerSec {
    msgs_in: f64,
    bytes_in: f64,
    msgs_out: f64,
    bytes_out: f64,
}

struct RateState {
    at: Instant,
    prev: Totals,
    per_sec: PerSec,
}

pub(super) struct Rates(Mutex<RateState>);

impl Rates {
    pub(super) fn new(state: &State) -> Rates {
        Rates(Mutex::new(RateState {
            at: Instant::now(),
            prev: Totals::read(state.metrics()),
            per_sec: PerSec::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RateState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Recomputes broker-wide and per-subject rates every second until shutdown.
pub(super) async fn tick(gw: Arc<Gateway>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        let cur = Totals::read(gw.state.metrics());
        let secs = {
            let mut r = gw.rates.lock();
            let secs = now.duration_since(r.at).as_secs_f64();
            if secs <= 0.0 {
                continue;
            }
            let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            r.per_sec = PerSec {
                msgs_in: d(cur.msgs_in, r.prev.msgs_in),
                bytes_in: d(cur.bytes_in, r.prev.bytes_in),
                msgs_out: d(cur.msgs_out, r.prev.msgs_out),
                bytes_out: d(cur.bytes_out, r.prev.bytes_out),
            };
            r.prev = cur;
            r.at = now;
            secs
        };
        gw.state.metrics().subjects.tick(secs);
    }
}

/// `Err(why)` while the broker should not get traffic: draining, or a part
/// of it (a store recovering) says it is not ready.
pub(super) fn ready(gw: &Gateway) -> Result<(), String> {
    if gw.is_draining() {
        return Err("shutting down".into());
    }
    let waiting: Vec<String> = gw
        .state
        .metrics()
        .sources
        .all()
        .iter()
        .filter_map(|s| s.ready().err().map(|e| format!("{}: {e}", s.name())))
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(waiting.join("; "))
    }
}

/// How many consumers of each stream `/v1/status` lists (by name); the
/// stream's `state.consumers` still counts them all.
const CONSUMERS_PER_STREAM: usize = 20;

/// Every stream (config and state, as `GET /v1/streams`) with its first
/// consumers by name, each with `num_pending`: messages after its position.
fn streams_with_consumers(st: &State) -> Value {
    st.streams
        .list_with_consumers(CONSUMERS_PER_STREAM)
        .into_iter()
        .map(|(info, consumers)| {
            let consumers: Vec<Value> = consumers
                .into_iter()
                .map(|c| {
                    let pending = pending(&info.state, c.next_seq);
                    // A filtered consumer reads only some of them; counting
                    // which would mean reading the stream every second.
                    let exact = c.config.filter_subject.is_none();
                    let mut v = serde_json::to_value(&c).unwrap_or(Value::Null);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("num_pending".into(), pending.into());
                        o.insert("num_pending_exact".into(), exact.into());
                    }
                    v
                })
                .collect();
            let mut v = serde_json::to_value(&info).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("consumers".into(), consumers.into());
            }
            v
        })
        .collect()
}

/// Messages stored after `next_seq - 1`: what a consumer at `next_seq`
/// has not been delivered yet (sequences in a stream have no gaps; with
/// damaged records skipped this is at most the stream's message count).
fn pending(s: &StreamState, next_seq: u64) -> u64 {
    (s.last_seq + 1)
        .saturating_sub(next_seq.max(s.first_seq))
        .min(s.messages)
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Everything the status page shows.
pub(super) fn snapshot(gw: &Gateway) -> Value {
    let st = &gw.state;
    let m = st.metrics();
    let g = Metrics::get;
    let per = gw.rates.lock().per_sec;
    let subjects: Vec<Value> = m
        .subjects
        .top(TOP_SUBJECTS)
        .into_iter()
        .map(|s| {
            json!({
                "subject": s.subject,
                "msgs": s.msgs,
                "bytes": s.bytes,
                "msgs_per_sec": round(s.msgs_per_sec),
                "bytes_per_sec": round(s.bytes_per_sec),
            })
        })
        .collect();
    let (tracked, other_msgs, _) = m.subjects.summary();

    let mut doc = json!({
        "node": st.config.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": gw.started.elapsed().as_secs(),
        "ready": ready(gw).err().map_or(Value::Bool(true), Value::from),
        "listen": {
            "clients": st.config.listen.to_string(),
            "http": gw.local_addr.to_string(),
            "cluster": st.config.cluster.map(|a| a.to_string()),
        },
        "connections": {
            "clients": g(&m.connections),
            "http": gw.metrics.connections(),
            "sse": gw.metrics.sse_subscribers(),
            "refused": g(&m.connections_refused),
        },
        "subscriptions": st.subscriptions(),
        "messages": {
            "in": g(&m.msgs_in),
            "out": g(&m.msgs_out),
            "bytes_in": g(&m.bytes_in),
            "bytes_out": g(&m.bytes_out),
            "in_per_sec": round(per.msgs_in),
            "out_per_sec": round(per.msgs_out),
            "bytes_in_per_sec": round(per.bytes_in),
            "bytes_out_per_sec": round(per.bytes_out),
            "slow_consumers": g(&m.slow_consumers),
            "stale_connections": g(&m.stale_connections),
            "dropped": g(&m.dropped_messages),
            "refused": g(&m.payload_too_large) + g(&m.invalid_subjects),
        },
        "subjects": subjects,
        "subjects_tracked": tracked,
        "subjects_other_msgs": other_msgs,
        "http_requests": gw.metrics.requests(),
        "streams": streams_with_consumers(st),
        "cluster": {
            "listen": st.config.cluster.map(|a| a.to_string()),
            "peers": st.config.peers.iter().map(|p| json!({"url": p})).collect::<Vec<_>>(),
        },
        "fast_path": {
            "mode": format!("{:?}", st.config.accel).to_lowercase(),
            "active": false,
            "detail": "plain TCP",
        },
    });
    // Parts of the broker that report for themselves replace the defaults above.
    if let Some(obj) = doc.as_object_mut() {
        for s in st.metrics().sources.all() {
            let v = s.status();
            if !v.is_null() {
                obj.insert(s.name().to_string(), v);
            }
        }
    }
    doc
}
