//! What a run reports: one [`RunReport`] per run, printed as a table row and
//! serialised to JSON as is.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::driver::Target;
use crate::scenario::{Length, Measured, Scenario, Spec};
use crate::stats::LatencySummary;

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub target: String,
    /// "sockbus" or "nats".
    pub driver: String,
    pub scenario: Scenario,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// In-flight window (closed-loop scenarios) or outstanding requests per
    /// requester (reqrep); None for the open-loop latency scenario.
    pub window: Option<u64>,
    /// Offered rate, msgs/s (latency scenario only).
    pub rate: Option<u64>,
    pub warmup_s: f64,
    /// Length of the measured phase, up to the last delivery.
    pub elapsed_s: f64,
    /// Messages (or requests) sent in the measured phase.
    pub published: u64,
    /// Messages received in the measured phase, every subscriber's copy
    /// counted (replies, for reqrep).
    pub delivered: u64,
    pub msgs_per_sec: f64,
    /// Payload megabytes (10^6) delivered per second.
    pub mb_per_sec: f64,
    pub latency: Option<LatencySummary>,
    pub broker_cpu_ms: Option<f64>,
    pub broker_cpu_ms_per_million: Option<f64>,
    pub client_cpu_ms: Option<f64>,
    pub client_cpu_ms_per_million: Option<f64>,
    /// Dropped by the client library as a slow consumer.
    pub client_dropped: u64,
    /// Published but never delivered (per expected copy).
    pub missing: u64,
    /// Delivered more than once (queue scenario only).
    pub duplicates: Option<u64>,
    /// Failed requests (reqrep).
    pub errors: u64,
    /// durable: msgs/s reading the stream back (msgs/s above is the acked publish rate).
    pub read_back_msgs_per_sec: Option<f64>,
    pub notes: Vec<String>,
}

impl RunReport {
    pub(crate) fn new(target: &Target, spec: &Spec, m: &Measured) -> RunReport {
        let secs = m.elapsed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let per_million = |ms: f64| {
            if m.delivered > 0 {
                Some(ms * 1e6 / m.delivered as f64)
            } else {
                None
            }
        };
        let (broker_ms, client_ms) = match &m.cpu {
            Some((a, b)) => (
                a.broker
                    .zip(b.broker)
                    .map(|(a, b)| b.saturating_sub(a).as_secs_f64() * 1e3),
                Some(b.client.saturating_sub(a.client).as_secs_f64() * 1e3),
            ),
            None => (None, None),
        };
        let mut notes = m.notes.clone();
        if let Length::Count(c) = spec.length {
            notes.push(format!("--count {c}"));
        }
        RunReport {
            target: crate::driver::redact_url(target.url()),
            driver: target.kind().to_string(),
            scenario: spec.scenario,
            payload_bytes: spec.payload,
            publishers: spec.publishers,
            subscribers: spec.subscribers,
            window: match spec.scenario {
                Scenario::Latency => None,
                _ => Some(spec.window),
            },
            rate: (spec.scenario == Scenario::Latency).then_some(spec.rate),
            warmup_s: spec.warmup.as_secs_f64(),
            elapsed_s: secs,
            published: m.published,
            delivered: m.delivered,
            msgs_per_sec: per_sec(m.delivered as f64),
            mb_per_sec: per_sec(m.delivered as f64 * spec.payload as f64) / 1e6,
            latency: m.latencies.as_ref().and_then(|l| l.summary()),
            broker_cpu_ms: broker_ms,
            broker_cpu_ms_per_million: broker_ms.and_then(per_million),
            client_cpu_ms: client_ms,
            client_cpu_ms_per_million: client_ms.and_then(per_million),
            client_dropped: m.client_dropped,
            missing: m.missing,
            duplicates: m.duplicates,
            errors: m.errors,
            read_back_msgs_per_sec: m.read_back_per_sec,
            notes,
        }
    }

    /// Anything a reader must not miss: lost, duplicated, dropped, failed.
    pub fn problems(&self) -> Option<String> {
        let mut p = Vec::new();
        if self.missing > 0 {
            p.push(format!("{} missing", self.missing));
        }
        if let Some(d) = self.duplicates.filter(|&d| d > 0) {
            p.push(format!("{d} duplicates"));
        }
        if self.client_dropped > 0 {
            p.push(format!("{} dropped by the client", self.client_dropped));
        }
        if self.errors > 0 {
            p.push(format!("{} failed requests", self.errors));
        }
        (!p.is_empty()).then(|| p.join(", "))
    }

    /// "1→10", "2→1 (queue of 4)" and the like.
    pub fn shape(&self) -> String {
        match self.scenario {
            Scenario::Queue => format!("{}→q{}", self.publishers, self.subscribers),
            Scenario::Durable => format!("1→stream, {} acks", self.window.unwrap_or(1)),
            Scenario::Reqrep => format!(
                "{}×{}⇄{}",
                self.publishers,
                self.window.unwrap_or(1),
                self.subscribers
            ),
            _ => format!("{}→{}", self.publishers, self.subscribers),
        }
    }
}

/// 1234567.0 → "1.23M"; 4321.0 → "4.32k".
pub fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Microseconds (always: columns are labelled µs), one decimal below 1 ms.
pub fn us(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "-".into())
}

/// A plain-text table, one row per run.
pub fn table(reports: &[RunReport]) -> String {
    let header = [
        "target",
        "scenario",
        "shape",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "broker CPU ms/M",
        "client CPU ms/M",
        "problems",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let l = r.latency.as_ref();
            vec![
                r.driver.clone(),
                r.scenario.name().to_string(),
                r.shape(),
                si(r.msgs_per_sec),
                format!("{:.1}", r.mb_per_sec),
                opt(l.map(|l| l.p50_us), us),
                opt(l.map(|l| l.p90_us), us),
                opt(l.map(|l| l.p99_us), us),
                opt(l.map(|l| l.p999_us), us),
                opt(l.map(|l| l.max_us), us),
                opt(r.broker_cpu_ms_per_million, |x| format!("{x:.0}")),
                opt(r.client_cpu_ms_per_million, |x| format!("{x:.0}")),
                r.problems().unwrap_or_else(|| "none".into()),
            ]
        })
        .collect();
    render(&header, &rows)
}

/// Left-aligns the first three columns and the last, right-aligns numbers.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            let numeric = i > 2 && i + 1 < n;
            if i > 0 {
                s.push_str("  ");
            }
            if numeric {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.trim_end().to_string()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_prefixes_keep_three_significant_digits() {
        assert_eq!(si(1_340_000.0), "1.34M");
        assert_eq!(si(638_000.0), "638.0k");
        assert_eq!(si(4_321.0), "4.32k");
        assert_eq!(si(999.0), "999");
    }

    #[test]
    fn microseconds_stay_microseconds() {
        assert_eq!(us(85.04), "85.0");
        assert_eq!(us(241_963.2), "241963");
    }

    #[test]
    fn tables_align_numbers_right() {
        let t = render(
            &["target", "a", "b", "msgs/s", "problems"],
            &[
                vec![
                    "nats".into(),
                    "x".into(),
                    "y".into(),
                    "1.34M".into(),
                    "none".into(),
                ],
                vec![
                    "sockbus".into(),
                    "x".into(),
                    "y".into(),
                    "12".into(),
                    "none".into(),
                ],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains(" 1.34M  none"));
        assert!(lines[2].contains("    12  none"));
    }
}
