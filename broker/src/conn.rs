//! One client connection: the handshake, a reader that hands every frame to
//! the delivery engine ([`crate::deliver`]) and a writer that drains the
//! connection's [`Outlet`]. Nothing here routes a message.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use hashbrown::hash_table::{Entry, HashTable};
use sockbus_protocol::flow::effective_window;
use sockbus_protocol::frame::{
    self, code, encode_err, encode_err_reply, encode_err_sid, encode_info_flags, encode_pong,
    Header, CONNECT_EXPLICIT_ACKS, CONNECT_NO_ECHO, CONNECT_NO_RESPONDERS, CONNECT_ROUTE,
    INFO_PUB_ROOM, MAX_FRAME_OVERHEAD,
};
use sockbus_protocol::{Credentials, FrameRef, Kind, ProtocolError, HEADER_LEN, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::account::Account;
use crate::auth::check::{PublishCheck, Responses};
use crate::auth::{AuthError, Permissions, User};
use crate::deliver::{Ack, Batch, PublishError, Publisher, SubscribeError, Subscriber};
use crate::outlet::{write_loop, Outlet};
use crate::read::{Ended, FrameReader, Frames, Keepalive};
use crate::router::Subscription;
use crate::server::State;
use crate::streams::Stream;
use crate::transport::{ReadSock, Transport, WriteSock};

/// Subjects each client connection remembers the matches of.
const MATCH_CACHE: usize = 4096;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] ProtocolError),
    #[error("{0}")]
    Refused(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Refuses a connection that has no writer task yet: writes one frame
/// straight to its socket and closes it so the client can read it.
async fn write_direct(
    wr: &mut (impl AsyncRead + AsyncWrite + Unpin),
    f: impl FnOnce(&mut BytesMut),
) {
    let mut b = BytesMut::new();
    f(&mut b);
    crate::transport::refuse(wr, &b).await;
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
    // The TLS handshake and CONNECT share one deadline: a peer that sends
    // nothing, garbage or a trickle is closed when it passes.
    let deadline = tokio::time::Instant::now() + state.config.handshake_timeout;
    // Direct delivery reads and writes plain frames in the kernel: never TLS.
    let direct_key = state
        .tls
        .is_none()
        .then(|| crate::accel::routes::client_key(&stream))
        .flatten();
    let mut cert = None;
    let mut stream = match &state.tls {
        None => Transport::Plain(stream),
        Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => {
                cert = client_cert_names(&state, s.get_ref().1);
                Transport::Tls(Box::new(s.into()))
            }
            Ok(Err(e)) => {
                debug!(%peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);

    // Handshake: the first frame must be CONNECT.
    let hs = tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut buf)).await;
    let wr = &mut stream;
    let (flags, recv_window, name, token, connect_len) = match hs {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, "handshake failed: {e}");
            state
                .metrics()
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            write_direct(wr, |b| encode_err(b, code::NOT_CONNECTED, &e.to_string())).await;
            return;
        }
        Err(_) => {
            debug!(%peer, "handshake timed out");
            write_direct(wr, |b| {
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
        write_direct(wr, |b| encode_err(b, code::UNSUPPORTED_VERSION, &e)).await;
        return;
    }
    let flags = flags.unwrap_or_default();
    // On the eBPF fast path the kernel holds whatever the client's declared
    // window lets the broker send, not the socket buffer: refuse a window
    // larger than the budget the broker would hold for it anyway (a silent
    // cap would stall a client that grants credit by its own window).
    let max_window = state.config.max_client_window();
    if effective_window(recv_window, state.config.max_payload) > max_window {
        tracing::info!(%peer, client = %name, recv_window, max_window, "refused a client: receive window too large");
        write_direct(wr, |b| {
            encode_err(
                b,
                code::FLOW_CONTROL,
                &format!(
                    "receive window of {recv_window} bytes is larger than this broker's \
                     maximum of {max_window} bytes (the larger of --max-pending and the \
                     default window); declare at most that"
                ),
            )
        })
        .await;
        return;
    }
    if flags & CONNECT_ROUTE != 0 {
        write_direct(wr, |b| {
            encode_err(
                b,
                code::BAD_REQUEST,
                "cluster routes connect to the cluster port, not the client port",
            )
        })
        .await;
        return;
    }

    let user = match state.users() {
        None => None,
        Some(users) => {
            let creds = Credentials::decode(&token);
            let user_name = match &creds {
                Ok(Credentials::UserPassword { user, .. }) => Some(user.to_string()),
                _ => None,
            };
            let checked = match creds {
                // No credentials over mTLS: the certificate names the user.
                Ok(Credentials::None) if cert.is_some() => {
                    users.authenticate_cert(cert.as_ref().expect("checked"))
                }
                Ok(c) => tokio::time::timeout_at(deadline, users.authenticate(c))
                    .await
                    .unwrap_or(Err(AuthError::TimedOut)),
                Err(_) => {
                    users.failures.fetch_add(1, Ordering::Relaxed);
                    Err(AuthError::Malformed)
                }
            };
            match checked {
                Ok(u) => Some(u),
                Err(e) => {
                    warn!(%peer, client = %name, user = user_name.as_deref().unwrap_or(""), "refused: {e}");
                    write_direct(wr, |b| {
                        encode_err(b, code::AUTHORIZATION_VIOLATION, &e.to_string())
                    })
                    .await;
                    return;
                }
            }
        }
    };
    // The account's limit is checked before the connection costs anything more.
    let account = state.accounts.of(user.as_deref()).clone();
    let slot = match account.connect() {
        Ok(slot) => slot,
        Err(e) => {
            state
                .metrics()
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%peer, client = %name, account = account.name(), "refused: {e}");
            write_direct(wr, |b| encode_err(b, code::MAX_CONNECTIONS, &e)).await;
            return;
        }
    };
    let tls = stream.is_tls();
    let span = match &user {
        Some(u) => {
            tracing::info_span!("conn", id, %peer, client = %name, user = %u.name, account = %u.account, tls)
        }
        None => tracing::info_span!("conn", id, %peer, client = %name, tls),
    };
    let (rd, wr) = stream.split();
    serve(
        state,
        &account,
        rd,
        wr,
        buf,
        id,
        &name,
        user,
        flags,
        recv_window,
        direct_key.map(|k| (k, connect_len)),
        shutdown,
    )
    .instrument(span)
    .await;
    drop(slot);
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: Arc<State>,
    account: &Account,
    mut rd: ReadSock,
    wr: WriteSock,
    mut buf: BytesMut,
    id: u64,
    name: &str,
    user: Option<Arc<User>>,
    flags: u8,
    recv_window: u32,
    direct: Option<(crate::accel::abi::SockKey, u64)>,
    shutdown: CancellationToken,
) {
    debug!("connected");
    let cfg = &state.config;
    let send_window = effective_window(recv_window, cfg.max_payload);
    let perms = user.as_ref().and_then(|u| u.perms.clone());
    // Requests this connection receives may be answered whatever its
    // publish permissions say (allow_responses).
    let responses = perms
        .as_ref()
        .filter(|p| !p.publish.is_open())
        .map(|_| Arc::new(Responses::default()));
    let mut outlet = account
        .delivery
        .outlet(id, send_window, CancellationToken::new(), Some(wr));
    if let Some(r) = &responses {
        outlet = outlet.with_responses(r.clone());
    }
    let out = Arc::new(outlet);
    let our_window = effective_window(cfg.recv_window, cfg.max_payload);
    // A connection that may publish direct is asked for PUBs with room for
    // the sid, which the kernel turns into MSGs in place.
    let info_flags = if direct.is_some() { INFO_PUB_ROOM } else { 0 };
    out.push_control(|b| {
        let _ = encode_info_flags(b, info_flags, our_window, cfg.max_payload, &cfg.node_id);
    });
    let writer = tokio::spawn(write_loop(out.clone(), cfg.write_timeout));
    crate::accel::guard::watch(id, name, &out);

    let max_body = cfg.max_payload + MAX_FRAME_OVERHEAD;
    let mut batch = account.delivery.ingress(&account.streams, MATCH_CACHE);
    if let Some(u) = &user {
        batch.restrict(PublishCheck::new(u, responses));
    }
    // Direct delivery: only the default account's subjects have routes, and
    // the kernel's allow map is per publisher, so only a publisher that may
    // publish anywhere is allowed (docs/fast-path.md, "Direct delivery").
    let default_account = account.name() == crate::auth::DEFAULT_ACCOUNT;
    let handshake = direct.map_or(0, |(_, n)| n);
    let direct = direct.and_then(|(key, _)| {
        let open = perms.as_ref().is_none_or(|p| p.publish.is_open());
        crate::accel::routes::register(id, key, &out, default_account && open, default_account)
    });
    if direct.is_some() && default_account {
        // A subscriber routes may name: publishers' frames may land in its receive queue between the
        // broker's sends: those end on frame boundaries.
        out.one_send_per_frame();
    }
    if direct.as_ref().is_some_and(|d| d.publisher) {
        batch.track_flushes();
    }
    let mut client = Client {
        user,
        perms,
        batch,
        direct,
        max_body,
        out: out.clone(),
        subs: Sids::default(),
        me: Publisher {
            id,
            echo: flags & CONNECT_NO_ECHO == 0,
            no_responders: flags & CONNECT_NO_RESPONDERS != 0,
            api: true,
            explicit_acks: flags & CONNECT_EXPLICIT_ACKS != 0,
        },
    };
    let keepalive = Keepalive {
        interval: cfg.ping_interval,
        max_out: cfg.max_pings_out,
    };
    let res = FrameReader::new(max_body, our_window, 0, keepalive)
        .handled_before(handshake)
        .run(&mut client, &mut rd, &mut buf, &out, &shutdown)
        .await;
    client.batch.finish();
    // Off the route manager first: no route may outlive the connection.
    drop(client.direct.take());
    // The table goes with them: its memory is part of what gets given back.
    // In the order they were allocated, not the table's (hash) order: each
    // subscription is then next to the last one in memory, and a million
    // go in a fraction of the time.
    let mut subs: Vec<Arc<Subscription>> =
        std::mem::take(&mut client.subs).table.into_iter().collect();
    subs.sort_unstable_by_key(|s| Arc::as_ptr(s) as usize);
    for s in subs {
        account.delivery.unsubscribe(&s);
    }
    match &res {
        Ok(Ended::Closed) => debug!("closed by client"),
        Ok(Ended::Stale { unanswered }) => {
            let why = format!(
                "stale connection: {unanswered} PINGs unanswered (--ping-interval {:?}, --max-pings-out {})",
                cfg.ping_interval, cfg.max_pings_out
            );
            warn!("closing connection: {why}");
            state
                .metrics()
                .stale_connections
                .fetch_add(1, Ordering::Relaxed);
            out.push_control(|b| encode_err(b, code::STALE_CONNECTION, &why));
        }
        Err(ConnError::Malformed(e)) => {
            warn!("closing connection: malformed frame: {e}");
            state
                .metrics()
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            out.push_control(|b| encode_err(b, code::MALFORMED, &format!("malformed frame: {e}")));
        }
        Err(ConnError::Refused(e)) => {
            warn!("closing connection: {e}");
            out.push_control(|b| encode_err(b, code::MALFORMED, e));
        }
        Err(ConnError::Io(e)) => debug!("read error: {e}"),
    }
    if shutdown.is_cancelled() {
        out.push_control(|b| encode_err(b, code::SHUTTING_DOWN, "broker is shutting down"));
    }
    crate::outlet::close_and_drain(&out, writer, cfg.drain_timeout).await;
}

/// The names of the client certificate a TLS handshake verified
/// (`--tls-client-ca`), when some user is named by a certificate.
pub(crate) fn client_cert_names(
    state: &State,
    conn: &rustls::ServerConnection,
) -> Option<crate::auth::cert::CertNames> {
    let users = state.users()?;
    if !users.has_certificate_users() {
        return None;
    }
    let leaf = conn.peer_certificates()?.first()?;
    Some(crate::auth::cert::CertNames::from_der(leaf))
}

/// Flags (or why the version is refused), receive window, client name,
/// credentials field, length of the CONNECT frame.
type ConnectInfo = (Result<u8, String>, u32, String, Vec<u8>, u64);

async fn read_connect(
    rd: &mut (impl AsyncRead + Unpin),
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
                    token,
                } = f
                else {
                    unreachable!("kind checked above")
                };
                let flags = if version == PROTOCOL_VERSION {
                    Ok(flags)
                } else {
                    Err(format!("protocol version {version} is not supported (this broker speaks {PROTOCOL_VERSION})"))
                };
                let (name, token) = (name.to_string(), token.to_vec());
                buf.advance(h.frame_len());
                return Ok((flags, recv_window, name, token, h.frame_len() as u64));
            }
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ConnError::Refused(
                "connection closed before CONNECT".into(),
            ));
        }
    }
}

