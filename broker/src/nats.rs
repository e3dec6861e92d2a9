//! The NATS front end (`--nats ADDR`, docs/nats.md): NATS clients in any
//! language connect here and share the one subject space with native
//! clients. Another kind of connection with its own codec
//! ([`sockbus_protocol::nats`]): every PUB goes through the delivery engine
//! ([`crate::deliver`]) like a native publish, every SUB is a subscription
//! in the router whose outlet frames messages as MSG/HMSG. Users,
//! permissions and limits apply as on the native port.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::Deserialize;
use sockbus_protocol::nats::{self, Op, Parsed};
use sockbus_protocol::Credentials;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::account::Account;
use crate::auth::check::{PublishCheck, Responses};
use crate::auth::{AuthError, User};
use crate::deliver::{Ack, Batch, PublishError, Publisher, SubscribeError, Subscriber};
use crate::outlet::{write_loop, Codec, Outlet, NAMED_SID};
use crate::router::Subscription;
use crate::server::State;
use crate::transport::{ReadSock, Transport};

/// Subjects each NATS connection remembers the matches of.
const MATCH_CACHE: usize = 4096;
/// The longest subscription id a NATS client may choose (bytes).
pub const MAX_SID_LEN: usize = 128;
/// The NATS server version announced in INFO. Clients gate features on it
/// (nats.js refuses headers from a server older than 2.2.0); this is the
/// NATS release whose client protocol this front end follows.
pub const NATS_VERSION: &str = "2.10.0";

/// The CONNECT options this broker reads; the rest are ignored.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct ConnectOpts {
    verbose: bool,
    pedantic: bool,
    user: Option<String>,
    pass: Option<String>,
    auth_token: Option<String>,
    name: Option<String>,
    echo: bool,
    headers: bool,
    no_responders: bool,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            verbose: false,
            pedantic: false,
            user: None,
            pass: None,
            auth_token: None,
            name: None,
            echo: true,
            headers: false,
            no_responders: false,
        }
    }
}

