//! NATS-style monitoring on the HTTP gateway (docs/nats.md, "Monitoring"):
//! `/varz`, the server's figures, and `/jsz`, sockbus's own streams and
//! consumers in the JSON shapes that tools written for nats-server read
//! (KEDA's NATS JetStream scaler sums `num_pending + num_ack_pending` of
//! one consumer in `account_details[].stream_detail[].consumer_detail[]`).

use serde_json::{json, Value};

use sockbus_protocol::api::consumer::ConsumerInfo;

use super::Gateway;
use crate::account::Account;
use crate::metrics::Metrics;
use crate::streams::Stream;

/// The name NATS tools use for the default account, shown for (and
/// accepted as `acc=` meaning) sockbus's default account.
const NATS_DEFAULT_ACCOUNT: &str = "$G";

/// Messages one filtered consumer's `num_pending` count reads at a time.
const COUNT_BATCH: usize = 4096;

/// `GET /varz`.
pub(super) fn varz(gw: &Gateway) -> Value {
    let st = &gw.state;
    let cfg = &st.config;
    let m = st.metrics();
    let g = Metrics::get;
    let uptime = gw.started.elapsed();
    let (rss, cpu_secs) = process_usage();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let port_of = |a: Option<std::net::SocketAddr>| a.map_or(0, |a| a.port());
    let now = now_rfc3339();
    json!({
        "server_id": format!("SOCKBUS-{}", cfg.node_id),
        "server_name": cfg.node_id,
        "version": crate::nats::NATS_VERSION,
        "sockbus_version": env!("CARGO_PKG_VERSION"),
        "proto": 1,
        "go": concat!("sockbus ", env!("CARGO_PKG_VERSION")),
        "host": cfg.nats.map_or_else(|| cfg.listen.ip().to_string(), |a| a.ip().to_string()),
        "port": port_of(cfg.nats),
        "native_port": cfg.listen.port(),
        "http_port": gw.local_addr.port(),
        "cluster": {"port": port_of(cfg.cluster)},
        "max_connections": cfg.max_connections,
        "max_payload": cfg.max_payload,
        "max_pending": cfg.max_pending,
        "ping_interval": cfg.ping_interval.as_nanos() as u64,
        "ping_max": cfg.max_pings_out,
        "tls_required": st.tls.is_some(),
        "auth_required": st.users().is_some(),
        "headers": true,
        "jetstream": {"enabled": true},
        "start": rfc3339_at(std::time::SystemTime::now() - uptime),
        "now": now,
        "uptime": humantime::format_duration(std::time::Duration::from_secs(uptime.as_secs())).to_string(),
        "mem": rss,
        "cores": cores,
        "gomaxprocs": cores,
        // Average since the start, in percent of one core.
        "cpu": if uptime.as_secs_f64() > 0.0 { (cpu_secs / uptime.as_secs_f64() * 1000.0).round() / 10.0 } else { 0.0 },
        // Native and NATS clients: they share the connection limit.
        "connections": g(&m.connections),
        "total_connections": g(&m.connections_total),
        "routes": g(&m.routes),
        "in_msgs": g(&m.msgs_in),
        "out_msgs": g(&m.msgs_out),
        "in_bytes": g(&m.bytes_in),
        "out_bytes": g(&m.bytes_out),
        "slow_consumers": g(&m.slow_consumers),
        "stale_connections": g(&m.stale_connections),
        "subscriptions": st.subscriptions(),
        "http_req_stats": {},
        "connect_urls": Vec::<String>::new(),
    })
}

/// What `/jsz` was asked for (the query parameters nats-server takes).
#[derive(Default, Debug)]
pub(super) struct JszQuery {
    acc: Option<String>,
    accounts: bool,
    streams: bool,
    consumers: bool,
    config: bool,
}

