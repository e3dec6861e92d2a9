//! One client connection: handshake, a reader that decodes and routes
//! frames, and a writer that drains the connection's [`Outbox`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use sockbus_protocol::flow::{effective_window, RecvWindow};
use sockbus_protocol::frame::{
    self, code, encode_err, encode_info, encode_msg, encode_pong, message_frame_len,
    CONNECT_NO_ECHO, CONNECT_NO_RESPONDERS, CONNECT_ROUTE, MAX_FRAME_OVERHEAD, MSG_NO_RESPONDERS,
};
use sockbus_protocol::subject::{subject_hash, validate_pattern, validate_subject};
use sockbus_protocol::{FrameRef, Kind, ProtocolError, HEADER_LEN, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::metrics::LocalCounts;
use crate::router::{MatchCache, Matches, QueueGroup, Subscription};
use crate::server::State;
use sockbus_protocol::outbox::{Direct, Outbox, Push};

const READ_CHUNK: usize = 64 * 1024;

/// Most bytes a producer writes to another connection's socket itself
/// (see [`ConnShared::kick`]); bigger batches go to the writer task so they
/// are written in parallel with the producer.
const DIRECT_MAX: usize = 32 * 1024;

/// The part of a connection other tasks touch: its outbox and its wake-ups.
pub struct ConnShared {
    pub id: u64,
    pub outbox: Outbox,
    /// Wakes the writer when the outbox goes from empty to non-empty or credit arrives.
    pub notify: Notify,
    /// Cancelled to abandon the connection at once (slow consumer, write error).
    pub abort: CancellationToken,
    /// The socket, for writes by whoever holds the outbox's writer role;
    /// None for feeds with no socket (HTTP event streams) and once the
    /// writer task has ended.
    sock: std::sync::Mutex<Option<Arc<OwnedWriteHalf>>>,
}

impl ConnShared {
    pub fn new(
        id: u64,
        outbox: Outbox,
        abort: CancellationToken,
        sock: Option<OwnedWriteHalf>,
    ) -> Self {
        ConnShared {
            id,
            outbox,
            notify: Notify::new(),
            abort,
            sock: std::sync::Mutex::new(sock.map(Arc::new)),
        }
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Gives a connection created before its socket was ready its socket.
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
        let mut t = match self.outbox.claim_direct(DIRECT_MAX) {
            Direct::Write(t) => t,
            Direct::Wake => return self.wake(),
            Direct::Busy => return,
        };
        let r = t.write_nonblocking(|b| s.try_write_vectored(b));
        drop(sock);
        let left = self.outbox.release(t);
        match r {
            Ok(_) => {
                if left {
                    self.wake();
                }
            }
            Err(e) => {
                debug!(conn = self.id, "write failed: {e}");
                self.outbox.close();
                self.abort.cancel();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] ProtocolError),
    #[error("{0}")]
    Refused(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes one frame straight to a socket that has no writer task yet.
async fn write_direct(wr: &mut OwnedWriteHalf, f: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    f(&mut b);
    let _ = wr.write_all(&b).await;
    let _ = wr.shutdown().await;
}

pub async fn run(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(30))
            .with_interval(std::time::Duration::from_secs(10)),
    );
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);

    // Handshake: the first frame must be CONNECT.
    let hs = tokio::time::timeout(
        state.config.handshake_timeout,
        read_connect(&mut rd, &mut buf),
    )
    .await;
    let (flags, recv_window, name) = match hs {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, "handshake failed: {e}");
            state
                .metrics
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            write_direct(&mut wr, |b| {
                encode_err(b, code::NOT_CONNECTED, &e.to_string())
            })
            .await;
            return;
        }
        Err(_) => {
            debug!(%peer, "handshake timed out");
            write_direct(&mut wr, |b| {
                encode_err(
                    b,
                    code::NOT_CONNECTED,
                    "no CONNECT frame within the handshake timeout",
                )
            })
            .await;
            return;
        }
    };
    if let Err(e) = flags {
        write_direct(&mut wr, |b| encode_err(b, code::UNSUPPORTED_VERSION, &e)).await;
        return;
    }
    let flags = flags.unwrap_or_default();
    if flags & CONNECT_ROUTE != 0 {
        write_direct(&mut wr, |b| {
            encode_err(
                b,
                code::BAD_REQUEST,
                "cluster routes connect to the cluster port, not the client port",
            )
        })
        .await;
        return;
    }

    let span = tracing::info_span!("conn", id, %peer, client = %name);
    serve(state, rd, wr, buf, id, flags, recv_window, shutdown)
        .instrument(span)
        .await
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: Arc<State>,
    mut rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    mut buf: BytesMut,
    id: u64,
    flags: u8,
    recv_window: u32,
    shutdown: CancellationToken,
) {
    debug!("connected");

    let send_window = effective_window(recv_window, state.config.max_payload);
    let shared = Arc::new(ConnShared::new(
        id,
        Outbox::new(state.config.max_pending, send_window),
        CancellationToken::new(),
        Some(wr),
    ));
    let our_window = effective_window(state.config.recv_window, state.config.max_payload);
    shared.outbox.push_control(|b| {
        let _ = encode_info(
            b,
            our_window,
            state.config.max_payload,
            &state.config.node_id,
        );
    });
    let writer = tokio::spawn(write_loop(shared.clone(), state.clone()));

    let mut reader = Reader {
        state: state.clone(),
        shared: shared.clone(),
        cache: MatchCache::new(4096),
        subs: HashMap::new(),
        wake: Vec::new(),
        counts: LocalCounts::default(),
        recv: RecvWindow::new(our_window),
        no_echo: flags & CONNECT_NO_ECHO != 0,
        no_responders: flags & CONNECT_NO_RESPONDERS != 0,
        skip: 0,
        captures: Default::default(),
        stored: Default::default(),
    };
    let res = reader.run(&mut rd, &mut buf, &shutdown).await;
    reader.flush();
    for (_, s) in reader.subs.drain() {
        state.router.remove(&s);
    }
    match &res {
        Ok(()) => debug!("closed by client"),
        Err(ConnError::Malformed(e)) => {
            warn!("closing connection: malformed frame: {e}");
            state
                .metrics
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            shared
                .outbox
                .push_control(|b| encode_err(b, code::MALFORMED, &format!("malformed frame: {e}")));
        }
        Err(ConnError::Refused(e)) => {
            warn!("closing connection: {e}");
            shared
                .outbox
                .push_control(|b| encode_err(b, code::MALFORMED, e));
        }
        Err(ConnError::Io(e)) => debug!("read error: {e}"),
    }
    if shutdown.is_cancelled() {
        shared
            .outbox
            .push_control(|b| encode_err(b, code::SHUTTING_DOWN, "broker is shutting down"));
    }
    shared.outbox.close();
    shared.wake();
    // Let the writer flush what is queued, but never longer than the drain timeout.
    let abort = shared.abort.clone();
    let mut writer = writer;
    if tokio::time::timeout(state.config.drain_timeout, &mut writer)
        .await
        .is_err()
    {
        abort.cancel();
        let _ = writer.await;
    }
    shared.outbox.clear();
}

