//! Where a subscriber's messages go: one bounded [`Outbox`], the socket it
//! drains into (if any) and the wake-ups of whoever drains it. A client
//! connection, a cluster route and an HTTP event stream each own one; the
//! router and the delivery engine see only this, never the connection.
//!
//! One budget per connection (`--max-pending`) counts every byte queued for
//! it, messages and control frames alike (PONG, ERR, INFO, PING, SUB to a
//! peer, credit): whatever goes over it makes the connection a slow
//! consumer ([`Outlet::overflow`]). The write loop closes a connection whose
//! bytes make no progress for `--write-timeout`, whether the socket is full
//! or the peer withholds credit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sockbus_protocol::drain::{self, Kick};
use sockbus_protocol::outbox::{Outbox, Push};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::transport::{write_all_tls, WriteSock};

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
    sock: std::sync::Mutex<Option<Arc<WriteSock>>>,
    /// Where slow consumers are counted (None in unit tests).
    metrics: Option<Arc<Metrics>>,
    /// A restricted user's connection: reply subjects it may answer.
    pub responses: Option<Arc<crate::auth::check::Responses>>,
    /// How messages are framed for this connection.
    pub codec: Codec,
    /// NATS subscriptions whose client-chosen id is not a plain decimal
    /// number: internal sid ([`NAMED_SID`] and up) to the client's text.
    pub sid_names: std::sync::RwLock<rustc_hash::FxHashMap<u32, Box<str>>>,
    /// Most bytes one send to the socket holds, whole frames only (a
    /// larger frame alone): `usize::MAX` (everything queued in one
    /// `writev`) unless the connection takes direct deliveries, see
    /// [`Outlet::one_send_per_frame`].
    send_max: AtomicUsize,
}

/// Internal sids from here up stand for a NATS client's non-numeric sid,
/// looked up in [`Outlet::sid_names`] when a message is framed.
pub(crate) const NAMED_SID: u32 = 1 << 31;

/// The wire format an outlet's messages are encoded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// sockbus frames (clients, routes, event streams).
    Native,
    /// NATS text protocol: MSG / HMSG (the `--nats` front end).
    Nats,
}

impl Outlet {
    pub fn new(id: u64, outbox: Outbox, abort: CancellationToken, sock: Option<WriteSock>) -> Self {
        Outlet {
            id,
            outbox,
            notify: Notify::new(),
            abort,
            subscriptions: AtomicUsize::new(0),
            sock: std::sync::Mutex::new(sock.map(Arc::new)),
            metrics: None,
            responses: None,
            codec: Codec::Native,
            sid_names: Default::default(),
            send_max: AtomicUsize::new(usize::MAX),
        }
    }

    /// Frames this outlet's messages in `codec`.
    /// For a connection that direct delivery may write into (its frames
    /// arrive in its receive queue from publishers' sockets, between the
    /// broker's sends): every send ends on a frame boundary and holds at
    /// most [`DIRECT_FRAME_MAX`](crate::accel::direct::DIRECT_FRAME_MAX)
    /// bytes, so the kernel never cuts one of the broker's frames below
    /// that bound into pieces another sender's frame could land between.
    /// Without it the write loop hands the socket everything queued in one
    /// `writev`, which the kernel cuts every 64 KiB wherever a frame is.
    pub fn one_send_per_frame(&self) {
        self.send_max.store(
            crate::accel::direct::DIRECT_FRAME_MAX as usize,
            Ordering::Relaxed,
        );
    }

    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Remembers the reply subjects of requests delivered here, which a
    /// restricted user may answer (allow_responses).
    pub fn with_responses(mut self, r: Arc<crate::auth::check::Responses>) -> Self {
        self.responses = Some(r);
        self
    }

    /// Counts this outlet's slow-consumer verdicts in `m`.
    pub fn counted_in(mut self, m: Arc<Metrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// The connection is a slow consumer (`why`): closes its outbox, counts
    /// and logs it once, and aborts the connection at once, without an ERR
    /// (it would queue behind the bytes the peer is not taking). True the
    /// first time; false when the outbox was already closed.
    pub fn overflow(&self, why: &str) -> bool {
        if !self.outbox.close() {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.slow_consumers.fetch_add(1, Ordering::Relaxed);
        }
        warn!(
            conn = self.id,
            budget = self.outbox.budget(),
            "slow consumer: {why}; closing the connection"
        );
        self.abort.cancel();
        true
    }

    /// Queues a control frame (PONG, ERR, INFO, PING, SUB to a peer) within
    /// the connection's budget. `Some(was_empty)` when queued (the caller
    /// gets the writer going when it was empty); None when the connection
    /// is closing, or was over its budget and is now closed as a slow
    /// consumer.
    pub fn push_control(&self, f: impl FnOnce(&mut bytes::BytesMut)) -> Option<bool> {
        match self.outbox.push_frame(f) {
            Push::Queued { was_empty } => Some(was_empty),
            Push::OverBudget => {
                self.overflow("outbound budget exceeded by control frames");
                None
            }
            Push::Closed => None,
        }
    }

    /// [`Outlet::push_control`], waking the writer when the outbox was empty.
    pub fn control(&self, f: impl FnOnce(&mut bytes::BytesMut)) {
        if let Some(true) = self.push_control(f) {
            self.wake();
        }
    }

    /// Gives an outlet created before its socket was ready its socket.
    pub fn set_socket(&self, wr: WriteSock) {
        *self.sock.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(wr));
    }

