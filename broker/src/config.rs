//! Broker configuration: command-line flags, `SOCKBUS_*` variables and a
//! TOML file, in that order of precedence, validated once at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::auth::Users;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
pub const DEFAULT_CLUSTER: &str = "127.0.0.1:7421";
pub const DEFAULT_HTTP: &str = "127.0.0.1:7480";
/// About 11 MiB of broker memory per connection at the measured size of a
/// subscription (docs/operations.md, "Memory").
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    #[default]
    Auto,
    On,
    Off,
}

/// `--accel-direct`: whether same-node messages may skip the broker
/// process (docs/fast-path.md, "Direct delivery").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A byte count written as `1048576`, `512KiB`, `1MiB`, `2GiB` (or KB/MB/GB, also powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (examples: 1048576, 512KiB, 1MiB)"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} in {s:?} (use KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `50us`, `250ms`, `10s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (examples: 250ms, 10s, 5m)"))?;
        let d = match unit {
            "us" | "µs" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            u => {
                return Err(format!(
                    "unknown duration unit {u:?} in {s:?} (use us, ms, s, m or h)"
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Every broker setting as given by flags, environment or file; all optional.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Native protocol listen address.
    #[arg(long, env = "SOCKBUS_LISTEN")]
    pub listen: Option<String>,
    /// HTTP gateway, metrics and status page listen address, or `off` (default 127.0.0.1:7480).
    #[arg(long, env = "SOCKBUS_HTTP")]
    pub http: Option<String>,
    /// Most concurrent HTTP connections, SSE streams included (default 65536).
    #[arg(long, env = "SOCKBUS_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// An HTTP request head (or the next one on a kept-alive connection) must arrive within this (default 10s).
    #[arg(long, env = "SOCKBUS_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: Option<Dur>,
    /// An HTTP request body must arrive completely within this (default 30s).
    #[arg(long, env = "SOCKBUS_HTTP_BODY_TIMEOUT")]
    pub http_body_timeout: Option<Dur>,
    /// Cluster route listen address.
    #[arg(long, env = "SOCKBUS_CLUSTER")]
    pub cluster: Option<String>,
    /// NATS client protocol listen address (4222 by convention; off by default). docs/nats.md.
    #[arg(long, env = "SOCKBUS_NATS")]
    pub nats: Option<String>,
    /// On SIGTERM, NATS clients are told the broker goes away (lame duck
    /// mode) this long before the drain starts, so they can move (default 2s; 0 skips it).
    #[arg(long, env = "SOCKBUS_LAME_DUCK_GRACE")]
    pub lame_duck_grace: Option<Dur>,
    /// Cluster peers, comma separated (sockbus-route://host:port).
    #[arg(long, env = "SOCKBUS_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Shared secret cluster routes authenticate with (every broker of the
    /// cluster needs the same one); without it any process that reaches
    /// the cluster port can join.
    #[arg(long, env = "SOCKBUS_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
    /// Reads the cluster secret from this file (a mounted Kubernetes
    /// Secret); surrounding whitespace is ignored.
    #[arg(long, env = "SOCKBUS_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// This broker's name in the cluster (defaults to the host name).
    #[arg(long, env = "SOCKBUS_NODE_ID")]
    pub node_id: Option<String>,
    /// Where durable data lives.
    #[arg(long, env = "SOCKBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML file with any of these settings (kebab-case keys).
    #[arg(long, env = "SOCKBUS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// eBPF same-node fast path.
    #[arg(long, env = "SOCKBUS_ACCEL", value_enum)]
    pub accel: Option<AccelMode>,
    /// Ports the fast path accelerates, comma separated (default: the --listen port).
    #[arg(long, env = "SOCKBUS_ACCEL_PORTS", value_delimiter = ',')]
    pub accel_ports: Option<Vec<u16>>,
    /// cgroup v2 directory the fast path attaches at, absolute or relative to the cgroup v2 root (default: the root).
    #[arg(long, env = "SOCKBUS_ACCEL_CGROUP")]
    pub accel_cgroup: Option<PathBuf>,
    /// A fast-path connection whose socket takes none of a batch of bytes for this long is closed as a send stall (default 5s; 0 turns the guard off).
    #[arg(long, env = "SOCKBUS_ACCEL_STALL_TIMEOUT")]
    pub accel_stall_timeout: Option<Dur>,
    /// Direct delivery on the fast path: a same-node PUB to a subject with one plain subscriber goes straight into its socket (default off: until it is faster for streaming pub/sub, see docs/fast-path.md).
    #[arg(long, env = "SOCKBUS_ACCEL_DIRECT", value_enum)]
    pub accel_direct: Option<OnOff>,
    /// Largest payload accepted (default 1MiB).
    #[arg(long, env = "SOCKBUS_MAX_PAYLOAD")]
    pub max_payload: Option<ByteSize>,
    /// Most concurrent client connections (default 65536).
    #[arg(long, env = "SOCKBUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most subscriptions one client connection may hold; 0: no limit (default 65536).
    #[arg(long, env = "SOCKBUS_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Most durable streams this broker holds; creating one more is refused (default 10000).
    #[arg(long, env = "SOCKBUS_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Outbound bytes held per connection before it is closed as a slow consumer (default 64MiB).
    #[arg(long, env = "SOCKBUS_MAX_PENDING")]
    pub max_pending: Option<ByteSize>,
    /// A write to a client that takes longer than this closes the connection (default 10s).
    #[arg(long, env = "SOCKBUS_WRITE_TIMEOUT")]
    pub write_timeout: Option<Dur>,
    /// Send a PING to a connection that sent nothing for this long (default 2m).
    #[arg(long, env = "SOCKBUS_PING_INTERVAL")]
    pub ping_interval: Option<Dur>,
    /// Close a connection that left this many PINGs unanswered when the next one is due (default 2).
    #[arg(long, env = "SOCKBUS_MAX_PINGS_OUT")]
    pub max_pings_out: Option<u32>,
    /// How long SIGTERM waits for connections to drain (default 10s).
    #[arg(long, env = "SOCKBUS_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<Dur>,
    /// Log format on stderr.
    #[arg(long, env = "SOCKBUS_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Keep polling the sockets for this long after the last read or write
    /// instead of sleeping (e.g. 200us; default off). Lower latency for one
    /// core's worth of CPU while traffic flows; the broker then runs its
    /// connections on one thread. docs/operations.md, "Busy-polling".
    #[arg(long, env = "SOCKBUS_BUSY_POLL")]
    pub busy_poll: Option<Dur>,
    /// Serve clients without users on addresses other than loopback
    /// (default false: with no `[[users]]` every listener must be loopback).
    #[arg(long, env = "SOCKBUS_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous: Option<bool>,
    /// Users, from the TOML file only (`[[users]]` tables; docs/security.md).
    #[arg(skip)]
    pub users: Option<Vec<crate::auth::UserConfig>>,
    /// TOML file of `[[users]]` tables (a mounted Kubernetes Secret), in
    /// addition to those of `--config`.
    #[arg(long, env = "SOCKBUS_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// Per-account limits, from the TOML file only (`[[accounts]]` tables;
    /// docs/security.md, "Accounts").
    #[arg(skip)]
    pub accounts: Option<Vec<AccountConfig>>,
    /// PEM certificate chain: TLS on every listener (with `--tls-key`).
    #[arg(long, env = "SOCKBUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SOCKBUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients (and peers) must present a certificate
    /// that chains to one of them (mTLS).
    #[arg(long, env = "SOCKBUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA certificates the peers this broker dials must chain to
    /// (default: `--tls-client-ca`).
    #[arg(long, env = "SOCKBUS_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
}

/// The validated configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// HTTP gateway address; None: no HTTP.
    pub http: Option<SocketAddr>,
    /// False when `http` is only the default: if that address is taken the
    /// broker runs without HTTP (with a warning) instead of refusing to start.
    pub http_explicit: bool,
    pub http_max_connections: usize,
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    pub cluster: Option<SocketAddr>,
    /// NATS client protocol address; None: no NATS front end.
    pub nats: Option<SocketAddr>,
    /// How long NATS clients get to move away after SIGTERM (lame duck).
    pub lame_duck_grace: Duration,
    pub peers: Vec<String>,
    /// Shared secret of cluster routes (cluster/auth.rs); None: routes are
    /// not authenticated.
    pub cluster_secret: Option<Secret>,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub accel: AccelMode,
    /// Ports the fast path accelerates; empty = the listen port.
    pub accel_ports: Vec<u16>,
    /// cgroup the fast path attaches at; None = the cgroup v2 root.
    pub accel_cgroup: Option<PathBuf>,
    /// The stall guard's timeout; zero: no guard.
    pub accel_stall_timeout: Duration,
    /// Direct delivery wanted (it still needs the fast path and its self-test).
    pub accel_direct: bool,
    pub max_payload: u32,
    pub max_connections: usize,
    /// Subscriptions per connection; 0: no limit.
    pub max_subscriptions: usize,
    /// Most durable streams; streams found on disk beyond it still open.
    pub max_streams: usize,
    pub max_pending: usize,
    pub write_timeout: Duration,
    /// Keepalive: a connection silent this long gets a PING.
    pub ping_interval: Duration,
    /// Keepalive: PINGs left unanswered before the connection is closed as stale.
    pub max_pings_out: u32,
    pub drain_timeout: Duration,
    pub handshake_timeout: Duration,
    pub log_format: LogFormat,
    /// Receive window announced to clients (bytes).
    pub recv_window: u32,
    /// Busy-poll window; None: sleep when idle (the default).
    pub busy_poll: Option<Duration>,
    /// Configured users; None: no authentication (loopback only unless
    /// `allow_anonymous`).
    pub users: Option<Arc<Users>>,
    /// `--users-file`: reread on SIGHUP and when it changes (auth/live.rs).
    pub users_file: Option<PathBuf>,
    /// The `[[users]]` of `--config`, which a reload keeps beside the file's.
    pub config_users: Vec<crate::auth::UserConfig>,
    pub allow_anonymous: bool,
    /// Limits of the accounts that have an `[[accounts]]` table.
    pub accounts: Vec<AccountLimits>,
    /// TLS on every listener; None: plain TCP.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// A secret from the command line, environment or config file: never
/// printed (`Debug` shows `<redacted>`).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl Secret {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Config {
    /// The largest receive window a client may declare: the larger of
    /// `max_pending` and the default window (so a client that declares 0, or
    /// the SDK's default, always fits). On the eBPF fast path the kernel holds
    /// up to this much for a client that stops reading.
    pub fn max_client_window(&self) -> u32 {
        let pending = u32::try_from(self.max_pending).unwrap_or(u32::MAX);
        pending.max(sockbus_protocol::flow::effective_window(
            0,
            self.max_payload,
        ))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            http: None,
            http_explicit: false,
            http_max_connections: 65536,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            cluster: None,
            nats: None,
            lame_duck_grace: Duration::from_secs(2),
            peers: Vec::new(),
            cluster_secret: None,
            node_id: default_node_id(),
            data_dir: PathBuf::from("./sockbus-data"),
            accel: AccelMode::Auto,
            accel_ports: Vec::new(),
            accel_cgroup: None,
            accel_stall_timeout: Duration::from_secs(5),
            accel_direct: false,
            max_payload: sockbus_protocol::DEFAULT_MAX_PAYLOAD,
            max_connections: 65536,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_streams: crate::streams::DEFAULT_MAX_STREAMS,
            max_pending: 64 << 20,
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
            drain_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            log_format: LogFormat::Text,
            recv_window: 8 << 20,
            busy_poll: None,
            users: None,
            users_file: None,
            config_users: Vec::new(),
            accounts: Vec::new(),
            allow_anonymous: false,
            tls: None,
        }
    }
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sockbus".to_string())
}

/// Parses `host:port`, optionally with a `sockbus://` / `http://` scheme.
pub fn parse_addr(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    let bare = s
        .split_once("://")
        .map_or(s, |(_, rest)| rest)
        .trim_end_matches('/');
    use std::net::ToSocketAddrs;
    bare.to_socket_addrs()
        .with_context(|| format!("--{what} {s:?} is not a host:port address"))?
        .next()
        .with_context(|| format!("--{what} {s:?} resolves to no address"))
}

/// A `--users-file`: `[[users]]` tables and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<crate::auth::UserConfig>,
}