type ConnectInfo = (Result<u8, String>, u32, String);

async fn read_connect(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> Result<ConnectInfo, ConnError> {
    loop {
        if let Some(h) = frame::parse_header(buf)? {
            if h.kind != Kind::Connect {
                return Err(ConnError::Refused(format!(
                    "expected CONNECT as the first frame, got {:?}",
                    h.kind
                )));
            }
            frame::check_len(&h, 64 * 1024)?;
            if buf.len() >= h.frame_len() {
                let f = frame::decode_body(&h, &buf[HEADER_LEN..h.frame_len()])?;
                let FrameRef::Connect {
                    version,
                    flags,
                    recv_window,
                    name,
                    ..
                } = f
                else {
                    unreachable!("kind checked above")
                };
                let flags = if version == PROTOCOL_VERSION {
                    Ok(flags)
                } else {
                    Err(format!("protocol version {version} is not supported (this broker speaks {PROTOCOL_VERSION})"))
                };
                let name = name.to_string();
                buf.advance(h.frame_len());
                return Ok((flags, recv_window, name));
            }
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ConnError::Refused(
                "connection closed before CONNECT".into(),
            ));
        }
    }
}

struct Reader {
    state: Arc<State>,
    shared: Arc<ConnShared>,
    cache: MatchCache,
    subs: HashMap<u32, Arc<Subscription>>,
    /// Connections whose outbox this batch made non-empty: woken once per batch.
    wake: Vec<Arc<ConnShared>>,
    counts: LocalCounts,
    recv: RecvWindow,
    no_echo: bool,
    no_responders: bool,
    /// Bytes still to discard of an oversized PUB.
    skip: usize,
    /// Which stream captures a subject (crate::streams), and what this batch stores.
    captures: crate::streams::CaptureCache,
    stored: crate::streams::Pending,
}