/// A client connection's side of the protocol: what its frames mean.
struct Client {
    /// Who authenticated; None when the broker has no users.
    user: Option<Arc<User>>,
    /// The user's permissions; None: everything.
    perms: Option<Arc<Permissions>>,
    batch: Batch,
    /// Known to direct delivery's route manager (fast path, plain TCP).
    direct: Option<crate::accel::routes::Registered>,
    /// Longest frame body read into memory.
    max_body: u32,
    out: Arc<Outlet>,
    subs: Sids,
    me: Publisher,
}

/// A connection's subscriptions by sid, read from the subscription itself:
/// 8 bytes a slot, where a `HashMap<u32, Arc<_>>` takes 16.
#[derive(Default)]
struct Sids {
    table: HashTable<Arc<Subscription>>,
    /// Seeded: sids are the client's to choose.
    hasher: RandomState,
}

impl Sids {
    fn get(&self, sid: u32) -> Option<&Arc<Subscription>> {
        self.table.find(self.hasher.hash_one(sid), |s| s.sid == sid)
    }

    /// Adds `sub`, in place of an ended subscription with its sid.
    fn insert(&mut self, sub: Arc<Subscription>) {
        let h = &self.hasher;
        let (hash, sid) = (h.hash_one(sub.sid), sub.sid);
        match self
            .table
            .entry(hash, |s| s.sid == sid, |s| h.hash_one(s.sid))
        {
            Entry::Occupied(mut e) => *e.get_mut() = sub,
            Entry::Vacant(e) => {
                e.insert(sub);
            }
        }
    }

