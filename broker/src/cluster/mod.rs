//! Cluster routes: broker replicas in a full mesh, so a subscriber on any
//! node receives what is published on any other.
//!
//! Every node dials every peer in `--peers` (skipping itself) and accepts
//! routes from any broker on `--cluster`, listed or not (a replica added by
//! scaling up is reached through the route it dials). A route is symmetric:
//! each end announces its local interest on it (one SUB per distinct pattern
//! and queue group, kept current as subscriptions come and go) and sends the
//! other the messages published locally that match the other's interest, as
//! RMSG frames: one frame per message per route at most, carrying "deliver to
//! your plain subscribers" and the queue groups the peer should serve. A node
//! delivers an RMSG only to its own clients, never onward, so a full mesh can
//! neither loop nor duplicate. When two nodes dialed each other,
//! `PeerInterest` keeps the route dialed by the smaller node id on both
//! ends. Queue groups stay exactly-once cluster-wide: the publishing node
//! picks a local member when it has one, otherwise exactly one peer.
//!
//! A lost route is redialed with backoff; on reconnect the interest is
//! announced again and the peer drops what the old route held.
//!
//! `interest` keeps what peers must hear from this broker; this file runs
//! the routes themselves. Messages a peer forwards go into the delivery
//! engine like any other ([`Batch::forwarded`]).

mod auth;
mod interest;

pub(crate) use interest::PeerInterest;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use sockbus_protocol::flow::effective_window;
use sockbus_protocol::frame::{
    self, encode_connect, encode_err, encode_info, encode_pong, Header, CONNECT_RAFT,
    CONNECT_ROUTE, RMSG_NO_ACK, RMSG_PLAIN,
};
use sockbus_protocol::{Backoff, FrameRef, MAX_FRAME_OVERHEAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::deliver::{Batch, Delivery};
use crate::metrics::Metrics;
use crate::outlet::{write_loop, Outlet};
use crate::read::{Ended, FrameReader, Frames, Keepalive};
use crate::router::Subscription;
use crate::server::State;
use crate::streams::Stream;
use crate::transport::Transport;

/// Subjects each route remembers the matches of.
const MATCH_CACHE: usize = 4096;
/// Redials of a lost or unreachable peer: 50 ms doubling to 1.6 s, with jitter
/// so that many nodes do not redial in step.
const ROUTE_BACKOFF: Backoff = Backoff::cluster_route();

/// Starts the route listener and one dialer per peer.
pub(crate) fn start(
    state: Arc<State>,
    listener: TcpListener,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, node = %state.config.node_id, peers = ?state.config.peers, "listening for cluster routes");
    }
    match &state.config.cluster_secret {
        Some(_) => info!("cluster routes must present the cluster secret"),
        None => warn!(
            "no --cluster-secret: any process that reaches the cluster port can join as a \
             broker and read and inject messages; set one (or restrict the port)"
        ),
    }
    let verifier = state
        .config
        .cluster_secret
        .as_ref()
        .map(|s| Arc::new(auth::Verifier::new(s.as_bytes())));
    let t = tracker.clone();
    let (st, sd) = (state.clone(), shutdown.clone());
    tracker.spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = sd.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("route accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            t.spawn(accept_route(
                st.clone(),
                stream,
                peer,
                verifier.clone(),
                sd.clone(),
            ));
        }
    });
    for url in state.config.peers.clone() {
        tracker.spawn(dial_loop(state.clone(), url, shutdown.clone()));
    }
    crate::replication::hub().start(state.clone());
}

/// `sockbus-route://host:port`, `nats-route://…` style or bare `host:port`.
fn host_port(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/')
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("this is our own address")]
    IsSelf,
    #[error("a route to this peer is already up")]
    Duplicate,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] sockbus_protocol::ProtocolError),
    #[error("peer refused the route: {0}")]
    Refused(String),
    #[error("timed out")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
}

/// The name a peer's certificate must carry: the host of its URL.
fn server_name(url: &str) -> Result<rustls::pki_types::ServerName<'static>, DialError> {
    let hp = host_port(url);
    let host = hp.rsplit_once(':').map_or(hp, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| DialError::Tls(format!("{host:?} is not a host name for TLS: {e}")))
}

