//! The stall guard: while the broker's own fast path is attached, a task
//! looks at every client connection once per period and closes one whose
//! socket has refused a batch of bytes for `--accel-stall-timeout` (a send
//! stall), logging it and counting it in `sockbus_accel_stalls_total`.
//!
//! Why that is a stall and not a slow reader: on the fast path the kernel
//! ignores the receiver's socket buffer, so a reader that stops reading
//! never makes the broker's socket refuse bytes; the protocol's credit
//! window stops the broker instead, and bytes without credit stay in the
//! outbox, where the writer does not hold them. A writer that holds one
//! batch (the same claim of the outbox's writer role) for seconds is waiting
//! for a socket that does not take bytes it is allowed to send: the
//! kernel-side stalls reported for sockmap. The guard confirms that both
//! ends of the connection are in the socket hash before acting; a
//! connection on plain TCP is left to `--write-timeout`.
//!
//! It closes the connection rather than deleting it from the socket hash:
//! removing a socket drops what is queued in its redirect queue, which
//! would leave a hole in the middle of the byte stream; a close is seen by
//! the client, which reconnects. Nothing runs per message: the writer counts
//! its claims under the lock it already takes once per batch, and the guard
//! reads that count per connection once per period.
//!
//! For tests only (debug builds; a release build ignores it, see
//! [`super::test_hook`]), `SOCKBUS_ACCEL_STALL_INJECT=<client name>` makes the
//! guard see connections of that client name as stalled (writer holding a
//! batch, no new claim); everything after that sample is the real path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::sock;
use crate::outlet::Outlet;

/// The test hook's variable (see the module documentation).
pub const INJECT_VAR: &str = "SOCKBUS_ACCEL_STALL_INJECT";

static RUNNING: AtomicBool = AtomicBool::new(false);
static STALLS: AtomicU64 = AtomicU64::new(0);
static CONNS: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

struct Watched {
    id: u64,
    name: String,
    out: Weak<Outlet>,
    /// Claims of the outbox's writer role at the last look.
    claims: u64,
    /// Since when the writer has held the same claim.
    since: Option<Instant>,
}

/// Stalls detected (and connections closed for it) in this process.
pub fn stalls() -> u64 {
    STALLS.load(Ordering::Relaxed)
}

/// Watches a client connection's outlet while the guard runs (a no-op
/// otherwise). Called once per connection.
pub(crate) fn watch(id: u64, name: &str, out: &Arc<Outlet>) {
    if !RUNNING.load(Ordering::Relaxed) {
        return;
    }
    conns().push(Watched {
        id,
        name: name.to_string(),
        out: Arc::downgrade(out),
        claims: 0,
        since: None,
    });
}

fn conns() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    CONNS.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often the guard looks, for a given stall timeout.
pub fn period(stall_after: Duration) -> Duration {
    (stall_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Starts the guard (when the fast path is active and `stall_after` is not
/// zero); it runs until `shutdown`.
pub fn spawn(stall_after: Duration, shutdown: CancellationToken) {
    if stall_after.is_zero() || super::status().state != super::AccelState::Active {
        return;
    }
    let inject = super::test_hook(INJECT_VAR);
    RUNNING.store(true, Ordering::Relaxed);
    let every = period(stall_after);
    info!(
        "stall guard: on: a fast-path connection whose socket takes no bytes for {stall_after:?} is closed (checked every {every:?}; --accel-stall-timeout)"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (id, name, out, held) in suspects(stall_after, inject.as_deref()) {
                confirm_and_close(id, &name, &out, held);
            }
        }
        RUNNING.store(false, Ordering::Relaxed);
        conns().clear();
    });
}

/// One look at every watched connection; returns those whose writer has
/// held the same batch for `stall_after` or longer.
fn suspects(
    stall_after: Duration,
    inject: Option<&str>,
) -> Vec<(u64, String, Arc<Outlet>, Duration)> {
    let now = Instant::now();
    let mut found = Vec::new();
    conns().retain_mut(|w| {
        let Some(out) = w.out.upgrade() else {
            return false;
        };
        if out.abort.is_cancelled() {
            return false;
        }
        let (writing, claims) = if inject == Some(w.name.as_str()) {
            // Test hook: what a stalled writer looks like.
            (true, w.claims)
        } else {
            out.outbox.write_state()
        };
        if !writing || claims != w.claims {
            w.claims = claims;
            w.since = None;
            return true;
        }
        let since = *w.since.get_or_insert(now);
        let held = now - since;
        if held >= stall_after {
            found.push((w.id, w.name.clone(), out, held));
            // Not again for this one until it moves.
            w.since = Some(now);
        }
        true
    });
    found
}

fn confirm_and_close(id: u64, name: &str, out: &Outlet, held: Duration) {
    let Some(s) = out.socket() else { return };
    // TLS connections are not checked here yet: --write-timeout decides.
    let Some(s) = s.tcp() else { return };
    let Some(fp) = super::active_path() else {
        return;
    };
    let on_fast_path = sock::keys(s)
        .and_then(|(mine, theirs)| fp.contains(&[mine, theirs]))
        .is_ok_and(|f| f == [true, true]);
    if !on_fast_path {
        // Plain TCP (the peer is outside the cgroup, or the map was full):
        // a slow reader can hold a write there; --write-timeout decides.
        return;
    }
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let outq = sock::send_queue(s).unwrap_or(0);
    STALLS.fetch_add(1, Ordering::Relaxed);
    warn!(
        conn = id,
        client = name,
        %peer,
        "fast path: send stall: the socket has taken none of a batch of bytes for {:.1}s ({} B unacknowledged by credit, {} B queued behind it, SIOCOUTQ {outq} B); closing the connection",
        held.as_secs_f64(),
        out.outbox.in_flight(),
        out.outbox.queued(),
    );
    out.outbox.close();
    out.abort.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_looks_a_few_times_per_timeout_but_not_too_often() {
        assert_eq!(period(Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(1)), Duration::from_millis(250));
        assert_eq!(
            period(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }
}