/// Accepts NATS clients until `shutdown`; shares the native listener's
/// connection limit (`limit`). `lame_duck` is cancelled when the broker is
/// about to drain: each connection then tells its client (INFO `ldm`).
pub(crate) fn start(
    state: Arc<State>,
    listener: TcpListener,
    limit: Arc<Semaphore>,
    tracker: &TaskTracker,
    lame_duck: CancellationToken,
    shutdown: CancellationToken,
) {
    let t = tracker.clone();
    tracker.spawn(async move {
        let addr = listener.local_addr().ok();
        info!(addr = ?addr, "listening for NATS clients");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("NATS accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                state
                    .metrics()
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%peer, limit = state.config.max_connections, "NATS connection refused: at the connection limit");
                t.spawn(async move {
                    let mut stream = stream;
                    crate::transport::refuse(&mut stream, b"-ERR 'maximum connections exceeded'\r\n").await;
                });
                continue;
            };
            let id = state.delivery.next_id();
            let (st, sd, ld) = (state.clone(), shutdown.clone(), lame_duck.clone());
            t.spawn(async move {
                let m = st.metrics();
                m.connections.fetch_add(1, Ordering::Relaxed);
                m.connections_total.fetch_add(1, Ordering::Relaxed);
                run(st.clone(), stream, peer, id, ld, sd).await;
                st.metrics().connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    });
}

/// The INFO line this broker sends a client.
fn info(state: &State, id: u64, peer: SocketAddr, ldm: bool) -> Vec<u8> {
    let cfg = &state.config;
    let port = cfg.nats.map_or(4222, |a| a.port());
    // Peers' NATS ports are not exchanged over routes: a cluster's brokers
    // serve NATS on the same port (docs/nats.md, "Cluster").
    let mut connect_urls: Vec<String> = cfg
        .peers
        .iter()
        .filter_map(|p| {
            let bare = p.split_once("://").map_or(p.as_str(), |(_, r)| r);
            let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
            (!host.is_empty()).then(|| format!("{host}:{port}"))
        })
        .collect();
    // Peers on one host (a test cluster) name it once.
    let mut seen = std::collections::HashSet::new();
    connect_urls.retain(|u| seen.insert(u.clone()));
    let mut v = serde_json::json!({
        "server_id": format!("SOCKBUS-{}", cfg.node_id),
        "server_name": cfg.node_id,
        "version": NATS_VERSION,
        "proto": 1,
        "go": concat!("sockbus ", env!("CARGO_PKG_VERSION")),
        "host": cfg.nats.map_or("0.0.0.0".to_string(), |a| a.ip().to_string()),
        "port": port,
        "headers": true,
        "max_payload": cfg.max_payload,
        "client_id": id,
        "client_ip": peer.ip().to_string(),
        "auth_required": state.users().is_some(),
        "tls_required": state.tls.is_some(),
    });
    if !connect_urls.is_empty() {
        v["connect_urls"] = connect_urls.into();
    }
    if ldm {
        v["ldm"] = true.into();
    }
    let mut line = b"INFO ".to_vec();
    line.extend_from_slice(v.to_string().as_bytes());
    line.extend_from_slice(b"\r\n");
    line
}

fn err_line(text: &str) -> Vec<u8> {
    let mut b = Vec::new();
    nats::encode_err(&mut b, text);
    b
}

async fn run(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    lame_duck: CancellationToken,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + state.config.handshake_timeout;
    let mut stream = stream;
    // INFO goes first, in the clear; a TLS client upgrades after reading
    // it. A client that starts TLS at once (`handshake_first`) gets INFO
    // inside the session instead.
    let tls_first = state.tls.is_some() && starts_with_tls(&stream).await;
    if !tls_first
        && stream
            .write_all(&info(&state, id, peer, lame_duck.is_cancelled()))
            .await
            .is_err()
    {
        return;
    }
    let mut cert = None;
    let mut stream = match &state.tls {
        None => Transport::Plain(stream),
        Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => {
                cert = crate::conn::client_cert_names(&state, s.get_ref().1);
                Transport::Tls(Box::new(s.into()))
            }
            Ok(Err(e)) => {
                debug!(%peer, tls_first, "NATS TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, tls_first, "NATS TLS handshake timed out");
                return;
            }
        },
    };
    if tls_first
        && stream
            .write_all(&info(&state, id, peer, lame_duck.is_cancelled()))
            .await
            .is_err()
    {
        return;
    }
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let opts = match tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut buf)).await {
        Ok(Ok(o)) => o,
        Ok(Err(text)) => {
            debug!(%peer, "NATS handshake failed: {text}");
            crate::transport::refuse(&mut stream, &err_line(&text)).await;
            return;
        }
        Err(_) => {
            crate::transport::refuse(&mut stream, &err_line("Authentication Timeout")).await;
            return;
        }
    };
    let name = opts.name.clone().unwrap_or_default();
    let user = match state.users() {
        None => None,
        Some(users) => {
            let creds = match (&opts.user, &opts.pass, &opts.auth_token) {
                (Some(u), p, _) => Credentials::UserPassword {
                    user: u,
                    password: p.as_deref().unwrap_or("").as_bytes(),
                },
                (None, _, Some(t)) => Credentials::Token(t.as_bytes()),
                _ => Credentials::None,
            };
            let checked = match (creds, &cert) {
                // No credentials over mTLS: the certificate names the user.
                (Credentials::None, Some(names)) => users.authenticate_cert(names),
                (creds, _) => tokio::time::timeout_at(deadline, users.authenticate(creds))
                    .await
                    .unwrap_or(Err(AuthError::TimedOut)),
            };
            match checked {
                Ok(u) => Some(u),
                Err(e) => {
                    warn!(%peer, client = %name, user = opts.user.as_deref().unwrap_or(""), "NATS client refused: {e}");
                    crate::transport::refuse(&mut stream, &err_line("Authorization Violation"))
                        .await;
                    return;
                }
            }
        }
    };
    // Each user's messages stay in its account, as on the native port.
    let account = state.accounts.of(user.as_deref()).clone();
    let slot = match account.connect() {
        Ok(slot) => slot,
        Err(e) => {
            state
                .metrics()
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%peer, client = %name, account = account.name(), "NATS client refused: {e}");
            crate::transport::refuse(
                &mut stream,
                &err_line("maximum account connections exceeded"),
            )
            .await;
            return;
        }
    };
    let span = match &user {
        Some(u) => {
            tracing::info_span!("nats", id, %peer, client = %name, user = %u.name, account = %u.account)
        }
        None => tracing::info_span!("nats", id, %peer, client = %name),
    };
    serve(
        state, &account, stream, buf, id, peer, opts, user, lame_duck, shutdown,
    )
    .instrument(span)
    .await;
    drop(slot);
}

