//! Giving memory back to the operating system after a large release.
//! glibc's malloc keeps what a program frees for later reuse, in the arena
//! of whichever thread allocated it, so a million subscriptions that came
//! and went would stay in the broker's resident size for good. The delivery
//! engine counts the subscriptions it removes; once enough have gone and
//! removals pause, `malloc_trim` hands the free pages back (docs/operations.md,
//! "Memory"). With another C library there is nothing to do here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Subscriptions removed before a trim is worth its cost (about 1 MB).
const TRIM_AFTER: usize = 4096;
/// Removals must pause this long first, so a mass unsubscribe costs one
/// trim, not one per few thousand...
const QUIET: Duration = Duration::from_millis(100);
/// ...but under steady churn the trim waits no longer than this.
const LONGEST_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(crate) struct Release {
    freed: AtomicUsize,
    wake: Notify,
}

impl Release {
    /// `n` subscriptions were removed.
    pub fn freed(&self, n: usize) {
        let before = self.freed.fetch_add(n, Ordering::Relaxed);
        if before < TRIM_AFTER && before + n >= TRIM_AFTER {
            self.wake.notify_one();
        }
    }

    /// Trims after each large release, until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            let start = Instant::now();
            loop {
                let seen = self.freed.load(Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(QUIET) => {}
                    _ = shutdown.cancelled() => return,
                }
                if self.freed.load(Ordering::Relaxed) == seen || start.elapsed() >= LONGEST_WAIT {
                    break;
                }
            }
            self.freed.store(0, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

/// Most of a thread heap's free top that glibc keeps (see [`configure`]):
/// twice the mmap threshold, glibc's own rule when it moves them. Lower
/// costs the hot paths dearly: at 256 KiB every stream read (a 256 KiB
/// chunk and its batch, allocated and freed each round) handed the heap's
/// top back with `madvise` and faulted it in again on the next round,
/// about 20,000 page faults a second, and read-back ran at 0.76x of the
/// broker before the threshold was fixed (docs/benchmarks.md, "Issue 13
/// item 10: the read-back loss found").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 2 << 20;
/// Blocks this large or larger get their own mapping, returned when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Fixes glibc's trim and mmap thresholds, once per process. Left alone,
/// glibc raises both after the first large block is freed (to twice its
/// size for the trim threshold), and `malloc_trim` does not shrink the top
/// of the heaps of threads other than the main one: the megabytes a big
/// table left there would stay resident. Fixed, every free that merges
/// into a heap's top returns what exceeds `TRIM_THRESHOLD`.
pub(crate) fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets the allocator's parameters, under its lock.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        });
    }
}

/// Returns the allocator's free pages to the operating system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
