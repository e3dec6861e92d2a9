//! `GET /metrics`: the Prometheus text format (version 0.0.4), and the HTTP
//! gateway's own counters. Names follow Prometheus conventions: a
//! `sockbus_` prefix, `_total` on counters, base units (`_seconds`,
//! `_bytes`) in the name. Other parts of the broker add their lines through
//! [`crate::metrics::Source`].

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hyper::StatusCode;

use super::routes::Route;
use super::Gateway;
use crate::metrics::Metrics;

/// Statuses the gateway answers with; anything else is counted as "other".
const STATUSES: [u16; 12] = [200, 204, 400, 401, 403, 404, 405, 408, 413, 500, 503, 431];
const NROUTES: usize = Route::ALL.len();
const NSTATUS: usize = STATUSES.len() + 1;
/// Histogram upper bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default, Debug)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// The HTTP gateway's counters: lock-free, a handful of relaxed atomic adds per request.
#[derive(Default, Debug)]
pub struct HttpMetrics {
    requests: [[AtomicU64; NSTATUS]; NROUTES],
    durations: [Histogram; NROUTES],
    connections: AtomicU64,
    connections_total: AtomicU64,
    connections_refused: AtomicU64,
    sse: AtomicU64,
    sse_total: AtomicU64,
    body_timeouts: AtomicU64,
}

fn route_index(r: Route) -> usize {
    Route::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(NROUTES - 1)
}

