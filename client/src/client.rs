//! The connection machinery: connect/handshake, a reader that dispatches
//! MSG frames to subscriptions, a writer that drains the shared outbox, and a
//! supervisor that reconnects with backoff and restores subscriptions.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_core::Stream;
use sockbus_protocol::flow::{effective_window, RecvWindow};
use sockbus_protocol::frame::{
    self, code, encode_connect, encode_ping, encode_pong, encode_pub, encode_sub, encode_unsub,
    message_frame_len, CONNECT_NO_ECHO, CONNECT_NO_RESPONDERS,
};
use sockbus_protocol::outbox::{Direct, Outbox, Push};
use sockbus_protocol::subject::{validate_pattern, validate_subject};
use sockbus_protocol::{FrameRef, Kind, HEADER_LEN, MAX_FRAME_OVERHEAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::message::{Headers, Message};

/// Header that makes a stored publish idempotent (see `streams`).
pub use sockbus_protocol::api::header::MSG_ID as MSG_ID_HEADER;

/// How a client connects and behaves. Start from `ConnectOptions::default()`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    name: String,
    token: Vec<u8>,
    connect_timeout: Duration,
    request_timeout: Duration,
    flush_timeout: Duration,
    max_reconnect_delay: Duration,
    max_reconnects: Option<usize>,
    sub_capacity: usize,
    sub_pending_bytes: usize,
    send_buffer: usize,
    recv_window: u32,
    no_echo: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            name: String::new(),
            token: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(2),
            max_reconnects: None,
            sub_capacity: 65536,
            sub_pending_bytes: 64 << 20,
            send_buffer: 32 << 20,
            recv_window: 8 << 20,
            no_echo: false,
        }
    }
}

impl ConnectOptions {
    pub fn new() -> Self {
        Self::default()
    }
    /// Name shown in the broker's logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Authentication token (carried in CONNECT; reserved for broker auth).
    pub fn token(mut self, token: impl Into<Vec<u8>>) -> Self {
        self.token = token.into();
        self
    }
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.flush_timeout = d;
        self
    }
    /// Longest wait between reconnect attempts (backoff doubles up to it).
    pub fn max_reconnect_delay(mut self, d: Duration) -> Self {
        self.max_reconnect_delay = d;
        self
    }
    /// Give up after this many failed reconnect attempts in a row (default: never).
    pub fn max_reconnects(mut self, n: usize) -> Self {
        self.max_reconnects = Some(n);
        self
    }
    /// Messages a subscription buffers before new ones are dropped (slow consumer).
    pub fn subscription_capacity(mut self, n: usize) -> Self {
        self.sub_capacity = n.max(1);
        self
    }
    /// Payload bytes a subscription buffers before new ones are dropped.
    pub fn subscription_pending_bytes(mut self, n: usize) -> Self {
        self.sub_pending_bytes = n.max(1);
        self
    }
    /// Bytes of unsent frames after which `publish` waits (backpressure).
    pub fn send_buffer(mut self, n: usize) -> Self {
        self.send_buffer = n.max(64 * 1024);
        self
    }
    /// Flow-control window announced to the broker (0: the default, 8 MiB).
    pub fn receive_window(mut self, n: u32) -> Self {
        self.recv_window = n;
        self
    }
    /// Do not receive this client's own publishes on its subscriptions.
    pub fn no_echo(mut self, yes: bool) -> Self {
        self.no_echo = yes;
        self
    }

    /// Connects to the first reachable server of a comma-separated list.
    pub async fn connect(self, urls: &str) -> Result<Client> {
        let urls = parse_urls(urls)?;
        let inner = Arc::new(Inner::new(self, urls));
        let conn = establish(&inner, 0).await?;
        tokio::spawn(supervise(inner.clone(), conn));
        Ok(Client {
            inner: inner.clone(),
            _guard: Arc::new(CloseOnDrop(inner)),
        })
    }
}

/// Connects with default options.
pub async fn connect(urls: &str) -> Result<Client> {
    ConnectOptions::default().connect(urls).await
}

