//! The read path: frames from the broker, handled in order by whoever reads
//! the socket (the connection's reader task, or a task waiting for its own
//! message: see [`poll_reading`]). MSG frames go to their subscription or
//! waiting request, control frames (PONG, PING, CREDIT, ERR, INFO) update
//! the client.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use sockbus_protocol::flow::RecvWindow;
use sockbus_protocol::frame::{self, code, encode_pong, INFO_PUB_ROOM};
use sockbus_protocol::{FrameRef, Kind, ProtocolError, HEADER_LEN, MAX_FRAME_OVERHEAD};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tracing::warn;

use crate::client::{lock, Inner};
use crate::error::Error;
use crate::message::Message;
use crate::options::Overflow;
use crate::subscriber::{SubEntry, SubMap};

/// A connection's read side: the socket and what was read from it but not
/// handled yet. The connection's reader task reads it, and so does a task
/// waiting for a request's reply or a subscription's next message when the
/// socket's readiness wakes it first (see [`poll_reading`]): what it waits
/// for then reaches it without a hand-off from the reader task, a task
/// switch per message. Whoever reads handles every frame read, in order,
/// under `state`'s lock, which nobody holds across an await: a waiting task
/// that is never polled again cannot stall the connection, the reader task
/// reads on.
pub(crate) struct ReadSide {
    /// The socket (through the write half, which the writer shares).
    sock: Arc<OwnedWriteHalf>,
    /// Held so the socket's read side stays open; reads go through `sock`.
    _rd: OwnedReadHalf,
    state: Mutex<ReadState>,
    /// What a waiting task met while reading (an error, the end of the
    /// stream): the reader task ends the connection with it.
    failed: Mutex<Option<Error>>,
    failed_wake: Notify,
}

/// What was read but not handled yet, and the credit it frees: no socket
/// here, so the handling of any run of bytes is a plain unit test.
pub(crate) struct ReadState {
    buf: BytesMut,
    recv: RecvWindow,
    /// Bytes handled since the last credit grant.
    consumed: usize,
    /// With [`Overflow::Wait`]: the message a full subscription could not
    /// take yet. Nothing behind it is handled (nor read, nor credited)
    /// until it can.
    stalled: Option<Stalled>,
}

/// A message held for a full subscription ([`Overflow::Wait`]).
pub(crate) struct Stalled {
    sid: u32,
    msg: Message,
    size: usize,
    /// The subscription ends with this message (its UNSUB count).
    last: bool,
    /// The subscription's drop count: the message is counted there if the
    /// connection ends before it is delivered.
    dropped: Arc<AtomicU64>,
}

/// What a read made of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Bytes were read and handled.
    Read,
    /// The socket had nothing (its readiness is now cleared).
    Idle,
    /// A full subscription holds a message: nothing is read until it has room.
    Stalled,
}