/// Reads the `[[users]]` of a `--users-file`; one that holds none is an
/// error (a Secret created empty by mistake would otherwise mean "no
/// authentication").
pub fn read_users_file(path: &std::path::Path) -> anyhow::Result<Vec<crate::auth::UserConfig>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --users-file {}", path.display()))?;
    let f: UsersFile = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map_or(0, |sp| text[..sp.start].lines().count().max(1));
        anyhow::anyhow!(
            "invalid --users-file {} (line {line}): {}",
            path.display(),
            e.message().trim()
        )
    })?;
    if f.users.is_empty() {
        bail!("--users-file {} holds no [[users]] table", path.display());
    }
    Ok(f.users)
}

impl Options {
    /// Merges flags/environment (self) over the TOML file, then over defaults.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<Options>(&text).map_err(|e| {
                    let line = e
                        .span()
                        .map_or(0, |sp| text[..sp.start].lines().count().max(1));
                    anyhow::anyhow!(
                        "invalid config file {} (line {line}): {}",
                        path.display(),
                        e.message().trim()
                    )
                })?
            }
            None => Options::default(),
        };
        let o = self.merge(file);
        let d = Config::default();
        let max_payload = o.max_payload.map_or(d.max_payload as u64, |b| b.0);
        if max_payload == 0 || max_payload > 64 << 20 {
            bail!("--max-payload must be between 1 byte and 64MiB, got {max_payload}");
        }
        let max_pending = o.max_pending.map_or(d.max_pending as u64, |b| b.0);
        if max_pending < 2 * max_payload {
            bail!("--max-pending ({max_pending} bytes) must be at least twice --max-payload ({max_payload} bytes)");
        }
        let max_connections = o.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        let ping_interval = o.ping_interval.map_or(d.ping_interval, |x| x.0);
        if ping_interval.is_zero() {
            bail!("--ping-interval must be longer than 0 (e.g. 2m)");
        }
        let max_pings_out = o.max_pings_out.unwrap_or(d.max_pings_out);
        if max_pings_out == 0 {
            bail!("--max-pings-out must be at least 1");
        }
        let write_timeout = o.write_timeout.map_or(d.write_timeout, |x| x.0);
        if write_timeout.is_zero() {
            bail!("--write-timeout must be longer than 0 (e.g. 10s)");
        }
        let max_streams = o.max_streams.unwrap_or(d.max_streams);
        if max_streams == 0 {
            bail!("--max-streams must be at least 1");
        }
        let (http, http_explicit) = match o.http.as_deref().map(str::trim) {
            None => (Some(parse_addr("http", DEFAULT_HTTP)?), false),
            Some("off" | "none" | "") => (None, true),
            Some(s) => (Some(parse_addr("http", s)?), true),
        };
        let http_max_connections = o.http_max_connections.unwrap_or(d.http_max_connections);
        if http_max_connections == 0 {
            bail!("--http-max-connections must be at least 1");
        }
        let cfg = Config {
            listen: parse_addr("listen", o.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?,
            http,
            http_explicit,
            http_max_connections,
            http_header_timeout: o.http_header_timeout.map_or(d.http_header_timeout, |x| x.0),
            http_body_timeout: o.http_body_timeout.map_or(d.http_body_timeout, |x| x.0),
            cluster: o
                .cluster
                .as_deref()
                .map(|s| parse_addr("cluster", s))
                .transpose()?,
            nats: o
                .nats
                .as_deref()
                .map(|s| parse_addr("nats", s))
                .transpose()?,
            lame_duck_grace: o.lame_duck_grace.map_or(d.lame_duck_grace, |x| x.0),
            peers: o.peers.unwrap_or_default(),
            cluster_secret: match (o.cluster_secret, &o.cluster_secret_file) {
                (Some(_), Some(_)) => {
                    bail!("give --cluster-secret or --cluster-secret-file, not both")
                }
                (Some(s), None) if s.0.trim().is_empty() => {
                    bail!("--cluster-secret is empty: give a secret, or leave the option out")
                }
                (Some(s), None) => Some(s),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("--cluster-secret-file {}: {e}", path.display())
                    })?;
                    if text.trim().is_empty() {
                        bail!("--cluster-secret-file {} is empty", path.display());
                    }
                    Some(Secret(text.trim().to_string()))
                }
                (None, None) => None,
            },
            node_id: o.node_id.unwrap_or(d.node_id),
            data_dir: o.data_dir.unwrap_or(d.data_dir),
            accel: o.accel.unwrap_or_default(),
            accel_ports: o.accel_ports.unwrap_or_default(),
            accel_cgroup: o.accel_cgroup,
            accel_stall_timeout: o.accel_stall_timeout.map_or(d.accel_stall_timeout, |x| x.0),
            accel_direct: o.accel_direct.map_or(d.accel_direct, |x| x == OnOff::On),
            max_payload: max_payload as u32,
            max_connections,
            max_subscriptions: o.max_subscriptions.unwrap_or(d.max_subscriptions),
            max_streams,
            max_pending: max_pending as usize,
            write_timeout,
            ping_interval,
            max_pings_out,
            drain_timeout: o.drain_timeout.map_or(d.drain_timeout, |x| x.0),
            handshake_timeout: d.handshake_timeout,
            log_format: o.log_format.unwrap_or_default(),
            recv_window: d.recv_window,
            busy_poll: o.busy_poll.map(|x| x.0).filter(|d| !d.is_zero()),
            config_users: o.users.clone().unwrap_or_default(),
            users_file: o.users_file.clone(),
            users: {
                let mut list = o.users.unwrap_or_default();
                if let Some(path) = &o.users_file {
                    list.extend(read_users_file(path)?);
                }
                if list.is_empty() {
                    None
                } else {
                    let users = Users::from_config(list).with_context(|| match &o.users_file {
                        Some(p) => format!("users in --config and --users-file {}", p.display()),
                        None => "users in --config".into(),
                    })?;
                    Some(Arc::new(users))
                }
            },
            allow_anonymous: o.allow_anonymous.unwrap_or(false),
            accounts: AccountLimits::from_config(o.accounts.unwrap_or_default())?,
            tls: match (o.tls_cert, o.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: o.tls_client_ca,
                    cluster_ca: o.cluster_tls_ca,
                }),
                (None, None) => {
                    if o.tls_client_ca.is_some() || o.cluster_tls_ca.is_some() {
                        bail!("--tls-client-ca and --cluster-tls-ca need --tls-cert and --tls-key");
                    }
                    None
                }
                (Some(_), None) => {
                    bail!("--tls-cert needs --tls-key (the certificate's private key)")
                }
                (None, Some(_)) => {
                    bail!("--tls-key needs --tls-cert (the certificate it goes with)")
                }
            },
        };
        if cfg
            .users
            .as_ref()
            .is_some_and(|u| u.has_certificate_users())
            && cfg.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            bail!("a [[users]] table names its user by `certificate`, but no client certificates are verified: give --tls-client-ca (with --tls-cert and --tls-key)");
        }
        if cfg.users.is_none() && !cfg.allow_anonymous {
            let open = [
                ("listen", Some(cfg.listen)),
                ("http", cfg.http),
                ("cluster", cfg.cluster),
                ("nats", cfg.nats),
            ]
            .into_iter()
            .find_map(|(flag, a)| a.filter(|a| !a.ip().is_loopback()).map(|a| (flag, a)));
            if let Some((flag, addr)) = open {
                bail!(
                    "--{flag} {addr} is not a loopback address and no users are configured: \
                     anyone who reaches it could publish, subscribe and manage streams. \
                     Configure [[users]] in the --config file, or pass --allow-anonymous \
                     (SOCKBUS_ALLOW_ANONYMOUS=true, allow-anonymous = true) to serve without authentication"
                );
            }
        }
        if let Some(n) = cfg.nats.filter(|n| cfg.accel_ports.contains(&n.port())) {
            // The fast path ignores the receiver's socket buffer; native
            // connections are bounded by their credit window, NATS has none.
            bail!(
                "--accel-ports includes the NATS port {}: the fast path would let a NATS \
                 subscriber that stops reading queue without bound in the kernel (NATS has no \
                 credit window); accelerate the native port only",
                n.port()
            );
        }
        if cfg.busy_poll.is_some_and(|d| d > Duration::from_secs(1)) {
            bail!("--busy-poll is a window after each message, at most 1s (e.g. 200us); 0 turns it off");
        }
        if cfg.node_id.is_empty() || cfg.node_id.contains(char::is_whitespace) {
            bail!(
                "--node-id {:?} must be non-empty without spaces",
                cfg.node_id
            );
        }
        Ok(cfg)
    }

    fn merge(self, file: Options) -> Options {
        Options {
            listen: self.listen.or(file.listen),
            http: self.http.or(file.http),
            http_max_connections: self.http_max_connections.or(file.http_max_connections),
            http_header_timeout: self.http_header_timeout.or(file.http_header_timeout),
            http_body_timeout: self.http_body_timeout.or(file.http_body_timeout),
            cluster: self.cluster.or(file.cluster),
            nats: self.nats.or(file.nats),
            lame_duck_grace: self.lame_duck_grace.or(file.lame_duck_grace),
            peers: self.peers.or(file.peers),
            cluster_secret: self.cluster_secret.or(file.cluster_secret),
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            node_id: self.node_id.or(file.node_id),
            data_dir: self.data_dir.or(file.data_dir),
            config: self.config,
            accel: self.accel.or(file.accel),
            accel_ports: self.accel_ports.or(file.accel_ports),
            accel_cgroup: self.accel_cgroup.or(file.accel_cgroup),
            accel_stall_timeout: self.accel_stall_timeout.or(file.accel_stall_timeout),
            accel_direct: self.accel_direct.or(file.accel_direct),
            max_payload: self.max_payload.or(file.max_payload),
            max_connections: self.max_connections.or(file.max_connections),
            max_subscriptions: self.max_subscriptions.or(file.max_subscriptions),
            max_streams: self.max_streams.or(file.max_streams),
            max_pending: self.max_pending.or(file.max_pending),
            write_timeout: self.write_timeout.or(file.write_timeout),
            ping_interval: self.ping_interval.or(file.ping_interval),
            max_pings_out: self.max_pings_out.or(file.max_pings_out),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            log_format: self.log_format.or(file.log_format),
            busy_poll: self.busy_poll.or(file.busy_poll),
            allow_anonymous: self.allow_anonymous.or(file.allow_anonymous),
            users: file.users,
            users_file: self.users_file.or(file.users_file),
            accounts: file.accounts,
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
            cluster_tls_ca: self.cluster_tls_ca.or(file.cluster_tls_ca),
        }
    }
}

