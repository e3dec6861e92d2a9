//! [`ConnectOptions`]: how a client connects and behaves, and the server
//! URLs it accepts.

use std::time::Duration;

use crate::client::Client;
use crate::connector;
use crate::error::{Error, Result};
use sockbus_protocol::Credentials;

/// What the client does with a message for a subscription whose buffer is
/// full (its subscriber is slower than the messages come).
///
/// The read side is one per connection, shared by all its subscriptions
/// and requests, and messages are handled in the order they arrive: a
/// subscription cannot wait alone without the others losing their order or
/// their messages. So the choice is the connection's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop the message and count it ([`Subscriber::dropped`]); the other
    /// subscriptions, requests and flushes of the connection go on. Right
    /// for a client with many subscriptions, where one slow reader must not
    /// hold up the rest.
    ///
    /// [`Subscriber::dropped`]: crate::Subscriber::dropped
    #[default]
    Drop,
    /// Keep the message and stop handling the connection's input until the
    /// subscriber takes one: nothing is dropped here. Everything behind it
    /// waits too (other subscriptions, replies, flushes), the client stops
    /// granting the broker credit, and the broker holds what it would send,
    /// up to its `--max-pending`, then closes the connection as a slow
    /// consumer (counted in its metrics), which
    /// [`Client::disconnected`](crate::Client::disconnected) reports. Right
    /// for one reader that must see everything or fail loudly (`sockbus sub`);
    /// give such a subscription a connection of its own.
    Wait,
}

/// How a client connects and behaves. Start from `ConnectOptions::default()`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub(crate) name: String,
    /// The CONNECT credentials field, encoded (empty: none).
    pub(crate) token: Secret,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) max_reconnect_delay: Duration,
    pub(crate) max_reconnects: Option<usize>,
    pub(crate) sub_capacity: usize,
    pub(crate) sub_pending_bytes: usize,
    pub(crate) overflow: Overflow,
    pub(crate) send_buffer: usize,
    pub(crate) recv_window: u32,
    pub(crate) no_echo: bool,
    pub(crate) frame_aligned_sends: bool,
    pub(crate) ping_interval: Duration,
    pub(crate) max_pings_out: u32,
    pub(crate) tls: crate::tls::TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            name: String::new(),
            token: Secret::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(2),
            max_reconnects: None,
            sub_capacity: 65536,
            sub_pending_bytes: 64 << 20,
            overflow: Overflow::Drop,
            send_buffer: 32 << 20,
            recv_window: 8 << 20,
            no_echo: false,
            frame_aligned_sends: false,
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
            tls: Default::default(),
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
    /// Authenticate with a token (a `[[users]]` entry with `token`).
    pub fn token(mut self, token: impl AsRef<[u8]>) -> Self {
        self.token = Secret(Credentials::Token(token.as_ref()).encode());
        self
    }
    /// Authenticate as a user with a password.
    pub fn user_password(mut self, user: &str, password: &str) -> Self {
        self.token = Secret(
            Credentials::UserPassword {
                user,
                password: password.as_bytes(),
            }
            .encode(),
        );
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
    /// What happens to a message for a subscription whose buffer
    /// ([`subscription_capacity`](Self::subscription_capacity),
    /// [`subscription_pending_bytes`](Self::subscription_pending_bytes)) is
    /// full: dropped and counted (the default), or held while the whole
    /// connection waits. See [`Overflow`].
    pub fn when_subscription_full(mut self, o: Overflow) -> Self {
        self.overflow = o;
        self
    }
    /// Bytes of unsent frames after which `publish` waits (backpressure).
    pub fn send_buffer(mut self, n: usize) -> Self {
        self.send_buffer = n.max(64 * 1024);
        self
    }
    /// Flow-control window announced to the broker (0: the default, 8 MiB).
    /// The broker refuses a window larger than its per-connection budget
    /// (`--max-pending`, 64 MiB by default): connecting then fails with its
    /// reason.
    pub fn receive_window(mut self, n: u32) -> Self {
        self.recv_window = n;
        self
    }
    /// Cut every send at a frame boundary, at most 64 KiB of whole frames
    /// (a larger frame alone), instead of sending all that is queued in one
    /// write. With the broker's direct delivery on (docs/fast-path.md,
    /// "Direct delivery") this keeps every publish eligible to go straight
    /// into its subscriber's socket: the kernel cuts sends of more than
    /// 64 KiB into pieces of its own, and a frame header cut between two
    /// pieces sends this connection through the broker for good. Off by
    /// default: the kernel then delivers direct one frame per verdict, which
    /// suits requests and replies but streams small messages several times
    /// slower than the broker's batched fast path (measured in
    /// docs/fast-path.md); a streaming publisher that loses alignment goes
    /// back to the batched path.
    pub fn frame_aligned_sends(mut self, yes: bool) -> Self {
        self.frame_aligned_sends = yes;
        self
    }
    /// Do not receive this client's own publishes on its subscriptions.
    pub fn no_echo(mut self, yes: bool) -> Self {
        self.no_echo = yes;
        self
    }

    /// Keepalive: after this long without anything from the broker the
    /// client sends it a PING (default 2 minutes). See
    /// [`max_pings_out`](Self::max_pings_out).
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d.max(Duration::from_millis(1));
        self
    }
    /// Keepalive: a connection that left this many PINGs unanswered when
    /// the next one is due is stale: the client drops it and reconnects
    /// (default 2, so a dead broker is noticed within three intervals).
    pub fn max_pings_out(mut self, n: u32) -> Self {
        self.max_pings_out = n.max(1);
        self
    }

    /// PEM CA certificates a `sockbus+tls://` broker's certificate must
    /// chain to (default: the system's roots).
    pub fn tls_ca(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.ca = Some(path.into());
        self
    }

    /// A client certificate and its key (PEM), for brokers that require
    /// one (`--tls-client-ca`).
    pub fn tls_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.cert = Some(cert.into());
        self.tls.key = Some(key.into());
        self
    }

    /// Connects to the first reachable server of a comma-separated list.
    ///
    /// Credentials in a URL (`sockbus://NAME:PASSWORD@host:port`,
    /// `sockbus://TOKEN@host:port`, percent-encoded) apply when the options
    /// carry none.
    pub async fn connect(mut self, urls: &str) -> Result<Client> {
        let (urls, creds) = parse_urls(urls)?;
        if self.token.0.is_empty() {
            if let Some(c) = creds {
                self.token = c;
            }
        }
        connector::connect(self, urls).await
    }
}