fn parse_urls(urls: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let bare = match u.split_once("://") {
            Some(("sockbus" | "tcp", rest)) => rest,
            Some(_) => return Err(Error::InvalidUrl(u.to_string())),
            None => u,
        }
        .trim_end_matches('/');
        if bare.is_empty() || bare.contains('/') {
            return Err(Error::InvalidUrl(u.to_string()));
        }
        let hostport = if bare
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            bare.to_string()
        } else {
            format!("{bare}:7420")
        };
        out.push(hostport);
    }
    if out.is_empty() {
        return Err(Error::InvalidUrl(urls.to_string()));
    }
    Ok(out)
}

/// Subscriptions by id; ids are small integers, so a fast non-keyed hash suffices.
type SubMap = HashMap<u32, SubEntry, rustc_hash::FxBuildHasher>;

struct SubEntry {
    subject: String,
    queue: Option<String>,
    tx: mpsc::Sender<Message>,
    pending: Arc<AtomicUsize>,
    /// Messages received over the subscription's life, and the limit.
    received: u64,
    max: Option<u64>,
    dropped: Arc<AtomicU64>,
    warned: bool,
}

/// Most bytes a publishing task writes to the socket itself (see
/// [`Inner::pushed`]); more goes to the writer task.
const DIRECT_MAX: usize = 32 * 1024;
/// A publish writes to the socket itself only when nothing was written for
/// this many nanoseconds: a quiet connection. On a busy one the frame goes
/// to the writer task, which batches it with the others (one syscall per
/// message would cap a tight publish loop at a few hundred thousand
/// messages per second).
const QUIET_NS: u64 = 10_000;

struct Inner {
    opts: ConnectOptions,
    urls: Vec<String>,
    outbox: Outbox,
    /// Wakes the writer.
    wake: Notify,
    /// The current connection's socket, for direct writes.
    sock: Mutex<Option<Arc<OwnedWriteHalf>>>,
    /// The current connection's read side, for tasks that read it themselves.
    read: Mutex<Option<Arc<ReadSide>>>,
    /// Time base, and when the last write ended (nanoseconds since `t0`).
    t0: Instant,
    last_write: AtomicU64,
    /// Wakes publishers waiting for outbox space.
    space: Notify,
    /// How many publishers wait on `space`.
    space_waiters: AtomicUsize,
    subs: Mutex<SubMap>,
    next_sid: AtomicU32,
    pings: Mutex<VecDeque<(u64, oneshot::Sender<Result<()>>)>>,
    next_ping: AtomicU64,
    max_payload: AtomicU32,
    /// Count of ERR frames received and the latest one.
    errors: Mutex<(u64, Option<(u16, String)>)>,
    requests: Mutex<HashMap<u64, oneshot::Sender<Message>, rustc_hash::FxBuildHasher>>,
    mux_sid: tokio::sync::OnceCell<u32>,
    inbox_prefix: String,
    next_req: AtomicU64,
    closing: AtomicBool,
    closed: Notify,
    connected: tokio::sync::watch::Sender<bool>,
    server: Mutex<Option<(String, SocketAddr)>>,
}

