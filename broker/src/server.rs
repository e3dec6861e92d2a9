//! The listener: accepts connections up to the limit and tracks them so a
//! shutdown can drain every one before the process exits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use sockbus_protocol::frame::{code, encode_err};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::account::{AccountMetrics, Accounts};
use crate::cluster::{ClusterMetrics, PeerInterest};
use crate::config::Config;
use crate::deliver::Delivery;
use crate::metrics::Metrics;
use crate::store::FileCache;
use crate::streams::{StreamInfo, Streams, StreamsMetrics};
use crate::tls::Tls;

/// What the broker's front ends share, built once in [`Server::bind`].
pub struct State {
    pub(crate) config: Config,
    /// The delivery engine: router, counters, every publish and subscription.
    pub(crate) delivery: Delivery,
    pub(crate) streams: Arc<Streams>,
    /// Every account (`delivery` and `streams` are the default account's).
    pub(crate) accounts: Arc<Accounts>,
    /// What cluster peers must hear of local interest.
    pub(crate) peers: Arc<PeerInterest>,
    /// TLS on every listener, when `--tls-cert` is set.
    pub(crate) tls: Option<Arc<Tls>>,
    /// The users table in force (reloaded from `--users-file`); None: no
    /// authentication.
    pub(crate) users: Option<Arc<crate::auth::live::LiveUsers>>,
}

impl State {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The users in force now (the config's, or the last reload's).
    pub fn users(&self) -> Option<Arc<crate::auth::Users>> {
        self.users.as_ref().map(|l| l.get())
    }

    /// The users table and its reload counters.
    pub fn live_users(&self) -> Option<&Arc<crate::auth::live::LiveUsers>> {
        self.users.as_ref()
    }

    /// The broker's counters (what `/metrics` shows), and where other
    /// parts of a program embedding the broker register figures of theirs.
    pub fn metrics(&self) -> &Metrics {
        self.delivery.metrics()
    }

    /// Subscriptions in the routers of every account, peers' interest included.
    pub fn subscriptions(&self) -> usize {
        self.accounts
            .all()
            .iter()
            .map(|a| a.delivery.router().len())
            .sum()
    }

    /// Every durable stream of the default account, sorted by name.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.streams.list()
    }

    /// Node ids of the cluster peers with a route up.
    pub fn peers(&self) -> Vec<String> {
        self.peers.peers()
    }
}

pub struct Server {
    state: Arc<State>,
    listener: TcpListener,
    local_addr: SocketAddr,
    route_listener: Option<TcpListener>,
    nats_listener: Option<TcpListener>,
}

