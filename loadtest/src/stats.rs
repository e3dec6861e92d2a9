//! The numbers behind every report: latency histograms and their
//! percentiles, the open-loop send schedule (coordinated-omission
//! correction), and the median / ratio arithmetic of `compare`.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track (60 s, in nanoseconds); anything
/// slower is clamped to it rather than lost.
const MAX_TRACKABLE_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latencies")
            .field("count", &self.0.len())
            .finish()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Latencies(
            Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3)
                .expect("static histogram bounds are valid"),
        )
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_TRACKABLE_NS));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both sides share the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Latency at quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> Option<LatencySummary> {
        if self.0.is_empty() {
            return None;
        }
        Some(LatencySummary {
            count: self.0.len(),
            mean_us: self.0.mean() / 1000.0,
            p50_us: self.quantile_us(0.50),
            p90_us: self.quantile_us(0.90),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: self.0.max() as f64 / 1000.0,
            curve: self.curve(),
        })
    }

    /// Points for the percentile chart: evenly spaced in "nines"
    /// (x = -log10(1 - q)), from p0 to p99.999, then the maximum.
    fn curve(&self) -> Vec<CurvePoint> {
        let mut pts: Vec<CurvePoint> = (0..=50)
            .map(|i| {
                let nines = i as f64 / 10.0;
                let q = 1.0 - 10f64.powf(-nines);
                CurvePoint {
                    quantile: q,
                    latency_us: self.quantile_us(q),
                }
            })
            .collect();
        pts.push(CurvePoint {
            quantile: 1.0,
            latency_us: self.0.max() as f64 / 1000.0,
        });
        pts
    }
}

/// Percentiles of one run, as reported in tables and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The whole distribution, for charts.
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CurvePoint {
    pub quantile: f64,
    pub latency_us: f64,
}

/// An open-loop schedule: message `i` is due at `i / rate` seconds after the
/// start, whatever happened to the messages before it.
///
/// Latency is measured from this *intended* send time, not from when the
/// sender got round to sending. A sender that stalls for 10 ms therefore
/// charges the stall to every message that should have gone out during it,
/// as a real client at a fixed rate would see; measuring from the actual send
/// time would hide the stall (coordinated omission).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    rate: u64,
}

impl Schedule {
    /// `rate` messages per second; at least 1.
    pub fn new(rate: u64) -> Self {
        Schedule { rate: rate.max(1) }
    }

    /// Nanoseconds from the start at which message `i` (0-based) is due.
    /// Computed from `i` directly so rounding never accumulates.
    pub fn intended_ns(&self, i: u64) -> u64 {
        (i as u128 * 1_000_000_000 / self.rate as u128) as u64
    }

    /// How many messages are due by `elapsed_ns` after the start (those with
    /// `intended_ns(i) <= elapsed_ns`).
    pub fn due(&self, elapsed_ns: u64) -> u64 {
        // Smallest i with intended_ns(i) > elapsed is floor(elapsed*rate/1e9)+1,
        // up to the floor in intended_ns; the loop settles the rounding.
        let mut n = (elapsed_ns as u128 * self.rate as u128 / 1_000_000_000) as u64;
        while self.intended_ns(n) <= elapsed_ns {
            n += 1;
        }
        while n > 0 && self.intended_ns(n - 1) > elapsed_ns {
            n -= 1;
        }
        n
    }
}

/// Latency of one message from its intended send time (see [`Schedule`]).
pub fn corrected_latency_ns(intended_ns: u64, received_ns: u64) -> u64 {
    received_ns.saturating_sub(intended_ns)
}