struct Route {
    stream: Transport,
    buf: BytesMut,
    peer_node: String,
    peer_addr: SocketAddr,
    send_window: u32,
    info_len: usize,
}

async fn dial_loop(state: Arc<State>, url: String, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let dial = tokio::time::timeout(Duration::from_secs(3), dial(&state, &url));
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = dial => r.unwrap_or(Err(DialError::Timeout)),
        };
        match r {
            Ok(route) => {
                let peer = route.peer_node.clone();
                let addr = route.peer_addr;
                match run_route(&state, route, true, &shutdown).await {
                    Err(DialError::Duplicate) => {
                        // The peer's own route to us is the one both ends keep;
                        // look again later in case it goes away.
                        debug!(%peer, "route to peer already up; standing by");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                        continue;
                    }
                    _ if shutdown.is_cancelled() => return,
                    _ => {
                        failures = 0;
                        warn!(%peer, %addr, "cluster route lost; redialing");
                    }
                }
            }
            Err(DialError::Duplicate) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            Err(DialError::IsSelf) => {
                debug!(%url, "peer is this broker itself; not routing to it");
                return;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(%url, attempts = failures, "cannot reach cluster peer: {e}");
                }
            }
        }
        let delay = ROUTE_BACKOFF.delay(failures, rand::random());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Opens a Raft channel to the peer at `url`: the route handshake with
