//! How queued frames reach the socket: a publisher writes a small batch
//! itself when the connection is quiet (no writer wake-up, no thread hop);
//! otherwise the connection's writer task sends everything queued in one
//! write.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sockbus_protocol::drain::{self, Kick};
use tokio::net::tcp::OwnedWriteHalf;

use crate::client::{lock, Inner};
use crate::error::Error;

/// Most bytes a publishing task writes to the socket itself (see
/// [`Inner::pushed`]); more goes to the writer task.
const DIRECT_MAX: usize = 32 * 1024;
/// A publish writes to the socket itself only when nothing was written for
/// this many nanoseconds: a quiet connection. On a busy one the frame goes
/// to the writer task, which batches it with the others (one syscall per
/// message would cap a tight publish loop at a few hundred thousand
/// messages per second).
const QUIET_NS: u64 = 10_000;

impl Inner {
    /// Called after a push found the outbox empty: gets the frame on its way.
    /// At moderate rates the publishing task writes it to the socket itself,
    /// saving the writer task's wake-up (a thread hop, most of the latency
    /// of a request); on a connection that wrote within `QUIET_NS` the
    /// writer task takes it, so fast publishers' frames go out in batches.
    pub(crate) fn pushed(&self) {
        let now = self.now_ns();
        if now.saturating_sub(self.last_write.load(Ordering::Relaxed)) < QUIET_NS {
            self.wake.notify_one();
            return;
        }
        self.kick_at(Some(now));
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    pub(crate) fn wrote(&self) {
        self.last_write.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Wakes the publishers waiting for outbox space, if any (checking
    /// first saves the notifier's lock on every write).
    pub(crate) fn space_freed(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Writes what is queued to the socket without blocking when nobody else
    /// is writing and the batch is small; otherwise leaves it to the writer
    /// task (woken if needed). What the socket does not take, the writer
    /// task finishes.
    pub(crate) fn kick(&self) {
        self.kick_at(None)
    }

    /// [`Inner::kick`], `now` being the time just read by the caller (one
    /// clock read per publish, not two: it stands for the end of the write,
    /// a couple of µs off, well inside `QUIET_NS`).
    fn kick_at(&self, now: Option<u64>) {
        let sock = lock(&self.sock);
        let Some(s) = sock.as_ref() else {
            // Between connections: what is queued stays queued (the next
            // connection's reset keeps the publishes) for the next writer.
            return self.wake.notify_one();
        };
        let kicked = drain::write_now(&self.outbox, s, DIRECT_MAX);
        drop(sock);
        let (result, left) = match kicked {
            Kick::Wrote { result, left } => (result, left),
            Kick::Wake => return self.wake.notify_one(),
            Kick::Busy => return,
        };
        // The claim took bytes out of the outbox: room for waiting publishers.
        self.space_freed();
        match now {
            Some(now) => self.last_write.store(now, Ordering::Relaxed),
            None => self.wrote(),
        }
        // On an error the writer task meets it too, and the connection is
        // replaced.
        if left || result.is_err() {
            self.wake.notify_one();
        }
    }
}

pub(crate) async fn write_loop(inner: Arc<Inner>, wr: Arc<OwnedWriteHalf>) -> Error {
    loop {
        let Some(mut t) = inner.outbox.claim() else {
            // Nothing to write, or a publisher is writing directly (its
            // release wakes us if it leaves anything, or on close).
            if inner.is_closing() && inner.outbox.queued() == 0 && !inner.outbox.is_writing() {
                let _ = socket2::SockRef::from(wr.as_ref().as_ref())
                    .shutdown(std::net::Shutdown::Write);
                return Error::Closed;
            }
            inner.wake.notified().await;
            // Let the tasks that are ready now (say, the publishers a batch
            // of acks just released) queue their frames first: they then go
            // out in this one write instead of one write each.
            tokio::task::yield_now().await;
            continue;
        };
        if !t.data.is_empty() {
            inner.space_freed();
        }
        let r = drain::write_all(&mut t, &wr).await;
        inner.outbox.release(t);
        inner.wrote();
        if let Err(e) = r {
            return e.into();
        }
    }
}

/// [`write_loop`] for a connection only this task writes (TLS: the session
/// encrypts, so publishers never write it directly).
pub(crate) async fn write_loop_stream<W: tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut wr: W,
) -> Error {
    loop {
        let Some(mut t) = inner.outbox.claim() else {
            if inner.is_closing() && inner.outbox.queued() == 0 && !inner.outbox.is_writing() {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
                return Error::Closed;
            }
            inner.wake.notified().await;
            tokio::task::yield_now().await;
            continue;
        };
        if !t.data.is_empty() {
            inner.space_freed();
        }
        let r = drain::write_all_to(&mut t, &mut wr).await;
        inner.outbox.release(t);
        inner.wrote();
        if let Err(e) = r {
            return e.into();
        }
    }
}