impl HttpMetrics {
    pub(super) fn observe(&self, route: Route, status: StatusCode, took: Duration) {
        let r = route_index(route);
        let s = STATUSES
            .iter()
            .position(|&x| x == status.as_u16())
            .unwrap_or(NSTATUS - 1);
        self.requests[r][s].fetch_add(1, Relaxed);
        let h = &self.durations[r];
        let secs = took.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        h.buckets[b].fetch_add(1, Relaxed);
        h.count.fetch_add(1, Relaxed);
        h.sum_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub(super) fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub(super) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub(super) fn refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    pub(super) fn sse_opened(&self) {
        self.sse.fetch_add(1, Relaxed);
        self.sse_total.fetch_add(1, Relaxed);
    }

    pub(super) fn sse_closed(&self) {
        self.sse.fetch_sub(1, Relaxed);
    }

    pub(super) fn body_timeout(&self) {
        self.body_timeouts.fetch_add(1, Relaxed);
    }

    /// Open HTTP connections.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// Open SSE subscriptions.
    pub fn sse_subscribers(&self) -> u64 {
        self.sse.load(Relaxed)
    }

    /// Requests answered so far, all routes.
    pub fn requests(&self) -> u64 {
        self.requests
            .iter()
            .flat_map(|r| r.iter())
            .map(|c| c.load(Relaxed))
            .sum()
    }
}

/// Writes `# HELP` and `# TYPE` for one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

/// Escapes a label value (backslash, double quote, newline).
pub(super) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(super) fn render(gw: &Gateway) -> String {
    let st = &gw.state;
    let m = st.metrics();
    let g = Metrics::get;
    let mut o = String::with_capacity(8 * 1024);
    family(
        &mut o,
        "sockbus_info",
        "gauge",
        "Broker version and node id (always 1).",
    );
    let _ = writeln!(
        o,
        "sockbus_info{{version=\"{}\",node=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        label(&st.config.node_id)
    );
    family(
        &mut o,
        "sockbus_uptime_seconds",
        "gauge",
        "Seconds since the HTTP gateway started.",
    );
    let _ = writeln!(
        o,
        "sockbus_uptime_seconds {:.3}",
        gw.started.elapsed().as_secs_f64()
    );

    if let Some(live) = st.live_users() {
        let users = live.get();
        if live.reloadable() {
            family(
                &mut o,
                "sockbus_users_reloads_total",
                "counter",
                "Reloads of --users-file: applied (ok) and refused, the users in force kept (failed).",
            );
            let _ = writeln!(
                o,
                "sockbus_users_reloads_total{{result=\"ok\"}} {}",
                live.reloads.load(Relaxed)
            );
            let _ = writeln!(
                o,
                "sockbus_users_reloads_total{{result=\"failed\"}} {}",
                live.reload_failures.load(Relaxed)
            );
        }
        sample(
            &mut o,
            "sockbus_auth_failures_total",
            "counter",
            "Credentials refused (native CONNECT and HTTP), wrong or missing.",
            users.failures.load(Relaxed),
        );
        for (name, help, get) in [
            (
                "sockbus_permission_denied_publish_total",
                "Publishes refused by the user's permissions, per user.",
                (|u: &crate::auth::User| u.denied_publish.load(Relaxed))
                    as fn(&crate::auth::User) -> u64,
            ),
            (
                "sockbus_permission_denied_subscribe_total",
                "Subscriptions refused by the user's permissions, per user.",
                |u: &crate::auth::User| u.denied_subscribe.load(Relaxed),
            ),
        ] {
            family(&mut o, name, "counter", help);
            for u in users.iter() {
                let _ = writeln!(o, "{name}{{user=\"{}\"}} {}", label(&u.name), get(u));
            }
        }
    }

    sample(
        &mut o,
        "sockbus_connections",
        "gauge",
        "Native protocol client connections open now.",
        g(&m.connections),
    );
    sample(
        &mut o,
        "sockbus_connections_total",
        "counter",
        "Native protocol connections accepted.",
        g(&m.connections_total),
    );
    sample(
        &mut o,
        "sockbus_connections_refused_total",
        "counter",
        "Native protocol connections refused at --max-connections.",
        g(&m.connections_refused),
    );
    sample(
        &mut o,
        "sockbus_subscriptions",
        "gauge",
        "Subscriptions in the router (native, SSE and cluster interest).",
        st.subscriptions() as u64,
    );
    sample(
        &mut o,
        "sockbus_messages_in_total",
        "counter",
        "Messages published to this broker (native and HTTP).",
        g(&m.msgs_in),
    );
    sample(
        &mut o,
        "sockbus_bytes_in_total",
        "counter",
        "Payload bytes published to this broker.",
        g(&m.bytes_in),
    );
    sample(
        &mut o,
        "sockbus_messages_out_total",
        "counter",
        "Messages queued for delivery to subscribers.",
        g(&m.msgs_out),
    );
    sample(
        &mut o,
        "sockbus_bytes_out_total",
        "counter",
        "Payload bytes queued for delivery to subscribers.",
        g(&m.bytes_out),
    );
    sample(
        &mut o,
        "sockbus_slow_consumers_total",
        "counter",
        "Connections closed as slow consumers: over --max-pending queued bytes, or no write progress for --write-timeout.",
        g(&m.slow_consumers),
    );
    sample(
        &mut o,
        "sockbus_stale_connections_total",
        "counter",
        "Connections closed for leaving --max-pings-out keepalive PINGs unanswered.",
        g(&m.stale_connections),
    );
    sample(&mut o, "sockbus_dropped_messages_total", "counter", "Messages a matching subscriber did not get because its connection was over budget or closing.", g(&m.dropped_messages));
    family(
        &mut o,
        "sockbus_refused_messages_total",
        "counter",
        "Publishes refused, by reason.",
    );
    let _ = writeln!(
        o,
        "sockbus_refused_messages_total{{reason=\"payload_too_large\"}} {}",
        g(&m.payload_too_large)
    );
    let _ = writeln!(
        o,
        "sockbus_refused_messages_total{{reason=\"invalid_subject\"}} {}",
        g(&m.invalid_subjects)
    );
    sample(
        &mut o,
        "sockbus_malformed_frames_total",
        "counter",
        "Native connections closed for a malformed frame.",
        g(&m.malformed_frames),
    );
    sample(
        &mut o,
        "sockbus_no_responders_total",
        "counter",
        "Requests answered with a no-responders status.",
        g(&m.no_responders),
    );

    let h = &gw.metrics;
    sample(
        &mut o,
        "sockbus_http_connections",
        "gauge",
        "HTTP connections open now (SSE included).",
        h.connections.load(Relaxed),
    );
    sample(
        &mut o,
        "sockbus_http_connections_total",
        "counter",
        "HTTP connections accepted.",
        h.connections_total.load(Relaxed),
    );
    sample(
        &mut o,
        "sockbus_http_connections_refused_total",
        "counter",
        "HTTP connections refused at --http-max-connections (probes answered there are not counted).",
        h.connections_refused.load(Relaxed),
    );
    sample(
        &mut o,
        "sockbus_http_sse_subscribers",
        "gauge",
        "SSE subscriptions open now.",
        h.sse.load(Relaxed),
    );
    sample(
        &mut o,
        "sockbus_http_sse_subscribers_total",
        "counter",
        "SSE subscriptions opened.",
        h.sse_total.load(Relaxed),
    );
    sample(
        &mut o,
        "sockbus_http_body_timeouts_total",
        "counter",
        "Requests answered 408 because the body did not arrive within --http-body-timeout.",
        h.body_timeouts.load(Relaxed),
    );

    family(
        &mut o,
        "sockbus_http_requests_total",
        "counter",
        "HTTP requests answered, by route template and status code.",
    );
    for (ri, route) in Route::ALL.iter().enumerate() {
        for (si, c) in h.requests[ri].iter().enumerate() {
            let v = c.load(Relaxed);
            if v == 0 {
                continue;
            }
            let status = STATUSES
                .get(si)
                .map_or("other".to_string(), |s| s.to_string());
            let _ = writeln!(
                o,
                "sockbus_http_requests_total{{route=\"{}\",status=\"{status}\"}} {v}",
                route.label()
            );
        }
    }
    family(
        &mut o,
        "sockbus_http_request_duration_seconds",
        "histogram",
        "Time from request to response head, by route template (SSE: until the stream starts).",
    );
    for (ri, route) in Route::ALL.iter().enumerate() {
        let hist = &h.durations[ri];
        let count = hist.count.load(Relaxed);
        if count == 0 {
            continue;
        }
        let r = route.label();
        let mut cum = 0;
        for (bi, le) in BUCKETS.iter().enumerate() {
            cum += hist.buckets[bi].load(Relaxed);
            let _ = writeln!(
                o,
                "sockbus_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"{le}\"}} {cum}"
            );
        }
        cum += hist.buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            o,
            "sockbus_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}",
            cum.max(count)
        );
        let _ = writeln!(
            o,
            "sockbus_http_request_duration_seconds_sum{{route=\"{r}\"}} {:.9}",
            hist.sum_nanos.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            o,
            "sockbus_http_request_duration_seconds_count{{route=\"{r}\"}} {}",
            cum.max(count)
        );
    }

    let (tracked, other_msgs, _) = m.subjects.summary();
    sample(
        &mut o,
        "sockbus_subjects_tracked",
        "gauge",
        "Subjects with their own counts on the status page (at most 1024).",
        tracked as u64,
    );
    sample(&mut o, "sockbus_subjects_untracked_messages_total", "counter", "Messages counted under no tracked subject (table full, or too many subjects in one batch).", other_msgs);

    for s in st.metrics().sources.all() {
        s.prometheus(&mut o);
    }
    o
}