impl Drop for ReadState {
    fn drop(&mut self) {
        // The connection ended with a message its subscriber never got.
        if let Some(s) = self.stalled.take() {
            s.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ReadState {
    /// `consumed`: bytes already handled that count against our window
    /// (the INFO frame).
    pub(crate) fn new(buf: BytesMut, recv_window: u32, consumed: usize) -> ReadState {
        ReadState {
            buf,
            recv: RecvWindow::new(recv_window),
            consumed,
            stalled: None,
        }
    }

    /// Handles the whole frames in the buffer (first the message a full
    /// subscription holds up, if any) and grants the credit they free.
    pub(crate) fn handle(&mut self, inner: &Inner) -> Result<(), Error> {
        if let Some(s) = self.stalled.take() {
            self.stalled = retry(inner, s);
        }
        if self.stalled.is_none() {
            read_batch(inner, &mut self.buf, &mut self.consumed, &mut self.stalled)?;
        }
        if let Some(c) = self.recv.on_consumed(std::mem::take(&mut self.consumed)) {
            if inner.outbox.grant(c) {
                inner.kick();
            }
        }
        Ok(())
    }
}

impl ReadSide {
    pub(crate) fn new(
        sock: Arc<OwnedWriteHalf>,
        rd: OwnedReadHalf,
        buf: BytesMut,
        recv_window: u32,
        info_len: usize,
    ) -> ReadSide {
        ReadSide {
            sock,
            _rd: rd,
            state: Mutex::new(ReadState::new(buf, recv_window, info_len)),
            failed: Mutex::new(None),
            failed_wake: Notify::new(),
        }
    }

    fn stream(&self) -> &TcpStream {
        self.sock.as_ref().as_ref()
    }

    /// Handles the whole frames in the buffer, then, unless a full
    /// subscription holds a message up, reads once and handles what that
    /// completes.
    fn read_and_handle(&self, inner: &Inner, st: &mut ReadState) -> Result<Progress, Error> {
        st.handle(inner)?;
        if st.stalled.is_some() {
            // Not reading is the backpressure: the broker gets no credit
            // for what stays in the socket.
            return Ok(Progress::Stalled);
        }
        if st.buf.capacity() - st.buf.len() < 4096 {
            st.buf.reserve(64 * 1024);
        }
        let stream = self.stream();
        let spare = st.buf.capacity() - st.buf.len();
        let mut got = None;
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            let n = socket2::SockRef::from(stream).recv(st.buf.spare_capacity_mut())?;
            got = Some(n);
            if n > 0 && n < spare {
                // A short read took everything there was: clear the
                // readiness now (as tokio's own reads do), so that the
                // other reader, woken by the same event, does not try again.
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match (got, r) {
            (Some(0), _) => Err(Error::Disconnected),
            (Some(n), _) => {
                // SAFETY: recv initialised the first n spare bytes.
                unsafe { st.buf.set_len(st.buf.len() + n) };
                inner.heard.store(true, Ordering::Relaxed);
                sockbus_protocol::busy_poll::touch();
                st.handle(inner)?;
                Ok(Progress::Read)
            }
            (None, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Progress::Idle),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(())) => unreachable!("recv ran"),
        }
    }

    /// Hands an error met by a waiting task to the reader task.
    fn fail(&self, e: Error) {
        lock(&self.failed).get_or_insert(e);
        self.failed_wake.notify_one();
    }
}

/// Polls `poll_rx` (a reply's or a subscription's channel) and, while it is
/// empty, the connection's socket: when the socket's readiness wakes this
/// task (it is woken before the reader task), it reads and handles what
/// arrived itself, its own message included, and looks at `poll_rx` again.
/// When the reader task is busy reading, it waits for the reader task to
/// deliver as usual.
///
/// Only on a current-thread runtime. On a multi-thread runtime each event
/// would wake two tasks, the waiting one and the reader task, often on two
/// workers: a thread wake-up more per message, which under an open-loop
/// load of 50,000 messages a second doubled the latency p99 of
/// `sockbus-loadtest`'s latency scenario. There the waiting task only waits.
pub(crate) fn poll_reading<T>(
    inner: &Inner,
    cx: &mut Context<'_>,
    mut poll_rx: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    // Looked up only once the channel is empty: the runtime handle is an
    // `Arc` clone and drop, a cost per message when messages are waiting.
    let own_thread = || {
        matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread)
        )
    };
    let mut stalled = false;
    loop {
        if let Poll::Ready(v) = poll_rx(cx) {
            return Poll::Ready(v);
        }
        // Held up by another subscription: what we wait for comes through
        // the channel once the reader task can go on.
        if stalled || !own_thread() {
            return Poll::Pending;
        }
        let Some(side) = lock(&inner.read).clone() else {
            return Poll::Pending;
        };
        // Registers this task for the socket's readiness (the reader task
        // waits for it too).
        if side.stream().poll_read_ready(cx).is_pending() {
            return Poll::Pending;
        }
        let mut st = match side.state.try_lock() {
            Ok(st) => st,
            // The reader task (or another waiting task) is reading: what it
            // reads for us comes through the channel.
            Err(std::sync::TryLockError::WouldBlock) => return Poll::Pending,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        match side.read_and_handle(inner, &mut st) {
            Ok(p) => stalled = p == Progress::Stalled,
            Err(e) => {
                drop(st);
                side.fail(e);
                return Poll::Pending;
            }
        }
    }
}

pub(crate) async fn read_loop(inner: &Arc<Inner>, side: &ReadSide) -> Error {
    // Registered once, before the first read, so a close while a batch is
    // being handled is seen too (and no lock per read for a new waiter).
    let closed = inner.closed.notified();
    tokio::pin!(closed);
    closed.as_mut().enable();
    if inner.is_closing() {
        return Error::Closed;
    }
    // Only a subscription that waits for room ([`Overflow::Wait`]) stalls
    // the read side; registering for room costs two locks per turn.
    let wait = inner.opts.overflow == Overflow::Wait;
    loop {
        if let Some(e) = lock(&side.failed).take() {
            return e;
        }
        // Registered before the read, so room made while it runs is seen.
        let room = inner.room.notified();
        tokio::pin!(room);
        if wait {
            room.as_mut().enable();
        }
        // A waiting task may be reading: it holds the lock for one read and
        // what that completes, never across an await.
        let progress = match side.read_and_handle(inner, &mut lock(&side.state)) {
            Ok(p) => p,
            Err(e) => return e,
        };
        if progress == Progress::Read {
            continue;
        }
        let failed = side.failed_wake.notified();
        tokio::pin!(failed);
        failed.as_mut().enable();
        if lock(&side.failed).is_some() {
            continue;
        }
        // Stalled: wait for the subscriber to make room, not for the socket
        // (readable, it would wake us at once for nothing). Idle: either; a
        // waiting task may have stalled on a read of its own.
        let stalled = progress == Progress::Stalled;
        tokio::select! {
            r = side.stream().readable(), if !stalled => {
                if let Err(e) = r {
                    return e.into();
                }
            }
            _ = room.as_mut(), if wait => {}
            _ = failed.as_mut() => {}
            _ = closed.as_mut() => return Error::Closed,
        }
    }
}

/// The reading loop of a connection no other task reads (TLS): read,
/// handle, until the connection fails or the client closes. A message a
/// full subscription holds up stops the reading until there is room.
pub(crate) async fn read_loop_stream<R: tokio::io::AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    rd: &mut R,
    mut st: ReadState,
) -> Error {
    use tokio::io::AsyncReadExt;
    let closed = inner.closed.notified();
    tokio::pin!(closed);
    closed.as_mut().enable();
    if inner.is_closing() {
        return Error::Closed;
    }
    loop {
        let room = inner.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if let Err(e) = st.handle(inner) {
            return e;
        }
        if st.stalled.is_some() {
            tokio::select! {
                _ = room.as_mut() => continue,
                _ = closed.as_mut() => return Error::Closed,
            }
        }
        if st.buf.capacity() - st.buf.len() < 4096 {
            st.buf.reserve(64 * 1024);
        }
        tokio::select! {
            r = rd.read_buf(&mut st.buf) => match r {
                Ok(0) => return Error::Disconnected,
                Ok(_) => {
                    inner.heard.store(true, Ordering::Relaxed);
                    sockbus_protocol::busy_poll::touch();
                }
                Err(e) => return e.into(),
            },
            _ = closed.as_mut() => return Error::Closed,
        }
    }
}

/// Handles every whole frame in `buf`, up to a message a full subscription
/// holds up ([`Overflow::Wait`], left in `stalled`). Takes the subscription
/// lock at the first MSG and holds it to the end of the batch: one lock per
/// read, not per message (and never across an await: this is not async).
fn read_batch(
    inner: &Inner,
    buf: &mut BytesMut,
    consumed: &mut usize,
    stalled: &mut Option<Stalled>,
) -> Result<(), Error> {
    // The broker's frames carry at most its max payload (from INFO) and the
    // fields around it: anything longer is a broken or lying broker, refused
    // from the header alone instead of reserving room for it.
    let max_body = inner
        .max_payload
        .load(Ordering::Relaxed)
        .saturating_add(2 * MAX_FRAME_OVERHEAD);
    let mut subs: Option<MutexGuard<'_, SubMap>> = None;
    while stalled.is_none() {
        let h = match frame::parse_header(buf) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(e.into()),
        };
        if h.len > max_body {
            return Err(ProtocolError::FrameTooLarge {
                len: h.len,
                max: max_body,
            }
            .into());
        }
        let len = h.frame_len();
        if buf.len() < len {
            buf.reserve(len - buf.len());
            break;
        }
        if h.kind != Kind::Credit {
            *consumed += len;
        }
        if h.kind == Kind::Msg {
            let frame = buf.split_to(len).freeze();
            dispatch_msg(inner, &mut subs, &h, frame, stalled)?;
            continue;
        }
        let r = match frame::decode_body(&h, &buf[HEADER_LEN..len]) {
            Ok(f) => handle_control(inner, &h, f),
            Err(e) => return Err(e.into()),
        };
        buf.advance(len);
        r?;
    }
    Ok(())
}