/// How long a new connection on a TLS-enabled NATS port is watched for a
/// TLS ClientHello before the plain INFO goes out (nats-server's fallback
/// delay for `handshake_first: auto`).
const TLS_FIRST_WAIT: Duration = Duration::from_millis(50);

/// True when the client's first byte, within [`TLS_FIRST_WAIT`], opens a
/// TLS handshake record (0x16): a `handshake_first` client, which expects
/// no INFO before TLS. A client that waits for INFO sends nothing.
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(TLS_FIRST_WAIT, stream.peek(&mut first)).await,
        Ok(Ok(1))
    ) && first[0] == 0x16
}

/// Reads up to the CONNECT line and parses its options; the error is the
/// `-ERR` text the client gets before the connection closes. Leaves what
/// follows CONNECT (a PING, PUBs) in `buf`.
async fn read_connect(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<ConnectOpts, String> {
    loop {
        match nats::parse(buf, 0) {
            Ok(Parsed::Op(Op::Connect(json), n)) => {
                let opts = serde_json::from_slice(json)
                    .map_err(|e| format!("Parser Error: CONNECT options: {e}"))?;
                buf.advance(n);
                return Ok(opts);
            }
            Ok(Parsed::Incomplete(_)) => {}
            Ok(_) => return Err("Authorization Violation: CONNECT must come first".into()),
            Err(e) => return Err(e.to_string()),
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err("connection closed before CONNECT".into()),
            Ok(_) => {}
        }
    }
}

/// A NATS connection's side of the protocol: what its operations mean.
struct Client {
    user: Option<Arc<User>>,
    batch: Batch,
    out: Arc<Outlet>,
    subs: std::collections::HashMap<u32, Arc<Subscription>>,
    /// Sids the client named with other text than a plain decimal number
    /// (NATS sids are opaque): the internal sid each stands for.
    named: std::collections::HashMap<Box<str>, u32>,
    next_named: u32,
    me: Publisher,
    verbose: bool,
    pedantic: bool,
    peer: SocketAddr,
}

impl Client {
    fn send(&mut self, line: &[u8]) {
        if let Some(true) = self.out.push_control(|b| b.put_slice(line)) {
            self.batch.wake(&self.out);
        }
    }

    fn ok(&mut self) {
        if self.verbose {
            self.send(b"+OK\r\n");
        }
    }

    fn err(&mut self, text: &str) {
        let line = err_line(text);
        self.send(&line);
    }

    /// One operation; Err(text) closes the connection with `-ERR 'text'`.
    fn op(&mut self, op: Op<'_>) -> Result<(), String> {
        match op {
            Op::Pub {
                subject,
                reply,
                headers,
                payload,
            } => {
                let block = nats::headers_to_block(headers)
                    .map_err(|_| "Parser Error: malformed NATS/1.0 header block".to_string())?;
                match self
                    .batch
                    .publish(&self.me, subject, reply, &block, payload, Ack::Nats)
                {
                    Ok(_) => self.ok(),
                    Err(PublishError::Denied(s) | PublishError::Reserved(s)) => {
                        if let Some(u) = &self.user {
                            warn!(user = %u.name, subject = %s, "NATS publish denied by permissions");
                        }
                        self.err(&format!("Permissions Violation for Publish to \"{s}\""))
                    }
                    Err(PublishError::PayloadTooLarge { .. }) => {
                        self.err("Maximum Payload Violation")
                    }
                    Err(PublishError::InvalidSubject(_) | PublishError::InvalidReply(_)) => {
                        // nats-server says so only to pedantic clients.
                        if self.pedantic {
                            self.err("Invalid Publish Subject")
                        }
                    }
                }
            }
            Op::Sub {
                subject,
                queue,
                sid,
            } => {
                let Some(sid) = self.sid(sid, true) else {
                    self.err(&format!(
                        "Invalid Subscription ID: longer than {MAX_SID_LEN} bytes"
                    ));
                    return Ok(());
                };
                if self.subs.get(&sid).is_some_and(|s| !s.is_removed()) {
                    // nats-server ignores a SUB whose sid is in use.
                    self.ok();
                    return Ok(());
                }
                let perms = self.user.as_ref().and_then(|u| u.perms.clone());
                match self.batch.delivery().subscribe(
                    &Subscriber {
                        api: false,
                        perms: perms.as_deref(),
                    },
                    &self.out,
                    sid,
                    subject,
                    queue,
                ) {
                    Ok(sub) => {
                        // In the map before the sweep: a named sid's text
                        // is kept only for subscriptions in it.
                        self.subs.insert(sid, sub);
                        if self.subs.len()
                            >= 2 * self.out.subscriptions.load(Ordering::Acquire) + 64
                        {
                            self.forget_removed();
                        }
                        self.ok();
                    }
                    Err(SubscribeError::InvalidSubject(_)) => self.err("Invalid Subject"),
                    Err(SubscribeError::InvalidQueue(_)) => self.err("Invalid Queue Name"),
                    Err(SubscribeError::TooMany { .. } | SubscribeError::AccountTooMany { .. }) => {
                        self.err("Maximum Subscriptions Exceeded")
                    }
                    Err(SubscribeError::Denied(p) | SubscribeError::Reserved(p)) => {
                        if let Some(u) = &self.user {
                            u.denied_subscribe.fetch_add(1, Ordering::Relaxed);
                            warn!(user = %u.name, pattern = %p, "NATS subscription denied by permissions");
                        }
                        self.err(&format!(
                            "Permissions Violation for Subscription to \"{p}\""
                        ))
                    }
                }
            }
            Op::Unsub { sid: text, max } => {
                if let Some(sid) = self.sid(text, false) {
                    if let Some(s) = self.subs.get(&sid) {
                        if max.is_none_or(|m| m == 0 || s.set_max(m)) {
                            if let Some(s) = self.subs.remove(&sid) {
                                self.batch.delivery().unsubscribe(&s);
                            }
                            if sid >= NAMED_SID && self.named.remove(text).is_some() {
                                self.forget_name(sid);
                            }
                        }
                    }
                }
                self.ok();
            }
            Op::Ping => self.send(b"PONG\r\n"),
            Op::Pong | Op::Ignored => {}
            Op::Connect(_) => self.ok(),
        }
        Ok(())
    }
}

impl Client {
    /// The internal sid of the client's `text`: the number itself for a
    /// plain decimal below [`NAMED_SID`] (what nats.go, nats.js, nats.py
    /// and async-nats send), else one taken from [`NAMED_SID`] up and
    /// remembered (`create`), its text kept where the outlet frames MSG.
    /// None when `text` is too long or unknown (`!create`).
    fn sid(&mut self, text: &str, create: bool) -> Option<u32> {
        if let Some(n) = decimal_sid(text) {
            return Some(n);
        }
        if let Some(&n) = self.named.get(text) {
            if !create || self.subs.get(&n).is_some_and(|s| !s.is_removed()) {
                return Some(n);
            }
        }
        if !create || text.len() > MAX_SID_LEN {
            return None;
        }
        if self.next_named == u32::MAX {
            // 2^31 named subscriptions on one connection: start over
            // after the ones still live.
            self.forget_removed();
            self.next_named = NAMED_SID;
        }
        let mut n = self.next_named;
        while self.subs.contains_key(&n) {
            n = n.checked_add(1)?;
        }
        self.next_named = n + 1;
        if let Some(old) = self.named.insert(text.into(), n) {
            self.forget_name(old);
        }
        self.out
            .sid_names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(n, text.into());
        Some(n)
    }

    fn forget_name(&mut self, n: u32) {
        self.out
            .sid_names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&n);
    }

    /// Drops subscriptions that ended (UNSUB with a max reached) and the
    /// names of named sids no longer in use.
    fn forget_removed(&mut self) {
        self.subs.retain(|_, s| !s.is_removed());
        if self.named.is_empty() {
            return;
        }
        let subs = &self.subs;
        let mut gone = Vec::new();
        self.named.retain(|_, n| {
            let keep = subs.contains_key(n);
            if !keep {
                gone.push(*n);
            }
            keep
        });
        let mut names = self
            .out
            .sid_names
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for n in gone {
            names.remove(&n);
        }
    }
}