impl Reader {
    async fn run(
        &mut self,
        rd: &mut OwnedReadHalf,
        buf: &mut BytesMut,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let max_body = self.state.config.max_payload + MAX_FRAME_OVERHEAD;
        // Made once: registering with a token per read costs two locks each.
        let aborted = self.shared.abort.clone().cancelled_owned();
        let shut_down = shutdown.cancelled();
        tokio::pin!(aborted, shut_down);
        loop {
            let mut consumed = 0usize;
            loop {
                if self.skip > 0 {
                    let n = self.skip.min(buf.len());
                    buf.advance(n);
                    self.skip -= n;
                    consumed += n;
                    if self.skip > 0 {
                        break;
                    }
                    continue;
                }
                let Some(h) = frame::parse_header(buf)? else {
                    break;
                };
                if h.len > max_body {
                    if h.kind != Kind::Pub {
                        return Err(ProtocolError::FrameTooLarge {
                            len: h.len,
                            max: max_body,
                        }
                        .into());
                    }
                    self.payload_too_large(h.len as usize);
                    self.skip = h.frame_len();
                    continue;
                }
                let len = h.frame_len();
                if buf.len() < len {
                    buf.reserve(len - buf.len());
                    break;
                }
                let f = frame::decode_body(&h, &buf[HEADER_LEN..len])?;
                self.handle(f)?;
                if h.kind != Kind::Credit {
                    consumed += len;
                }
                buf.advance(len);
            }
            self.flush();
            // A stream writer that is behind slows this publisher down.
            self.stored.wait_space().await;
            if let Some(c) = self.recv.on_consumed(consumed) {
                if self.shared.outbox.grant(c) {
                    self.shared.kick();
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                r = rd.read_buf(buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    sockbus_protocol::busy_poll::touch();
                }
                _ = aborted.as_mut() => return Ok(()),
                _ = shut_down.as_mut() => return Ok(()),
            }
        }
    }

    /// End of a batch: wake writers and publish counters.
    fn flush(&mut self) {
        self.stored.flush();
        for c in self.wake.drain(..) {
            c.kick();
        }
        self.state.metrics.add(&mut self.counts);
    }

    fn error(&self, code: u16, text: &str) {
        if let Push::Queued { was_empty: true } = self
            .shared
            .outbox
            .push_control(|b| encode_err(b, code, text))
        {
            self.shared.wake();
        }
    }

    fn payload_too_large(&self, len: usize) {
        self.state
            .metrics
            .payload_too_large
            .fetch_add(1, Ordering::Relaxed);
        self.error(
            code::MAX_PAYLOAD,
            &format!(
                "message of {len} bytes exceeds the maximum payload of {} bytes",
                self.state.config.max_payload
            ),
        );
    }

    fn handle(&mut self, f: FrameRef<'_>) -> Result<(), ConnError> {
        match f {
            FrameRef::Pub {
                subject,
                reply,
                headers,
                payload,
            } => {
                if payload.len() > self.state.config.max_payload as usize {
                    self.payload_too_large(payload.len());
                    return Ok(());
                }
                if let Some(r) = reply {
                    if let Err(e) = validate_subject(r) {
                        self.state
                            .metrics
                            .invalid_subjects
                            .fetch_add(1, Ordering::Relaxed);
                        self.error(
                            code::INVALID_SUBJECT,
                            &format!("invalid reply subject: {e}"),
                        );
                        return Ok(());
                    }
                }
                let state = self.state.clone();
                if sockbus_protocol::api::subject::is_reserved(subject) {
                    // The stream API: answered by the broker, never routed.
                    crate::streams::api::handle(&state, subject, reply, payload);
                    return Ok(());
                }
                let m = match self.cache.get(&state.router, subject) {
                    Ok(m) => m,
                    Err(e) => {
                        self.state
                            .metrics
                            .invalid_subjects
                            .fetch_add(1, Ordering::Relaxed);
                        self.error(code::INVALID_SUBJECT, &format!("invalid subject: {e}"));
                        return Ok(());
                    }
                };
                self.counts.msgs_in += 1;
                self.counts.bytes_in += payload.len() as u64;
                let msg = Outgoing {
                    subject,
                    hash: subject_hash(subject.as_bytes()),
                    reply,
                    headers,
                    payload,
                    flags: 0,
                };
                self.counts.subject(subject, msg.hash, payload.len());
                let skip = self.no_echo.then_some(self.shared.id);
                let delivered = route(&state, m, &msg, skip, &mut self.wake, &mut self.counts);
                let stream = self.captures.get(&state.streams, subject);
                if let Some(s) = &stream {
                    self.stored.add_pub(s, subject, reply, headers, payload);
                }
                if delivered == 0 && self.no_responders && stream.is_none() {
                    if let Some(r) = reply {
                        self.send_no_responders(r);
                    }
                }
            }
            FrameRef::Sub {
                sid,
                subject,
                queue,
            } => {
                if let Err(e) = validate_pattern(subject) {
                    self.state
                        .metrics
                        .invalid_subjects
                        .fetch_add(1, Ordering::Relaxed);
                    self.error(
                        code::INVALID_SUBJECT,
                        &format!("invalid subscription subject: {e}"),
                    );
                    return Ok(());
                }
                if let Some(q) = queue {
                    if q.len() > 255 || q.bytes().any(|b| b <= b' ' || b == 0x7f) {
                        self.error(
                            code::BAD_REQUEST,
                            &format!("invalid queue group name {q:?}"),
                        );
                        return Ok(());
                    }
                }
                if self.subs.get(&sid).is_some_and(|s| !s.is_removed()) {
                    self.error(
                        code::BAD_REQUEST,
                        &format!("subscription id {sid} is already in use"),
                    );
                    return Ok(());
                }
                let sub = Arc::new(Subscription::new(sid, subject, queue, self.shared.clone()));
                self.state.router.insert(sub.clone());
                self.subs.insert(sid, sub);
            }
            FrameRef::Unsub { sid, max } => {
                if let Some(s) = self.subs.get(&sid) {
                    if max == 0 || s.set_max(max as u64) {
                        let s = self.subs.remove(&sid).expect("present");
                        self.state.router.remove(&s);
                    }
                }
            }
            FrameRef::Ping(id) => {
                if let Push::Queued { was_empty: true } =
                    self.shared.outbox.push_control(|b| encode_pong(b, id))
                {
                    self.wake.push(self.shared.clone());
                }
            }
            FrameRef::Pong(_) => {}
            FrameRef::Credit(n) => {
                self.shared.outbox.on_credit(n);
                self.wake.push(self.shared.clone());
            }
            FrameRef::Err { code, text } => debug!(code, "client reported an error: {text}"),
            FrameRef::Connect { .. } => {
                self.error(
                    code::BAD_REQUEST,
                    "CONNECT was already received on this connection",
                );
            }
            FrameRef::Info { .. } | FrameRef::Msg { .. } | FrameRef::RMsg { .. } => {
                return Err(ConnError::Refused(
                    "clients may not send INFO or MSG frames".into(),
                ));
            }
        }
        Ok(())
    }

    /// Tells a requester nobody listens: a status MSG to its own reply subscriptions.
    fn send_no_responders(&mut self, reply: &str) {
        self.state
            .metrics
            .no_responders
            .fetch_add(1, Ordering::Relaxed);
        let (m, _) = self.state.router.compute(reply);
        let msg = Outgoing {
            subject: reply,
            hash: subject_hash(reply.as_bytes()),
            reply: None,
            headers: &[],
            payload: &[],
            flags: MSG_NO_RESPONDERS,
        };
        for s in m
            .plain
            .iter()
            .chain(m.groups.iter().flat_map(|g| g.members.iter()))
        {
            if s.conn.id == self.shared.id {
                deliver(&self.state, s, &msg, &mut self.wake, &mut self.counts);
            }
        }
    }
}

/// A message on its way to subscribers, borrowed from the publisher's read buffer.
pub struct Outgoing<'a> {
    pub subject: &'a str,
    pub hash: u32,
    pub reply: Option<&'a str>,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    pub flags: u8,
}