impl Server {
    /// Binds the native listener. Port 0 picks a free port (see [`Server::local_addr`]).
    /// Opens the streams under the data directory; must run inside a tokio runtime.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let route_listener = match config.cluster {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for cluster routes on {addr}"))?,
            ),
            None => None,
        };
        let nats_listener = match config.nats {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for NATS clients on {addr}"))?,
            ),
            None => None,
        };
        match &config.users {
            Some(users) => {
                info!(users = users.iter().count(), "clients must authenticate");
                for name in &users.plain_text {
                    warn!(user = %name, "password or token of this user is plain text in the config; store an argon2 hash (`sockbus passwd`) instead");
                }
            }
            None if config.allow_anonymous => {
                warn!("no users configured and --allow-anonymous: anyone who reaches a listener may publish, subscribe and manage streams")
            }
            None => {}
        }
        let tls = match &config.tls {
            Some(files) => {
                let tls = Tls::load(files.clone()).context("TLS")?;
                if config.cluster.is_some() && tls.route_connector().is_none() {
                    anyhow::bail!("TLS with --cluster needs --cluster-tls-ca or --tls-client-ca: the CA the peers' certificates are verified against");
                }
                Some(Arc::new(tls))
            }
            None => None,
        };
        // One pass, each part handed the narrow handles it needs.
        let metrics = Arc::new(Metrics::default());
        let peers = Arc::new(PeerInterest::default());
        let open_files = FileCache::budget();
        info!(
            "stream files: at most {open_files} kept open (half the open-file limit), the rest is for connections"
        );
        // Each account its own engine and streams; without a cluster port
        // there are never peers to tell of interest, and the routers keep no
        // second table of it.
        let accounts = Arc::new(Accounts::open(&config, &metrics, &peers, open_files)?);
        let delivery = accounts.default_account().delivery.clone();
        let streams = accounts.default_account().streams.clone();
        metrics.sources.register(Arc::new(ClusterMetrics {
            metrics: metrics.clone(),
            peers: peers.clone(),
            node: config.node_id.clone(),
            listen: config.cluster,
        }));
        metrics
            .sources
            .register(Arc::new(StreamsMetrics(streams.clone())));
        let users = config.users.clone().map(|u| {
            Arc::new(
                crate::auth::live::LiveUsers::new(
                    u,
                    config.config_users.clone(),
                    config.users_file.clone(),
                    config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
                )
                .with_accounts(
                    accounts
                        .all()
                        .iter()
                        .map(|a| a.name().to_string())
                        .collect(),
                ),
            )
        });
        metrics
            .sources
            .register(Arc::new(AccountMetrics(accounts.clone())));
        let mut config = config;
        // Port 0 picked a port: INFO and the docs name the real one.
        if let Some(l) = &nats_listener {
            config.nats = Some(l.local_addr()?);
        }
        let state = Arc::new(State {
            users,
            config,
            delivery,
            streams,
            accounts,
            peers,
            tls,
        });
        Ok(Server {
            state,
            listener,
            local_addr,
            route_listener,
            nats_listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Address of the cluster route listener, when `--cluster` is set.
    pub fn route_addr(&self) -> Option<SocketAddr> {
        self.route_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Address of the NATS listener, when `--nats` is set.
    pub fn nats_addr(&self) -> Option<SocketAddr> {
        self.state.config.nats
    }

    /// Lets direct delivery's route manager (when the fast path turned it
    /// on) follow the default account's subscriptions and streams; call
    /// after `accel::start`, on the runtime that serves.
    pub fn bind_direct_routes(&self) {
        let a = self.state.accounts.default_account();
        crate::accel::routes::bind(a.delivery.clone(), a.streams.clone());
    }

    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets every
    /// connection flush what it has queued, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            state,
            listener,
            local_addr,
            route_listener,
            nats_listener,
        } = self;
        // With NATS clients, a shutdown first puts the broker in lame duck
        // mode: they are told (INFO `ldm`) and get --lame-duck-grace to move
        // before the drain closes their connections.
        let lame_duck = CancellationToken::new();
        let outer = shutdown;
        let shutdown = CancellationToken::new();
        {
            let (outer, inner, ld) = (outer.clone(), shutdown.clone(), lame_duck.clone());
            let grace = match nats_listener {
                Some(_) => state.config.lame_duck_grace,
                None => Duration::ZERO,
            };
            tokio::spawn(async move {
                outer.cancelled().await;
                if !grace.is_zero() {
                    info!(
                        ?grace,
                        "lame duck mode: telling NATS clients to move before the drain"
                    );
                    ld.cancel();
                    tokio::time::sleep(grace).await;
                }
                inner.cancel();
            });
        }
        info!(addr = %local_addr, node = %state.config.node_id, max_payload = state.config.max_payload, tls = state.tls.is_some(), "listening for clients");
        let tracker = TaskTracker::new();
        if let Some(tls) = &state.tls {
            tracker.spawn(tls.clone().watch(shutdown.clone()));
        }
        if let Some(users) = state.users.as_ref().filter(|u| u.reloadable()) {
            tracker.spawn(users.clone().watch(shutdown.clone()));
        }
        if let Some(l) = route_listener {
            crate::cluster::start(state.clone(), l, &tracker, shutdown.clone());
        }
        crate::memory::configure();
        for a in state.accounts.all() {
            tracker.spawn(a.delivery.clone().give_back_memory(shutdown.clone()));
        }
        let limit = Arc::new(Semaphore::new(state.config.max_connections));
        if let Some(l) = nats_listener {
            crate::nats::start(
                state.clone(),
                l,
                limit.clone(),
                &tracker,
                lame_duck.clone(),
                shutdown.clone(),
            );
        }
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("accept failed: {e}");
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
                warn!(%peer, limit = state.config.max_connections, "connection refused: at the connection limit");
                if state.tls.is_some() {
                    // A plain ERR means nothing to a TLS client; a TLS
                    // session per refusal costs what the limit protects.
                    drop(stream);
                    continue;
                }
                tracker.spawn(async move {
                    let mut stream = stream;
                    let mut b = BytesMut::new();
                    encode_err(
                        &mut b,
                        code::MAX_CONNECTIONS,
                        "broker is at its connection limit",
                    );
                    crate::transport::refuse(&mut stream, &b).await;
                });
                continue;
            };
            let id = state.delivery.next_id();
            let st = state.clone();
            let sd = shutdown.clone();
            tracker.spawn(async move {
                let m = st.metrics();
                m.connections.fetch_add(1, Ordering::Relaxed);
                m.connections_total.fetch_add(1, Ordering::Relaxed);
                crate::conn::run(st.clone(), stream, peer, id, sd).await;
                st.metrics().connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        drop(listener);
        tracker.close();
        let open = tracker.len();
        info!(connections = open, "shutting down: draining connections");
        if tokio::time::timeout(
            state.config.drain_timeout + Duration::from_secs(1),
            tracker.wait(),
        )
        .await
        .is_err()
        {
            warn!("drain timed out; exiting with connections still open");
        }
        info!("shutdown complete");
        Ok(())
    }
}
