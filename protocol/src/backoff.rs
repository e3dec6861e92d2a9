//! Reconnect backoff, as pure arithmetic: the delay before the next attempt
//! from the count of attempts so far. The caller sleeps, and supplies the
//! randomness for the jitter, so this needs no runtime and no RNG and every
//! case is a plain unit test.
//!
//! The delay starts at `min`, doubles with each attempt up to `max` (and at
//! most `max_doublings` times), then gains a jitter of up to
//! `jitter_percent` of it, in whole milliseconds, so that many clients (or
//! brokers) that lost the same peer do not all come back at once.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    max_doublings: u32,
    jitter_percent: u32,
}

impl Backoff {
    /// Starts at `min` and doubles up to `max`, without jitter (a `min`
    /// above `max` acts as `max`).
    pub const fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            max_doublings: u32::MAX,
            jitter_percent: 0,
        }
    }

    /// Stops doubling after `n` doublings even below `max`.
    pub const fn max_doublings(mut self, n: u32) -> Self {
        self.max_doublings = n;
        self
    }

    /// Adds a random jitter of up to `percent` of the delay (bounds included).
    pub const fn jitter_percent(mut self, percent: u32) -> Self {
        self.jitter_percent = percent;
        self
    }

    /// The client SDK's reconnect backoff: 50 ms doubling up to `max` (its
    /// `max_reconnect_delay`, 2 s by default), but at most 6 times, so never
    /// past 3.2 s, plus up to half of that as jitter. The SDK passes the
    /// failed attempts since the last connection minus one.
    pub const fn client_reconnect(max: Duration) -> Self {
        Backoff::new(Duration::from_millis(50), max)
            .max_doublings(6)
            .jitter_percent(50)
    }

    /// The backoff of the broker's cluster routes (`dial_loop` in
    /// broker/src/cluster/mod.rs): 50 ms doubling at most 5 times, so at
    /// most 1.6 s, plus up to half of that as jitter. `dial_loop` passes its
    /// `failures` count: 0 right after a lost route (50 ms), 1 after the
    /// first failed dial (100 ms).
    pub const fn cluster_route() -> Self {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
            .max_doublings(5)
            .jitter_percent(50)
    }

    /// The delay before attempt `attempt` (0 for the first), without jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        let mut d = self.min;
        // Bounded by the doublings from `min` to `max`, not by `attempt`.
        for _ in 0..attempt.min(self.max_doublings) {
            if d >= self.max || d.is_zero() {
                break;
            }
            d = d.saturating_mul(2);
        }
        d.min(self.max)
    }

    /// The delay before attempt `attempt` (0 for the first): [`Backoff::base`]
    /// plus a jitter taken from `random` (any value from a uniform source).
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self.base(attempt);
        let span = base.as_millis().saturating_mul(self.jitter_percent as u128) / 100;
        let jitter = (random as u128) % span.saturating_add(1);
        // `jitter` <= `random`, so it fits in a u64.
        base.saturating_add(Duration::from_millis(jitter as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_doubles_from_min_until_max() {
        let b = Backoff::new(ms(100), ms(1000));
        let delays: Vec<_> = (0..6).map(|n| b.delay(n, 12345)).collect();
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
    }

    #[test]
    fn doubling_stops_after_max_doublings_even_below_max() {
        let b = Backoff::new(ms(50), Duration::from_secs(10)).max_doublings(2);
        assert_eq!(b.base(2), ms(200));
        assert_eq!(b.base(3), ms(200));
        assert_eq!(b.base(u32::MAX), ms(200));
    }

    #[test]
    fn jitter_spans_zero_to_the_percentage_of_the_delay_inclusive() {
        let b = Backoff::new(ms(100), ms(100)).jitter_percent(50);
        assert_eq!(b.delay(0, 0), ms(100));
        assert_eq!(b.delay(0, 50), ms(150));
        assert_eq!(b.delay(0, 51), ms(100));
        assert_eq!(b.delay(0, 7), ms(107));
    }

    #[test]
    fn huge_attempt_counts_and_bounds_do_not_overflow() {
        let b = Backoff::new(Duration::from_nanos(1), Duration::MAX).jitter_percent(100);
        assert_eq!(b.base(u32::MAX), Duration::MAX);
        assert_eq!(b.delay(u32::MAX, u64::MAX), Duration::MAX);
        let z = Backoff::new(Duration::ZERO, Duration::from_secs(1)).jitter_percent(50);
        assert_eq!(z.delay(u32::MAX, u64::MAX), Duration::ZERO);
    }

    /// The formula the SDK used before this type: 25 ms << min(failures, 7),
    /// capped, plus `random % (base_ms / 2 + 1)` ms, for failures >= 1.
    #[test]
    fn client_reconnect_matches_the_sdk_formula_it_replaced() {
        for max_ms in [1u64, 80, 2000, 3000, 60_000] {
            let max = ms(max_ms);
            let b = Backoff::client_reconnect(max);
            for failures in 1u64..20 {
                for random in [0u64, 1, 999, 1 << 40, u64::MAX] {
                    let base = Duration::from_millis(25u64 << failures.min(7)).min(max);
                    let jitter = random % (base.as_millis() as u64 / 2 + 1);
                    let old = base + Duration::from_millis(jitter);
                    assert_eq!(
                        b.delay(failures as u32 - 1, random),
                        old,
                        "{max_ms} {failures}"
                    );
                }
            }
        }
    }

    /// broker/src/cluster/mod.rs `dial_loop`: 50 ms << min(failures, 5),
    /// so 1.6 s at most.
    #[test]
    fn cluster_route_matches_the_dial_loop_base_delays() {
        let b = Backoff::cluster_route();
        for failures in 0u32..40 {
            let base = Duration::from_millis(50u64 << failures.min(5)).min(Duration::from_secs(2));
            assert_eq!(b.base(failures), base);
            // Jitter below half the base, as rand_jitter gives (for any
            // random value below the bound the two agree).
            let half = base.as_millis() as u64 / 2;
            assert_eq!(b.delay(failures, half - 1), base + ms(half - 1));
        }
        assert_eq!(b.base(100), ms(1600));
    }

    proptest! {
        #[test]
        fn delay_stays_within_base_and_base_plus_jitter(
            min_ms in 0u64..10_000,
            extra_ms in 0u64..100_000,
            doublings in 0u32..40,
            percent in 0u32..200,
            attempt in 0u32..1000,
            random: u64,
        ) {
            let b = Backoff::new(ms(min_ms), ms(min_ms + extra_ms))
                .max_doublings(doublings)
                .jitter_percent(percent);
            let base = b.base(attempt);
            prop_assert!(base >= ms(min_ms) && base <= ms(min_ms + extra_ms));
            prop_assert!(b.base(attempt + 1) >= base, "never shrinks");
            let d = b.delay(attempt, random);
            let span = base.as_millis() as u64 * percent as u64 / 100;
            prop_assert!(d >= base && d <= base + ms(span));
        }
    }
}
