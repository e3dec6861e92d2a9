//! Busy-polling: after traffic, keep a runtime thread polling its sockets for
//! a short window instead of going to sleep in `epoll_wait`.
//!
//! Waking a sleeping thread is the largest cost of a small round trip on a
//! virtual machine (the idle vCPU halts, and waking it is a VM exit). A
//! poller task yields in a loop; every yield makes the tokio runtime look
//! for I/O events without blocking, so a reply is picked up as soon as it
//! lands. When nothing was read or written for `window`, the poller sleeps
//! until the next read or write, so an idle process uses no CPU.
//!
//! The sans-IO part is [`touch`], which the connection code calls on every
//! read and write (a relaxed load and nothing else while no poller runs).
//! The poller itself needs tokio (feature `rt`).
//!
//! A poller only helps on a runtime whose one worker owns the I/O driver:
//! a current-thread runtime, or a multi-thread runtime with one worker. On a
//! multi-thread runtime with several workers another worker may be blocked
//! in `epoll_wait` holding the driver, and the poller then only burns CPU.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Pollers running in this process.
static POLLERS: AtomicUsize = AtomicUsize::new(0);
/// Pollers asleep, waiting for [`touch`].
static SLEEPERS: AtomicUsize = AtomicUsize::new(0);
/// Reads and writes seen while a poller runs.
static ACTIVITY: AtomicU64 = AtomicU64::new(0);
/// Loop turns of all pollers (each is one non-blocking look for I/O).
static POLLS: AtomicU64 = AtomicU64::new(0);
/// Times a poller went to sleep after a quiet window.
static SLEEPS: AtomicU64 = AtomicU64::new(0);

/// Records a read or write, waking sleeping pollers. Free while no poller runs.
#[inline]
pub fn touch() {
    if POLLERS.load(Ordering::Relaxed) != 0 {
        touch_slow();
    }
}

#[cold]
fn touch_slow() {
    // SeqCst pairs with the poller's SLEEPERS increment then ACTIVITY load:
    // either it sees this increment, or this sees it asleep and wakes it.
    ACTIVITY.fetch_add(1, Ordering::SeqCst);
    if SLEEPERS.load(Ordering::SeqCst) != 0 {
        #[cfg(feature = "rt")]
        rt::WAKE.notify_waiters();
    }
}

/// Process-wide busy-poll figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pollers running now.
    pub pollers: usize,
    /// Pollers asleep now (no traffic for their window).
    pub sleeping: usize,
    /// Non-blocking looks for I/O made by all pollers.
    pub polls: u64,
    /// Times a poller went to sleep after a quiet window.
    pub sleeps: u64,
}

pub fn stats() -> Stats {
    Stats {
        pollers: POLLERS.load(Ordering::Relaxed),
        sleeping: SLEEPERS.load(Ordering::Relaxed),
        polls: POLLS.load(Ordering::Relaxed),
        sleeps: SLEEPS.load(Ordering::Relaxed),
    }
}

#[cfg(feature = "rt")]
pub use rt::{spawn, BusyPoll};

#[cfg(feature = "rt")]
mod rt {
    use super::*;
    use std::time::{Duration, Instant};

    pub(super) static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

    /// A running poller; stops when dropped.
    #[derive(Debug)]
    pub struct BusyPoll {
        task: tokio::task::JoinHandle<()>,
        window: Duration,
    }

    impl BusyPoll {
        pub fn window(&self) -> Duration {
            self.window
        }
    }

    impl Drop for BusyPoll {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Counts a running poller for as long as its task lives (also when it
    /// is aborted or its runtime shuts down).
    struct Running;

    impl Running {
        fn new() -> Running {
            POLLERS.fetch_add(1, Ordering::SeqCst);
            Running
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            POLLERS.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Starts a poller on the current tokio runtime that keeps looking for
    /// I/O for `window` after the last read or write in this process.
    /// Panics outside a tokio runtime.
    pub fn spawn(window: Duration) -> BusyPoll {
        let running = Running::new();
        let task = tokio::spawn(async move {
            let _running = running;
            run(window).await
        });
        BusyPoll { task, window }
    }

    async fn run(window: Duration) {
        let mut seen = ACTIVITY.load(Ordering::SeqCst);
        let mut quiet_since = Instant::now();
        let mut polls = 0u64;
        loop {
            // Deferred by the runtime until it has looked for I/O events
            // without blocking and run whatever they woke.
            tokio::task::yield_now().await;
            polls += 1;
            if polls == 1024 {
                // Published now and then, so /metrics moves during traffic.
                POLLS.fetch_add(std::mem::take(&mut polls), Ordering::Relaxed);
            }
            let now = ACTIVITY.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
                continue;
            }
            // Reading the clock costs about as much as a look for I/O.
            if !polls.is_multiple_of(16) || quiet_since.elapsed() < window {
                continue;
            }
            POLLS.fetch_add(std::mem::take(&mut polls), Ordering::Relaxed);
            let wake = WAKE.notified();
            tokio::pin!(wake);
            // Registered before the check so a touch after it wakes us.
            wake.as_mut().enable();
            SLEEPERS.fetch_add(1, Ordering::SeqCst);
            if ACTIVITY.load(Ordering::SeqCst) == seen {
                SLEEPS.fetch_add(1, Ordering::Relaxed);
                wake.await;
            }
            SLEEPERS.fetch_sub(1, Ordering::SeqCst);
            seen = ACTIVITY.load(Ordering::SeqCst);
            quiet_since = Instant::now();
        }
    }
}

#[cfg(all(test, feature = "rt"))]
mod tests {
    use super::*;
    use std::time::Duration;

    // One test touches the process-wide counters, so the cases run in order.
    #[test]
    fn polls_while_traffic_flows_then_sleeps_until_the_next_touch() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Conditions are polled (a loaded machine may not run the poller
        // for a while); each wait is bounded.
        async fn until(what: &str, ok: impl Fn(&Stats) -> bool) -> Stats {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let s = stats();
                if ok(&s) {
                    return s;
                }
                assert!(std::time::Instant::now() < deadline, "{what}: {s:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        rt.block_on(async {
            let p = spawn(Duration::from_millis(20));
            assert_eq!(p.window(), Duration::from_millis(20));
            // Quiet: the poller goes to sleep after its window.
            let s = until("asleep after the window", |s| {
                (s.pollers, s.sleeping) == (1, 1)
            })
            .await;
            let sleeps = s.sleeps;
            // Asleep it makes no further looks.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(stats().polls, s.polls);
            assert_eq!(stats().sleeps, sleeps);
            let before = s.polls;
            // A touch wakes it; it polls for about the window, then sleeps again.
            touch();
            let s = until("woken, polling, asleep again", |s| {
                s.sleeping == 1 && s.sleeps == sleeps + 1
            })
            .await;
            assert!(s.polls > before, "it looked for I/O while awake: {s:?}");
            drop(p);
            tokio::task::yield_now().await;
            assert_eq!(stats().pollers, 0);
        });
    }
}
