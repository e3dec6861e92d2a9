//! The in-flight window of the closed-loop scenarios: a publisher may send
//! message number `n` only once the subscribers are within `window`
//! messages of it.
//!
//! Subscribers publish their progress through atomics; a blocked publisher
//! registers the progress it needs (`wake_at`) and sleeps on a `Notify`, so
//! the receive path costs one store and one load per message and nobody
//! wakes anyone while the window is open.

use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::Duration;

use tokio::sync::Notify;

/// How subscriber progress counts against the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every subscriber gets every message (pub/sub, fan-out): progress is
    /// the slowest subscriber's count.
    Min,
    /// Each message goes to one member (queue groups): progress is the
    /// members' total.
    Sum,
}

/// Keeps each counter on its own cache line so subscribers on different
/// cores do not slow each other down.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

pub struct Gate {
    window: u64,
    /// A blocked publisher resumes once this many messages drained, not
    /// after every single one, so it is not woken per message.
    hysteresis: u64,
    mode: Mode,
    claimed: Padded,
    /// Ordinals up to this may go without looking at the subscribers.
    allowed: Padded,
    counts: Box<[Padded]>,
    total: Padded,
    wake_at: Padded,
    notify: Notify,
}

/// No subscriber made progress for this long while a publisher waited.
#[derive(Debug, thiserror::Error)]
#[error("no message was delivered for {0:?} while the publisher waited on the in-flight window (messages lost or a subscriber stuck)")]
pub struct Stalled(pub Duration);

impl Gate {
    pub fn new(window: u64, subscribers: usize, mode: Mode) -> Gate {
        let window = window.max(1);
        Gate {
            window,
            hysteresis: (window / 8).min(window - 1),
            mode,
            claimed: Padded::default(),
            allowed: Padded(AtomicU64::new(window)),
            counts: (0..subscribers.max(1)).map(|_| Padded::default()).collect(),
            total: Padded::default(),
            wake_at: Padded(AtomicU64::new(u64::MAX)),
            notify: Notify::new(),
        }
    }

    /// Hands out the next message ordinal (1-based, unique across
    /// publishers). A claimed ordinal must be published, or publishers
    /// waiting behind it can stall.
    pub fn claim(&self) -> u64 {
        self.claimed.0.fetch_add(1, Relaxed) + 1
    }

    pub fn claimed(&self) -> u64 {
        self.claimed.0.load(Relaxed)
    }

    /// Progress as the window sees it (see [`Mode`]).
    pub fn progress(&self) -> u64 {
        match self.mode {
            Mode::Min => self
                .counts
                .iter()
                .map(|c| c.0.load(SeqCst))
                .min()
                .unwrap_or(0),
            Mode::Sum => self.total.0.load(SeqCst),
        }
    }

    /// Messages delivered so far, counting every copy.
    pub fn delivered(&self) -> u64 {
        match self.mode {
            Mode::Min => self.counts.iter().map(|c| c.0.load(Relaxed)).sum(),
            Mode::Sum => self.total.0.load(Relaxed),
        }
    }

    /// Waits until ordinal `n` fits in the window.
    pub async fn admit(&self, n: u64, stall_after: Duration) -> Result<(), Stalled> {
        if n <= self.allowed.0.load(Relaxed) {
            return Ok(());
        }
        loop {
            let p = self.progress();
            self.allowed.0.fetch_max(p + self.window, Relaxed);
            if n <= p + self.window {
                return Ok(());
            }
            // Never ask for more than the messages ahead of `n` can deliver.
            let target = (n - self.window + self.hysteresis).min(n - 1);
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.wake_at.0.fetch_min(target, SeqCst);
            if self.progress() >= target {
                continue;
            }
            if tokio::time::timeout(stall_after, notified).await.is_err() && self.progress() == p {
                return Err(Stalled(stall_after));
            }
        }
    }

    /// Records that subscriber `idx` has now received `count` messages in
    /// all. Called once per message by that subscriber only.
    #[inline]
    pub fn on_receive(&self, idx: usize, count: u64) {
        let reached = match self.mode {
            Mode::Min => {
                self.counts[idx].0.store(count, SeqCst);
                count
            }
            Mode::Sum => self.total.0.fetch_add(1, SeqCst) + 1,
        };
        let wake = self.wake_at.0.load(SeqCst);
        if reached >= wake && self.progress() >= wake {
            self.wake_at.0.store(u64::MAX, SeqCst);
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn publisher_waits_for_the_slowest_subscriber_then_resumes() {
        let g = Arc::new(Gate::new(4, 2, Mode::Min));
        for _ in 0..4 {
            let n = g.claim();
            g.admit(n, Duration::from_secs(1)).await.unwrap();
        }
        let fifth = g.claim();
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.admit(fifth, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "window of 4 must hold message 5");
        g.on_receive(0, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "the other subscriber is still behind"
        );
        g.on_receive(1, 1);
        waiter.await.unwrap().unwrap();
        assert_eq!(g.delivered(), 2);
    }

    #[tokio::test]
    async fn queue_mode_counts_the_members_together() {
        let g = Gate::new(2, 3, Mode::Sum);
        assert_eq!(g.claim(), 1);
        assert_eq!(g.claim(), 2);
        g.on_receive(0, 1);
        g.on_receive(2, 1);
        assert_eq!(g.progress(), 2);
        let n = g.claim();
        g.admit(n, Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn a_window_nobody_drains_reports_a_stall() {
        let g = Gate::new(1, 1, Mode::Min);
        let _ = g.claim();
        let n = g.claim();
        let e = g.admit(n, Duration::from_millis(30)).await.unwrap_err();
        assert!(e.to_string().contains("no message was delivered"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_messages_through_a_small_window_never_exceed_it() {
        let g = Arc::new(Gate::new(16, 1, Mode::Min));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let sub = {
            let g = g.clone();
            tokio::spawn(async move {
                let mut c = 0;
                while let Some(n) = rx.recv().await {
                    c += 1;
                    assert_eq!(n, c);
                    g.on_receive(0, c);
                }
                c
            })
        };
        for _ in 0..100_000 {
            let n = g.claim();
            g.admit(n, Duration::from_secs(5)).await.unwrap();
            assert!(n - g.progress() <= 16);
            tx.send(n).unwrap();
        }
        drop(tx);
        assert_eq!(sub.await.unwrap(), 100_000);
    }
}
