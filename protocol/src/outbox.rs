//! A connection's outbound buffer, shared by every task that writes to it.
//! Used by the broker (one per client connection) and by the client SDK (one
//! per client). No I/O here: producers push frames, a writer task takes them.
//!
//! Producers (in the broker, the delivery engine's batches) encode frames
//! straight into one contiguous buffer under a short, never-awaited lock;
//! whoever holds the writer role takes everything queued in one piece and
//! writes it with one syscall. That is what batches writes: a publisher that
//! fans out 400 messages from one read produces one write per subscriber,
//! not 400. The role is held by one party at a time: the connection's writer
//! task ([`Outbox::claim`]) or a producer that writes a small batch itself
//! without blocking ([`Outbox::claim_direct`]), which saves waking the
//! writer task; bytes a non-blocking write leaves behind go out first.
//!
//! The buffer is bounded by a byte budget. A push that would exceed it is
//! refused and the connection is treated as a slow consumer, so a reader that
//! stops reading costs the broker at most `budget` bytes and never slows the
//! producer or other subscribers. The broker's outboxes
//! ([`Outbox::bounded`]) count every byte held for the connection against
//! it: frames queued (messages and control frames alike, through
//! [`Outbox::push`] and [`Outbox::push_frame`]), the batch being written,
//! what a partial write left behind and the CREDIT frame owed. The SDK's
//! ([`Outbox::new`]) count only what is queued: a writer's claim frees room
//! for publishers at once.
//!
//! Flow control (protocol::flow) limits what the writer may take: only whole
//! frames, and no more than the peer's credit. Credit we owe the peer is kept
//! apart from the data so it can always be sent, even when the data cannot.

use std::io::{self, IoSlice};

use crate::flow::{aligned_prefix, SendWindow};
use crate::frame::{
    encode_credit, parse_header, Header, Kind, CREDIT_FRAME_LEN, HEADER_LEN, PUB_ROOM, PUB_ROOM_LEN,
};
use bytes::{Bytes, BytesMut};

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

/// Result of [`Outbox::claim_direct`].
#[derive(Debug)]
pub enum Direct {
    /// Write this without blocking, then [`Outbox::release`].
    Write(Take),
    /// Too much is queued for a direct write, or what is queued waits for
    /// the peer's credit (the writer task keeps the time): wake the writer
    /// task.
    Wake,
    /// Someone else writes what is queued, or there is nothing to write:
    /// nothing to do.
    Busy,
}

/// What the writer should send next, in this order: `front`, a CREDIT
/// frame for `grant`, then `data`.
#[derive(Debug, Default)]
pub struct Take {
    /// Bytes a previous writer handed to the socket only in part; they go
    /// first and need not start at a frame boundary (they end on one).
    pub front: Bytes,
    /// Bytes at the start of `front` that finish a frame an earlier send
    /// began (0: `front` starts on a frame boundary). Kept only by writers
    /// with a `send_max` bound (see [`Take::write_nonblocking`]).
    head: usize,
    /// Credit to grant the peer (send a CREDIT frame), 0 for none.
    pub grant: u32,
    /// Whole frames to write.
    pub data: BytesMut,
    /// Which connection (see [`Outbox::reset`]) this was taken for.
    epoch: u64,
    /// Capacity of the queue's buffer after `data` when it was taken: lets
    /// [`Outbox::release`] reclaim the whole buffer (see [`keep_spare`]).
    room_after: usize,
}

impl Take {
    pub fn is_empty(&self) -> bool {
        self.front.is_empty() && self.grant == 0 && self.data.is_empty()
    }

    /// Bytes to write.
    pub fn len(&self) -> usize {
        self.front.len() + if self.grant > 0 { CREDIT_FRAME_LEN } else { 0 } + self.data.len()
    }

    /// Everything left, as one run of bytes (a CREDIT frame for `grant`
    /// between `front` and `data`).
    fn into_bytes(self) -> Bytes {
        if self.grant == 0 && self.front.is_empty() {
            return self.data.freeze();
        }
        if self.grant == 0 && self.data.is_empty() {
            return self.front;
        }
        let mut b = BytesMut::with_capacity(self.len());
        b.extend_from_slice(&self.front);
        if self.grant > 0 {
            encode_credit(&mut b, self.grant);
        }
        b.extend_from_slice(&self.data);
        b.freeze()
    }