    fn remove(&mut self, sid: u32) -> Option<Arc<Subscription>> {
        let hash = self.hasher.hash_one(sid);
        let (sub, _) = self.table.find_entry(hash, |s| s.sid == sid).ok()?.remove();
        let t = &mut self.table;
        if t.capacity() > 64 && t.len() < t.capacity() / 4 {
            let h = &self.hasher;
            t.shrink_to(t.len() * 2, |s| h.hash_one(s.sid));
        }
        Some(sub)
    }

    /// Forgets the subscriptions that ended by themselves (UNSUB with a
    /// count) once they outnumber the `live` ones, so they cannot pile up.
    fn prune(&mut self, live: usize) {
        if self.table.len() >= 2 * live + 64 {
            self.table.retain(|s| !s.is_removed());
        }
    }
}

impl Client {
    fn error(&self, code: u16, text: &str) {
        self.out.control(|b| encode_err(b, code, text));
    }

    /// Refuses the SUB with this sid (`ERR_SID`): the client ends that
    /// subscription.
    fn sub_error(&self, code: u16, sid: u32, text: &str) {
        self.out.control(|b| encode_err_sid(b, code, sid, text));
    }

    /// Refuses a PUB; one with a reply subject is named by it
    /// (`ERR_REPLY`), so the request waiting on it fails at once.
    fn refused(&self, e: &PublishError, reply: Option<&str>) {
        let code = match e {
            PublishError::Denied(_) => code::PERMISSION_DENIED,
            PublishError::PayloadTooLarge { .. } => code::MAX_PAYLOAD,
            PublishError::InvalidSubject(_) | PublishError::InvalidReply(_) => {
                code::INVALID_SUBJECT
            }
            PublishError::Reserved(_) => code::BAD_REQUEST,
        };
        match reply {
            Some(r) => self
                .out
                .control(|b| encode_err_reply(b, code, r, &e.to_string())),
            None => self.error(code, &e.to_string()),
        }
    }
}

