//! The public [`Client`] handle and the state its clones, subscribers and
//! connection tasks share ([`Inner`]): publish, flush, subscribe, close.
//! Request/reply is in `request`, the connection's life in `connector`,
//! the way frames reach the socket in `writer` and back in `reader`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sockbus_protocol::frame::{
    code, encode_ping, encode_pub_flags, encode_sub, encode_unsub, pub_frame_len, PUB_ROOM,
};
use sockbus_protocol::outbox::{Outbox, Push};
use sockbus_protocol::subject::{validate_pattern, validate_subject};
use sockbus_protocol::MAX_FRAME_OVERHEAD;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::options::{ConnectOptions, Overflow};
use crate::reader::ReadSide;
use crate::subscriber::{SubEntry, SubMap, Subscriber};

#[cfg(doc)]
use sockbus_protocol::frame::PUB_ACK;

/// Header that makes a stored publish idempotent (see `streams`).
pub use sockbus_protocol::api::header::MSG_ID as MSG_ID_HEADER;

/// What the client's clones, its subscribers and its connection tasks share.
pub(crate) struct Inner {
    pub(crate) opts: ConnectOptions,
    pub(crate) urls: Vec<String>,
    pub(crate) outbox: Outbox,
    /// Wakes the writer.
    pub(crate) wake: Notify,
    /// The current connection's socket, for direct writes.
    pub(crate) sock: Mutex<Option<Arc<OwnedWriteHalf>>>,
    /// The current connection's read side, for tasks that read it themselves.
    pub(crate) read: Mutex<Option<Arc<ReadSide>>>,
    /// Time base, and when the last write ended (nanoseconds since `t0`).
    pub(crate) t0: Instant,
    pub(crate) last_write: AtomicU64,
    /// Wakes publishers waiting for outbox space.
    pub(crate) space: Notify,
    /// How many publishers wait on `space`.
    pub(crate) space_waiters: AtomicUsize,
    pub(crate) subs: Mutex<SubMap>,
    pub(crate) next_sid: AtomicU32,
    pub(crate) pings: Mutex<VecDeque<(u64, oneshot::Sender<Result<()>>)>>,
    pub(crate) next_ping: AtomicU64,
    pub(crate) max_payload: AtomicU32,
    /// The broker's INFO asked for PUBs with room for the sid
    /// (`INFO_PUB_ROOM`): direct delivery rewrites them in place.
    pub(crate) pub_room: AtomicBool,
    /// Count of ERR frames received and the latest one.
    pub(crate) errors: Mutex<(u64, Option<(u16, String)>)>,
    /// Requests waiting, by id: the reply, or why the broker refused the
    /// request (an ERR naming its reply subject).
    pub(crate) requests:
        Mutex<HashMap<u64, oneshot::Sender<Result<Message>>, rustc_hash::FxBuildHasher>>,
    pub(crate) mux_sid: tokio::sync::OnceCell<u32>,
    pub(crate) inbox_prefix: String,
    pub(crate) next_req: AtomicU64,
    pub(crate) closing: AtomicBool,
    pub(crate) closed: Notify,
    /// A full subscription holds up the read side ([`Overflow::Wait`]).
    pub(crate) stalled: AtomicBool,
    /// Wakes the reader task when a subscriber made room while `stalled`.
    pub(crate) room: Notify,
    /// Keepalive: bytes arrived from the broker since the last ping tick.
    pub(crate) heard: AtomicBool,
    /// Keepalive: PINGs sent since the last PONG.
    pub(crate) pings_out: AtomicU32,
    /// The closing ERR the broker sent on the current connection, if any.
    pub(crate) close_reason: Mutex<Option<(u16, String)>>,
    /// Connections lost so far, and why the last one was (the broker's
    /// closing ERR, when it sent one).
    pub(crate) lost: Mutex<(u64, Option<(u16, String)>)>,
    pub(crate) connected: tokio::sync::watch::Sender<bool>,
    pub(crate) server: Mutex<Option<(String, SocketAddr)>>,
}

/// Counts a publisher waiting for outbox space while it lives.
struct SpaceWaiter<'a>(&'a AtomicUsize);

impl<'a> SpaceWaiter<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        SpaceWaiter(n)
    }
}