/// `<prefix>.<id>` written into `buf`: a request's reply subject without an
/// allocation (the prefix is `_INBOX.` and 16 hex digits).
fn reply_subject<'a>(buf: &'a mut [u8; 64], prefix: &str, id: u64) -> &'a str {
    use std::io::Write;
    let mut w = &mut buf[..];
    write!(w, "{prefix}.{id}").expect("a reply subject fits in 64 bytes");
    let n = 64 - w.len();
    std::str::from_utf8(&buf[..n]).expect("ASCII")
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn new(opts: ConnectOptions, urls: Vec<String>) -> Self {
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
            errors: Mutex::new((0, None)),
            requests: Mutex::new(HashMap::default()),
            mux_sid: tokio::sync::OnceCell::new(),
            inbox_prefix: format!("{}{id:016x}", sockbus_protocol::subject::INBOX_PREFIX),
            next_req: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
            connected: tokio::sync::watch::channel(false).0,
            server: Mutex::new(None),
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Called after a push found the outbox empty: gets the frame on its way.
    /// At moderate rates the publishing task writes it to the socket itself,
    /// saving the writer task's wake-up (a thread hop, most of the latency
    /// of a request); on a connection that wrote within `QUIET_NS` the
    /// writer task takes it, so fast publishers' frames go out in batches.
    fn pushed(&self) {
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

    fn wrote(&self) {
        self.last_write.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Wakes the publishers waiting for outbox space, if any (checking
    /// first saves the notifier's lock on every write).
    fn space_freed(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Writes what is queued to the socket without blocking when nobody else
    /// is writing and the batch is small; otherwise leaves it to the writer
    /// task (woken if needed). What the socket does not take, the writer
    /// task finishes.
    fn kick(&self) {
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
        let mut t = match self.outbox.claim_direct(DIRECT_MAX) {
            Direct::Write(t) => t,
            Direct::Wake => return self.wake.notify_one(),
            Direct::Busy => return,
        };
        let r = t.write_nonblocking(|b| s.try_write_vectored(b));
        drop(sock);
        // The claim took bytes out of the outbox: room for waiting publishers.
        self.space_freed();
        match now {
            Some(now) => self.last_write.store(now, Ordering::Relaxed),
            None => self.wrote(),
        }
        // On an error the writer task meets it too, and the connection is
        // replaced.
        if self.outbox.release(t) || r.is_err() {
            self.wake.notify_one();
        }
    }

    /// Queues a control frame (SUB, UNSUB, PING): small, never refused for space.
    fn control(&self, f: impl FnOnce(&mut BytesMut)) -> Result<()> {
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

    fn shutdown(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            self.outbox.close();
            self.wake.notify_one();
            self.closed.notify_waiters();
            self.space.notify_waiters();
        }
    }

    fn fail_pings(&self, e: impl Fn() -> Error) {
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
    inner: Arc<Inner>,
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
    /// Publishes a message. Returns once it is queued; waits only when the
    /// send buffer is full. Use [`Client::flush`] to know the broker has it.
    pub async fn publish(&self, subject: &str, payload: impl AsRef<[u8]>) -> Result<()> {
        self.publish_inner(subject, None, &[], payload.as_ref())
            .await
    }

    pub async fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<()> {
        validate_subject(reply)?;
        self.publish_inner(subject, Some(reply), &[], payload.as_ref())
            .await
    }

    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: &Headers,
        payload: impl AsRef<[u8]>,
    ) -> Result<()> {
        let h = headers.encode()?;
        self.publish_inner(subject, None, &h, payload.as_ref())
            .await
    }

    async fn publish_inner(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
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
        let len = message_frame_len(false, subject, reply, headers, payload);
        // Ok(true): queued; Ok(false): the send buffer is full.
        let try_push = || match self.inner.outbox.push(len, |b| {
            // Lengths were checked above, so encoding cannot fail.
            let _ = encode_pub(b, subject, reply, headers, payload);
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
                    Some((code, message)) if errs.0 != errors_before => Err(Error::Server {
                        code: *code,
                        message: message.clone(),
                    }),
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
        let pending = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        {
            // Register before the SUB goes out so no message can arrive unrouted.
            let mut subs = lock(&self.inner.subs);
            subs.insert(
                sid,
                SubEntry {
                    subject: subject.to_string(),
                    queue: queue.map(str::to_string),
                    tx,
                    pending: pending.clone(),
                    received: 0,
                    max: None,
                    dropped: dropped.clone(),
                    warned: false,
                },
            );
            self.inner.control(|b| {
                let _ = encode_sub(b, sid, subject, queue);
            })?;
        }
        Ok(Subscriber {
            sid,
            rx,
            pending,
            dropped,
            client: self.clone(),
            active: true,
        })
    }

    /// A unique subject to receive replies on (`_INBOX.<client>_<n>`: outside
    /// the `_INBOX.<client>.*` subscription that carries this client's
    /// request replies).
    pub fn new_inbox(&self) -> String {
        let n = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        format!("{}_{n}", self.inner.inbox_prefix)
    }

    /// Sends a request and waits for the first reply, up to the request timeout.
    pub async fn request(&self, subject: &str, payload: impl AsRef<[u8]>) -> Result<Message> {
        self.request_timeout(subject, payload, self.inner.opts.request_timeout)
            .await
    }

    pub async fn request_timeout(
        &self,
        subject: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Message> {
        self.request_raw(subject, &[], payload.as_ref(), timeout)
            .await
    }

    /// Sends a request with headers and waits for the first reply, up to the request timeout.
    pub async fn request_with_headers(
        &self,
        subject: &str,
        headers: &Headers,
        payload: impl AsRef<[u8]>,
    ) -> Result<Message> {
        let h = headers.encode()?;
        self.request_raw(
            subject,
            &h,
            payload.as_ref(),
            self.inner.opts.request_timeout,
        )
        .await
    }

    async fn request_raw(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Message> {
        validate_subject(subject)?;
        let inner = &self.inner;
        inner
            .mux_sid
            .get_or_try_init(|| async {
                let sid = inner.next_sid.fetch_add(1, Ordering::Relaxed);
                let (tx, _rx) = mpsc::channel(1);
                let pattern = format!("{}.*", inner.inbox_prefix);
                let mut subs = lock(&inner.subs);
                subs.insert(
                    sid,
                    SubEntry {
                        subject: pattern.clone(),
                        queue: None,
                        tx,
                        pending: Arc::new(AtomicUsize::new(0)),
                        received: 0,
                        max: None,
                        dropped: Arc::new(AtomicU64::new(0)),
                        warned: false,
                    },
                );
                inner.control(|b| {
                    let _ = encode_sub(b, sid, &pattern, None);
                })?;
                Ok::<_, Error>(sid)
            })
            .await?;
        let id = inner.next_req.fetch_add(1, Ordering::Relaxed);
        let mut subject_buf = [0u8; 64];
        let reply = reply_subject(&mut subject_buf, &inner.inbox_prefix, id);
        let (tx, rx) = oneshot::channel();
        lock(&inner.requests).insert(id, tx);
        if let Err(e) = self
            .publish_inner(subject, Some(reply), headers, payload)
            .await
        {
            lock(&inner.requests).remove(&id);
            return Err(e);
        }
        let mut rx = rx;
        let reply =
            std::future::poll_fn(|cx| poll_reading(inner, cx, |cx| Pin::new(&mut rx).poll(cx)));
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(m)) if m.is_no_responders() => Err(Error::NoResponders),
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => {
                lock(&inner.requests).remove(&id);
                Err(Error::Timeout)
            }
        }
    }

    /// True while a connection to a broker is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
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

/// A subscription: a `Stream` of messages. Dropping it unsubscribes.
pub struct Subscriber {
    sid: u32,
    rx: mpsc::Receiver<Message>,
    pending: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    client: Client,
    active: bool,
}

impl Subscriber {
    /// The next message; `None` once unsubscribed and drained, or closed.
    pub async fn next(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let rx = &mut self.rx;
        let m = std::task::ready!(poll_reading(&self.client.inner, cx, |cx| rx.poll_recv(cx)));
        if let Some(m) = &m {
            self.pending.fetch_sub(m.payload.len(), Ordering::Relaxed);
        }
        Poll::Ready(m)
    }

    /// Stops the subscription now.
    pub fn unsubscribe(mut self) -> Result<()> {
        self.stop()
    }

    /// Ends the subscription after `n` more messages.
    pub fn unsubscribe_after(&mut self, n: u64) -> Result<()> {
        let mut subs = lock(&self.client.inner.subs);
        let Some(e) = subs.get_mut(&self.sid) else {
            return Ok(());
        };
        let total = e.received + n;
        e.max = Some(total);
        if n == 0 {
            subs.remove(&self.sid);
        }
        let sid = self.sid;
        self.client
            .inner
            .control(|b| encode_unsub(b, sid, total.min(u32::MAX as u64) as u32))
    }

    /// Messages dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.active, false) {
            return Ok(());
        }
        let present = lock(&self.client.inner.subs).remove(&self.sid).is_some();
        if present {
            let sid = self.sid;
            self.client.inner.control(|b| encode_unsub(b, sid, 0))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("sid", &self.sid)
            .finish()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Stream for Subscriber {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.poll_message(cx)
    }
}

// ------------------------------------------------------------ connection

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    recv_window: u32,
    /// Size of the INFO frame: the broker counts it against our window.
    info_len: usize,
}

/// Tries every server once, starting at `start`; on success the outbox is
/// reset for the new connection with every live subscription re-sent first.
async fn establish(inner: &Arc<Inner>, start: usize) -> Result<Conn> {
    let mut last = String::new();
    for i in 0..inner.urls.len() {
        let url = &inner.urls[(start + i) % inner.urls.len()];
        match tokio::time::timeout(inner.opts.connect_timeout, handshake(inner, url)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = format!("{url}: {e}"),
            Err(_) => last = format!("{url}: timed out"),
        }
    }
    Err(Error::NoServers(last))
}

async fn handshake(inner: &Arc<Inner>, url: &str) -> Result<Conn> {
    let mut stream = TcpStream::connect(url).await?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let mut flags = CONNECT_NO_RESPONDERS;
    if inner.opts.no_echo {
        flags |= CONNECT_NO_ECHO;
    }
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        flags,
        inner.opts.recv_window,
        &inner.opts.name,
        &inner.opts.token,
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if let Some((f, len)) = frame::decode(&buf, 64 * 1024)? {
            match f {
                FrameRef::Info {
                    recv_window,
                    max_payload,
                    server_name,
                    ..
                } => {
                    inner.max_payload.store(max_payload, Ordering::Relaxed);
                    *lock(&inner.server) = Some((server_name.to_string(), peer));
                    let send_window = effective_window(recv_window, max_payload);
                    let our_window = effective_window(inner.opts.recv_window, max_payload);
                    buf.advance(len);
                    let mut prefix = BytesMut::new();
                    for (sid, e) in lock(&inner.subs).iter() {
                        let _ = encode_sub(&mut prefix, *sid, &e.subject, e.queue.as_deref());
                        if let Some(max) = e.max {
                            // The new broker counts from zero.
                            encode_unsub(
                                &mut prefix,
                                *sid,
                                max.saturating_sub(e.received).max(1).min(u32::MAX as u64) as u32,
                            );
                        }
                    }
                    inner.outbox.reset(send_window, &prefix);
                    return Ok(Conn {
                        stream,
                        buf,
                        recv_window: our_window,
                        info_len: len,
                    });
                }
                FrameRef::Err { code, text } => {
                    return Err(Error::Server {
                        code,
                        message: text.to_string(),
                    });
                }
                _ => {
                    return Err(Error::Server {
                        code: code::MALFORMED,
                        message: "expected INFO from the broker".into(),
                    })
                }
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(Error::Disconnected);
        }
    }
}

async fn supervise(inner: Arc<Inner>, first: Conn) {
    let mut conn = Some(first);
    let mut failures = 0usize;
    let mut next_url = 0usize;
    loop {
        if let Some(c) = conn.take() {
            inner.connected.send_replace(true);
            let err = serve(&inner, c).await;
            inner.connected.send_replace(false);
            inner.fail_pings(|| Error::Disconnected);
            if inner.is_closing() {
                break;
            }
            warn!("disconnected from the broker: {err}; reconnecting");
            next_url += 1;
        }
        if inner.is_closing() {
            break;
        }
        failures += 1;
        if inner.opts.max_reconnects.is_some_and(|m| failures > m) {
            warn!("giving up after {} reconnect attempts", failures - 1);
            break;
        }
        // Exponential backoff with jitter, capped.
        let base =
            Duration::from_millis(25u64 << failures.min(7)).min(inner.opts.max_reconnect_delay);
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (base.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(base + jitter) => {}
            _ = inner.closed.notified() => break,
        }
        match establish(&inner, next_url).await {
            Ok(c) => {
                info!(
                    "reconnected to {:?}",
                    lock(&inner.server).as_ref().map(|s| s.1)
                );
                failures = 0;
                conn = Some(c);
            }
            Err(e) => debug!("reconnect attempt {failures} failed: {e}"),
        }
    }
    inner.shutdown();
    inner.connected.send_replace(false);
    inner.fail_pings(|| Error::Closed);
    // Ending the senders ends every subscriber's stream.
    lock(&inner.subs).clear();
    lock(&inner.requests).clear();
}

/// Runs one connection until it fails or the client closes.
async fn serve(inner: &Arc<Inner>, conn: Conn) -> Error {
    let Conn {
        stream,
        buf,
        recv_window,
        info_len,
    } = conn;
    let (rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    *lock(&inner.sock) = Some(wr.clone());
    let side = Arc::new(ReadSide {
        sock: wr.clone(),
        state: Mutex::new(ReadState {
            _rd: rd,
            buf,
            recv: RecvWindow::new(recv_window),
            consumed: info_len,
        }),
        failed: Mutex::new(None),
        failed_wake: Notify::new(),
    });
    *lock(&inner.read) = Some(side.clone());
    // Frames queued while there was no connection.
    inner.wake.notify_one();
    let writer = tokio::spawn(write_loop(inner.clone(), wr));
    let abort = writer.abort_handle();
    let r = tokio::select! {
        r = read_loop(inner, &side) => r,
        w = writer => match w {
            Ok(e) => e,
            Err(_) => Error::Disconnected,
        },
    };
    abort.abort();
    lock(&inner.sock).take();
    lock(&inner.read).take();
    r
}

async fn write_loop(inner: Arc<Inner>, wr: Arc<OwnedWriteHalf>) -> Error {
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
        let r = async {
            while !t.write_nonblocking(|b| wr.try_write_vectored(b))? {
                wr.writable().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        inner.outbox.release(t);
        inner.wrote();
        if let Err(e) = r {
            return e.into();
        }
    }
}

/// A connection's read side: the socket and what was read from it but not
/// handled yet. The connection's reader task reads it, and so does a task
/// waiting for a request's reply or a subscription's next message when the
/// socket's readiness wakes it first (see [`poll_reading`]): what it waits
/// for then reaches it without a hand-off from the reader task, a task
/// switch per message. Whoever reads handles every frame read, in order,
/// under `state`'s lock, which nobody holds across an await: a waiting task
/// that is never polled again cannot stall the connection, the reader task
/// reads on.
struct ReadSide {
    /// The socket (through the write half, which the writer shares).
    sock: Arc<OwnedWriteHalf>,
    state: Mutex<ReadState>,
    /// What a waiting task met while reading (an error, the end of the
    /// stream): the reader task ends the connection with it.
    failed: Mutex<Option<Error>>,
    failed_wake: Notify,
}

struct ReadState {
    /// Held so the socket's read side stays open; reads go through `sock`.
    _rd: OwnedReadHalf,
    buf: BytesMut,
    recv: RecvWindow,
    /// Bytes handled since the last credit grant.
    consumed: usize,
}

impl ReadSide {
    fn stream(&self) -> &TcpStream {
        self.sock.as_ref().as_ref()
    }

    /// Handles the whole frames in the buffer, then reads once and handles
    /// what that completes. `Ok(true)` when bytes were read; `Ok(false)`
    /// when the socket had none (its readiness is then cleared).
    fn read_and_handle(&self, inner: &Inner, st: &mut ReadState) -> Result<bool, Error> {
        self.handle(inner, st)?;
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
                sockbus_protocol::busy_poll::touch();
                self.handle(inner, st)?;
                Ok(true)
            }
            (None, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(())) => unreachable!("recv ran"),
        }
    }

    /// Handles the whole frames in the buffer and grants the credit they free.
    fn handle(&self, inner: &Inner, st: &mut ReadState) -> Result<(), Error> {
        read_batch(inner, &mut st.buf, &mut st.consumed)?;
        if let Some(c) = st.recv.on_consumed(std::mem::take(&mut st.consumed)) {
            if inner.outbox.grant(c) {
                inner.kick();
            }
        }
        Ok(())
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
fn poll_reading<T>(
    inner: &Inner,
    cx: &mut Context<'_>,
    mut poll_rx: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    let own_thread = matches!(
        tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
        Ok(tokio::runtime::RuntimeFlavor::CurrentThread)
    );
    loop {
        if let Poll::Ready(v) = poll_rx(cx) {
            return Poll::Ready(v);
        }
        if !own_thread {
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
        if let Err(e) = side.read_and_handle(inner, &mut st) {
            drop(st);
            side.fail(e);
            return Poll::Pending;
        }
    }
}

async fn read_loop(inner: &Arc<Inner>, side: &ReadSide) -> Error {
    // Registered once, before the first read, so a close while a batch is
    // being handled is seen too (and no lock per read for a new waiter).
    let closed = inner.closed.notified();
    tokio::pin!(closed);
    closed.as_mut().enable();
    if inner.is_closing() {
        return Error::Closed;
    }
    loop {
        if let Some(e) = lock(&side.failed).take() {
            return e;
        }
        // A waiting task may be reading: it holds the lock for one read and
        // what that completes, never across an await.
        let read = match side.read_and_handle(inner, &mut lock(&side.state)) {
            Ok(read) => read,
            Err(e) => return e,
        };
        if read {
            continue;
        }
        let failed = side.failed_wake.notified();
        tokio::pin!(failed);
        failed.as_mut().enable();
        if lock(&side.failed).is_some() {
            continue;
        }
        tokio::select! {
            r = side.stream().readable() => {
                if let Err(e) = r {
                    return e.into();
                }
            }
            _ = failed.as_mut() => {}
            _ = closed.as_mut() => return Error::Closed,
        }
    }
}

/// Handles every whole frame in `buf`. Takes the subscription lock at the
/// first MSG and holds it to the end of the batch: one lock per read, not per
/// message (and never across an await: this is not async).
fn read_batch(inner: &Inner, buf: &mut BytesMut, consumed: &mut usize) -> Result<(), Error> {
    let max_body = u32::MAX;
    let mut subs: Option<MutexGuard<'_, SubMap>> = None;
    loop {
        let h = match frame::parse_header(buf) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(e.into()),
        };
        if h.len > max_body {
            return Err(Error::Disconnected);
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
            dispatch_msg(inner, &mut subs, &h, frame)?;
            continue;
        }
        let r = match frame::decode_body(&h, &buf[HEADER_LEN..len]) {
            Ok(f) => handle_control(inner, f),
            Err(e) => return Err(e.into()),
        };
        buf.advance(len);
        r?;
    }
    Ok(())
}

fn handle_control(inner: &Inner, f: FrameRef<'_>) -> Result<(), Error> {
    match f {
        FrameRef::Pong(id) => {
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
            match c {
                code::MALFORMED
                | code::SLOW_CONSUMER
                | code::SHUTTING_DOWN
                | code::NOT_CONNECTED => {
                    warn!(code = c, "broker closed the connection: {text}")
                }
                _ => warn!(code = c, "broker refused a request: {text}"),
            }
        }
        FrameRef::Info { max_payload, .. } => {
            inner.max_payload.store(max_payload, Ordering::Relaxed)
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

fn dispatch_msg<'a>(
    inner: &'a Inner,
    subs: &mut Option<MutexGuard<'a, SubMap>>,
    h: &frame::Header,
    frame: Bytes,
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
                let _ = tx.send(Message {
                    frame,
                    subject: subject_span,
                    reply: reply_span,
                    headers: headers_span,
                    payload,
                    status: flags,
                });
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
    let over = e.pending.load(Ordering::Relaxed) + size > inner.opts.sub_pending_bytes;
    let msg = Message {
        frame,
        subject: subject_span,
        reply: reply_span,
        headers: headers_span,
        payload,
        status: flags,
    };
    let mut remove = e.max.is_some_and(|m| e.received >= m);
    if over {
        drop_slow(e, sid);
    } else {
        // Count before sending: the subscriber may take it off at once.
        e.pending.fetch_add(size, Ordering::Relaxed);
        match e.tx.try_send(msg) {
            Ok(()) => e.warned = false,
            Err(err) => {
                e.pending.fetch_sub(size, Ordering::Relaxed);
                match err {
                    mpsc::error::TrySendError::Full(_) => drop_slow(e, sid),
                    mpsc::error::TrySendError::Closed(_) => remove = true,
                }
            }
        }
    }
    if remove {
        subs.remove(&sid);
    }
    Ok(())
}

fn drop_slow(e: &mut SubEntry, sid: u32) {
    e.dropped.fetch_add(1, Ordering::Relaxed);
    if !e.warned {
        e.warned = true;
        warn!(sid, subject = %e.subject, "slow consumer: subscription buffer full, dropping messages");
    }
}