impl Frames for Client {
    type Error = ConnError;

    fn oversized(&mut self, h: &Header) -> Result<(), ConnError> {
        if h.kind != Kind::Pub {
            return Err(ProtocolError::FrameTooLarge {
                len: h.len,
                max: self.max_body,
            }
            .into());
        }
        // Refused without reading it into memory; the connection stays usable.
        let e = self.batch.delivery().too_large(h.len as usize);
        self.refused(&e, None);
        Ok(())
    }

    fn frame(&mut self, f: FrameRef<'_>) -> Result<(), ConnError> {
        match f {
            FrameRef::Pub {
                flags,
                subject,
                reply,
                headers,
                payload,
            } => {
                if let Err(e) = self.batch.publish(
                    &self.me,
                    subject,
                    reply,
                    headers,
                    payload,
                    Ack::Flags(flags),
                ) {
                    self.refused(&e, reply);
                }
            }
            FrameRef::Sub {
                sid,
                subject,
                queue,
            } => {
                if self.subs.get(sid).is_some_and(|s| !s.is_removed()) {
                    self.error(
                        code::BAD_REQUEST,
                        &format!("subscription id {sid} is already in use"),
                    );
                    return Ok(());
                }
                match self.batch.delivery().subscribe(
                    &Subscriber {
                        api: self.me.api,
                        perms: self.perms.as_deref(),
                    },
                    &self.out,
                    sid,
                    subject,
                    queue,
                ) {
                    Ok(sub) => {
                        self.subs
                            .prune(self.out.subscriptions.load(Ordering::Acquire));
                        self.subs.insert(sub);
                    }
                    Err(e @ SubscribeError::InvalidSubject(_)) => {
                        self.sub_error(code::INVALID_SUBJECT, sid, &e.to_string())
                    }
                    Err(
                        e
                        @ (SubscribeError::TooMany { .. } | SubscribeError::AccountTooMany { .. }),
                    ) => self.sub_error(code::MAX_SUBSCRIPTIONS, sid, &e.to_string()),
                    Err(e @ SubscribeError::Denied(_)) => {
                        if let Some(u) = &self.user {
                            u.denied_subscribe.fetch_add(1, Ordering::Relaxed);
                            warn!(user = %u.name, pattern = subject, "subscription denied by permissions");
                        }
                        self.sub_error(code::PERMISSION_DENIED, sid, &e.to_string())
                    }
                    Err(e @ (SubscribeError::InvalidQueue(_) | SubscribeError::Reserved(_))) => {
                        self.sub_error(code::BAD_REQUEST, sid, &e.to_string())
                    }
                }
            }
            FrameRef::Unsub { sid, max } => {
                if let Some(s) = self.subs.get(sid) {
                    if max == 0 || s.set_max(max as u64) {
                        let s = self.subs.remove(sid).expect("present");
                        self.batch.delivery().unsubscribe(&s);
                    } else {
                        // Only the broker counts to the limit: no route.
                        let router = self.batch.delivery().router();
                        crate::accel::routes::changed(router, s.pattern(), None);
                    }
                }
            }
            FrameRef::Ping(id) => {
                // Within the connection's budget: a peer that PINGs and
                // never reads the PONGs is a slow consumer like any other.
                if let Some(true) = self.out.push_control(|b| encode_pong(b, id)) {
                    self.batch.wake(&self.out);
                }
            }
            FrameRef::Pong(_) => {}
            FrameRef::Credit(n) => {
                self.out.outbox.on_credit(n);
                self.batch.wake(&self.out);
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

    fn end_batch(&mut self) -> Option<Arc<Stream>> {
        self.batch.finish();
        self.batch.backlogged()
    }

    fn handled(&mut self, total: u64) {
        // The barrier opens only once this publisher's messages are all in
        // the kernel: a direct frame then lands behind them.
        if let Some(d) = self.direct.as_mut().filter(|d| d.publisher) {
            if self.batch.flushed() {
                d.set_done(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::Delivery;
    use crate::router::Router;
    use crate::streams::Streams;
    use sockbus_protocol::frame::encode_pub;
    use sockbus_protocol::outbox::Outbox;

    const MAX_PAYLOAD: u32 = 1024;

    /// A client connection's frame handler with no socket, over a fresh engine.
    fn client(dir: &std::path::Path) -> (Client, Delivery) {
        let d = Delivery::new(
            Router::default(),
            Default::default(),
            MAX_PAYLOAD,
            1 << 20,
            0,
        );
        let streams = Arc::new(Streams::open(dir, d.clone(), None).unwrap());
        let out = Arc::new(Outlet::new(
            d.next_id(),
            Outbox::new(1 << 20, 1 << 20),
            CancellationToken::new(),
            None,
        ));
        let c = Client {
            user: None,
            perms: None,
            batch: d.ingress(&streams, 16),
            direct: None,
            max_body: MAX_PAYLOAD + MAX_FRAME_OVERHEAD,
            out: out.clone(),
            subs: Sids::default(),
            me: Publisher {
                id: out.id,
                echo: true,
                no_responders: true,
                api: true,
                explicit_acks: true,
            },
        };
        (c, d)
    }

    /// Every frame queued for the client, owned.
    fn sent(c: &Client) -> Vec<sockbus_protocol::Frame> {
        let t = c.out.outbox.take();
        let mut data = &t.data[..];
        let mut v = Vec::new();
        while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
            data = &data[len..];
            v.push(sockbus_protocol::Frame::from(f));
        }
        v
    }

    fn err_codes(frames: &[sockbus_protocol::Frame]) -> Vec<u16> {
        frames
            .iter()
            .filter_map(|f| match f {
                sockbus_protocol::Frame::Err { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }

    fn sub(c: &mut Client, sid: u32, subject: &str) {
        c.frame(FrameRef::Sub {
            sid,
            subject,
            queue: None,
        })
        .unwrap();
    }

    fn publish(c: &mut Client, subject: &str, reply: Option<&str>, payload: &[u8]) {
        c.frame(FrameRef::Pub {
            flags: 0,
            subject,
            reply,
            headers: &[],
            payload,
        })
        .unwrap();
        c.end_batch();
    }

    #[tokio::test]
    async fn a_subscription_id_in_use_is_refused_and_the_first_keeps_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, d) = client(dir.path());
        sub(&mut c, 1, "a");
        sub(&mut c, 1, "b");
        assert_eq!(err_codes(&sent(&c)), [code::BAD_REQUEST]);
        assert_eq!(d.router().len(), 1);
        publish(&mut c, "a", None, b"x");
        assert!(matches!(
            &sent(&c)[..],
            [sockbus_protocol::Frame::Msg { sid: 1, .. }]
        ));
    }

    #[tokio::test]
    async fn unsub_with_a_count_ends_the_subscription_after_that_many_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, d) = client(dir.path());
        sub(&mut c, 7, "a");
        c.frame(FrameRef::Unsub { sid: 7, max: 2 }).unwrap();
        for _ in 0..4 {
            publish(&mut c, "a", None, b"x");
        }
        assert_eq!(sent(&c).len(), 2);
        assert_eq!(d.router().len(), 0);
    }

    #[tokio::test]
    async fn ping_is_answered_with_pong_and_bad_input_gets_an_error_the_connection_survives() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _d) = client(dir.path());
        c.frame(FrameRef::Ping(42)).unwrap();
        c.end_batch();
        assert!(matches!(&sent(&c)[..], [sockbus_protocol::Frame::Pong(42)]));

        publish(&mut c, "a.*", None, b"");
        publish(&mut c, "a", Some("bad reply"), b"");
        sub(&mut c, 2, "a..b");
        c.frame(FrameRef::Sub {
            sid: 3,
            subject: "a",
            queue: Some("bad queue"),
        })
        .unwrap();
        // An oversized PUB is skipped unread; anything else that big ends the connection.
        let mut big = BytesMut::new();
        encode_pub(&mut big, "a", None, &[], &[0u8; 2000]).unwrap();
        let h = frame::parse_header(&big).unwrap().unwrap();
        assert!(c.oversized(&h).is_ok());
        assert_eq!(
            err_codes(&sent(&c)),
            [
                code::INVALID_SUBJECT,
                code::INVALID_SUBJECT,
                code::INVALID_SUBJECT,
                code::BAD_REQUEST,
                code::MAX_PAYLOAD
            ]
        );
        let h = Header {
            kind: Kind::Sub,
            ..h
        };
        assert!(matches!(c.oversized(&h), Err(ConnError::Malformed(_))));
        assert!(matches!(c.frame(FrameRef::Credit(1)), Ok(())));
        assert!(matches!(
            c.frame(FrameRef::Info {
                version: PROTOCOL_VERSION,
                flags: 0,
                recv_window: 0,
                max_payload: 0,
                server_name: "x",
            }),
            Err(ConnError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn a_request_to_the_stream_api_is_answered_on_its_reply_subject() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _d) = client(dir.path());
        sub(&mut c, 5, "_INBOX.me.*");
        publish(&mut c, "$SB.API.STREAM.LIST", Some("_INBOX.me.1"), b"");
        let f = sent(&c);
        let [sockbus_protocol::Frame::Msg {
            sid: 5, payload, ..
        }] = &f[..]
        else {
            panic!("one answer: {f:?}");
        };
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["streams"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn a_request_nobody_answers_gets_no_responders_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _d) = client(dir.path());
        sub(&mut c, 5, "_INBOX.me.*");
        publish(&mut c, "svc.none", Some("_INBOX.me.2"), b"?");
        let f = sent(&c);
        assert!(
            matches!(&f[..], [sockbus_protocol::Frame::Msg { sid: 5, flags, .. }] if flags & frame::MSG_NO_RESPONDERS != 0),
            "{f:?}"
        );
    }
}
