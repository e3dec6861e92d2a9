//! One trait, two implementations: the scenarios drive sockbus (our SDK) and
//! NATS (async-nats) through exactly the same calls, so a difference in the
//! numbers is a difference in the brokers and their client libraries, not in
//! the load generator.
//!
//! The trait is generic (no boxing) so neither driver pays for dynamic
//! dispatch or a per-message allocation the other does not.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;

pub mod nats;
pub mod sockbus;

/// Which broker a URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Sockbus(String),
    Nats(String),
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        match url.split_once("://") {
            Some(("sockbus" | "sockbus+tls", rest)) if !rest.is_empty() => {
                Ok(Target::Sockbus(url.to_string()))
            }
            Some(("nats" | "tls", rest)) if !rest.is_empty() => Ok(Target::Nats(url.to_string())),
            _ => bail!("--target {url:?}: expected sockbus://HOST:PORT, nats://HOST:PORT, or over TLS sockbus+tls:// or tls:// (CA from SOCKBUS_TLS_CA)"),
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Target::Sockbus(u) | Target::Nats(u) => u,
        }
    }

    /// "sockbus" or "nats".
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Sockbus(_) => "sockbus",
            Target::Nats(_) => "nats",
        }
    }
}

/// The CA `compare --tls` made, in place of `SOCKBUS_TLS_CA`.
static TLS_CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Verifies TLS targets against `ca` from now on, whatever
/// `SOCKBUS_TLS_CA` says (`compare --tls`).
pub fn set_tls_ca(ca: std::path::PathBuf) {
    let _ = TLS_CA.set(ca);
}

/// The CA file TLS targets are verified against (`SOCKBUS_TLS_CA`), for
/// both drivers.
pub fn tls_ca() -> Option<std::path::PathBuf> {
    TLS_CA
        .get()
        .cloned()
        .or_else(|| std::env::var_os("SOCKBUS_TLS_CA").map(Into::into))
}

/// Per-connection settings the scenarios need from both clients.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Which server of a comma-separated target list to use: 0 is the
    /// first; 1, 2, … go round the others (cluster runs).
    pub server: usize,
    pub name: String,
    /// Messages a subscription may buffer in the client before it drops: set
    /// above the in-flight window so the client never drops by design.
    pub sub_capacity: usize,
    /// Same, in payload bytes (sockbus tracks both).
    pub sub_pending_bytes: usize,
}

/// The URL of server `i` of a comma-separated list (see [`ConnSettings::server`]).
/// `url` (a comma-separated list) without the credentials a URL may carry.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match u.rsplit_once('@') {
            Some((info, host)) => match info.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***@{host}"),
                None => format!("***@{host}"),
            },
            None => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn pick_server(list: &str, i: usize) -> &str {
    let urls: Vec<&str> = list.split(',').map(str::trim).collect();
    let n = urls.len();
    if i == 0 || n == 1 {
        urls[0]
    } else {
        urls[1 + (i - 1) % (n - 1)]
    }
}

/// A broker's client library, as the scenarios use it.
pub trait Driver: Send + Sync + 'static {
    type Conn: Conn;
    fn connect(
        &self,
        settings: ConnSettings,
    ) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
}

/// One connection. Clones share it.
pub trait Conn: Clone + Send + Sync + 'static {
    /// A subject in the form the client publishes fastest (prepared once).
    type Topic: Clone + Send + Sync + 'static;
    type Msg: Incoming;
    type Sub: Sub<Msg = Self::Msg>;

    fn topic(&self, subject: &str) -> Self::Topic;

    /// Publishes; returns once queued (may wait under backpressure).
    fn publish(
        &self,
        topic: &Self::Topic,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Self::Sub>> + Send;

    /// Sends a request and waits for the reply's payload.
    fn request(
        &self,
        topic: &Self::Topic,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = anyhow::Result<Bytes>> + Send;

    /// Answers a request received on a subscription.
    fn respond(
        &self,
        request: &Self::Msg,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Resolves once the broker has processed everything this connection
    /// sent before (a round trip), e.g. so a subscription is in place
    /// before another connection publishes.
    fn sync(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Durable streams: publish with a storage acknowledgement, read back.
/// NATS implements it with JetStream, sockbus with its streams.
pub trait Durable: Conn {
    /// Resolves once the broker has stored the message.
    type Ack: Future<Output = anyhow::Result<()>> + Send + 'static;

    /// Creates a file-backed stream named `name` capturing `subject`, kept
    /// in `replicas` copies (1: one server; 3 or 5: a cluster's replicated
    /// stream).
    fn create_stream(
        &self,
        name: &str,
        subject: &str,
        replicas: u32,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Publishes to a stream's subject; returns once sent, with the ack to await.
    fn publish_acked(
        &self,
        topic: &Self::Topic,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<Self::Ack>> + Send;

    /// Reads `count` messages from the start of the stream (no acks);
    /// returns how many arrived before the stream went quiet for `idle`.
    fn read_stream(
        &self,
        name: &str,
        count: u64,
        idle: Duration,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;

    fn delete_stream(&self, name: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A received message.
pub trait Incoming: Send + 'static {
    fn payload(&self) -> &[u8];
}

/// A subscription.
pub trait Sub: Send + 'static {
    type Msg: Incoming;
    /// The next message; None once the subscription ended.
    fn next(&mut self) -> impl Future<Output = Option<Self::Msg>> + Send;
    /// Messages the client library dropped because this subscription's
    /// buffer was full (slow consumer), as far as the library tells.
    fn dropped(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_pick_the_driver() {
        assert_eq!(
            Target::parse("sockbus://127.0.0.1:7420").unwrap(),
            Target::Sockbus("sockbus://127.0.0.1:7420".into())
        );
        assert_eq!(Target::parse("nats://h:4222").unwrap().kind(), "nats");
        for bad in ["127.0.0.1:7420", "http://x:1", "nats://", ""] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains("sockbus://HOST:PORT"), "{e}");
        }
    }
}