    pub fn socket(&self) -> Option<Arc<WriteSock>> {
        self.sock.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Gets what is queued on its way: writes it to the socket right here
    /// when nobody else is writing and the batch is small, without blocking
    /// (what the socket does not take, the writer task finishes); otherwise
    /// wakes the writer task. Saves a task wake-up and a thread hop per
    /// batch, which is most of a message's latency at moderate rates.
    pub fn kick(&self) {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(WriteSock::Plain(s)) = sock.as_deref() else {
            // No socket (an event stream, or the writer task has ended), or
            // TLS, which only the write loop writes.
            return self.wake();
        };
        let send_max = self.send_max.load(Ordering::Relaxed);
        match drain::write_now(&self.outbox, s, DIRECT_MAX, send_max) {
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

/// Ends a connection's outlet: closes the outbox and lets its writer task
/// flush what is queued, but never longer than `drain`; then drops what is
/// left.
pub(crate) async fn close_and_drain(
    out: &Outlet,
    mut writer: tokio::task::JoinHandle<()>,
    drain: Duration,
) {
    out.outbox.close();
    out.wake();
    if tokio::time::timeout(drain, &mut writer).await.is_err() {
        out.abort.cancel();
        let _ = writer.await;
    }
    out.outbox.clear();
}

/// Drains an outlet into its socket until it is closed and empty, aborted,
/// or a write fails. Bytes that make no progress for `write_timeout` (the
/// socket takes nothing, or the peer grants no credit for what is queued)
/// make the connection a slow consumer.
pub(crate) async fn write_loop(out: Arc<Outlet>, write_timeout: Duration) {
    let Some(sock) = out.socket() else {
        return;
    };
    // Over TLS the write loop holds the session's writing half for its life.
    let mut tls = match &*sock {
        WriteSock::Plain(_) => None,
        WriteSock::Tls(m) => Some(m.lock().await),
    };
    // Since when queued bytes wait for the peer's credit, and the outbox's
    // progress then (producers may write directly meanwhile). Only frames
    // taken for writing are progress: CREDIT frames we keep sending to a
    // peer that talks but grants nothing are not.
    let mut starved: Option<(Instant, u64)> = None;
    loop {
        let Some(mut t) = out.outbox.claim() else {
            // Nothing to write, or a producer is writing directly (its
            // release wakes us if it leaves anything, or on close), or
            // what is queued waits for credit.
            if out.abort.is_cancelled() || (out.outbox.is_closed() && !out.outbox.is_writing()) {
                break;
            }
            if out.outbox.queued() == 0 {
                starved = None;
                tokio::select! {
                    _ = out.notify.notified() => {}
                    _ = out.abort.cancelled() => break,
                }
                continue;
            }
            let progress = out.outbox.progress();
            let (since, mark) = match starved {
                Some((since, mark)) if mark == progress => (since, mark),
                _ => *starved.insert((Instant::now(), progress)),
            };
            tokio::select! {
                _ = out.notify.notified() => {}
                _ = out.abort.cancelled() => break,
                _ = tokio::time::sleep_until(since + write_timeout) => {
                    if out.outbox.progress() == mark && out.outbox.waits_for_credit() {
                        out.overflow(&format!(
                            "the peer granted no credit for {write_timeout:?} (--write-timeout)"
                        ));
                        break;
                    }
                    // Someone wrote meanwhile, or is writing: start over.
                    starved = None;
                }
            }
            continue;
        };
        let r = tokio::select! {
            r = tokio::time::timeout(write_timeout, async {
                match (&*sock, tls.as_deref_mut()) {
                    (WriteSock::Plain(w), _) => {
                        let send_max = out.send_max.load(Ordering::Relaxed);
                        drain::write_all(&mut t, w, send_max).await
                    }
                    (_, Some(w)) => write_all_tls(&mut t, w).await,
                    (WriteSock::Tls(_), None) => unreachable!("locked above"),
                }
            }) => Some(r),
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
                let why =
                    format!("a write made no progress for {write_timeout:?} (--write-timeout)");
                if !out.overflow(&why) {
                    // Already closing (a drain): not a verdict on the peer.
                    debug!(conn = out.id, "{why}; closing");
                }
                break;
            }
        }
    }
    out.outbox.close();
    out.abort.cancel();
    match (&*sock, tls.as_deref_mut()) {
        (WriteSock::Plain(w), _) => {
            let _ = socket2::SockRef::from(w.as_ref()).shutdown(std::net::Shutdown::Write);
        }
        (_, Some(w)) => {
            // close_notify, then the TCP write side; a peer that reads
            // nothing does not hold the loop.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncWriteExt::shutdown(w),
            )
            .await;
        }
        (WriteSock::Tls(_), None) => {}
    }
    drop(tls);
    // The socket closes once the read half is gone too, however long other
    // tasks keep this outlet.
    out.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
}