impl Drop for SpaceWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn new(opts: ConnectOptions, urls: Vec<String>) -> Self {
        let send_buffer = opts.send_buffer;
        let id: u64 = rand::random();
        Inner {
            opts,
            urls,
            outbox: Outbox::new(send_buffer, 0),
            wake: Notify::new(),
            sock: Mutex::new(None),
            read: Mutex::new(None),
            t0: Instant::now(),
            last_write: AtomicU64::new(0),
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
            subs: Mutex::new(SubMap::default()),
            next_sid: AtomicU32::new(1),
            pings: Mutex::new(VecDeque::new()),
            next_ping: AtomicU64::new(1),
            max_payload: AtomicU32::new(sockbus_protocol::DEFAULT_MAX_PAYLOAD),
            pub_room: AtomicBool::new(false),
            errors: Mutex::new((0, None)),
            requests: Mutex::new(HashMap::default()),
            mux_sid: tokio::sync::OnceCell::new(),
            inbox_prefix: format!("{}{id:016x}", sockbus_protocol::subject::INBOX_PREFIX),
            next_req: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
            stalled: AtomicBool::new(false),
            room: Notify::new(),
            heard: AtomicBool::new(false),
            pings_out: AtomicU32::new(0),
            close_reason: Mutex::new(None),
            lost: Mutex::new((0, None)),
            connected: tokio::sync::watch::channel(false).0,
            server: Mutex::new(None),
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A subscriber took a message (or went away): with [`Overflow::Wait`],
    /// wakes the read side if it waits for room. The fence pairs with the
    /// one in `reader::offer`, so either the reader sees the room or this
    /// sees its `stalled`.
    pub(crate) fn took(&self) {
        if self.opts.overflow == Overflow::Wait {
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.stalled.load(Ordering::SeqCst) {
                self.room.notify_one();
            }
        }
    }

    /// Queues a control frame (SUB, UNSUB, PING): small, never refused for space.
    pub(crate) fn control(&self, f: impl FnOnce(&mut BytesMut)) -> Result<()> {
        match self.outbox.push_control(f) {
            Push::Queued { was_empty } => {
                if was_empty {
                    self.pushed();
                }
                Ok(())
            }
            _ => Err(Error::Closed),
        }
    }

    pub(crate) fn shutdown(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            self.outbox.close();
            self.wake.notify_one();
            self.closed.notify_waiters();
            self.space.notify_waiters();
        }
    }

    pub(crate) fn fail_pings(&self, e: impl Fn() -> Error) {
        for (_, tx) in lock(&self.pings).drain(..) {
            let _ = tx.send(Err(e()));
        }
    }
}

struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A connection to a sockbus broker (or a list of them, for failover).
/// Cheap to clone; the connection closes when the last clone and every
/// subscriber are dropped, or on [`Client::close`].
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.inner.urls)
            .finish()
    }
}

impl Client {
    /// The handle for a connected client; the connection closes when the
    /// last clone (each subscriber holds one) is dropped.
    pub(crate) fn new(inner: Arc<Inner>) -> Client {
        Client {
            inner: inner.clone(),
            _guard: Arc::new(CloseOnDrop(inner)),
        }
    }

    /// Publishes a message. Returns once it is queued; waits only when the
    /// send buffer is full. Use [`Client::flush`] to know the broker has it.
    pub async fn publish(&self, subject: &str, payload: impl AsRef<[u8]>) -> Result<()> {
        self.publish_inner(subject, None, &[], payload.as_ref(), 0)
            .await
    }