/// A sid as nats.go, nats.js, nats.py and async-nats send it: a decimal
/// counter, canonical (no leading zero) and below [`NAMED_SID`].
fn decimal_sid(s: &str) -> Option<u32> {
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|&n| n < NAMED_SID)
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: Arc<State>,
    account: &Account,
    stream: Transport,
    mut buf: BytesMut,
    id: u64,
    peer: SocketAddr,
    opts: ConnectOpts,
    user: Option<Arc<User>>,
    lame_duck: CancellationToken,
    shutdown: CancellationToken,
) {
    debug!("NATS client connected");
    let cfg = &state.config;
    let (mut rd, wr) = stream.split();
    let perms = user.as_ref().and_then(|u| u.perms.clone());
    let responses = perms
        .as_ref()
        .filter(|p| !p.publish.is_open())
        .map(|_| Arc::new(Responses::default()));
    let mut outlet = account
        .delivery
        .outlet(id, 0, CancellationToken::new(), Some(wr))
        .with_codec(Codec::Nats);
    if let Some(r) = &responses {
        outlet = outlet.with_responses(r.clone());
    }
    let out = Arc::new(outlet);
    let writer = tokio::spawn(write_loop(out.clone(), cfg.write_timeout));
    let mut batch = account.delivery.ingress(&account.streams, MATCH_CACHE);
    if let Some(u) = &user {
        batch.restrict(PublishCheck::new(u, responses));
    }
    let mut client = Client {
        user,
        batch,
        out: out.clone(),
        subs: Default::default(),
        named: Default::default(),
        next_named: NAMED_SID,
        me: Publisher {
            id,
            echo: opts.echo,
            no_responders: opts.headers && opts.no_responders,
            api: false,
            explicit_acks: true,
        },
        verbose: opts.verbose,
        pedantic: opts.pedantic,
        peer,
    };
    client.ok();
    let why = read_loop(
        &state,
        &mut client,
        &mut rd,
        &mut buf,
        &lame_duck,
        &shutdown,
    )
    .await;
    client.batch.close();
    for (_, s) in client.subs.drain() {
        account.delivery.unsubscribe(&s);
    }
    if let Some(text) = &why {
        warn!("closing NATS connection: {text}");
        out.control(|b| nats::encode_err(b, text));
    }
    crate::outlet::close_and_drain(&out, writer, cfg.drain_timeout).await;
}

