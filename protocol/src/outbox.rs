//! A connection's outbound buffer, shared by every task that writes to it.
//! Used by the broker (one per client connection) and by the client SDK (one
//! per client). No I/O here: producers push frames, a writer task takes them.
//!
//! Producers (in the broker, the reader tasks of publishing connections) encode frames
//! straight into one contiguous buffer under a short, never-awaited lock;
//! the connection's writer task takes everything queued in one piece and
//! writes it with one syscall. That is what batches writes: a publisher that
//! fans out 400 messages from one read produces one write per subscriber,
//! not 400.
//!
//! The buffer is bounded by a byte budget. A push that would exceed it is
//! refused and the connection is treated as a slow consumer, so a reader that
//! stops reading costs the broker at most `budget` bytes and never slows the
//! producer or other subscribers.
//!
//! Flow control (protocol::flow) limits what the writer may take: only whole
//! frames, and no more than the peer's credit. Credit we owe the peer is kept
//! apart from the data so it can always be sent, even when the data cannot.

use crate::flow::{aligned_prefix, SendWindow};
use crate::frame::{parse_header, Kind};
use bytes::BytesMut;

use crate::sync::Mutex;

/// Result of queuing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued. `was_empty` tells the producer it must wake the writer.
    Queued { was_empty: bool },
    /// Refused: the buffer would exceed the budget.
    OverBudget,
    /// Refused: the connection is closing.
    Closed,
}

/// What the writer should send next.
#[derive(Debug, Default)]
pub struct Take {
    /// Credit to grant the peer (send a CREDIT frame first), 0 for none.
    pub grant: u32,
    /// Whole frames to write.
    pub data: BytesMut,
}

impl Take {
    pub fn is_empty(&self) -> bool {
        self.grant == 0 && self.data.is_empty()
    }
}

struct Inner {
    buf: BytesMut,
    grant: u32,
    send: SendWindow,
    closed: bool,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    budget: usize,
}

impl Outbox {
    /// `budget`: most bytes held for this connection. `send_window`: the
    /// peer's receive window (0 = no flow control).
    pub fn new(budget: usize, send_window: u32) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                buf: BytesMut::new(),
                grant: 0,
                send: SendWindow::new(send_window),
                closed: false,
            }),
            budget,
        }
    }

    fn lock(&self) -> crate::sync::MutexGuardCompat<'_, Inner> {
        // A panic while holding the lock leaves only bytes behind; keep going.
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Queues one frame of `len` bytes, written by `encode`.
    pub fn push(&self, len: usize, encode: impl FnOnce(&mut BytesMut)) -> Push {
        let mut g = self.lock();
        if g.closed {
            return Push::Closed;
        }
        // One frame larger than the whole budget still goes out alone.
        if !g.buf.is_empty() && g.buf.len() + len > self.budget {
            return Push::OverBudget;
        }
        let was_empty = g.buf.is_empty() && g.grant == 0;
        g.buf.reserve(len);
        encode(&mut g.buf);
        Push::Queued { was_empty }
    }

    /// Queues a control frame (PONG, ERR) regardless of the budget; these
    /// are small and bounded by what the peer itself sends.
    pub fn push_control(&self, encode: impl FnOnce(&mut BytesMut)) -> Push {
        let mut g = self.lock();
        if g.closed {
            return Push::Closed;
        }
        let was_empty = g.buf.is_empty() && g.grant == 0;
        encode(&mut g.buf);
        Push::Queued { was_empty }
    }

    /// Records credit to grant the peer. Returns true when the writer must be woken.
    pub fn grant(&self, n: u32) -> bool {
        let mut g = self.lock();
        let was_empty = g.buf.is_empty() && g.grant == 0;
        g.grant = g.grant.saturating_add(n);
        was_empty
    }

    /// Applies credit granted by the peer.
    pub fn on_credit(&self, n: u32) {
        self.lock().send.on_credit(n);
    }

    /// Takes what may be written now: pending credit grant, and the longest
    /// run of whole frames the peer's credit allows.
    pub fn take(&self) -> Take {
        let mut g = self.lock();
        let grant = std::mem::take(&mut g.grant);
        let n = aligned_prefix(&g.buf, g.send.available());
        let data = g.buf.split_to(n);
        g.send.on_sent(n);
        Take { grant, data }
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.lock().buf.len()
    }

    /// Bytes written but not yet credited by the peer.
    pub fn in_flight(&self) -> u64 {
        self.lock().send.in_flight()
    }

    /// Refuses further pushes. Returns false if it was already closed.
    pub fn close(&self) -> bool {
        let mut g = self.lock();
        !std::mem::replace(&mut g.closed, true)
    }

    /// Starts over on a new connection: the peer's window is `send_window`,
    /// nothing is in flight and no credit is owed. Of what is queued only PUB
    /// frames are kept (subscriptions are re-sent by the caller in `prefix`,
    /// which goes first; pings and credits belonged to the old connection).
    pub fn reset(&self, send_window: u32, prefix: &[u8]) {
        let mut g = self.lock();
        g.send = SendWindow::new(send_window);
        g.grant = 0;
        g.closed = false;
        let mut b = BytesMut::with_capacity(prefix.len() + g.buf.len());
        b.extend_from_slice(prefix);
        let mut rest = &g.buf[..];
        while let Ok(Some(h)) = parse_header(rest) {
            if rest.len() < h.frame_len() {
                break;
            }
            if h.kind == Kind::Pub {
                b.extend_from_slice(&rest[..h.frame_len()]);
            }
            rest = &rest[h.frame_len()..];
        }
        g.buf = b;
    }

    /// Drops everything queued (used when the connection is abandoned).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.buf = BytesMut::new();
        g.grant = 0;
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}