/// Delivers a message published on this broker: to every plain local
/// subscription, to one member of each queue group (a local one when any can
/// take it), and at most once over each cluster route, carrying the plain
/// flag and the queue groups that peer should serve.
/// Returns how many subscriptions (or routes) took the message.
pub fn route(
    state: &State,
    m: &Matches,
    msg: &Outgoing<'_>,
    skip_conn: Option<u64>,
    wake: &mut Vec<Arc<ConnShared>>,
    counts: &mut LocalCounts,
) -> usize {
    let mut n = 0;
    let mut remote: Vec<Remote<'_>> = Vec::new();
    for s in &m.plain {
        if s.route {
            note_remote(&mut remote, s, None);
            continue;
        }
        if skip_conn == Some(s.conn.id) {
            continue;
        }
        n += deliver(state, s, msg, wake, counts) as usize;
    }
    for g in &m.groups {
        let start = g.start();
        if pick_local(state, g, start, msg, skip_conn, wake, counts) {
            n += 1;
            continue;
        }
        // No local member could take it: one peer with members gets it.
        let len = g.members.len();
        if let Some(s) = (0..len)
            .map(|i| &g.members[(start + i) % len])
            .find(|s| s.route && !s.is_removed())
        {
            note_remote(&mut remote, s, Some(&g.name));
        }
    }
    for r in &remote {
        n += forward(state, r, msg, wake, counts) as usize;
    }
    n
}