/// Reads and handles operations until the client closes (None) or must be
/// closed (the `-ERR` text).
async fn read_loop(
    state: &State,
    c: &mut Client,
    rd: &mut ReadSock,
    buf: &mut BytesMut,
    lame_duck: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<String> {
    let cfg = &state.config;
    let max_payload = cfg.max_payload as usize;
    let every = cfg.ping_interval;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut heard, mut pings_out) = (false, 0u32);
    let mut skip = 0usize;
    let mut told_ldm = false;
    let aborted = c.out.abort.clone().cancelled_owned();
    tokio::pin!(aborted);
    loop {
        // Every whole operation in the buffer, then one flush.
        let res = loop {
            if skip > 0 {
                let n = skip.min(buf.len());
                buf.advance(n);
                skip -= n;
                if skip > 0 {
                    break Ok(());
                }
                continue;
            }
            match nats::parse(buf, max_payload) {
                Ok(Parsed::Op(op, n)) => {
                    if op == Op::Pong {
                        pings_out = 0;
                    }
                    let r = c.op(op);
                    buf.advance(n);
                    if let Err(e) = r {
                        break Err(e);
                    }
                }
                Ok(Parsed::Incomplete(need)) => {
                    if need > buf.capacity() {
                        buf.reserve(need - buf.len());
                    }
                    break Ok(());
                }
                Ok(Parsed::TooLarge { size, skip: n }) => {
                    // Refused without reading it into memory; the
                    // connection stays usable (docs/nats.md).
                    let _ = c.batch.delivery().too_large(size);
                    c.err("Maximum Payload Violation");
                    skip = n;
                }
                Err(e) => {
                    state
                        .metrics()
                        .malformed_frames
                        .fetch_add(1, Ordering::Relaxed);
                    break Err(e.to_string());
                }
            }
        };
        c.batch.finish();
        if let Err(e) = res {
            return Some(e);
        }
        if let Some(s) = c.batch.backlogged() {
            s.wait_space().await;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if c.out.abort.is_cancelled() {
            return None;
        }
        tokio::select! {
            biased;
            r = rd.read_buf(buf) => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => heard = true,
            },
            _ = aborted.as_mut() => return None,
            _ = shutdown.cancelled() => return None,
            _ = lame_duck.cancelled(), if !told_ldm => {
                told_ldm = true;
                let line = info(state, c.me.id, c.peer, true);
                c.out.control(|b| b.put_slice(&line));
            }
            _ = tick.tick() => {
                if std::mem::take(&mut heard) {
                    continue;
                }
                if pings_out >= cfg.max_pings_out {
                    state.metrics().stale_connections.fetch_add(1, Ordering::Relaxed);
                    return Some("Stale Connection".into());
                }
                pings_out += 1;
                c.out.control(|b| b.put_slice(b"PING\r\n"));
            }
        }
    }
}