impl JszQuery {
    /// Parses `acc=..&accounts=true&streams=true&consumers=true&config=true`;
    /// unknown parameters are ignored, as nats-server does.
    pub(super) fn parse(query: Option<&str>) -> Result<JszQuery, String> {
        let mut q = JszQuery::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = super::routes::decode_path(v)?;
            let on = || matches!(&*v, "true" | "1" | "");
            match k {
                "acc" => q.acc = Some(v.to_string()).filter(|a| !a.is_empty()),
                "accounts" => q.accounts = on(),
                "streams" => q.streams = on(),
                "consumers" => q.consumers = on(),
                "config" => q.config = on(),
                _ => {}
            }
        }
        // Consumers are listed inside their streams, streams inside their
        // accounts; naming an account asks for its details (what KEDA's
        // `acc=..&consumers=true&config=true` relies on).
        q.streams |= q.consumers;
        q.accounts |= q.streams || q.acc.is_some();
        Ok(q)
    }
}

/// `GET /jsz`: totals over `accounts`, and per account (when asked) its
/// streams and their consumers.
pub(super) fn jsz(gw: &Gateway, accounts: &[&Account], q: &JszQuery) -> Value {
    let now = now_rfc3339();
    let mut details = Vec::new();
    let (mut n_streams, mut n_consumers, mut msgs, mut bytes) = (0usize, 0usize, 0u64, 0u64);
    for a in accounts {
        let name = nats_account_name(a.name());
        if q.acc
            .as_deref()
            .is_some_and(|want| want != name && want != a.name())
        {
            continue;
        }
        let mut streams = Vec::new();
        let (mut a_msgs, mut a_bytes, mut a_consumers) = (0u64, 0u64, 0usize);
        let mut names: Vec<String> = a
            .streams
            .list()
            .into_iter()
            .map(|i| i.config.name)
            .collect();
        names.sort();
        for sname in names {
            let Some(s) = a.streams.get(&sname) else {
                continue;
            };
            let info = s.info();
            let consumers = s.consumer_infos(usize::MAX);
            a_msgs += info.state.messages;
            a_bytes += info.state.bytes;
            a_consumers += consumers.len();
            if !q.streams {
                continue;
            }
            let mut d = json!({
                "name": info.config.name,
                "created": now,
                "cluster": {"leader": gw.state.config.node_id},
                "state": {
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_seq": info.state.first_seq,
                    "first_ts": info.state.first_ts,
                    "last_seq": info.state.last_seq,
                    "last_ts": info.state.last_ts,
                    "consumer_count": consumers.len(),
                    "num_deleted": 0,
                },
            });
            if q.config {
                d["config"] = json!({
                    "name": info.config.name,
                    "subjects": info.config.subjects,
                    "retention": "limits",
                    "storage": "file",
                    "num_replicas": 1,
                    "max_msgs": info.config.max_msgs.map_or(-1, |n| n as i64),
                    "max_bytes": info.config.max_bytes.map_or(-1, |n| n as i64),
                    "max_age": info.config.max_age_ms.map_or(0, |ms| ms * 1_000_000),
                    "duplicate_window": info.config.duplicate_window_ms.unwrap_or(0) * 1_000_000,
                });
            }
            if q.consumers {
                d["consumer_detail"] = consumers
                    .iter()
                    .map(|c| consumer_detail(gw, &s, c, q.config, &now))
                    .collect::<Vec<_>>()
                    .into();
            }
            streams.push(d);
        }
        n_streams += a.streams.count();
        n_consumers += a_consumers;
        msgs += a_msgs;
        bytes += a_bytes;
        if q.accounts {
            let mut d = json!({
                "name": name,
                "id": name,
                "memory": 0,
                "storage": a_bytes,
                "accounts": 1,
                "ha_assets": 0,
                "api": {"total": 0, "errors": 0},
            });
            if q.streams {
                d["stream_detail"] = streams.into();
            }
            details.push(d);
        }
    }
    let mut v = json!({
        "server_id": format!("SOCKBUS-{}", gw.state.config.node_id),
        "now": now,
        "config": {"store_dir": gw.state.config.data_dir.display().to_string()},
        "memory": 0,
        "storage": bytes,
        "accounts": accounts.len(),
        "ha_assets": 0,
        "api": {"total": 0, "errors": 0},
        "streams": n_streams,
        "consumers": n_consumers,
        "messages": msgs,
        "bytes": bytes,
    });
    if q.accounts {
        v["account_details"] = details.into();
    }
    v
}