/// Median of the finite values; the mean of the two middle ones for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// `a / b`, or None when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: f64, expected: f64, rel: f64) -> bool {
        (actual - expected).abs() <= expected.abs() * rel
    }

    #[test]
    fn percentiles_of_a_uniform_1_to_1000_us_distribution() {
        let mut h = Latencies::new();
        for us in 1..=1000u64 {
            h.record_ns(us * 1000);
        }
        let s = h.summary().unwrap();
        assert_eq!(s.count, 1000);
        // 3 significant digits: each value is within 0.1% of the exact one.
        assert!(within(s.p50_us, 500.0, 0.002), "p50 {}", s.p50_us);
        assert!(within(s.p90_us, 900.0, 0.002), "p90 {}", s.p90_us);
        assert!(within(s.p99_us, 990.0, 0.002), "p99 {}", s.p99_us);
        assert!(within(s.p999_us, 999.0, 0.002), "p99.9 {}", s.p999_us);
        assert!(within(s.max_us, 1000.0, 0.002), "max {}", s.max_us);
        assert!(within(s.mean_us, 500.5, 0.002), "mean {}", s.mean_us);
    }

    #[test]
    fn a_single_outlier_shows_in_p999_and_max_but_not_p99() {
        let mut h = Latencies::new();
        for _ in 0..999 {
            h.record_ns(100_000); // 100 µs
        }
        h.record_ns(50_000_000); // 50 ms
        let s = h.summary().unwrap();
        assert!(within(s.p99_us, 100.0, 0.002));
        assert!(within(s.p999_us, 100.0, 0.002));
        assert!(within(s.max_us, 50_000.0, 0.002));
        // One in a thousand is above p99.9 by definition; at 2 in 1000 it moves.
        h.record_ns(50_000_000);
        assert!(within(h.summary().unwrap().p999_us, 50_000.0, 0.002));
    }

    #[test]
    fn merged_histograms_count_every_sample() {
        let mut a = Latencies::new();
        let mut b = Latencies::new();
        a.record_ns(1_000);
        b.record_ns(3_000);
        b.record_ns(0); // clamped to the lowest bucket, not lost
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!(within(a.summary().unwrap().max_us, 3.0, 0.002));
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert!(Latencies::new().summary().is_none());
    }

    #[test]
    fn curve_runs_from_p0_to_max_and_never_decreases() {
        let mut h = Latencies::new();
        for ns in (1..=100_000u64).map(|i| i * 37 % 1_000_003) {
            h.record_ns(ns);
        }
        let c = h.summary().unwrap().curve;
        assert_eq!(c.first().unwrap().quantile, 0.0);
        assert_eq!(c.last().unwrap().quantile, 1.0);
        assert!(c.windows(2).all(|w| w[0].latency_us <= w[1].latency_us));
    }

    #[test]
    fn schedule_spaces_messages_evenly_without_drift() {
        let s = Schedule::new(50_000); // one every 20 µs
        assert_eq!(s.intended_ns(0), 0);
        assert_eq!(s.intended_ns(1), 20_000);
        assert_eq!(s.intended_ns(50_000), 1_000_000_000);
        // A rate that does not divide a second: 3/s is 333_333_333.33 ns apart.
        let s = Schedule::new(3);
        assert_eq!(s.intended_ns(1), 333_333_333);
        assert_eq!(s.intended_ns(3), 1_000_000_000);
        assert_eq!(s.intended_ns(3_000_000), 1_000_000 * 1_000_000_000);
    }

    #[test]
    fn schedule_due_counts_messages_whose_time_has_come() {
        let s = Schedule::new(50_000);
        assert_eq!(s.due(0), 1); // message 0 is due at once
        assert_eq!(s.due(19_999), 1);
        assert_eq!(s.due(20_000), 2);
        assert_eq!(s.due(1_000_000_000), 50_001);
        let s = Schedule::new(3);
        assert_eq!(s.due(333_333_332), 1);
        assert_eq!(s.due(333_333_333), 2);
        for t in [0u64, 1, 5, 999_999_999, 1_000_000_000, 7_777_777_777] {
            let n = s.due(t);
            assert!(s.intended_ns(n - 1) <= t && s.intended_ns(n) > t, "t={t}");
        }
    }

    /// The point of the correction: a sender stalled for 10 ms at 1,000 msgs/s
    /// owes ten messages; measured from their intended times they show the
    /// stall, measured from the (late) actual send they look instant.
    #[test]
    fn coordinated_omission_stall_is_charged_to_every_delayed_message() {
        let s = Schedule::new(1_000); // one per ms
        let network_ns = 50_000; // 50 µs one way
        let stall_until_ns = 10_500_000; // sender frozen from 0 until 10.5 ms
        let mut corrected = Latencies::new();
        let mut naive = Latencies::new();
        for i in 0..100u64 {
            let intended = s.intended_ns(i);
            let actual_send = intended.max(stall_until_ns);
            let received = actual_send + network_ns;
            corrected.record_ns(corrected_latency_ns(intended, received));
            naive.record_ns(received - actual_send);
        }
        let c = corrected.summary().unwrap();
        let n = naive.summary().unwrap();
        // Naive: every message took 50 µs, the stall vanished.
        assert!(within(n.max_us, 50.0, 0.002));
        assert!(within(n.p90_us, 50.0, 0.002));
        // Corrected: message 0 waited 10.5 ms + 50 µs, messages 0..=10 were late.
        assert!(within(c.max_us, 10_550.0, 0.002), "max {}", c.max_us);
        assert_eq!(
            (0..100u64)
                .filter(|&i| corrected_latency_ns(
                    s.intended_ns(i),
                    s.intended_ns(i).max(stall_until_ns) + network_ns
                ) > network_ns)
                .count(),
            11
        );
        assert!(within(c.p90_us, 550.0, 0.01), "p90 {}", c.p90_us);
        assert!(within(c.p50_us, 50.0, 0.002));
    }

    #[test]
    fn corrected_latency_never_underflows() {
        assert_eq!(corrected_latency_ns(100, 40), 0);
        assert_eq!(corrected_latency_ns(100, 140), 40);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0, f64::INFINITY]), Some(5.0));
    }

    #[test]
    fn ratio_is_none_without_a_positive_denominator() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }
}