/// One `[[accounts]]` table of the config file, as written: the limits of
/// the account of that name (absent: unlimited, or the broker-wide limit).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AccountConfig {
    pub name: String,
    pub max_connections: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_streams: Option<usize>,
    pub max_stored_bytes: Option<ByteSize>,
}

/// An account's validated limits; None: no limit of the account's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountLimits {
    pub name: String,
    /// Native client connections at once.
    pub max_connections: Option<usize>,
    /// Subscriptions of all the account's connections together.
    pub max_subscriptions: Option<usize>,
    /// Durable streams.
    pub max_streams: Option<usize>,
    /// Bytes stored in all the account's streams together.
    pub max_stored_bytes: Option<u64>,
}

/// Is `name` usable as an account name: the default account, or a subject
/// token of letters, digits, `-` and `_` (it names a directory and travels
/// as a token on cluster routes).
pub fn valid_account_name(name: &str) -> bool {
    name == crate::auth::DEFAULT_ACCOUNT
        || (!name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

impl AccountLimits {
    /// Validates the `[[accounts]]` tables: a usable name, no name twice,
    /// every limit at least 1 (leave it out for none).
    pub fn from_config(list: Vec<AccountConfig>) -> anyhow::Result<Vec<AccountLimits>> {
        let mut out: Vec<AccountLimits> = Vec::new();
        for a in list {
            let name = a.name;
            if !valid_account_name(&name) {
                bail!("[[accounts]]: name {name:?} must be 1 to 64 letters, digits, '-' or '_' (or \"$default\")");
            }
            if out.iter().any(|o| o.name == name) {
                bail!("[[accounts]]: account {name:?} is configured twice");
            }
            let at_least_one = |key: &str, v: Option<u64>| -> anyhow::Result<()> {
                if v == Some(0) {
                    bail!("[[accounts]] {name:?}: {key} must be at least 1 (leave it out for no limit)");
                }
                Ok(())
            };
            at_least_one("max-connections", a.max_connections.map(|v| v as u64))?;
            at_least_one("max-subscriptions", a.max_subscriptions.map(|v| v as u64))?;
            at_least_one("max-streams", a.max_streams.map(|v| v as u64))?;
            at_least_one("max-stored-bytes", a.max_stored_bytes.map(|v| v.0))?;
            out.push(AccountLimits {
                name,
                max_connections: a.max_connections,
                max_subscriptions: a.max_subscriptions,
                max_streams: a.max_streams,
                max_stored_bytes: a.max_stored_bytes.map(|b| b.0),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert_eq!("42".parse::<ByteSize>().unwrap().0, 42);
        assert!("1XB".parse::<ByteSize>().is_err());
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!(
            "200us".parse::<Dur>().unwrap().0,
            Duration::from_micros(200)
        );
        assert!("soon".parse::<Dur>().is_err());
    }

    #[test]
    fn tls_needs_both_the_certificate_and_the_key_and_reads_the_file() {
        let e = Options {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-key"), "{e}");
        let e = Options {
            tls_client_ca: Some("ca.pem".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-cert"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "tls-cert = \"/etc/sockbus/tls.crt\"\ntls-key = \"/etc/sockbus/tls.key\"\n",
        )
        .unwrap();
        let tls = Options {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/sockbus/tls.crt"));
        assert_eq!(tls.client_ca, None);
    }

    #[test]
    fn busy_poll_is_off_by_default_off_at_zero_and_bounded() {
        let resolve = |v: Option<&str>| {
            Options {
                busy_poll: v.map(|v| v.parse().unwrap()),
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(resolve(None).unwrap().busy_poll, None);
        assert_eq!(resolve(Some("0")).unwrap().busy_poll, None);
        assert_eq!(
            resolve(Some("200us")).unwrap().busy_poll,
            Some(Duration::from_micros(200))
        );
        let e = resolve(Some("5s")).unwrap_err().to_string();
        assert!(e.contains("--busy-poll"), "{e}");
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9999\"\nmax-payload = \"2MiB\"\n",
        )
        .unwrap();
        let cfg = Options {
            config: Some(path.clone()),
            max_payload: Some(ByteSize(4096)),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.max_payload, 4096);
    }

    #[test]
    fn the_subscription_limit_is_bounded_by_default_and_comes_from_the_file_or_flag() {
        assert_eq!(
            Options::default().resolve().unwrap().max_subscriptions,
            DEFAULT_MAX_SUBSCRIPTIONS
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "max-subscriptions = 100\n").unwrap();
        let from_file = |flag: Option<usize>| {
            Options {
                config: Some(path.clone()),
                max_subscriptions: flag,
                ..Default::default()
            }
            .resolve()
            .unwrap()
            .max_subscriptions
        };
        assert_eq!(from_file(None), 100);
        assert_eq!(from_file(Some(0)), 0, "0: no limit");
    }

    #[test]
    fn keepalive_defaults_to_two_minutes_and_two_pings_and_reads_the_file() {
        let cfg = Options::default().resolve().unwrap();
        assert_eq!(cfg.ping_interval, Duration::from_secs(120));
        assert_eq!(cfg.max_pings_out, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "ping-interval = \"30s\"\nmax-pings-out = 5\n").unwrap();
        let cfg = Options {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.ping_interval, Duration::from_secs(30));
        assert_eq!(cfg.max_pings_out, 5);
        for (o, flag) in [
            (
                Options {
                    ping_interval: Some(Dur(Duration::ZERO)),
                    ..Default::default()
                },
                "--ping-interval",
            ),
            (
                Options {
                    max_pings_out: Some(0),
                    ..Default::default()
                },
                "--max-pings-out",
            ),
            (
                Options {
                    write_timeout: Some(Dur(Duration::ZERO)),
                    ..Default::default()
                },
                "--write-timeout",
            ),
        ] {
            let e = o.resolve().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn max_streams_defaults_to_ten_thousand_reads_the_file_and_refuses_zero() {
        assert_eq!(Options::default().resolve().unwrap().max_streams, 10_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "max-streams = 500\n").unwrap();
        let file = |flag: Option<usize>| {
            Options {
                config: Some(path.clone()),
                max_streams: flag,
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(file(None).unwrap().max_streams, 500);
        assert_eq!(file(Some(20_000)).unwrap().max_streams, 20_000);
        let e = format!("{:#}", file(Some(0)).unwrap_err());
        assert!(e.contains("--max-streams must be at least 1"), "{e}");
    }

    #[test]
    fn http_is_on_by_default_on_loopback_and_can_be_turned_off() {
        let cfg = Options::default().resolve().unwrap();
        assert_eq!(cfg.http, Some(DEFAULT_HTTP.parse().unwrap()));
        assert!(!cfg.http_explicit, "the default may give way");
        let cfg = Options {
            http: Some("off".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.http, None);
        let cfg = Options {
            http: Some("0.0.0.0:9480".into()),
            allow_anonymous: Some(true),
            http_body_timeout: Some("250ms".parse().unwrap()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.http, Some("0.0.0.0:9480".parse().unwrap()));
        assert!(cfg.http_explicit);
        assert_eq!(cfg.http_body_timeout, Duration::from_millis(250));
        assert_eq!(cfg.http_header_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = Options {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `lisen`"),
            "{err:#}"
        );
        let err = Options {
            max_payload: Some(ByteSize(0)),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--max-payload"));
        let err = Options {
            listen: Some("not an address".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--listen"));
    }

    fn from_toml(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, text).unwrap();
        Options {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
    }

    #[test]
    fn users_come_from_the_file_as_the_issue_shows_them() {
        let cfg = from_toml(
            r#"
listen = "0.0.0.0:7420"
[[users]]
name = "orders"
password = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$Kx+Hjz1+1Fv0Cx7u9Dq1XiLyqU6e2bHf0cVxQ4SnV1A"
account = "shop"
publish = ["orders.>"]
subscribe = ["orders.>", "_INBOX.>"]
publish-deny = ["orders.admin.>"]
subscribe-deny = []
[[users]]
name = "ci"
token = "plain-token"
"#,
        )
        .unwrap();
        let users = cfg.users.expect("users");
        let names: Vec<_> = users
            .iter()
            .map(|u| (u.name.as_str(), u.account.as_str()))
            .collect();
        assert_eq!(
            names,
            [("orders", "shop"), ("ci", crate::auth::DEFAULT_ACCOUNT)]
        );
        assert_eq!(users.plain_text, ["ci"]);
        let p = users
            .iter()
            .next()
            .unwrap()
            .perms
            .clone()
            .expect("restricted");
        assert!(p.publish.allows_subject("orders.new"));
        assert!(!p.publish.allows_subject("orders.admin.x"));
        assert!(
            users.iter().nth(1).unwrap().perms.is_none(),
            "no lists: everything"
        );
    }

    #[test]
    fn the_nats_port_is_off_by_default_and_set_in_the_file_and_needs_users_off_loopback() {
        let d = from_toml("").unwrap();
        assert_eq!(d.nats, None);
        assert_eq!(d.lame_duck_grace, Duration::from_secs(2));
        let cfg = from_toml("nats = \"127.0.0.1:4222\"\nlame-duck-grace = \"5s\"\n").unwrap();
        assert_eq!(cfg.nats, Some("127.0.0.1:4222".parse().unwrap()));
        assert_eq!(cfg.lame_duck_grace, Duration::from_secs(5));
        let e = format!("{:#}", from_toml("nats = \"0.0.0.0:4222\"\n").unwrap_err());
        assert!(e.contains("--nats 0.0.0.0:4222"), "{e}");
        let e = from_toml("nats = \"127.0.0.1:4222\"\naccel-ports = [7420, 4222]\n").unwrap_err();
        assert!(e.to_string().contains("NATS port 4222"), "{e}");
    }

    #[test]
    fn bad_users_fail_at_start_with_the_reason() {
        for (text, want) in [
            ("[[users]]\nname = \"a\"\npassword = \"x\"\npublsh = []\n", "unknown field `publsh`"),
            ("[[users]]\nname = \"a\"\npassword = \"x\"\npublish = [\"a.>.b\"]\n", "bad pattern"),
            ("[[users]]\nname = \"a\"\npassword = \"x\"\n[[users]]\nname = \"a\"\ntoken = \"y\"\n", "configured twice"),
        ] {
            let e = format!("{:#}", from_toml(text).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_users_file_adds_its_users_and_a_bad_one_fails_at_start_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users.toml");
        std::fs::write(&users, "[[users]]\nname = \"ci\"\ntoken = \"t\"\n").unwrap();
        let cfg = Options {
            users_file: Some(users.clone()),
            listen: Some("0.0.0.0:7420".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let names: Vec<_> = cfg.users.unwrap().iter().map(|u| u.name.clone()).collect();
        assert_eq!(names, ["ci"]);
        // Beside the config file's users; a name in both is refused.
        let conf = dir.path().join("b.toml");
        let with = |text: &str| {
            std::fs::write(&conf, text).unwrap();
            Options {
                config: Some(conf.clone()),
                ..Default::default()
            }
            .resolve()
        };
        let file_key = format!("users-file = {:?}\n", users.display().to_string());
        let cfg = with(&format!(
            "{file_key}[[users]]\nname = \"a\"\npassword = \"x\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.users.unwrap().iter().count(), 2);
        let e = format!(
            "{:#}",
            with(&format!(
                "{file_key}[[users]]\nname = \"ci\"\npassword = \"x\"\n"
            ))
            .unwrap_err()
        );
        assert!(
            e.contains("configured twice") && e.contains("--users-file"),
            "{e}"
        );
        for (text, want) in [
            ("", "holds no [[users]]"),
            ("listen = \"0.0.0.0:1\"\n", "unknown field `listen`"),
            ("[[users]]\nname = \"a\"\n", "exactly one of"),
            ("[[users", "line 1"),
        ] {
            std::fs::write(&users, text).unwrap();
            let e = format!("{:#}", with(&file_key).unwrap_err());
            assert!(
                e.contains(want) && e.contains("users.toml"),
                "{text:?}: {e}"
            );
        }
        std::fs::remove_file(&users).unwrap();
        let e = format!("{:#}", with(&file_key).unwrap_err());
        assert!(e.contains("cannot read --users-file"), "{e}");
    }

    #[test]
    fn a_certificate_user_needs_verified_client_certificates() {
        let e = format!(
            "{:#}",
            from_toml("[[users]]\nname = \"o\"\ncertificate = \"CN=o\"\n").unwrap_err()
        );
        assert!(e.contains("--tls-client-ca"), "{e}");
    }

    #[test]
    fn without_users_only_loopback_is_served_unless_anonymous_is_allowed() {
        for o in [
            Options {
                listen: Some("0.0.0.0:7420".into()),
                ..Default::default()
            },
            Options {
                http: Some("0.0.0.0:7480".into()),
                ..Default::default()
            },
            Options {
                cluster: Some("0.0.0.0:7421".into()),
                ..Default::default()
            },
        ] {
            let e = o.clone().resolve().unwrap_err().to_string();
            assert!(e.contains("--allow-anonymous"), "{e}");
            let ok = Options {
                allow_anonymous: Some(true),
                ..o
            }
            .resolve();
            assert!(ok.is_ok());
        }
        assert!(Options {
            listen: Some("[::1]:7420".into()),
            ..Default::default()
        }
        .resolve()
        .is_ok());
        let cfg = from_toml("listen = \"0.0.0.0:7420\"\nallow-anonymous = true\n").unwrap();
        assert!(cfg.allow_anonymous);
    }
}