fn consumer_detail(gw: &Gateway, s: &Stream, c: &ConsumerInfo, config: bool, now: &str) -> Value {
    let num_pending = num_pending(s, c.next_seq, c.config.filter_subject.as_deref());
    let mut d = json!({
        "stream_name": c.stream,
        "name": c.name,
        "created": now,
        "delivered": {"consumer_seq": c.next_seq.saturating_sub(1), "stream_seq": c.next_seq.saturating_sub(1)},
        "ack_floor": {"consumer_seq": c.ack_floor, "stream_seq": c.ack_floor},
        "num_ack_pending": c.num_ack_pending,
        "num_redelivered": c.num_redelivered,
        "num_waiting": 0,
        "num_pending": num_pending,
        "cluster": {"leader": gw.state.config.node_id},
        "ts": now,
    });
    if config {
        let mut cfg = json!({
            "name": c.name,
            "deliver_policy": "all",
            "ack_policy": serde_json::to_value(c.config.ack_policy).unwrap_or(Value::Null),
            "ack_wait": c.config.ack_wait().as_nanos() as u64,
            "max_deliver": c.config.max_deliver.map_or(-1, i64::from),
            "max_ack_pending": c.config.max_ack_pending(),
        });
        if let Some(dn) = &c.config.durable {
            cfg["durable_name"] = dn.clone().into();
        }
        if let Some(f) = &c.config.filter_subject {
            cfg["filter_subject"] = f.clone().into();
        }
        d["config"] = cfg;
    }
    d
}

/// Messages of `s` from `next_seq` on that match `filter`: what the
/// consumer has yet to deliver for the first time. Without a filter (or
/// with one that takes every subject the stream captures) it is the span
/// of sequences; with a narrower filter the stream is read from `next_seq`
/// (the cost of a `/jsz?consumers=true` grows with such a backlog).
pub(crate) fn num_pending(s: &Stream, next_seq: u64, filter: Option<&str>) -> u64 {
    let (first, last) = {
        let st = s.log.lock();
        (st.first_seq(), st.last_seq())
    };
    let mut from = next_seq.max(first);
    if from > last {
        return 0;
    }
    let filter = filter.filter(|f| {
        !s.config()
            .subjects
            .iter()
            .all(|p| crate::streams::covers(f, p))
    });
    let Some(f) = filter else {
        return last - from + 1;
    };
    let mut n = 0u64;
    let mut pos = None;
    while from <= last {
        let Ok(b) = s.log.read(from, Some(f), COUNT_BATCH, usize::MAX, pos) else {
            break;
        };
        n += b.msgs.iter().filter(|m| m.seq <= last).count() as u64;
        if b.next <= from {
            break;
        }
        from = b.next;
        pos = b.pos;
    }
    n
}

fn nats_account_name(name: &str) -> &str {
    if name == crate::auth::DEFAULT_ACCOUNT {
        NATS_DEFAULT_ACCOUNT
    } else {
        name
    }
}

fn now_rfc3339() -> String {
    rfc3339_at(std::time::SystemTime::now())
}

fn rfc3339_at(t: std::time::SystemTime) -> String {
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::streams::rfc3339(ns)
}

/// Resident memory (bytes) and CPU time used (user + system, seconds) of
/// this process, from /proc; zeros where /proc is not there.
fn process_usage() -> (u64, f64) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |p| p * page);
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / tick)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::covers;

    #[test]
    fn a_filter_covers_the_patterns_it_matches_every_subject_of() {
        assert!(covers(">", "orders.>"));
        assert!(covers("orders.>", "orders.>"));
        assert!(covers("orders.>", "orders.*"));
        assert!(covers("orders.*", "orders.*"));
        assert!(covers("orders.*", "orders.eu"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.eu", "orders.*"));
        assert!(!covers("orders.*.x", "orders.*"));
        assert!(!covers("orders", "orders.>"));
    }

    #[test]
    fn naming_an_account_or_consumers_asks_for_the_details_around_them() {
        let q = JszQuery::parse(Some("acc=%24G&consumers=true&config=true")).unwrap();
        assert_eq!(q.acc.as_deref(), Some("$G"));
        assert!(q.accounts && q.streams && q.consumers && q.config);
        let q = JszQuery::parse(None).unwrap();
        assert!(!q.accounts && !q.streams && !q.consumers && !q.config);
        assert!(JszQuery::parse(Some("acc=%zz")).is_err());
    }
}