/// Delivers a message that arrived over a cluster route: only to local
/// subscriptions (never onward to other peers, so a full mesh cannot loop),
/// to plain ones when the sender said so, and to one local member of each
/// queue group it named.
pub fn route_from_peer(
    state: &State,
    m: &Matches,
    msg: &Outgoing<'_>,
    plain: bool,
    queues: &[u8],
    wake: &mut Vec<Arc<ConnShared>>,
    counts: &mut LocalCounts,
) -> usize {
    let mut n = 0;
    if plain {
        for s in m.plain.iter().filter(|s| !s.route) {
            n += deliver(state, s, msg, wake, counts) as usize;
        }
    }
    for q in frame::iter_queues(queues) {
        if let Some(g) = m.groups.iter().find(|g| &*g.name == q) {
            n += pick_local(state, g, g.start(), msg, None, wake, counts) as usize;
        }
    }
    n
}

/// One member of a queue group on this broker, round-robin; false when no
/// local member could take the message.
fn pick_local(
    state: &State,
    g: &QueueGroup,
    start: usize,
    msg: &Outgoing<'_>,
    skip_conn: Option<u64>,
    wake: &mut Vec<Arc<ConnShared>>,
    counts: &mut LocalCounts,
) -> bool {
    let len = g.members.len();
    for i in 0..len {
        let s = &g.members[(start + i) % len];
        if s.route || skip_conn == Some(s.conn.id) {
            continue;
        }
        if deliver(state, s, msg, wake, counts) {
            return true;
        }
    }
    false
}

/// What one message owes one cluster route.
struct Remote<'a> {
    sub: &'a Arc<Subscription>,
    plain: bool,
    queues: Vec<&'a str>,
}

fn note_remote<'a>(remote: &mut Vec<Remote<'a>>, s: &'a Arc<Subscription>, queue: Option<&'a str>) {
    let i = match remote.iter().position(|r| r.sub.conn.id == s.conn.id) {
        Some(i) => i,
        None => {
            remote.push(Remote {
                sub: s,
                plain: false,
                queues: Vec::new(),
            });
            remote.len() - 1
        }
    };
    match queue {
        None => remote[i].plain = true,
        Some(q) => remote[i].queues.push(q),
    }
}

fn forward(
    state: &State,
    r: &Remote<'_>,
    msg: &Outgoing<'_>,
    wake: &mut Vec<Arc<ConnShared>>,
    counts: &mut LocalCounts,
) -> bool {
    if r.sub.is_removed() {
        return false;
    }
    let flags = if r.plain { frame::RMSG_PLAIN } else { 0 };
    let len = frame::rmsg_frame_len(msg.subject, msg.reply, &r.queues, msg.headers, msg.payload);
    let push = r.sub.conn.outbox.push(len, |b| {
        frame::encode_rmsg(
            b,
            flags,
            msg.subject,
            msg.hash,
            msg.reply,
            &r.queues,
            msg.headers,
            msg.payload,
        )
    });
    if accepted(state, &r.sub.conn, push, wake) {
        counts.msgs_out += 1;
        counts.bytes_out += msg.payload.len() as u64;
        true
    } else {
        false
    }
}

