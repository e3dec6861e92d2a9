//! Where a subscriber's messages go: one bounded [`Outbox`], the socket it
//! drains into (if any) and the wake-ups of whoever drains it. A client
//! connection, a cluster route and an HTTP event stream each own one; the
//! router and the delivery engine see only this, never the connection.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use sockbus_protocol::drain::{self, Kick};
use sockbus_protocol::outbox::{Outbox, Push};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Most bytes a producer writes to another connection's socket itself
/// (see [`Outlet::kick`]); bigger batches go to the writer task so they
/// are written in parallel with the producer.
const DIRECT_MAX: usize = 32 * 1024;

pub(crate) struct Outlet {
    pub id: u64,
    pub outbox: Outbox,
    /// Wakes the writer when the outbox goes from empty to non-empty or credit arrives.
    pub notify: Notify,
    /// Cancelled to abandon the connection at once (slow consumer, write error).
    pub abort: CancellationToken,
    /// Live subscriptions delivering here; kept by the delivery engine,
    /// which holds it to `--max-subscriptions`.
    pub subscriptions: AtomicUsize,
    /// The socket, for writes by whoever holds the outbox's writer role;
    /// None for feeds with no socket (HTTP event streams) and once the
    /// writer task has ended.
    sock: std::sync::Mutex<Option<Arc<OwnedWriteHalf>>>,
}

impl Outlet {
    pub fn new(
        id: u64,
        outbox: Outbox,
        abort: CancellationToken,
        sock: Option<OwnedWriteHalf>,
    ) -> Self {
        Outlet {
            id,
            outbox,
            notify: Notify::new(),
            abort,
            subscriptions: AtomicUsize::new(0),
            sock: std::sync::Mutex::new(sock.map(Arc::new)),
        }
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Queues a control frame (PONG, ERR, INFO, SUB to a peer) and wakes the
    /// writer when the outbox was empty.
    pub fn control(&self, f: impl FnOnce(&mut bytes::BytesMut)) {
        if let Push::Queued { was_empty: true } = self.outbox.push_control(f) {
            self.wake();
        }
    }

    /// Gives an outlet created before its socket was ready its socket.
    pub fn set_socket(&self, wr: OwnedWriteHalf) {
        *self.sock.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(wr));
    }

    fn socket(&self) -> Option<Arc<OwnedWriteHalf>> {
        self.sock.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Gets what is queued on its way: writes it to the socket right here
    /// when nobody else is writing and the batch is small, without blocking
    /// (what the socket does not take, the writer task finishes); otherwise
    /// wakes the writer task. Saves a task wake-up and a thread hop per
    /// batch, which is most of a message's latency at moderate rates.
    pub fn kick(&self) {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = sock.as_ref() else {
            // No socket: an event stream, or the writer task has ended.
            return self.wake();
        };
        match drain::write_now(&self.outbox, s, DIRECT_MAX) {
            Kick::Wrote {
                result: Ok(()),
                left,
            } => {
                if left {
                    self.wake();
                }
            }
            Kick::Wrote { result: Err(e), .. } => {
                drop(sock);
                debug!(conn = self.id, "write failed: {e}");
                self.outbox.close();
                self.abort.cancel();
            }
            Kick::Wake => self.wake(),
            Kick::Busy => {}
        }
    }
}

/// Drains an outlet into its socket until it is closed and empty, aborted,
/// or a write fails or makes no progress for `write_timeout`.
pub(crate) async fn write_loop(out: Arc<Outlet>, write_timeout: Duration) {
    let Some(sock) = out.socket() else {
        return;
    };
    loop {
        let Some(mut t) = out.outbox.claim() else {
            // Nothing to write, or a producer is writing directly (its
            // release wakes us if it leaves anything, or on close).
            if out.abort.is_cancelled() || (out.outbox.is_closed() && !out.outbox.is_writing()) {
                break;
            }
            tokio::select! {
                _ = out.notify.notified() => {}
                _ = out.abort.cancelled() => break,
            }
            continue;
        };
        let r = tokio::select! {
            r = tokio::time::timeout(write_timeout, drain::write_all(&mut t, &sock)) => Some(r),
            _ = out.abort.cancelled() => None,
        };
        out.outbox.release(t);
        let Some(r) = r else { break };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(conn = out.id, "write failed: {e}");
                break;
            }
            Err(_) => {
                info!(
                    conn = out.id,
                    "write timed out after {write_timeout:?}; closing"
                );
                break;
            }
        }
    }
    out.outbox.close();
    out.abort.cancel();
    let _ = socket2::SockRef::from(sock.as_ref().as_ref()).shutdown(std::net::Shutdown::Write);
    // The socket closes once the read half is gone too, however long other
    // tasks keep this outlet.
    out.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
}
