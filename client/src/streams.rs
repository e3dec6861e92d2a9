//! Durable streams from the SDK: stored publishes with acks, stream
//! management and pull consumers. Everything goes over request/reply on the
//! broker's reserved `$SB.` subjects (see docs/storage.md).
//!
//! ```no_run
//! # async fn demo(client: sockbus_client::Client) -> sockbus_client::Result<()> {
//! use sockbus_client::streams::{ConsumerConfig, StreamConfig};
//! client.stream_add(&StreamConfig::new("ORDERS", ["orders.>"])).await?;
//! let ack = client.publish_durable("orders.eu", "hello").await?;
//! let mut c = client.consumer("ORDERS", ConsumerConfig::durable("worker")).await?;
//! let m = c.next().await?;
//! assert_eq!(m.seq, ack.seq);
//! m.ack().await?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sockbus_protocol::frame::code;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::subscriber::Subscriber;

pub use crate::client::MSG_ID_HEADER;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    #[default]
    Always,
    Interval,
    Never,
}

/// A stream's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    #[serde(default)]
    pub fsync: Fsync,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msgs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_ms: Option<u64>,
}

impl StreamConfig {
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        StreamConfig {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            fsync: Fsync::Always,
            fsync_interval_ms: None,
            max_age_ms: None,
            max_bytes: None,
            max_msgs: None,
            segment_bytes: None,
            duplicate_window_ms: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamState {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    #[serde(default)]
    pub first_ts: Option<String>,
    #[serde(default)]
    pub last_ts: Option<String>,
    pub segments: usize,
    pub consumers: usize,
    pub damaged_records: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamInfo {
    pub config: StreamConfig,
    pub state: StreamState,
}

/// The broker's answer to a stored publish.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PubAck {
    pub stream: String,
    pub seq: u64,
    /// The message carried a `Msg-Id` already stored within the duplicate window.
    #[serde(default)]
    pub duplicate: bool,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    First,
    Last,
    New,
    Seq(u64),
    Time(SystemTime),
}

impl Start {
    fn to_wire(&self) -> String {
        match self {
            Start::First => "first".into(),
            Start::Last => "last".into(),
            Start::New => "new".into(),
            Start::Seq(n) => format!("seq:{n}"),
            Start::Time(t) => format!("time:{}", humantime::format_rfc3339_nanos(*t)),
        }
    }
}

impl std::str::FromStr for Start {
    type Err = String;
    /// `first`, `last`, `new`, `seq:N` or `time:RFC3339`.
    fn from_str(s: &str) -> std::result::Result<Start, String> {
        let bad = || format!("{s:?} must be first, last, new, seq:N or time:RFC3339");
        Ok(match s {
            "first" => Start::First,
            "last" => Start::Last,
            "new" => Start::New,
            _ => {
                if let Some(n) = s.strip_prefix("seq:") {
                    Start::Seq(n.parse().map_err(|_| bad())?)
                } else if let Some(t) = s.strip_prefix("time:") {
                    Start::Time(humantime::parse_rfc3339_weak(t).map_err(|_| bad())?)
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

/// A consumer's settings; start from [`ConsumerConfig::durable`] or [`ConsumerConfig::ephemeral`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub durable: Option<String>,
    pub start: Start,
    pub filter_subject: Option<String>,
    /// No acks: every message is delivered once, as fast as possible.
    pub no_ack: bool,
    pub ack_wait: Duration,
    pub max_deliver: Option<u32>,
    pub max_ack_pending: Option<usize>,
    /// Messages asked for per pull (the flow-control window).
    pub batch: usize,
    /// How long one pull waits at the broker; a pull unanswered for this
    /// plus a second (lost with a broker restart) is sent again.
    pub pull_expires: Duration,
}

impl ConsumerConfig {
    pub fn durable(name: impl Into<String>) -> Self {
        ConsumerConfig {
            durable: Some(name.into()),
            ..Self::ephemeral()
        }
    }
    pub fn ephemeral() -> Self {
        ConsumerConfig {
            durable: None,
            start: Start::First,
            filter_subject: None,
            no_ack: false,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            max_ack_pending: None,
            batch: 256,
            pull_expires: Duration::from_secs(5),
        }
    }
    pub fn start(mut self, s: Start) -> Self {
        self.start = s;
        self
    }
    pub fn filter(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = Some(subject.into());
        self
    }
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = Some(n);
        self
    }
    pub fn no_ack(mut self, yes: bool) -> Self {
        self.no_ack = yes;
        self
    }
    pub fn pull_expires(mut self, d: Duration) -> Self {
        self.pull_expires = d.max(Duration::from_millis(10));
        self
    }
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
}

#[derive(Serialize)]
struct WireConsumer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    durable: Option<&'a str>,
    start: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter_subject: Option<&'a str>,
    ack_policy: &'static str,
    ack_wait_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_deliver: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ack_pending: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerInfo {
    pub stream: String,
    pub name: String,
    pub durable: bool,
    pub next_seq: u64,
    pub ack_floor: u64,
    pub num_ack_pending: usize,
    pub num_redelivered: u64,
}

/// Turns an API reply into `T`, or the broker's `{"error": ..}` into an error.
fn answer<T: for<'de> Deserialize<'de>>(m: &Message) -> Result<T> {
    #[derive(Deserialize)]
    struct E {
        error: String,
    }
    // The broker's error answers are `{"error":...}`; look for that before
    // parsing, so a successful answer is parsed once.
    if m.payload.starts_with(br#"{"error""#) {
        let e: E = serde_json::from_slice(&m.payload).map_err(|e| Error::Server {
            code: code::MALFORMED,
            message: format!("unexpected answer from the broker: {e}"),
        })?;
        return Err(Error::Server {
            code: code::BAD_REQUEST,
            message: e.error,
        });
    }
    serde_json::from_slice(&m.payload).map_err(|e| Error::Server {
        code: code::MALFORMED,
        message: format!("unexpected answer from the broker: {e}"),
    })
}

impl Client {
    async fn api<T: for<'de> Deserialize<'de>>(&self, subject: &str, body: Vec<u8>) -> Result<T> {
        let m = self.request(subject, body).await.map_err(|e| match e {
            Error::NoResponders => Error::Server {
                code: code::BAD_REQUEST,
                message: "the broker has no stream support".into(),
            },
            e => e,
        })?;
        answer(&m)
    }

    /// Publishes and waits until a stream has stored the message (as its
    /// fsync policy says). Fails when no stream captures the subject.
    pub async fn publish_durable(
        &self,
        subject: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<PubAck> {
        self.publish_durable_with_headers(subject, &Headers::new(), payload)
            .await
    }

    /// As [`Client::publish_durable`], with headers. A `Msg-Id` header makes
    /// the publish idempotent: a retry within the stream's duplicate window
    /// is stored once and acked with the first sequence.
    pub async fn publish_durable_with_headers(
        &self,
        subject: &str,
        headers: &Headers,
        payload: impl AsRef<[u8]>,
    ) -> Result<PubAck> {
        let m = self
            .request_with_headers(subject, headers, payload.as_ref())
            .await
            .map_err(|e| match e {
                Error::NoResponders => Error::Server {
                    code: code::BAD_REQUEST,
                    message: format!("no stream captures subject {subject:?}"),
                },
                e => e,
            })?;
        answer(&m)
    }

    pub async fn stream_add(&self, cfg: &StreamConfig) -> Result<StreamInfo> {
        let body = serde_json::to_vec(cfg).expect("serialisable");
        self.api(&format!("$SB.API.STREAM.CREATE.{}", cfg.name), body)
            .await
    }

    pub async fn stream_info(&self, name: &str) -> Result<StreamInfo> {
        self.api(&format!("$SB.API.STREAM.INFO.{name}"), Vec::new())
            .await
    }

    pub async fn stream_list(&self) -> Result<Vec<StreamInfo>> {
        #[derive(Deserialize)]
        struct L {
            streams: Vec<StreamInfo>,
        }
        Ok(self
            .api::<L>("$SB.API.STREAM.LIST", Vec::new())
            .await?
            .streams)
    }

    pub async fn stream_delete(&self, name: &str) -> Result<()> {
        self.api::<serde_json::Value>(&format!("$SB.API.STREAM.DELETE.{name}"), Vec::new())
            .await
            .map(|_| ())
    }

    pub async fn consumer_info(&self, stream: &str, name: &str) -> Result<ConsumerInfo> {
        self.api(
            &format!("$SB.API.CONSUMER.INFO.{stream}.{name}"),
            Vec::new(),
        )
        .await
    }

    pub async fn consumer_delete(&self, stream: &str, name: &str) -> Result<()> {
        self.api::<serde_json::Value>(
            &format!("$SB.API.CONSUMER.DELETE.{stream}.{name}"),
            Vec::new(),
        )
        .await
        .map(|_| ())
    }

    /// Creates a pull consumer (a durable one that exists resumes where it
    /// left off; its start is then ignored).
    pub async fn consumer(&self, stream: &str, cfg: ConsumerConfig) -> Result<PullConsumer> {
        let wire = WireConsumer {
            durable: cfg.durable.as_deref(),
            start: cfg.start.to_wire(),
            filter_subject: cfg.filter_subject.as_deref(),
            ack_policy: if cfg.no_ack { "none" } else { "explicit" },
            ack_wait_ms: cfg.ack_wait.as_millis() as u64,
            max_deliver: cfg.max_deliver,
            max_ack_pending: cfg.max_ack_pending,
        };
        let info: ConsumerInfo = self
            .api(
                &format!("$SB.API.CONSUMER.CREATE.{stream}"),
                serde_json::to_vec(&wire).expect("serialisable"),
            )
            .await?;
        let inbox = format!(
            "{}{:016x}.c",
            sockbus_protocol::subject::INBOX_PREFIX,
            rand::random::<u64>()
        );
        let sub = self.subscribe(&inbox).await?;
        Ok(PullConsumer {
            client: self.clone(),
            next_subject: format!("$SB.API.CONSUMER.NEXT.{stream}.{}", info.name),
            info,
            inbox,
            sub,
            batch: cfg.batch,
            outstanding: 0,
            expires: cfg.pull_expires,
            last_activity: tokio::time::Instant::now(),
        })
    }
}

/// A message read from a stream. Ack it (unless the consumer is `no_ack`)
/// or it is delivered again after the ack wait.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub seq: u64,
    /// 1 for a first delivery.
    pub deliveries: u32,
    pub msg: Message,
    ack_subject: String,
    client: Client,
}

impl StreamMessage {
    pub fn subject(&self) -> &str {
        self.msg.subject()
    }
    pub fn payload(&self) -> &Bytes {
        &self.msg.payload
    }
    pub fn headers(&self) -> Headers {
        self.msg.headers()
    }
    /// Acks without waiting for the broker.
    pub async fn ack(&self) -> Result<()> {
        self.client.publish(&self.ack_subject, b"").await
    }
    /// Acks and waits until the broker has stored the ack: after a restart
    /// this message is not delivered again.
    pub async fn ack_sync(&self) -> Result<()> {
        let m = self.client.request(&self.ack_subject, b"").await?;
        answer::<serde_json::Value>(&m).map(|_| ())
    }
    /// Asks for redelivery now.
    pub async fn nak(&self) -> Result<()> {
        self.client.publish(&self.ack_subject, b"-NAK").await
    }
    /// Never deliver this message again.
    pub async fn term(&self) -> Result<()> {
        self.client.publish(&self.ack_subject, b"+TERM").await
    }
}

/// A pull consumer: asks the broker for `batch` messages at a time and asks
/// for more when half of them are consumed, so memory stays bounded however
/// large the stream.
pub struct PullConsumer {
    client: Client,
    info: ConsumerInfo,
    next_subject: String,
    inbox: String,
    sub: Subscriber,
    batch: usize,
    outstanding: usize,
    expires: Duration,
    /// Last pull sent or answer received: a pull silent for longer than it
    /// may wait was lost (broker restart) and is sent again.
    last_activity: tokio::time::Instant,
}

impl PullConsumer {
    /// The consumer's name (generated for an ephemeral consumer).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn info(&self) -> &ConsumerInfo {
        &self.info
    }

    async fn pull(&mut self, n: usize) -> Result<()> {
        let body = format!(
            r#"{{"batch":{n},"expires_ms":{}}}"#,
            self.expires.as_millis()
        );
        self.client
            .publish_with_reply(&self.next_subject, &self.inbox, body)
            .await?;
        self.outstanding += n;
        self.last_activity = tokio::time::Instant::now();
        Ok(())
    }

    /// Hands back (naks) the messages asked for but not yet returned by
    /// `next`, so they are delivered again at once rather than after the ack
    /// wait, and ends the consumer's subscription.
    pub async fn close(mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while self.outstanding > 0 {
            match self
                .next_limited(
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                    0,
                )
                .await?
            {
                Some(m) => m.nak().await?,
                None => break,
            }
        }
        self.client.flush().await
    }

    /// The next message, waiting as long as it takes.
    pub async fn next(&mut self) -> Result<StreamMessage> {
        loop {
            if let Some(m) = self.next_timeout(Duration::from_secs(3600)).await? {
                return Ok(m);
            }
        }
    }

    /// The next message, or `None` if none arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<StreamMessage>> {
        self.next_limited(timeout, usize::MAX).await
    }

    /// Like [`PullConsumer::next_timeout`] but never asks for more than
    /// `limit` messages in all (so a CLI reading N leaves none pending).
    pub async fn next_limited(
        &mut self,
        timeout: Duration,
        limit: usize,
    ) -> Result<Option<StreamMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let want = self.batch.min(limit);
            if self.outstanding <= want / 2 && want > self.outstanding {
                let n = want - self.outstanding;
                self.pull(n).await?;
            }
            // A pull lost with a broker restart is noticed by its silence.
            let silence = self.last_activity + self.expires + Duration::from_secs(1);
            let until = deadline.min(silence);
            let m = match tokio::time::timeout_at(until, self.sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(Error::Closed),
                Err(_) => {
                    if tokio::time::Instant::now() >= silence {
                        self.outstanding = 0;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                    continue;
                }
            };
            self.last_activity = tokio::time::Instant::now();
            if let Some(status) = m.headers().get("Sb-Status") {
                let h = m.headers();
                let left: usize = h
                    .get("Sb-Pending")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.outstanding = self.outstanding.saturating_sub(left);
                match status {
                    "404" if h.get("Sb-Description") == Some("no messages") => {}
                    "408" => {}
                    _ => {
                        return Err(Error::Server {
                            code: code::BAD_REQUEST,
                            message: h
                                .get("Sb-Description")
                                .unwrap_or("consumer error")
                                .to_string(),
                        })
                    }
                }
                continue;
            }
            self.outstanding = self.outstanding.saturating_sub(1);
            let Some(ack) = m.reply().map(str::to_string) else {
                continue;
            };
            // $SB.ACK.<stream>.<consumer>.<seq>.<deliveries>
            let mut t = ack.rsplit('.');
            let deliveries = t.next().and_then(|x| x.parse().ok()).unwrap_or(1);
            let seq = t.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            return Ok(Some(StreamMessage {
                seq,
                deliveries,
                msg: m,
                ack_subject: ack,
                client: self.client.clone(),
            }));
        }
    }
}