    /// Writes as much as `write` accepts without blocking: `write` is a
    /// non-blocking vectored write (`try_write_vectored`). Returns Ok(true)
    /// when everything went out, Ok(false) when the socket would block, in
    /// which case `self` holds exactly the rest.
    ///
    /// Each call of `write` is handed at most `send_max` bytes that end on a
    /// frame boundary: whole frames (a frame larger than `send_max` alone),
    /// after the rest of a frame a partial write cut. The kernel's direct
    /// delivery reads a frame header at the start of each send and needs
    /// every header whole in one (docs/fast-path.md); the kernel itself cuts
    /// a send into pieces of its own only beyond 64 KiB. `usize::MAX`: the
    /// whole batch in one call.
    pub fn write_nonblocking(
        &mut self,
        send_max: usize,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<bool> {
        if self.grant > 0 {
            // The grant becomes bytes of its own so a partial write can
            // stop inside it.
            let mut c = [0u8; CREDIT_FRAME_LEN];
            encode_credit(&mut &mut c[..], std::mem::take(&mut self.grant));
            let mut f = BytesMut::with_capacity(self.front.len() + c.len());
            f.extend_from_slice(&self.front);
            f.extend_from_slice(&c);
            self.front = f.freeze();
        }
        while !self.is_empty() {
            let want = self.send_len(send_max);
            let f = want.min(self.front.len());
            let slices = [
                IoSlice::new(&self.front[..f]),
                IoSlice::new(&self.data[..want - f]),
            ];
            let n = match write(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n.min(want),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            crate::busy_poll::touch();
            // Without a bound nothing reads `head`: no walk over the frames
            // (the broker's and the SDK's default writes cost what they did).
            self.head = if n == want || send_max == usize::MAX {
                0
            } else {
                self.boundary_after(n) - n
            };
            let f = n.min(self.front.len());
            let _ = self.front.split_to(f);
            let _ = self.data.split_to(n - f);
        }
        Ok(true)
    }

    /// Length of the frame starting `at` bytes into `front` then `data`
    /// (frames never straddle the two: `front` ends on a boundary).
    fn frame_at(&self, at: usize) -> usize {
        let (b, off) = if at < self.front.len() {
            (&self.front[..], at)
        } else {
            (&self.data[..], at - self.front.len())
        };
        let rest = b.len() - off;
        match b.get(off + 4..off + 8) {
            Some(l) => {
                let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
                (HEADER_LEN + len).clamp(1, rest)
            }
            // Not a whole header (never: only whole frames are queued).
            None => rest.max(1),
        }
    }

    /// The first frame boundary at or after `n` bytes.
    fn boundary_after(&self, n: usize) -> usize {
        let mut at = self.head;
        while at < n {
            at += self.frame_at(at);
        }
        at
    }

    /// How many bytes the next send takes: everything when it fits in
    /// `send_max`, else the longest run of whole frames that does (after
    /// the rest of a cut frame), else the first frame alone.
    fn send_len(&self, send_max: usize) -> usize {
        let total = self.front.len() + self.data.len();
        if total <= send_max {
            return total;
        }
        let mut at = self.head;
        while at < total {
            let next = at + self.frame_at(at);
            if next > send_max {
                break;
            }
            at = next;
        }
        if at == 0 {
            self.frame_at(0)
        } else {
            at
        }
    }
}

struct Inner {
    buf: BytesMut,
    grant: u32,
    send: SendWindow,
    closed: bool,
    /// Someone holds the writer role (see [`Outbox::claim`]).
    writing: bool,
    /// Taken, handed to the socket only in part: goes out first.
    unwritten: Bytes,
    /// [`Take::head`] of `unwritten`.
    unwritten_head: usize,
    /// Counts resets: a claim taken before one is void after it.
    epoch: u64,
    /// Counts claims of the writer role (see [`Outbox::write_state`]).
    claims: u64,
    /// Bytes of the current claim (see [`Outbox::claim`]), until released.
    taken: usize,
    /// Bytes of frames ever claimed for writing (wrapping): moves whenever
    /// anything is written.
    claimed: u64,
    /// A buffer a writer finished with, kept for the queue's next one (see
    /// [`Outbox::release`]); empty when there is none.
    spare: BytesMut,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    budget: usize,
    /// The budget counts every byte held, not only the queue ([`Outbox::bounded`]).
    all_held: bool,
}

impl Outbox {
    /// `budget`: most bytes held for this connection. `send_window`: the
    /// peer's receive window (0 = no flow control).
    /// The budget counts the bytes queued and not yet taken by a writer.
    pub fn new(budget: usize, send_window: u32) -> Self {
        Self::with(budget, send_window, false)
    }

    /// Like [`Outbox::new`], but the budget counts every byte held for the
    /// connection until it is in the socket: queued, being written, left
    /// over by a partial write, and the CREDIT frame owed. The broker's
    /// outboxes are these, so a peer that reads nothing costs at most
    /// `budget` bytes however large a window it declared.
    pub fn bounded(budget: usize, send_window: u32) -> Self {
        Self::with(budget, send_window, true)
    }

    fn with(budget: usize, send_window: u32, all_held: bool) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                buf: BytesMut::new(),
                grant: 0,
                send: SendWindow::new(send_window),
                closed: false,
                writing: false,
                unwritten: Bytes::new(),
                unwritten_head: 0,
                epoch: 0,
                claims: 0,
                taken: 0,
                claimed: 0,
                spare: BytesMut::new(),
            }),
            budget,
            all_held,
        }
    }

    /// Bytes counted against the budget.
    fn held(&self, g: &Inner) -> usize {
        if !self.all_held {
            return g.buf.len();
        }
        let credit = if g.grant > 0 { CREDIT_FRAME_LEN } else { 0 };
        g.buf.len() + g.unwritten.len() + g.taken + credit
    }

    /// The byte budget given at creation.
    pub fn budget(&self) -> usize {
        self.budget
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
        let held = self.held(&g);
        if held > 0 && held + len > self.budget {
            return Push::OverBudget;
        }
        let was_empty = g.buf.is_empty() && g.grant == 0;
        make_room(&mut g, len);
        g.buf.reserve(len);
        encode(&mut g.buf);
        Push::Queued { was_empty }
    }

    /// Queues one frame of a length not known in advance (a control frame:
    /// PONG, PING, ERR, INFO, SUB to a peer) within the budget, like
    /// [`Outbox::push`]: a peer that asks for answers and never reads them
    /// runs out of budget like one that never reads its messages.
    pub fn push_frame(&self, encode: impl FnOnce(&mut BytesMut)) -> Push {
        let mut g = self.lock();
        if g.closed {
            return Push::Closed;
        }
        let held = self.held(&g);
        let was_empty = g.buf.is_empty() && g.grant == 0;
        make_room(&mut g, CONTROL_ROOM);
        let at = g.buf.len();
        encode(&mut g.buf);
        let len = g.buf.len() - at;
        if held > 0 && held + len > self.budget {
            g.buf.truncate(at);
            return Push::OverBudget;
        }
        Push::Queued { was_empty }
    }

    /// Queues a control frame regardless of the budget. For the SDK, whose
    /// control frames (SUB, UNSUB, a flush's PING) are the application's own
    /// and must get through a send buffer full of publishes; the broker
    /// uses [`Outbox::push_frame`].
    pub fn push_control(&self, encode: impl FnOnce(&mut BytesMut)) -> Push {
        let mut g = self.lock();
        if g.closed {
            return Push::Closed;
        }
        let was_empty = g.buf.is_empty() && g.grant == 0;
        make_room(&mut g, CONTROL_ROOM);
        encode(&mut g.buf);
        Push::Queued { was_empty }
    }

    /// Records credit to grant the peer. Returns true when the writer must
    /// be woken: no grant was pending. Also when frames are queued: they may
    /// be waiting for the peer's credit, and the CREDIT frame must not wait
    /// with them (a writer busy with them takes it on its next claim).
    pub fn grant(&self, n: u32) -> bool {
        let mut g = self.lock();
        let was_none = g.grant == 0;
        g.grant = g.grant.saturating_add(n);
        was_none
    }

    /// Applies credit granted by the peer.
    pub fn on_credit(&self, n: u32) {
        self.lock().send.on_credit(n);
    }

    /// Takes what may be written now: pending credit grant, and the longest
    /// run of whole frames the peer's credit allows. For a consumer that is
    /// the only writer (the HTTP event stream); socket writers share the
    /// role through [`Outbox::claim`].
    pub fn take(&self) -> Take {
        let mut g = self.lock();
        let grant = std::mem::take(&mut g.grant);
        let n = aligned_prefix(&g.buf, g.send.available());
        let data = g.buf.split_to(n);
        g.send.on_sent(n);
        Take {
            front: Bytes::new(),
            head: 0,
            grant,
            data,
            epoch: g.epoch,
            room_after: 0,
        }
    }

    /// Claims the writer role and takes what may be written now. None when
    /// another task holds the role or there is nothing to write. Exactly one
    /// claimant writes at a time, so bytes reach the socket in queue order
    /// whoever writes them: the connection's writer task, or a producer
    /// writing directly (see [`Outbox::claim_direct`]). The claimant must
    /// call [`Outbox::release`].
    pub fn claim(&self) -> Option<Take> {
        self.claim_inner()
    }

    /// Like [`Outbox::claim`], for a producer that writes without blocking
    /// instead of waking the writer task: also None when a previous write
    /// left bytes behind (the socket is full: the writer task waits for it)
    /// or more than `max` bytes are queued (big batches are the writer
    /// task's, so they are written in parallel with the producer).
    pub fn claim_direct(&self, max: usize) -> Direct {
        let mut g = self.lock();
        if g.writing || !g.unwritten.is_empty() {
            // The claimant, or the writer task already woken for the
            // unwritten bytes, takes what was queued since.
            return Direct::Busy;
        }
        if g.buf.len() > max {
            return Direct::Wake;
        }
        match Self::claim_locked(&mut g) {
            Some(t) => Direct::Write(t),
            None if g.buf.is_empty() => Direct::Busy,
            None => Direct::Wake,
        }
    }

    fn claim_inner(&self) -> Option<Take> {
        let mut g = self.lock();
        if g.writing {
            return None;
        }
        Self::claim_locked(&mut g)
    }

    fn claim_locked(g: &mut Inner) -> Option<Take> {
        let n = aligned_prefix(&g.buf, g.send.available());
        if n == 0 && g.grant == 0 && g.unwritten.is_empty() {
            return None;
        }
        let room_after = g.buf.capacity() - n;
        let data = g.buf.split_to(n);
        g.send.on_sent(n);
        let t = Take {
            room_after,
            front: std::mem::take(&mut g.unwritten),
            head: std::mem::take(&mut g.unwritten_head),
            grant: std::mem::take(&mut g.grant),
            data,
            epoch: g.epoch,
        };
        g.writing = true;
        g.claims = g.claims.wrapping_add(1);
        g.taken = t.len();
        g.claimed = g.claimed.wrapping_add(n as u64);
        Some(t)
    }

    /// Ends a claim. `rest` is what the claimant could not write (it goes out
    /// first next time). Returns true when something is left to write or
    /// the outbox was closed meanwhile, in which case the caller wakes the
    /// writer task (or claims again).
    pub fn release(&self, rest: Take) -> bool {
        let mut g = self.lock();
        if rest.epoch != g.epoch {
            // Claimed on a connection that has since been replaced: the
            // role and the queue belong to the new one.
            return true;
        }
        g.writing = false;
        g.taken = 0;
        debug_assert!(g.unwritten.is_empty());
        if !rest.is_empty() {
            g.unwritten_head = rest.head;
            g.unwritten = rest.into_bytes();
        } else {
            keep_spare(&mut g, rest.data, rest.room_after);
        }
        g.closed
            || !g.unwritten.is_empty()
            || g.grant > 0
            || (!g.buf.is_empty() && aligned_prefix(&g.buf, g.send.available()) > 0)
    }

    /// True while someone holds the writer role.
    pub fn is_writing(&self) -> bool {
        self.lock().writing
    }

    /// Whether someone holds the writer role, and how many times the role
    /// has been claimed. Read periodically by a watchdog (the broker's
    /// fast-path stall guard): the role held by the same claim on two reads
    /// seconds apart means one batch has been waiting for the socket all
    /// that time. Counting claims costs the writer nothing but an add under
    /// the lock it already holds, once per batch.
    pub fn write_state(&self) -> (bool, u64) {
        let g = self.lock();
        (g.writing, g.claims)
    }

    /// True when every byte ever queued has been handed to the socket (or
    /// the outbox is closed, when nothing more will be): nothing queued,
    /// being written or left over by a partial write. The broker's direct
    /// delivery barrier waits for this (docs/fast-path.md).
    pub fn is_flushed(&self) -> bool {
        let g = self.lock();
        g.closed || (!g.writing && g.buf.is_empty() && g.unwritten.is_empty())
    }

    /// Counts `n` bytes the peer will receive by another way (the kernel's
    /// direct delivery) as in flight: the peer's credit for them comes back
    /// like credit for bytes this outbox wrote. [`Outbox::on_credit`] gives
    /// back what was reserved and never sent.
    pub fn reserve(&self, n: usize) {
        self.lock().send.on_sent(n);
    }

    /// Bytes the peer's window lets go out now (`usize::MAX`: no flow control).
    pub fn available(&self) -> usize {
        self.lock().send.available()
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.lock().buf.len()
    }

    /// Bytes of frames claimed for writing so far (wrapping): a writer that
    /// sees it move knows the connection made progress, whoever wrote.
    pub fn progress(&self) -> u64 {
        self.lock().claimed
    }

    /// True when frames are queued that the peer's credit does not let any
    /// writer take, and nothing else is waiting to be written: the
    /// connection waits for a CREDIT frame.
    pub fn waits_for_credit(&self) -> bool {
        let g = self.lock();
        !g.writing
            && g.unwritten.is_empty()
            && g.grant == 0
            && !g.buf.is_empty()
            && aligned_prefix(&g.buf, g.send.available()) == 0
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
    /// Without `room` (the new broker did not ask for [`PUB_ROOM`]) the
    /// kept PUBs lose their room, which a broker that does not know the flag
    /// would misread.
    pub fn reset(&self, send_window: u32, prefix: &[u8], room: bool) {
        let mut g = self.lock();
        g.send = SendWindow::new(send_window);
        g.grant = 0;
        g.closed = false;
        g.writing = false;
        g.unwritten = Bytes::new();
        g.unwritten_head = 0;
        g.taken = 0;
        g.spare = BytesMut::new();
        g.epoch += 1;
        let mut b = BytesMut::with_capacity(prefix.len() + g.buf.len());
        b.extend_from_slice(prefix);
        let mut rest = &g.buf[..];
        while let Ok(Some(h)) = parse_header(rest) {
            if rest.len() < h.frame_len() {
                break;
            }
            if h.kind == Kind::Pub {
                let frame = &rest[..h.frame_len()];
                if !room && h.flags & PUB_ROOM != 0 && frame.len() >= HEADER_LEN + PUB_ROOM_LEN {
                    Header {
                        flags: h.flags & !PUB_ROOM,
                        len: h.len - PUB_ROOM_LEN as u32,
                        ..h
                    }
                    .write(&mut b);
                    b.extend_from_slice(&frame[HEADER_LEN + PUB_ROOM_LEN..]);
                } else {
                    b.extend_from_slice(frame);
                }
            }
            rest = &rest[h.frame_len()..];
        }
        g.buf = b;
    }

    /// Drops everything queued (used when the connection is abandoned).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.buf = BytesMut::new();
        g.spare = BytesMut::new();
        g.grant = 0;
        g.unwritten = Bytes::new();
        g.unwritten_head = 0;
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Room [`Outbox::push_frame`] and [`Outbox::push_control`] make before
/// encoding a frame of unknown length (larger ones grow the buffer).
const CONTROL_ROOM: usize = 256;

/// Before a push that does not fit: moves the queue into the spare buffer
/// when that holds it, instead of letting the queue allocate a new one.
/// A claim takes the queue's bytes out of its buffer, which the writer then
/// holds until it is done, so a queue that fills while a write is under way
/// needs a second buffer. Allocating that afresh each time costs more than
/// the copy: a large buffer is a fresh mapping every time, faulted in page
/// by page (in a 1->10 fan-out, most of the CPU per message the broker had
/// gained since the refactor: 32% above the older build's before the spare,
/// 6% after; docs/benchmarks.md, "Issue 13 item 10: the fan-out loss
/// found"). With the spare, a busy connection alternates between two
/// buffers and allocates nothing.
fn make_room(g: &mut Inner, len: usize) {
    let need = g.buf.len() + len;
    if g.buf.capacity() >= need || g.spare.capacity() < need {
        return;
    }
    let mut b = std::mem::take(&mut g.spare);
    b.extend_from_slice(&g.buf);
    g.buf = b;
}

/// After a claim was written in full: keeps the buffer it was taken from,
/// if nothing else refers to it any more, for [`make_room`]. An idle
/// connection keeps one buffer, as it did without a spare: when nothing is
/// queued the kept buffer becomes the queue's own, and no spare is held.
/// Held this way: at most one buffer, whose size the budget bounds (a queue
/// never grows past it by more than one frame), beside the queue's own.
fn keep_spare(g: &mut Inner, mut done: BytesMut, room_after: usize) {
    if g.buf.is_empty() {
        // The empty queue may still point into the same buffer; let go of
        // it so the buffer can be reclaimed whole.
        g.buf = BytesMut::new();
        g.spare = BytesMut::new();
    }
    done.clear();
    // Succeeds only for the last handle to the buffer. Asking for more than
    // is left after the written bytes (`room_after`), and no more than the
    // whole buffer, moves the handle back to the buffer's start and makes
    // all of it usable again.
    if !done.try_reclaim(room_after + 1) {
        return;
    }
    if g.buf.is_empty() && g.buf.capacity() < done.capacity() {
        g.buf = done;
    } else if g.spare.capacity() < done.capacity() {
        g.spare = done;
    }
}

#[cfg(all(test, not(sockbus_loom)))]
mod tests {
    use super::*;
    use crate::frame::{encode_ping, encode_pong, encode_pub};

    const PONG: usize = 20;

    fn pong(ob: &Outbox, id: u64) -> Push {
        ob.push_frame(|b| encode_pong(b, id))
    }

    /// Writes a claim in full (what a writer does when the socket takes it all).
    fn write_all(ob: &Outbox, mut t: Take, out: &mut Vec<u8>) {
        let done = t
            .write_nonblocking(usize::MAX, |s| {
                let mut n = 0;
                for x in s {
                    out.extend_from_slice(x);
                    n += x.len();
                }
                Ok(n)
            })
            .unwrap();
        assert!(done);
        ob.release(t);
    }

    /// PUBs queued with room for a broker that asked for it are sent on
    /// reconnect to one that did not without their room (it would read the
    /// room as the subject's length), and with it to one that did.
    #[test]
    fn a_reset_keeps_pub_room_only_for_a_broker_that_asks_for_it() {
        use crate::frame::{encode_pub_flags, PUB_ACK};
        for room in [false, true] {
            let ob = Outbox::bounded(1 << 20, 0);
            let mut want = Vec::new();
            for (i, flags) in [PUB_ROOM, 0, PUB_ROOM | PUB_ACK].into_iter().enumerate() {
                let payload = [i as u8; 10];
                let reply = (flags & PUB_ACK != 0).then_some("r");
                ob.push_frame(|b| encode_pub_flags(b, flags, "a.b", reply, &[], &payload).unwrap());
                let kept = if room { flags } else { flags & !PUB_ROOM };
                encode_pub_flags(&mut want, kept, "a.b", reply, &[], &payload).unwrap();
            }
            ob.push_frame(|b| encode_ping(b, 1));
            ob.reset(1 << 20, b"", room);
            let mut out = Vec::new();
            let t = ob.claim().expect("queued");
            write_all(&ob, t, &mut out);
            assert_eq!(out, want, "room kept: {room}");
        }
    }

    #[test]
    fn a_busy_queue_alternates_two_buffers_and_keeps_every_frame_in_order() {
        // A queue that fills while its writer writes: once the first two
        // buffers exist, no round allocates a third (each would be a fresh
        // mapping at these sizes), and the bytes still arrive in order.
        let ob = Outbox::bounded(64 << 20, 0);
        let mut seq = 0u64;
        let mut push = |n: usize| {
            for _ in 0..n {
                let mut payload = [0u8; 100];
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                let mut b = BytesMut::new();
                encode_pub(&mut b, "s.x", None, &[], &payload).unwrap();
                seq += 1;
                assert!(matches!(
                    ob.push(b.len(), |q| q.extend_from_slice(&b)),
                    Push::Queued { .. }
                ));
            }
        };
        let mut out = Vec::new();
        let mut buffers = std::collections::HashSet::new();
        push(20_000);
        for round in 0..20 {
            let t = ob.claim().expect("frames queued");
            buffers.insert(t.data.as_ptr() as usize);
            // More frames arrive while the writer is busy.
            push(20_000);
            write_all(&ob, t, &mut out);
            if round >= 3 {
                assert!(
                    buffers.len() <= 3,
                    "round {round}: claims came from {} buffers",
                    buffers.len()
                );
            }
        }
        let t = ob.claim().expect("the last frames");
        write_all(&ob, t, &mut out);
        // Every frame, in order.
        let mut rest = &out[..];
        let mut n = 0u64;
        while let Ok(Some(h)) = parse_header(rest) {
            let frame = &rest[..h.frame_len()];
            let payload = &frame[frame.len() - 100..];
            assert_eq!(payload[..8], n.to_le_bytes(), "frame {n} out of order");
            rest = &rest[h.frame_len()..];
            n += 1;
        }
        assert!(rest.is_empty());
        assert_eq!(n, 21 * 20_000);
    }

    #[test]
    fn control_frames_count_against_the_budget() {
        let ob = Outbox::bounded(10 * PONG, 1 << 20);
        for i in 0..10 {
            assert!(matches!(pong(&ob, i), Push::Queued { .. }), "pong {i}");
        }
        assert_eq!(pong(&ob, 10), Push::OverBudget);
        assert_eq!(
            ob.queued(),
            10 * PONG,
            "the refused frame left nothing behind"
        );
    }

    #[test]
    fn the_batch_being_written_and_a_partial_write_still_count() {
        let ob = Outbox::bounded(10 * PONG, 1 << 20);
        for i in 0..6 {
            pong(&ob, i);
        }
        // A writer takes all six and is stuck writing them.
        let mut t = ob.claim().expect("something to write");
        for i in 0..4 {
            assert!(matches!(pong(&ob, i), Push::Queued { .. }));
        }
        assert_eq!(pong(&ob, 4), Push::OverBudget, "6 being written + 4 queued");
        // The socket took two frames; four are left over, and go out first.
        let mut wrote = 0;
        let done = t
            .write_nonblocking(usize::MAX, |_| {
                if wrote == 0 {
                    wrote = 2 * PONG;
                    Ok(2 * PONG)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            })
            .unwrap();
        assert!(!done);
        ob.release(t);
        assert!(matches!(pong(&ob, 5), Push::Queued { .. }));
        assert!(matches!(pong(&ob, 6), Push::Queued { .. }));
        assert_eq!(pong(&ob, 7), Push::OverBudget, "4 left over + 6 queued");
    }

    #[test]
    fn the_sdk_outbox_counts_only_the_queue_and_its_control_frames_always_fit() {
        let ob = Outbox::new(2 * PONG, 0);
        pong(&ob, 1);
        pong(&ob, 2);
        let t = ob.claim().unwrap();
        assert!(
            matches!(pong(&ob, 3), Push::Queued { .. }),
            "the claim freed room"
        );
        pong(&ob, 4);
        assert_eq!(pong(&ob, 5), Push::OverBudget);
        assert!(matches!(
            ob.push_control(|b| encode_ping(b, 6)),
            Push::Queued { .. }
        ));
        ob.release(t);
    }

    #[test]
    fn a_frame_larger_than_the_budget_goes_out_alone() {
        let ob = Outbox::bounded(64, 1 << 20);
        let big = [0u8; 100];
        let push = |ob: &Outbox| {
            ob.push(200, |b| {
                encode_pub(b, "a", None, &[], &big).unwrap();
            })
        };
        assert!(matches!(push(&ob), Push::Queued { .. }));
        assert_eq!(push(&ob), Push::OverBudget);
    }

    #[test]
    fn waiting_for_credit_is_told_apart_from_having_nothing_to_send() {
        let ob = Outbox::bounded(1 << 20, 2 * PONG as u32);
        assert!(!ob.waits_for_credit(), "empty");
        for i in 0..3 {
            pong(&ob, i);
        }
        assert!(!ob.waits_for_credit(), "two frames fit the window");
        let t = ob.claim().unwrap();
        assert_eq!(t.data.len(), 2 * PONG);
        assert!(!ob.waits_for_credit(), "a write is under way");
        let mut t = t;
        t.data.clear();
        ob.release(t);
        assert!(ob.waits_for_credit(), "one frame queued, no credit left");
        ob.grant(100);
        assert!(!ob.waits_for_credit(), "a CREDIT frame of ours can go");
        if let Some(mut t) = ob.claim() {
            t.grant = 0;
            ob.release(t);
        }
        assert!(ob.waits_for_credit());
        ob.on_credit(PONG as u32);
        assert!(!ob.waits_for_credit(), "credit arrived");
    }

    /// What a socket was handed, send by send: the bytes it took and the
    /// bytes it was offered.
    #[derive(Default)]
    struct Recorder {
        stream: Vec<u8>,
        /// (offset in `stream` where the send began, bytes offered).
        sends: Vec<(usize, usize)>,
        rng: u64,
    }

    impl Recorder {
        fn next(&mut self) -> u64 {
            // xorshift64: a reproducible mix of whole, partial and refused sends.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        fn write(&mut self, s: &[IoSlice<'_>]) -> io::Result<usize> {
            let offered: usize = s.iter().map(|b| b.len()).sum();
            let r = self.next();
            if r.is_multiple_of(7) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Half the sends are taken whole, the rest cut anywhere.
            let n = if r.is_multiple_of(2) {
                offered
            } else {
                1 + (r >> 8) as usize % offered
            };
            self.sends.push((self.stream.len(), offered));
            let mut left = n;
            for b in s {
                let k = left.min(b.len());
                self.stream.extend_from_slice(&b[..k]);
                left -= k;
            }
            Ok(n)
        }

        /// Checks every send against the frames of the stream: it ends on a
        /// frame boundary, and holds at most `send_max` bytes unless it holds
        /// no boundary inside (one frame, or the rest of one, alone).
        fn check(&self, send_max: usize) -> Vec<usize> {
            let mut bounds = vec![0];
            let mut at = 0;
            while let Some(h) = parse_header(&self.stream[at..]).unwrap() {
                at += h.frame_len();
                bounds.push(at);
            }
            assert_eq!(at, self.stream.len(), "the stream is whole frames");
            for &(start, offered) in &self.sends {
                let end = start + offered;
                assert!(
                    bounds.binary_search(&end).is_ok(),
                    "a send of {offered} bytes at {start} ends inside a frame"
                );
                if offered > send_max {
                    let first_after = bounds.partition_point(|&b| b <= start);
                    let inside = bounds.get(first_after).is_some_and(|&b| b < end);
                    assert!(!inside, "a send of {offered} > {send_max} bytes at {start} holds more than one frame");
                }
            }
            bounds
        }
    }

    #[test]
    fn every_send_ends_on_a_frame_boundary_even_after_partial_writes() {
        const SEND_MAX: usize = 64 * 1024;
        let ob = Outbox::new(usize::MAX, 0);
        let mut rec = Recorder {
            rng: 0x9e37_79b9_7f4a_7c15,
            ..Default::default()
        };
        let mut want = Vec::new();
        let payload = vec![7u8; 200 * 1024];
        let mut sizes = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..800u32 {
            // A burst of frames of every size, some far above SEND_MAX,
            // and now and then credit owed (a CREDIT frame in `front`).
            for _ in 0..(round % 24) {
                sizes ^= sizes << 13;
                sizes ^= sizes >> 7;
                sizes ^= sizes << 17;
                let len = match sizes % 40 {
                    0 => (sizes >> 16) as usize % payload.len(),
                    1 | 2 => SEND_MAX - 30 + (sizes >> 16) as usize % 60,
                    _ => (sizes >> 16) as usize % 600,
                };
                let at = want.len();
                encode_pub(&mut want, "sub.j", None, &[], &payload[..len]).unwrap();
                let frame = want[at..].to_vec();
                ob.push(frame.len(), |b| b.extend_from_slice(&frame));
            }
            if round.is_multiple_of(5) {
                ob.grant(100);
            }
            // A writer takes the batch and writes what the socket takes.
            if let Some(mut t) = ob.claim() {
                let _ = t.write_nonblocking(SEND_MAX, |s| rec.write(s)).unwrap();
                ob.release(t);
            }
        }
        while let Some(mut t) = ob.claim() {
            let _ = t.write_nonblocking(SEND_MAX, |s| rec.write(s)).unwrap();
            ob.release(t);
        }
        rec.check(SEND_MAX);
        let pubs: Vec<u8> = {
            let mut out = Vec::new();
            let mut b = &rec.stream[..];
            while let Some(h) = parse_header(b).unwrap() {
                if h.kind == Kind::Pub {
                    out.extend_from_slice(&b[..h.frame_len()]);
                }
                b = &b[h.frame_len()..];
            }
            out
        };
        assert!(pubs == want, "every PUB arrived once, in order");
        let cut = rec.sends.iter().filter(|&&(_, n)| n > SEND_MAX).count();
        assert!(
            rec.sends.len() > 500 && cut > 0,
            "the test saw big batches, partial writes and frames above the bound"
        );
    }

    #[test]
    fn credit_owed_wakes_the_writer_even_behind_frames_waiting_for_credit() {
        let ob = Outbox::bounded(1 << 20, PONG as u32);
        pong(&ob, 1);
        pong(&ob, 2);
        let mut t = ob.claim().unwrap();
        t.data.clear();
        ob.release(t);
        assert!(ob.waits_for_credit());
        assert!(ob.grant(100), "the CREDIT frame must go out now");
        assert!(!ob.grant(100), "one wake-up for both grants");
        let t = ob.claim().expect("the CREDIT frame");
        assert_eq!((t.grant, t.data.len()), (200, 0));
    }
}