/// Connects with default options.
pub async fn connect(urls: &str) -> Result<Client> {
    ConnectOptions::default().connect(urls).await
}

/// A secret that `Debug` never prints.
#[derive(Clone, Default)]
pub(crate) struct Secret(pub(crate) Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "none"
        } else {
            "<redacted>"
        })
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `NAME:PASSWORD` or `TOKEN`, percent-decoded, as the CONNECT field.
fn userinfo(u: &str, info: &str) -> Result<Secret> {
    let enc = match info.split_once(':') {
        Some((name, password)) => {
            let name = String::from_utf8(percent_decode(name))
                .map_err(|_| Error::InvalidUrl(u.to_string()))?;
            Credentials::UserPassword {
                user: &name,
                password: &percent_decode(password),
            }
            .encode()
        }
        None => Credentials::Token(&percent_decode(info)).encode(),
    };
    Ok(Secret(enc))
}

pub(crate) fn parse_urls(urls: &str) -> Result<(Vec<String>, Option<Secret>)> {
    let mut creds = None;
    let mut out = Vec::new();
    for raw in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        // Errors show the URL without its credentials.
        let shown = match raw.rsplit_once('@') {
            Some((info, host)) => match info.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***@{host}"),
                None => format!("***@{host}"),
            },
            None => raw.to_string(),
        };
        let u = shown.as_str();
        let mut tls = false;
        let bare = match raw.split_once("://") {
            Some(("sockbus" | "tcp", rest)) => rest,
            Some(("sockbus+tls", rest)) => {
                tls = true;
                rest
            }
            Some(_) => return Err(Error::InvalidUrl(u.to_string())),
            None => raw,
        }
        .trim_end_matches('/');
        let bare = match bare.rsplit_once('@') {
            Some((info, host)) => {
                if creds.is_none() && !info.is_empty() {
                    creds = Some(userinfo(u, info)?);
                }
                host
            }
            None => bare,
        };
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
        out.push(if tls {
            format!("{}{hostport}", crate::tls::TLS_SCHEME)
        } else {
            hostport
        });
    }
    if out.is_empty() {
        return Err(Error::InvalidUrl(urls.to_string()));
    }
    Ok((out, creds))
}