/// Common handling of a push into a connection's outbox: wake its writer,
/// or treat it as a slow consumer when it is over budget.
fn accepted(
    state: &State,
    conn: &Arc<ConnShared>,
    push: Push,
    wake: &mut Vec<Arc<ConnShared>>,
) -> bool {
    match push {
        Push::Queued { was_empty } => {
            if was_empty {
                wake.push(conn.clone());
            }
            true
        }
        Push::OverBudget => {
            state
                .metrics
                .dropped_messages
                .fetch_add(1, Ordering::Relaxed);
            if conn.outbox.close() {
                state.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                warn!(
                    conn = conn.id,
                    budget = state.config.max_pending,
                    "slow consumer: outbound budget exceeded, closing the connection"
                );
                conn.abort.cancel();
            }
            false
        }
        Push::Closed => {
            state
                .metrics
                .dropped_messages
                .fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Why a message from outside the native protocol was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] sockbus_protocol::SubjectError),
    #[error("message of {size} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge { size: usize, max: u32 },
    #[error("invalid headers: {0}")]
    BadHeaders(#[from] ProtocolError),
}

/// Routes a message that did not arrive on a client connection (the HTTP
/// gateway, streams, cluster routes) exactly as a PUB would be routed.
/// `headers` is an encoded header block (see `protocol::frame::push_header`).
/// Returns how many subscriptions took it.
pub fn publish(
    state: &State,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) -> Result<usize, PublishError> {
    let mut wake = Vec::new();
    let n = publish_deferred(state, subject, reply, headers, payload, &mut wake);
    for c in wake {
        c.kick();
    }
    n
}

/// [`publish`], leaving the connections it queued to in `wake`: a caller
/// that publishes many messages at once (the acks of one stream commit)
/// kicks each connection once at the end, so they go out in one write.
pub fn publish_deferred(
    state: &State,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
    wake: &mut Vec<Arc<ConnShared>>,
) -> Result<usize, PublishError> {
    validate_subject(subject)?;
    if let Some(r) = reply {
        validate_subject(r)?;
    }
    if payload.len() > state.config.max_payload as usize {
        return Err(PublishError::PayloadTooLarge {
            size: payload.len(),
            max: state.config.max_payload,
        });
    }
    frame::validate_headers(headers)?;
    let (m, _) = state.router.compute(subject);
    let msg = Outgoing {
        subject,
        hash: subject_hash(subject.as_bytes()),
        reply,
        headers,
        payload,
        flags: 0,
    };
    let mut counts = LocalCounts {
        msgs_in: 1,
        bytes_in: payload.len() as u64,
        ..Default::default()
    };
    let n = route(state, &m, &msg, None, wake, &mut counts);
    state.metrics.add(&mut counts);
    Ok(n)
}

/// Queues one MSG frame for one subscription. False when it could not take it.
#[inline]
pub fn deliver(
    state: &State,
    s: &Arc<Subscription>,
    msg: &Outgoing<'_>,
    wake: &mut Vec<Arc<ConnShared>>,
    counts: &mut LocalCounts,
) -> bool {
    if s.is_removed() {
        return false;
    }
    let Some(last) = s.claim() else { return false };
    let len = message_frame_len(true, msg.subject, msg.reply, msg.headers, msg.payload);
    let push = s.conn.outbox.push(len, |b| {
        encode_msg(
            b,
            s.sid,
            msg.flags,
            msg.subject,
            msg.hash,
            msg.reply,
            msg.headers,
            msg.payload,
        )
    });
    if !accepted(state, &s.conn, push, wake) {
        return false;
    }
    counts.msgs_out += 1;
    counts.bytes_out += msg.payload.len() as u64;
    if last {
        state.router.remove(s);
    }
    true
}

pub(crate) async fn write_loop(shared: Arc<ConnShared>, state: Arc<State>) {
    let Some(sock) = shared.socket() else {
        return;
    };
    loop {
        let Some(mut t) = shared.outbox.claim() else {
            // Nothing to write, or a producer is writing directly (its
            // release wakes us if it leaves anything, or on close).
            if shared.abort.is_cancelled()
                || (shared.outbox.is_closed() && !shared.outbox.is_writing())
            {
                break;
            }
            tokio::select! {
                _ = shared.notify.notified() => {}
                _ = shared.abort.cancelled() => break,
            }
            continue;
        };
        let write = async {
            while !t.write_nonblocking(|b| sock.try_write_vectored(b))? {
                sock.writable().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let r = tokio::select! {
            r = tokio::time::timeout(state.config.write_timeout, write) => Some(r),
            _ = shared.abort.cancelled() => None,
        };
        shared.outbox.release(t);
        let Some(r) = r else { break };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(conn = shared.id, "write failed: {e}");
                break;
            }
            Err(_) => {
                info!(
                    conn = shared.id,
                    "write timed out after {:?}; closing", state.config.write_timeout
                );
                break;
            }
        }
    }
    shared.outbox.close();
    shared.abort.cancel();
    let _ = socket2::SockRef::from(sock.as_ref().as_ref()).shutdown(std::net::Shutdown::Write);
    // The socket closes once the read half is gone too, however long other
    // tasks keep this connection's shared state.
    shared.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
}