    pub async fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<()> {
        validate_subject(reply)?;
        self.publish_inner(subject, Some(reply), &[], payload.as_ref(), 0)
            .await
    }

    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: &Headers,
        payload: impl AsRef<[u8]>,
    ) -> Result<()> {
        let h = headers.encode()?;
        self.publish_inner(subject, None, &h, payload.as_ref(), 0)
            .await
    }

    /// `flags`: the PUB frame's ([`PUB_ACK`] for a durable publish).
    pub(crate) async fn publish_inner(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
        flags: u8,
    ) -> Result<()> {
        validate_subject(subject)?;
        let max = self.inner.max_payload.load(Ordering::Relaxed);
        if payload.len() > max as usize {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                max,
            });
        }
        if headers.len() + subject.len() + reply.map_or(0, str::len)
            > MAX_FRAME_OVERHEAD as usize - 16
        {
            return Err(Error::Protocol(
                sockbus_protocol::ProtocolError::FieldTooLong("headers"),
            ));
        }
        let flags = if self.inner.pub_room.load(Ordering::Relaxed) {
            flags | PUB_ROOM
        } else {
            flags
        };
        let len = pub_frame_len(flags, subject, reply, headers, payload);
        // Ok(true): queued; Ok(false): the send buffer is full.
        let try_push = || match self.inner.outbox.push(len, |b| {
            // Lengths were checked above, so encoding cannot fail.
            let _ = encode_pub_flags(b, flags, subject, reply, headers, payload);
        }) {
            Push::Queued { was_empty } => {
                if was_empty {
                    self.inner.pushed();
                }
                Ok(true)
            }
            Push::Closed => Err(Error::Closed),
            Push::OverBudget => Ok(false),
        };
        loop {
            if try_push()? {
                return Ok(());
            }
            // Register for the writer's "space freed" signal before checking
            // again, so a wake-up between the two cannot be missed.
            let waiter = self.inner.space.notified();
            tokio::pin!(waiter);
            waiter.as_mut().enable();
            // Counted before the second look, which the notifier's count
            // check cannot then miss (both sides fence: see space_freed).
            let _counted = SpaceWaiter::new(&self.inner.space_waiters);
            std::sync::atomic::fence(Ordering::SeqCst);
            if try_push()? {
                return Ok(());
            }
            if self.inner.is_closing() {
                return Err(Error::Closed);
            }
            waiter.await;
        }
    }

    /// Resolves once the broker has processed everything published before
    /// it. Fails with the broker's error if it refused any of it.
    pub async fn flush(&self) -> Result<()> {
        self.flush_timeout(self.inner.opts.flush_timeout).await
    }

    pub async fn flush_timeout(&self, timeout: Duration) -> Result<()> {
        let errors_before = lock(&self.inner.errors).0;
        let (tx, rx) = oneshot::channel();
        {
            let mut pings = lock(&self.inner.pings);
            let id = self.inner.next_ping.fetch_add(1, Ordering::Relaxed);
            self.inner.control(|b| encode_ping(b, id))?;
            pings.push_back((id, tx));
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(Error::Closed),
            Ok(Ok(r)) => {
                r?;
                let errs = lock(&self.inner.errors);
                match &errs.1 {
                    Some((code, message)) if errs.0 != errors_before => {
                        Err(Error::from_server(*code, message))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Subscribes to a subject or wildcard pattern.
    pub async fn subscribe(&self, subject: &str) -> Result<Subscriber> {
        self.subscribe_inner(subject, None)
    }

    /// Subscribes as a member of a queue group: each message goes to one member.
    pub async fn queue_subscribe(&self, subject: &str, queue: &str) -> Result<Subscriber> {
        if queue.is_empty() || queue.bytes().any(|b| b <= b' ') {
            return Err(Error::Server {
                code: code::BAD_REQUEST,
                message: format!("invalid queue group name {queue:?}"),
            });
        }
        self.subscribe_inner(subject, Some(queue))
    }

    fn subscribe_inner(&self, subject: &str, queue: Option<&str>) -> Result<Subscriber> {
        validate_pattern(subject)?;
        if self.inner.is_closing() {
            return Err(Error::Closed);
        }
        let sid = self.inner.next_sid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.inner.opts.sub_capacity);
        let taken = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(std::sync::OnceLock::new());
        {
            // Register before the SUB goes out so no message can arrive unrouted.
            let mut subs = lock(&self.inner.subs);
            subs.insert(
                sid,
                SubEntry {
                    subject: subject.to_string(),
                    queue: queue.map(str::to_string),
                    tx,
                    offered: 0,
                    taken: taken.clone(),
                    received: 0,
                    max: None,
                    dropped: dropped.clone(),
                    warned: false,
                    refused: refused.clone(),
                },
            );
            self.inner.control(|b| {
                let _ = encode_sub(b, sid, subject, queue);
            })?;
        }
        Ok(Subscriber::new(
            sid,
            rx,
            taken,
            dropped,
            refused,
            self.clone(),
        ))
    }

    /// True while a connection to a broker is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Resolves when the connection that is up now is lost: the broker went
    /// away or closed it (as a slow consumer, say, with
    /// [`Overflow::Wait`]), or the client was closed ([`Error::Closed`]).
    /// The client reconnects by itself, but what was published meanwhile
    /// never reaches its subscriptions: a reader that must not miss a
    /// message watches this. The error is the broker's reason when it gave
    /// one ([`Error::Server`]), else [`Error::Disconnected`].
    pub fn disconnected(&self) -> impl std::future::Future<Output = Error> + Send + 'static {
        let inner = self.inner.clone();
        let seen = lock(&inner.lost).0;
        let mut rx = inner.connected.subscribe();
        async move {
            loop {
                {
                    let lost = lock(&inner.lost);
                    if lost.0 > seen {
                        return match &lost.1 {
                            Some((code, message)) => Error::Server {
                                code: *code,
                                message: message.clone(),
                            },
                            None => Error::Disconnected,
                        };
                    }
                }
                if inner.is_closing() || rx.changed().await.is_err() {
                    return Error::Closed;
                }
            }
        }
    }

    /// Waits until connected (e.g. after a broker restart), up to `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.inner.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Closed)?;
        Ok(())
    }

    /// Name and address of the broker currently connected.
    pub fn server(&self) -> Option<(String, SocketAddr)> {
        lock(&self.inner.server).clone()
    }

    /// Largest payload the broker accepts.
    pub fn max_payload(&self) -> u32 {
        self.inner.max_payload.load(Ordering::Relaxed)
    }

    /// Flushes what is queued (best effort) and closes the connection.
    /// Subscribers' streams end.
    pub async fn close(&self) -> Result<()> {
        let r = if self.is_connected() {
            self.flush().await
        } else {
            Ok(())
        };
        self.inner.shutdown();
        r
    }

    /// Unsubscribes everything, waits for the broker to have processed all
    /// publishes, then closes. Messages already received stay readable.
    pub async fn drain(&self) -> Result<()> {
        let sids: Vec<u32> = lock(&self.inner.subs).keys().copied().collect();
        for sid in sids {
            let _ = self.inner.control(|b| encode_unsub(b, sid, 0));
        }
        self.close().await
    }
}