/// the [`CONNECT_RAFT`] flag (crate::replication).
pub(crate) async fn open_raft(state: &State, url: &str) -> std::io::Result<Transport> {
    match dial_with(state, url, CONNECT_ROUTE | CONNECT_RAFT).await {
        Ok(r) => Ok(r.stream),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

async fn dial(state: &State, url: &str) -> Result<Route, DialError> {
    dial_with(state, url, CONNECT_ROUTE).await
}

async fn dial_with(state: &State, url: &str, flags: u8) -> Result<Route, DialError> {
    let tcp = TcpStream::connect(host_port(url)).await?;
    tcp.set_nodelay(true)?;
    let peer_addr = tcp.peer_addr()?;
    let mut stream = match &state.tls {
        None => Transport::Plain(tcp),
        Some(tls) => {
            let Some(c) = tls.route_connector() else {
                return Err(DialError::Tls("no CA to verify peers by".into()));
            };
            let s = c
                .connect(server_name(url)?, tcp)
                .await
                .map_err(|e| DialError::Tls(e.to_string()))?;
            Transport::Tls(Box::new(s.into()))
        }
    };
    let mut out = BytesMut::new();
    let token = state
        .config
        .cluster_secret
        .as_ref()
        .map(|s| auth::token(s.as_bytes(), &state.config.node_id))
        .unwrap_or_default();
    encode_connect(
        &mut out,
        flags,
        state.config.recv_window,
        &state.config.node_id,
        token.as_bytes(),
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if let Some((f, len)) = frame::decode(&buf, 64 * 1024)? {
            return match f {
                FrameRef::Info {
                    recv_window,
                    max_payload,
                    server_name,
                    ..
                } => {
                    if server_name == state.config.node_id {
                        return Err(DialError::IsSelf);
                    }
                    let peer_node = server_name.to_string();
                    crate::replication::hub().learn(&peer_node, url);
                    buf.advance(len);
                    Ok(Route {
                        stream,
                        buf,
                        peer_node,
                        peer_addr,
                        send_window: effective_window(recv_window, max_payload),
                        info_len: len,
                    })
                }
                FrameRef::Err { code, .. } if code == frame::code::DUPLICATE_ROUTE => {
                    Err(DialError::Duplicate)
                }
                FrameRef::Err { text, .. } => Err(DialError::Refused(text.to_string())),
                _ => Err(DialError::Refused("expected INFO".into())),
            };
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(DialError::Refused("closed during handshake".into()));
        }
    }
}

/// Handshake of a route another broker dialed to us, then the route itself.
async fn accept_route(
    state: Arc<State>,
    stream: TcpStream,
    addr: SocketAddr,
    verifier: Option<Arc<auth::Verifier>>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + state.config.handshake_timeout;
    let mut stream = match &state.tls {
        None => Transport::Plain(stream),
        Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => Transport::Tls(Box::new(s.into())),
            Ok(Err(e)) => {
                warn!(%addr, "cluster route refused: TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%addr, "cluster route: TLS handshake timed out");
                return;
            }
        },
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let hs = tokio::time::timeout_at(deadline, async {
        loop {
            if let Some((f, len)) = frame::decode(&buf, 64 * 1024)? {
                return match f {
                    FrameRef::Connect {
                        flags,
                        recv_window,
                        name,
                        version,
                        token,
                    } if flags & CONNECT_ROUTE != 0 && version == sockbus_protocol::PROTOCOL_VERSION => {
                        if let Some(v) = &verifier {
                            if let Err(why) = v.verify(name, token) {
                                warn!(%addr, claimed_node = %name, "refused a cluster route: {why}");
                                state.metrics().route_auth_failures.fetch_add(1, Ordering::Relaxed);
                                return Err(DialError::Refused(
                                    "cluster route refused: wrong or missing cluster secret \
                                     (--cluster-secret), or a clock more than 60 s off"
                                        .into(),
                                ));
                            }
                        }
                        let r = (name.to_string(), recv_window, len, flags & CONNECT_RAFT != 0);
                        Ok(r)
                    }
                    _ => Err(DialError::Refused("only brokers (CONNECT with the route flag) may connect to the cluster port".into())),
                };
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(DialError::Refused("closed during handshake".into()));
            }
        }
    })
    .await
    .unwrap_or(Err(DialError::Timeout));
    let (peer_node, recv_window, connect_len, raft) = match hs {
        Ok(x) => x,
        Err(e) => {
            debug!(%addr, "route handshake failed: {e}");
            let mut b = BytesMut::new();
            encode_err(&mut b, frame::code::BAD_REQUEST, &e.to_string());
            let _ = stream.write_all(&b).await;
            return;
        }
    };
    buf.advance(connect_len);
    if peer_node == state.config.node_id {
        let mut b = BytesMut::new();
        encode_err(&mut b, frame::code::BAD_REQUEST, "a route to ourselves");
        let _ = stream.write_all(&b).await;
        return;
    }
    if raft {
        let mut b = BytesMut::new();
        let window = effective_window(state.config.recv_window, state.config.max_payload);
        if encode_info(
            &mut b,
            window,
            state.config.max_payload,
            &state.config.node_id,
        )
        .is_err()
            || stream.write_all(&b).await.is_err()
        {
            return;
        }
        crate::replication::serve(state.clone(), stream, buf, peer_node).await;
        return;
    }
    let route = Route {
        stream,
        buf,
        peer_node,
        peer_addr: addr,
        send_window: effective_window(recv_window, state.config.max_payload),
        info_len: 0,
    };
    if let Err(DialError::Duplicate) = run_route(&state, route, false, &shutdown).await {
        debug!(%addr, "refused a duplicate route");
    }
}

/// Runs one established route (dialed by us or accepted) until it breaks or
/// the broker shuts down. Both ends run this same code.
async fn run_route(
    state: &Arc<State>,
    route: Route,
    dialed: bool,
    shutdown: &CancellationToken,
) -> Result<(), DialError> {
    let Route {
        stream,
        mut buf,
        peer_node,
        peer_addr,
        send_window,
        info_len,
    } = route;
    let (mut rd, mut wr) = stream.split();
    // A route has the same budget, write timeout and keepalive as a client
    // connection: a peer that stops reading is cut off and redialed.
    let link = Arc::new(state.delivery.outlet(
        state.delivery.next_id(),
        send_window,
        CancellationToken::new(),
        None,
    ));
    let our_window = effective_window(state.config.recv_window, state.config.max_payload);
    if !dialed {
        // The acceptor answers the dialer's CONNECT with INFO, before anything else.
        link.push_control(|b| {
            let _ = encode_info(
                b,
                our_window,
                state.config.max_payload,
                &state.config.node_id,
            );
        });
    }
    // Announces all local interest now, and every change from here on.
    if state
        .peers
        .add_link(link.clone(), &state.config.node_id, &peer_node, dialed)
        .is_err()
    {
        if !dialed {
            let mut b = BytesMut::new();
            encode_info(
                &mut b,
                our_window,
                state.config.max_payload,
                &state.config.node_id,
            )?;
            encode_err(
                &mut b,
                frame::code::DUPLICATE_ROUTE,
                "a route to this peer is already up",
            );
            let _ = wr.write_all(&b).await;
        }
        return Err(DialError::Duplicate);
    }
    info!(peer = %peer_node, addr = %peer_addr, dialed, "cluster route up");
    link.wake();
    let metrics = state.metrics();
    metrics.routes.fetch_add(1, Ordering::Relaxed);
    link.set_socket(wr);
    let writer = tokio::spawn(write_loop(link.clone(), state.config.write_timeout));
    let mut peer = Peer {
        batch: state.delivery.ingress(&state.streams, MATCH_CACHE),
        accounts: HashMap::new(),
        state: state.clone(),
        link: link.clone(),
        subs: HashMap::new(),
        max_body: state.config.max_payload + MAX_FRAME_OVERHEAD,
    };
    let keepalive = Keepalive {
        interval: state.config.ping_interval,
        max_out: state.config.max_pings_out,
    };
    let r = FrameReader::new(peer.max_body, our_window, info_len, keepalive)
        .run(&mut peer, &mut rd, &mut buf, &link, shutdown)
        .await;
    match &r {
        Ok(Ended::Closed) => {}
        Ok(Ended::Stale { unanswered }) => {
            warn!(peer = %peer_node, "closing a stale cluster route: {unanswered} PINGs unanswered");
            metrics.stale_connections.fetch_add(1, Ordering::Relaxed);
            link.control(|b| {
                encode_err(
                    b,
                    frame::code::STALE_CONNECTION,
                    &format!("stale route: {unanswered} PINGs unanswered"),
                )
            });
        }
        Err(e) => debug!(peer = %peer_node, "route read ended: {e}"),
    }
    for (_, (d, s)) in peer.subs.drain() {
        d.unsubscribe(&s);
    }
    for (_, mut b) in peer.accounts.drain() {
        b.close();
    }
    state.peers.remove_link(link.id);
    metrics.routes.fetch_sub(1, Ordering::Relaxed);
    link.outbox.close();
    if matches!(r, Ok(Ended::Stale { .. })) {
        // The writer sends the ERR, then ends the route.
        link.wake();
    } else {
        link.abort.cancel();
    }
    // Bounded: the write loop gives up after the write timeout.
    let _ = writer.await;
    link.outbox.clear();
    r.map(|_| ())
}

/// A cluster route's side of the protocol: what the peer's frames mean.
struct Peer {
    /// The default account's batch.
    batch: Batch,
    /// Other accounts' batches, made when the first message for one arrives.
    accounts: HashMap<String, Batch>,
    state: Arc<State>,
    link: Arc<Outlet>,
    /// The peer's interest: route subscriptions held by this link, with the
    /// engine (account) they are in.
    subs: HashMap<u32, (Delivery, Arc<Subscription>)>,
    max_body: u32,
}

impl Frames for Peer {
    type Error = DialError;

    fn oversized(&mut self, h: &Header) -> Result<(), DialError> {
        Err(sockbus_protocol::ProtocolError::FrameTooLarge {
            len: h.len,
            max: self.max_body,
        }
        .into())
    }

    fn frame(&mut self, f: FrameRef<'_>) -> Result<(), DialError> {
        match f {
            FrameRef::RMsg {
                flags,
                subject,
                reply,
                queues,
                headers,
                payload,
            } => {
                self.batch
                    .delivery()
                    .metrics()
                    .route_msgs_in
                    .fetch_add(1, Ordering::Relaxed);
                let Some((batch, subject)) = self.account_batch(subject) else {
                    return Ok(());
                };
                batch.forwarded(
                    subject,
                    reply,
                    headers,
                    payload,
                    flags & RMSG_PLAIN != 0,
                    flags & RMSG_NO_ACK == 0,
                    queues,
                );
            }
            FrameRef::Sub {
                sid,
                subject,
                queue,
            } => {
                let Some((batch, pattern)) = self.account_batch(subject) else {
                    return Ok(());
                };
                let d = batch.delivery().clone();
                if let Ok(sub) = d.subscribe_peer(&self.link, sid, pattern, queue) {
                    if let Some((od, old)) = self.subs.insert(sid, (d, sub)) {
                        od.unsubscribe(&old);
                    }
                }
            }
            FrameRef::Unsub { sid, .. } => {
                if let Some((d, s)) = self.subs.remove(&sid) {
                    d.unsubscribe(&s);
                }
            }
            FrameRef::Credit(n) => {
                self.link.outbox.on_credit(n);
                self.link.wake();
            }
            FrameRef::Ping(id) => self.link.control(|b| encode_pong(b, id)),
            FrameRef::Pong(_) => {}
            FrameRef::Err { code, text } => {
                warn!(code, "peer reported an error on the route: {text}")
            }
            other => {
                return Err(DialError::Refused(format!(
                    "unexpected frame on a route: {other:?}"
                )))
            }
        }
        Ok(())
    }

    fn end_batch(&mut self) -> Option<Arc<Stream>> {
        self.batch.finish();
        let mut behind = self.batch.backlogged();
        for b in self.accounts.values_mut() {
            b.finish();
            behind = behind.or_else(|| b.backlogged());
        }
        behind
    }
}

impl Peer {
    /// The batch of the account a subject (or pattern) from the peer
    /// belongs to, and the subject without its account: `$SB.ACC.<name>.`
    /// in front names an account other than the default. None for an
    /// account this broker does not have (configured on the peer only):
    /// nothing here can want its messages.
    fn account_batch<'s>(&mut self, subject: &'s str) -> Option<(&mut Batch, &'s str)> {
        let Some((name, rest)) = crate::account::split_route_subject(subject) else {
            return Some((&mut self.batch, subject));
        };
        if !self.accounts.contains_key(name) {
            let Some(a) = self.state.accounts.get(name) else {
                debug!(
                    account = name,
                    "a peer sent interest or a message of an account this broker does not have"
                );
                return None;
            };
            let b = a.delivery.ingress(&a.streams, MATCH_CACHE);
            self.accounts.insert(name.to_string(), b);
        }
        self.accounts.get_mut(name).map(|b| (b, rest))
    }
}

/// Cluster figures for `/metrics` and the status page.
pub(crate) struct ClusterMetrics {
    pub metrics: Arc<Metrics>,
    pub peers: Arc<PeerInterest>,
    pub node: String,
    pub listen: Option<SocketAddr>,
}

impl crate::metrics::Source for ClusterMetrics {
    fn name(&self) -> &'static str {
        "cluster"
    }

    /// Not ready while a replicated stream here has no leader or this
    /// replica is behind it (a restarted pod catching up).
    fn ready(&self) -> Result<(), String> {
        crate::replication::hub().ready()
    }

    fn prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "# HELP sockbus_cluster_routes Cluster routes to peer brokers that are up.\n\
             # TYPE sockbus_cluster_routes gauge\n\
             sockbus_cluster_routes {}\n\
             # HELP sockbus_cluster_messages_in_total Messages received from peers over cluster routes.\n\
             # TYPE sockbus_cluster_messages_in_total counter\n\
             sockbus_cluster_messages_in_total {}\n\
             # HELP sockbus_cluster_route_auth_failures_total Route handshakes refused for a wrong or missing cluster secret.\n\
             # TYPE sockbus_cluster_route_auth_failures_total counter\n\
             sockbus_cluster_route_auth_failures_total {}\n",
            self.metrics.routes.load(Ordering::Relaxed),
            self.metrics.route_msgs_in.load(Ordering::Relaxed),
            self.metrics.route_auth_failures.load(Ordering::Relaxed),
        );
    }

    fn status(&self) -> serde_json::Value {
        if self.listen.is_none() {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "node": self.node,
            "listen": self.listen.map(|a| a.to_string()),
            "routes_up": self.metrics.routes.load(Ordering::Relaxed),
            "peers": self.peers.peers().into_iter().map(|p| serde_json::json!({"node": p})).collect::<Vec<_>>(),
        })
    }
}