fn handle_control(inner: &Inner, h: &frame::Header, f: FrameRef<'_>) -> Result<(), Error> {
    match f {
        FrameRef::Pong(id) => {
            // Whatever it answers, the broker is alive (keepalive PINGs
            // carry id 0, which answers no flush).
            inner.pings_out.store(0, Ordering::Relaxed);
            let mut pings = lock(&inner.pings);
            while pings.front().is_some_and(|(p, _)| *p <= id) {
                if let Some((_, tx)) = pings.pop_front() {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        FrameRef::Ping(id) => {
            let _ = inner.control(|b| encode_pong(b, id));
        }
        FrameRef::Credit(n) => {
            inner.outbox.on_credit(n);
            inner.kick();
        }
        FrameRef::Err { code: c, text } => {
            {
                let mut e = lock(&inner.errors);
                e.0 += 1;
                e.1 = Some((c, text.to_string()));
            }
            if let Some(sid) = frame::err_sid(h) {
                // The broker refused that SUB: its subscriber ends (the
                // sender goes with the entry) and it is not re-sent.
                if let Some(e) = lock(&inner.subs).remove(&sid) {
                    let _ = e.refused.set((c, text.to_string()));
                }
                warn!(code = c, sid, "broker refused a subscription: {text}");
                return Ok(());
            }
            if let Some(hash) = frame::err_reply(h) {
                // The broker refused a PUB with a reply subject: the
                // request waiting on it fails now, with the typed error.
                let mut requests = lock(&inner.requests);
                let mut buf = [0u8; 64];
                let id = requests.keys().copied().find(|&id| {
                    let r = crate::request::reply_subject(&mut buf, &inner.inbox_prefix, id);
                    sockbus_protocol::subject::subject_hash(r.as_bytes()) == hash
                });
                if let Some(tx) = id.and_then(|id| requests.remove(&id)) {
                    let _ = tx.send(Err(Error::from_server(c, text)));
                    return Ok(());
                }
            }
            match c {
                code::MALFORMED
                | code::SLOW_CONSUMER
                | code::SHUTTING_DOWN
                | code::NOT_CONNECTED => {
                    *lock(&inner.close_reason) = Some((c, text.to_string()));
                    warn!(code = c, "broker closed the connection: {text}")
                }
                _ => warn!(code = c, "broker refused a request: {text}"),
            }
        }
        FrameRef::Info {
            max_payload, flags, ..
        } => {
            inner.max_payload.store(max_payload, Ordering::Relaxed);
            inner
                .pub_room
                .store(flags & INFO_PUB_ROOM != 0, Ordering::Relaxed);
        }
        _ => {
            return Err(Error::Server {
                code: code::MALFORMED,
                message: "unexpected frame from the broker".into(),
            })
        }
    }
    Ok(())
}

/// Routes a MSG to its subscription or waiting request. `Some` when a full
/// subscription holds it up ([`Overflow::Wait`]).
#[inline(always)]
fn dispatch_msg<'a>(
    inner: &'a Inner,
    subs: &mut Option<MutexGuard<'a, SubMap>>,
    h: &frame::Header,
    frame: Bytes,
    stalled: &mut Option<Stalled>,
) -> Result<(), Error> {
    let f = frame::decode_body(h, &frame[HEADER_LEN..])?;
    let FrameRef::Msg {
        sid,
        flags,
        subject,
        reply,
        headers,
        payload,
    } = f
    else {
        unreachable!("kind is MSG")
    };
    let base = frame.as_ptr() as usize;
    let span = |s: &[u8]| {
        let a = s.as_ptr() as usize - base;
        (a, a + s.len())
    };
    let subject_span = span(subject.as_bytes());
    let reply_span = reply.map(|r| span(r.as_bytes()));
    let headers_span = span(headers);
    let payload = frame.slice_ref(payload);
    // The inbox multiplexer: replies are routed by their last token.
    if inner.mux_sid.get() == Some(&sid) {
        if let Some(id) = subject
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
        {
            if let Some(tx) = lock(&inner.requests).remove(&id) {
                let _ = tx.send(Ok(Message {
                    frame,
                    subject: subject_span,
                    reply: reply_span,
                    headers: headers_span,
                    payload,
                    status: flags,
                }));
            }
        }
        return Ok(());
    }
    let subs = subs.get_or_insert_with(|| lock(&inner.subs));
    let Some(e) = subs.get_mut(&sid) else {
        return Ok(());
    };
    let size = payload.len();
    e.received += 1;
    let msg = Message {
        frame,
        subject: subject_span,
        reply: reply_span,
        headers: headers_span,
        payload,
        status: flags,
    };
    let last = e.max.is_some_and(|m| e.received >= m);
    match offer(inner, e, sid, msg, size) {
        Offer::Taken if !last => {}
        Offer::Taken | Offer::Closed => {
            subs.remove(&sid);
        }
        Offer::Full(msg) => {
            *stalled = Some(Stalled {
                sid,
                msg,
                size,
                last,
                dropped: e.dropped.clone(),
            })
        }
    }
    Ok(())
}

/// What became of a message offered to a subscription.
enum Offer {
    /// Queued for the subscriber, or dropped and counted ([`Overflow::Drop`]).
    Taken,
    /// The subscriber is gone.
    Closed,
    /// Full, and the connection waits for room ([`Overflow::Wait`]).
    Full(Message),
}

/// Queues `msg` for the subscription, or, when its buffer is full, drops it
/// and counts it or hands it back, as [`Overflow`] says.
#[inline(always)]
fn offer(inner: &Inner, e: &mut SubEntry, sid: u32, mut msg: Message, size: usize) -> Offer {
    let wait = inner.opts.overflow == Overflow::Wait;
    for second_look in [false, true] {
        // What the subscriber holds; `taken` may lag (a relaxed read), which
        // only overstates it.
        let pending = e.offered.wrapping_sub(e.taken.load(Ordering::Relaxed));
        // Waiting, a message larger than the whole allowance still goes to
        // an empty subscription (else it would wait forever).
        let over = pending + size > inner.opts.sub_pending_bytes && !(wait && pending == 0);
        if !over {
            match e.tx.try_send(msg) {
                Ok(()) => {
                    e.offered = e.offered.wrapping_add(size);
                    e.warned = false;
                    return Offer::Taken;
                }
                Err(mpsc::error::TrySendError::Full(m)) => msg = m,
                Err(mpsc::error::TrySendError::Closed(_)) => return Offer::Closed,
            }
        }
        if !wait {
            drop_slow(e, sid);
            return Offer::Taken;
        }
        if !second_look {
            // Say we wait, then look once more: a subscriber that took a
            // message before it could see this left room we see now (both
            // sides fence, see `Inner::took`).
            inner.stalled.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
        }
    }
    Offer::Full(msg)
}

/// Offers a held message again; `Some` while its subscription is still full.
fn retry(inner: &Inner, s: Stalled) -> Option<Stalled> {
    let mut subs = lock(&inner.subs);
    let outcome = match subs.get_mut(&s.sid) {
        // Unsubscribed meanwhile: nobody wants it.
        None => Offer::Closed,
        Some(e) => offer(inner, e, s.sid, s.msg, s.size),
    };
    match outcome {
        Offer::Full(msg) => return Some(Stalled { msg, ..s }),
        Offer::Taken if !s.last => {}
        Offer::Taken | Offer::Closed => {
            subs.remove(&s.sid);
        }
    }
    inner.stalled.store(false, Ordering::SeqCst);
    None
}

fn drop_slow(e: &mut SubEntry, sid: u32) {
    e.dropped.fetch_add(1, Ordering::Relaxed);
    if !e.warned {
        e.warned = true;
        warn!(sid, subject = %e.subject, "slow consumer: subscription buffer full, dropping messages");
    }
}

#[cfg(test)]
mod tests;
