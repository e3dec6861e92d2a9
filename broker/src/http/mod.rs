//! The HTTP gateway: publish and subscribe (Server-Sent Events) for clients
//! without the SDK, Prometheus metrics, health probes and the live status
//! page, on one hyper (HTTP/1.1) listener. Routes, header mapping and limits:
//! docs/http.md.
//!
//! One file per concern: `routes` dispatches and answers the small routes,
//! `publish` and `sse` carry messages, `exposition` counts requests and
//! renders `/metrics`, `status` serves the page and its JSON, `streams` is
//! where durable streams plug in, `limit` answers connections over the
//! connection limit (probes still get their answer), `rawpath` lets a raw
//! `>` stand in a request path.

mod exposition;
mod limit;
mod monitor;
mod publish;
mod rawpath;
mod routes;
mod sse;
mod status;
mod streams;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::deliver::Batch;
use crate::server::State;

pub use exposition::HttpMetrics;

/// Largest request head (request line and headers) accepted; beyond it hyper answers 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Pending connections the kernel queues for us (capped by net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 4096;
/// Subjects each HTTP connection remembers the matches of.
const CONN_MATCH_CACHE: usize = 64;

/// What every HTTP connection shares.
pub struct Gateway {
    pub(crate) state: Arc<State>,
    pub metrics: HttpMetrics,
    /// Where the gateway listens (shown on the status page).
    pub local_addr: SocketAddr,
    started: Instant,
    draining: AtomicBool,
    rates: status::Rates,
    h1: http1::Builder,
}

impl Gateway {
    /// True once shutdown began: `/readyz` answers 503 so load balancers stop sending.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Per-connection state: HTTP/1.1 serves one request at a time per
/// connection, so this lock is never contended; it exists to be `Sync`.
struct ConnCtx {
    /// The names of the verified client certificate, when some user is
    /// named by one (auth/cert.rs).
    cert: Option<crate::auth::cert::CertNames>,
    id: u64,
    /// Cancelled to drop the connection at once (its SSE stream fell behind).
    kill: CancellationToken,
    local: Mutex<ConnLocal>,
}

/// The publish path's reusable state (the delivery engine's per-producer
/// batch), kept per connection so that a keep-alive client publishing to the
/// same subjects allocates nothing and takes no shared lock per request.
struct ConnLocal {
    batch: Batch,
    /// The account `batch` publishes in.
    account: String,
}

pub struct HttpServer {
    gw: Arc<Gateway>,
    listener: TcpListener,
}

impl HttpServer {
    /// Binds the HTTP listener. Port 0 picks a free port (see [`HttpServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, state: Arc<State>) -> anyhow::Result<HttpServer> {
        let listener = listen(addr).with_context(|| format!("cannot listen for HTTP on {addr}"))?;
        let local_addr = listener.local_addr()?;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(state.config.http_header_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let gw = Arc::new(Gateway {
            metrics: HttpMetrics::default(),
            local_addr,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            rates: status::Rates::new(&state),
            h1,
            state,
        });
        Ok(HttpServer { gw, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.gw.local_addr
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.gw.clone()
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, answers
    /// `/readyz` with 503, ends every SSE stream after flushing it, lets
    /// requests in progress finish (up to the drain timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let HttpServer { gw, listener } = self;
        let cfg = &gw.state.config;
        info!(addr = %gw.local_addr, max_connections = cfg.http_max_connections, "HTTP gateway listening (status page, /metrics, /v1/publish, /v1/subscribe)");
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(cfg.http_max_connections));
        let answering = Arc::new(Semaphore::new(limit::MAX_ANSWERING));
        tracker.spawn(status::tick(gw.clone(), shutdown.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("HTTP accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                if gw.state.tls.is_some() {
                    // Probes over TLS would cost a handshake each: closed.
                    gw.metrics.refused();
                    continue;
                }
                debug!(%peer, limit = cfg.http_max_connections, "HTTP connection over the connection limit: probes only");
                match answering.clone().try_acquire_owned() {
                    Ok(p) => {
                        tracker.spawn(limit::answer(gw.clone(), stream, p));
                    }
                    // Too many answers in flight already: closed unanswered.
                    Err(_) => gw.metrics.refused(),
                }
                continue;
            };
            let id = gw.state.delivery.next_id();
            let gw = gw.clone();
            let sd = shutdown.clone();
            let span = tracing::info_span!("http", id, %peer);
            tracker.spawn(
                async move {
                    gw.metrics.connection_opened();
                    let _ = stream.set_nodelay(true);
                    match &gw.state.tls {
                        None => serve(&gw, stream, id, None, sd).await,
                        Some(tls) => {
                            // Bounded like the request head that follows it.
                            let hs = tokio::time::timeout(
                                gw.state.config.http_header_timeout,
                                tls.acceptor().accept(stream),
                            );
                            match hs.await {
                                Ok(Ok(s)) => {
                                    let cert =
                                        crate::conn::client_cert_names(&gw.state, s.get_ref().1);
                                    serve(&gw, s, id, cert, sd).await
                                }
                                Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
                                Err(_) => debug!("TLS handshake timed out"),
                            }
                        }
                    }
                    gw.metrics.connection_closed();
                    drop(permit);
                }
                .instrument(span),
            );
        }
        gw.draining.store(true, Ordering::Relaxed);
        drop(listener);
        tracker.close();
        info!(
            connections = tracker.len(),
            "HTTP gateway shutting down: draining"
        );
        if tokio::time::timeout(cfg.drain_timeout + Duration::from_secs(1), tracker.wait())
            .await
            .is_err()
        {
            warn!("HTTP drain timed out");
        }
        Ok(())
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// One HTTP connection, until the client leaves, its SSE stream is cut off
/// as a slow consumer, or shutdown has drained it.
async fn serve<S>(
    gw: &Arc<Gateway>,
    stream: S,
    id: u64,
    cert: Option<crate::auth::cert::CertNames>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ConnCtx {
        cert,
        id,
        kill: CancellationToken::new(),
        local: Mutex::new(ConnLocal {
            batch: gw
                .state
                .delivery
                .ingress(&gw.state.streams, CONN_MATCH_CACHE),
            account: crate::auth::DEFAULT_ACCOUNT.to_string(),
        }),
    });
    let svc = {
        let gw = gw.clone();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        service_fn(move |req| {
            let gw = gw.clone();
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            async move { Ok::<_, Infallible>(routes::handle(&gw, &ctx, &shutdown, req).await) }
        })
    };
    let conn = gw
        .h1
        .serve_connection(TokioIo::new(rawpath::RawPath::new(stream)), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = ctx.kill.cancelled() => None,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = ctx.kill.cancelled() => None,
                _ = tokio::time::sleep(gw.state.config.drain_timeout) => None,
            }
        }
    };
    match res {
        Some(Err(e)) => debug!("HTTP connection error: {e}"),
        Some(Ok(())) => debug!("HTTP connection closed"),
        None => debug!("HTTP connection dropped"),
    }
    ctx.kill.cancel();
    let mut local = ctx.local.lock().unwrap_or_else(|p| p.into_inner());
    local.batch.close();
}
