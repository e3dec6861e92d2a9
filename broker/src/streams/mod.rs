//! Durable streams: a stream captures every message published to its
//! subject patterns and stores it in its log (crate::store) until retention
//! removes it. Publishers with a reply subject get an ack once the message
//! is stored as the stream's `fsync` policy says; consumers read it back.
//!
//! The broker side of the API lives under the reserved `$SB.` subjects
//! (see [`api`]); the native protocol's frame kinds are unchanged.

pub mod api;
pub mod consumer;
mod index;
mod replicated;
mod strict;
#[cfg(test)]
mod testing;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use sockbus_protocol::api::ConfigError;
use sockbus_protocol::frame::iter_headers;
use sockbus_protocol::subject::is_inbox;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, error, info, warn};

use crate::deliver::Delivery;
use crate::router::InterestHook;
use crate::store::{record, FileCache, Log};
pub use consumer::Consumer;
use index::PatternIndex;
/// The API's types are shared with the SDK (sockbus_protocol::api).
pub use sockbus_protocol::api::{
    ConsumerInfo, Fsync, PubAck, PurgeRequest, StreamConfig, StreamInfo, StreamState,
};
pub(crate) use writer::purge_log;

/// `new` differs from `old` in the limits (`max_msgs`, `max_bytes`,
/// `max_age_ms`) and description only, what a replicated stream's update
/// may change; else the first other setting that differs.
pub(crate) fn limits_only(old: &StreamConfig, new: &StreamConfig) -> Result<(), &'static str> {
    let mut same = new.clone();
    same.max_msgs = old.max_msgs;
    same.max_bytes = old.max_bytes;
    same.max_age_ms = old.max_age_ms;
    same.description = old.description.clone();
    if same == *old {
        return Ok(());
    }
    Err(if same.subjects != old.subjects {
        "the subjects"
    } else if same.duplicate_window_ms != old.duplicate_window_ms {
        "the duplicate window"
    } else if same.max_msg_size != old.max_msg_size {
        "max_msg_size"
    } else if same.segment_bytes != old.segment_bytes {
        "segment_bytes"
    } else {
        "a setting other than the limits and the description"
    })
}

/// Header whose value makes a publish idempotent within the stream's duplicate window.
pub use sockbus_protocol::api::header::MSG_ID as MSG_ID_HEADER;
/// Bytes a stream's writer may have queued before publishers are slowed down.
const QUEUE_LIMIT: usize = 32 << 20;
/// Bytes all the streams' writers together may have queued before
/// publishers are slowed down: without it 10,000 streams could hold 32 MiB
/// each (docs/storage.md, "Many streams").
pub const TOTAL_QUEUE_LIMIT: usize = 256 << 20;

/// The broker-wide count of bytes queued for stream writers.
pub(crate) struct QueueBudget {
    queued: AtomicUsize,
    limit: usize,
    /// Signalled after every writer round.
    space: Notify,
}

impl QueueBudget {
    pub(crate) fn new(limit: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            queued: AtomicUsize::new(0),
            limit,
            space: Notify::new(),
        })
    }

    /// Bytes a round wrote (or failed): no longer queued.
    pub(crate) fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        self.space.notify_waiters();
    }
}
const DEFAULT_SEGMENT: u64 = 64 << 20;
/// How long an update waits for the stream's writer to apply it.
const RECONFIG_WAIT: Duration = Duration::from_secs(10);
/// Streams a broker holds unless `--max-streams` says otherwise: the scale
/// CI checks (broker/tests/streams_many.rs).
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

/// What the store derives from a stream's settings.
pub(crate) trait StreamConfigExt {
    /// Size at which the stream's segments are sealed.
    fn segment_bytes(&self) -> u64;
}

impl StreamConfigExt for StreamConfig {
    fn segment_bytes(&self) -> u64 {
        let mut s = self.segment_bytes.unwrap_or(DEFAULT_SEGMENT);
        if let Some(b) = self.max_bytes {
            // Retention drops whole segments: keep them small next to the limit.
            s = s.min((b / 8).max(64 * 1024));
        }
        s
    }
}

/// Could one subject match both patterns? The definition the pattern
/// index (`index.rs`) is checked against.
#[cfg(test)]
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(p), Some(q)) if p == "*" || q == "*" || p == q => {}
            _ => return false,
        }
    }
}

/// True when every subject `pattern` matches, `filter` matches too.
pub(crate) fn covers(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('.');
    let mut p = pattern.split('.');
    loop {
        match (f.next(), p.next()) {
            (Some(">"), Some(_)) => return true,
            (None, None) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != ">" => {}
            _ => return false,
        }
    }
}

/// Why a stream operation failed. The text is what users see.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    BadRequest(String),
    #[error("stream {0:?} not found")]
    NotFound(String),
    #[error("consumer {0:?} not found")]
    ConsumerNotFound(String),
    #[error("stream {0:?} already exists with a different configuration")]
    Exists(String),
    #[error("stream {name:?}: cannot store the message: {error}")]
    Storage { name: String, error: String },
    #[error("stream {0:?} was deleted")]
    Deleted(String),
    /// An update that changes what cannot change (`fsync`, `replicas`).
    #[error("stream configuration update can not change {0}")]
    Unchangeable(&'static str),
    /// Something sockbus does not do, named.
    #[error("not supported by sockbus: {0}")]
    Unsupported(String),
    #[error("the answer is {size} bytes, more than the largest payload, {max} bytes (--max-payload); {hint}")]
    AnswerTooLarge {
        size: usize,
        max: usize,
        hint: &'static str,
    },
    #[error("cannot create stream {name:?}: the broker holds {count} streams, its limit is {max} (--max-streams)")]
    TooMany {
        name: String,
        count: usize,
        max: usize,
    },
    #[error("cannot create stream {name:?}: account {account:?} holds {count} streams, its limit is {max} (max-streams of its [[accounts]] table)")]
    AccountTooMany {
        name: String,
        account: String,
        count: usize,
        max: usize,
    },
    /// A `Nats-Expected-*` header of the publish does not hold (its
    /// JetStream error code and text).
    #[error("{text}")]
    Expected { err_code: u32, text: String },
    #[error("stream {name:?}: cannot store the message: account {account:?} stores {used} bytes, its limit is {max} bytes (max-stored-bytes of its [[accounts]] table)")]
    AccountFull {
        name: String,
        account: String,
        used: u64,
        max: u64,
    },
}

impl From<ConfigError> for StreamError {
    fn from(e: ConfigError) -> Self {
        StreamError::BadRequest(e.to_string())
    }
}

impl StreamError {
    /// HTTP-style status for the gateway and the API replies.
    pub fn status(&self) -> u16 {
        match self {
            StreamError::BadRequest(_)
            | StreamError::Unchangeable(_)
            | StreamError::Unsupported(_)
            | StreamError::Expected { .. }
            | StreamError::TooMany { .. }
            | StreamError::AccountTooMany { .. } => 400,
            StreamError::AccountFull { .. } => 507,
            StreamError::NotFound(_) | StreamError::ConsumerNotFound(_) => 404,
            StreamError::Exists(_) => 409,
            StreamError::AnswerTooLarge { .. } => 413,
            StreamError::Storage { .. } | StreamError::Deleted(_) => 503,
        }
    }
}

pub(crate) fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// Where a stored publish's ack goes.
pub enum AckTo {
    None,
    /// Published to this subject (the SDK's request inbox).
    Reply(Box<str>),
    Chan(oneshot::Sender<Result<PubAck, StreamError>>),
    /// Published to this subject in JetStream's shape (a NATS publisher).
    Js(Box<str>),
}

/// What a publish's `Nats-Expected-*` headers require of the stream
/// before it is stored (checked by the writer, in order with the writes).
#[derive(Debug, Default)]
pub(crate) struct Expect {
    pub stream: Option<Box<str>>,
    pub last_seq: Option<u64>,
    pub last_msg_id: Option<Box<str>>,
    /// (sequence, the publish's subject)
    pub last_subject_seq: Option<(u64, Box<str>)>,
}

/// Work for a stream's writer besides publishes: it owns the log's
/// appender, so purges and deletes are its to do, between rounds.
pub(crate) enum AdminOp {
    Purge(PurgeRequest, std::sync::mpsc::Sender<std::io::Result<u64>>),
    /// Delete one message; answered whether it was there.
    Delete(u64, std::sync::mpsc::Sender<std::io::Result<bool>>),
}

/// How long a purge or delete waits for the stream's writer.
const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// Records queued for a stream's writer by one reader batch.
pub(crate) struct WriteReq {
    buf: BytesMut,
    entries: Vec<Entry>,
}

pub(crate) struct Entry {
    len: u32,
    ack: AckTo,
    msg_id: Option<Box<str>>,
    expect: Option<Box<Expect>>,
}

pub struct Stream {
    /// The stream's name: fixed, unlike the rest of its configuration.
    pub name: String,
    /// Its copies (1 unless replicated): fixed too, and read on the
    /// publish path without the configuration's lock.
    pub replicas: u32,
    /// Its configuration, replaced whole by [`Streams::update`]; readers
    /// take a snapshot ([`Stream::config`]).
    config: RwLock<Arc<StreamConfig>>,
    /// Configuration updates asked for (bumped by [`Streams::update`]) and
    /// the last one the writer has applied, retention included, so an
    /// update is answered once its new limits hold.
    reconfig: AtomicU64,
    applied: Mutex<u64>,
    applied_cv: Condvar,
    /// Purges and deletes waiting for the writer (it owns the appender).
    admin_ops: Mutex<Vec<AdminOp>>,
    pub log: Arc<Log>,
    dir: PathBuf,
    tx: Mutex<Option<std::sync::mpsc::Sender<WriteReq>>>,
    /// Bytes handed to the writer and not yet written.
    queued: AtomicUsize,
    space: Notify,
    /// Every stream's queued bytes, in total.
    pub(crate) budget: Arc<QueueBudget>,
    /// Wakes the writer task: records were queued, or the stream was deleted.
    wake: Notify,
    pub(crate) consumers: Mutex<HashMap<String, Arc<Consumer>>>,
    deleted: AtomicBool,
    /// The writer task stopped on an internal error (a panic): publishes
    /// fail at once instead of queuing for nobody.
    failed: AtomicBool,
    /// Where acks and consumer deliveries go.
    pub(crate) delivery: Delivery,
    /// The account's stored bytes, when it has a limit on them.
    pub(crate) quota: Option<Arc<Quota>>,
    /// This stream's bytes as last added to `quota`.
    pub(crate) counted: std::sync::atomic::AtomicU64,
}

/// The bytes an account's streams store together, against its
/// `max-stored-bytes`. Each writer adds what its stream grew or shrank by
/// after every turn (writes and retention), so `used` lags a turn at most.
pub(crate) struct Quota {
    pub account: String,
    pub max: u64,
    pub used: std::sync::atomic::AtomicU64,
    /// Orders a writer's last update against its stream's deletion.
    updates: Mutex<()>,
}

impl Quota {
    pub(crate) fn new(account: String, max: u64) -> Quota {
        Quota {
            account,
            max,
            used: Default::default(),
            updates: Mutex::new(()),
        }
    }

    /// Brings `s`'s share up to date with its log (nothing once deleted).
    pub(crate) fn sync(&self, s: &Stream) {
        let _g = self.updates.lock().unwrap_or_else(|p| p.into_inner());
        if s.deleted.load(Ordering::Acquire) {
            return;
        }
        let now = s.log.lock().bytes();
        let old = s.counted.swap(now, Ordering::AcqRel);
        if now >= old {
            self.used.fetch_add(now - old, Ordering::AcqRel);
        } else {
            self.used.fetch_sub(old - now, Ordering::AcqRel);
        }
    }

    /// Takes `s`'s share out (the stream was deleted).
    fn forget(&self, s: &Stream) {
        let _g = self.updates.lock().unwrap_or_else(|p| p.into_inner());
        let old = s.counted.swap(0, Ordering::AcqRel);
        self.used.fetch_sub(old, Ordering::AcqRel);
    }
}

impl Stream {
    /// A snapshot of the stream's configuration (an update replaces it).
    pub fn config(&self) -> Arc<StreamConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A stream record around `cfg`, its writer not started.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: StreamConfig,
        log: Arc<Log>,
        dir: PathBuf,
        tx: std::sync::mpsc::Sender<WriteReq>,
        budget: Arc<QueueBudget>,
        delivery: Delivery,
        quota: Option<Arc<Quota>>,
    ) -> Stream {
        Stream {
            name: cfg.name.clone(),
            replicas: cfg.replicas(),
            config: RwLock::new(Arc::new(cfg)),
            reconfig: AtomicU64::new(0),
            applied: Mutex::new(0),
            applied_cv: Condvar::new(),
            admin_ops: Mutex::new(Vec::new()),
            log,
            dir,
            tx: Mutex::new(Some(tx)),
            queued: AtomicUsize::new(0),
            space: Notify::new(),
            budget,
            wake: Notify::new(),
            consumers: Mutex::new(HashMap::new()),
            deleted: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            delivery,
            quota,
            counted: Default::default(),
        }
    }

    /// The writer has applied configuration update `gen` (and the
    /// retention it asks for): wakes the update waiting for it.
    pub(crate) fn reconfigured(&self, gen: u64) {
        let mut a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if gen > *a {
            *a = gen;
            self.applied_cv.notify_all();
        }
    }

    /// Waits until the writer has applied configuration update `gen`
    /// (false: not within `limit`, or the stream is gone).
    fn wait_applied(&self, gen: u64, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        while *a < gen {
            let now = std::time::Instant::now();
            if now >= deadline
                || self.deleted.load(Ordering::Acquire)
                || self.failed.load(Ordering::Acquire)
            {
                return false;
            }
            a = self
                .applied_cv
                .wait_timeout(a, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// A replicated stream's new configuration (limits, description),
    /// taken by its state machine at the update's entry
    /// (replication/sm.rs): saved in `stream.json`, then in force.
    pub(crate) fn set_replicated_config(&self, cfg: StreamConfig) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&cfg).expect("serialisable");
        write_atomic(&self.dir.join("stream.json"), &json)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        Ok(())
    }

    /// The purges and deletes queued for the writer.
    pub(crate) fn take_admin_ops(&self) -> Vec<AdminOp> {
        std::mem::take(&mut *self.admin_ops.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Hands `op` to the writer and waits for its answer on `rx`.
    fn admin<T>(
        &self,
        op: AdminOp,
        rx: std::sync::mpsc::Receiver<std::io::Result<T>>,
    ) -> Result<T, StreamError> {
        if self.replicas > 1 {
            return Err(StreamError::Unsupported(format!(
                "deleting messages of a replicated stream ({})",
                self.name
            )));
        }
        self.admin_ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
        self.wake.notify_one();
        match rx.recv_timeout(ADMIN_WAIT) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StreamError::Storage {
                name: self.name.clone(),
                error: e.to_string(),
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(StreamError::Storage {
                name: self.name.clone(),
                error: "the stream's writer did not answer within 30 s".into(),
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(if self.failed.load(Ordering::Acquire) {
                    StreamError::Storage {
                        name: self.name.clone(),
                        error: "the stream's writer stopped on an internal error".into(),
                    }
                } else {
                    StreamError::Deleted(self.name.clone())
                })
            }
        }
    }

    /// Removes messages (see [`PurgeRequest`]); returns how many. Consumers
    /// positioned before the new first message go on from it, and forget
    /// pending acks of messages now gone. Blocks: call from a blocking thread.
    pub fn purge(&self, req: PurgeRequest) -> Result<u64, StreamError> {
        if let Some(f) = &req.filter {
            sockbus_protocol::validate_pattern(f)
                .map_err(|e| StreamError::BadRequest(format!("filter: {e}")))?;
        }
        if req.seq.is_some() && req.keep.is_some() {
            return Err(StreamError::BadRequest(
                "a purge takes seq or keep, not both".into(),
            ));
        }
        if self.replicas > 1 {
            // Through the group's log: every replica's state machine does
            // it at the same entry, consumers included.
            let n = crate::replication::purge(self, &req)?;
            info!(stream = %self.name, purged = n, "replicated stream purged");
            return Ok(n);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let n = self.admin(AdminOp::Purge(req, tx), rx)?;
        let first = self.log.lock().first_seq();
        let consumers: Vec<Arc<Consumer>> = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for c in consumers {
            c.forget_below(first);
        }
        info!(stream = %self.name, purged = n, "stream purged");
        Ok(n)
    }

    /// Deletes message `seq`; false if the stream does not hold it. Blocks:
    /// call from a blocking thread.
    pub fn delete_msg(&self, seq: u64) -> Result<bool, StreamError> {
        if self.replicas > 1 {
            // Through the group's log, like a purge.
            let deleted = crate::replication::delete_msg(self, seq)?;
            info!(stream = %self.name, seq, deleted, "message of a replicated stream deleted");
            return Ok(deleted);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.admin(AdminOp::Delete(seq, tx), rx)
    }

    /// The configuration update the writer has yet to apply, if any.
    pub(crate) fn reconfig_wanted(&self) -> u64 {
        self.reconfig.load(Ordering::Acquire)
    }

    /// The stream's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A replicated stream's members (node names), empty otherwise.
    pub(crate) fn members(&self) -> Vec<String> {
        match std::fs::read(self.dir.join("raft").join("members")) {
            Ok(b) => String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn set_members(&self, members: &[String]) -> std::io::Result<()> {
        crate::replication::write_members(&self.dir, members)
    }

    pub fn info(&self) -> StreamInfo {
        let st = self.log.lock();
        let first_ts = st.first_ts();
        let msgs = st.msgs();
        StreamInfo {
            config: (*self.config()).clone(),
            state: StreamState {
                messages: msgs,
                bytes: st.bytes(),
                first_seq: st.first_seq(),
                last_seq: st.last_seq(),
                first_ts: (msgs > 0).then(|| rfc3339(first_ts)),
                last_ts: (msgs > 0).then(|| rfc3339(st.last_ts)),
                segments: st.segs.len(),
                consumers: self
                    .consumers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len(),
                damaged_records: st.lost,
            },
            cluster: (self.replicas > 1).then(|| crate::replication::hub().cluster_info(self)),
        }
    }

    fn captures(&self, subject: &str) -> bool {
        self.config()
            .subjects
            .iter()
            .any(|p| sockbus_protocol::matches(p, subject))
    }

    fn send(&self, req: WriteReq) {
        let n = req.buf.len();
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => {
                self.queued.fetch_add(n, Ordering::AcqRel);
                self.budget.queued.fetch_add(n, Ordering::AcqRel);
                if let Err(e) = tx.send(req) {
                    self.queued.fetch_sub(n, Ordering::AcqRel);
                    self.budget.release(n);
                    fail_all(
                        e.0,
                        &StreamError::Deleted(self.name.clone()),
                        &self.delivery,
                    );
                } else {
                    self.wake.notify_one();
                }
            }
            None => {
                drop(tx);
                let e = if self.failed.load(Ordering::Acquire) {
                    StreamError::Storage {
                        name: self.name.clone(),
                        error: "the stream's writer stopped on an internal error (see the \
                                broker's log); restart the broker"
                            .into(),
                    }
                } else {
                    StreamError::Deleted(self.name.clone())
                };
                fail_all(req, &e, &self.delivery)
            }
        }
    }

    /// The writer task is gone (it panicked, or could not start): what it
    /// had queued is lost with its channel, unacknowledged. Gives the queued
    /// bytes back to this stream's and the broker-wide budget (or every
    /// publisher to any stream would wait for them forever), and makes later
    /// publishes fail at once with a storage error.
    pub(crate) fn writer_failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let n = self.queued.swap(0, Ordering::AcqRel);
        self.budget.release(n);
        self.space.notify_waiters();
    }

    /// Ends the writer once it has answered what is queued (dropping the
    /// sender; publishes after this are answered "deleted").
    pub(crate) fn close_writer(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.wake.notify_one();
    }

    /// Over this stream's queue limit, or the broker-wide one.
    fn over_limit(&self) -> bool {
        self.queued.load(Ordering::Acquire) > QUEUE_LIMIT
            || self.budget.queued.load(Ordering::Acquire) > self.budget.limit
    }

    /// Waits until the writer's queue is below its limit and all the
    /// writers' queues together are below theirs.
    pub(crate) async fn wait_space(&self) {
        loop {
            let mine = self.space.notified();
            let all = self.budget.space.notified();
            tokio::pin!(mine, all);
            mine.as_mut().enable();
            all.as_mut().enable();
            if !self.over_limit() || self.deleted.load(Ordering::Acquire) {
                return;
            }
            tokio::select! {
                _ = mine => {}
                _ = all => {}
            }
        }
    }

    pub fn consumer(&self, name: &str) -> Option<Arc<Consumer>> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Up to `limit` of the stream's consumers' infos, sorted by name.
    pub fn consumer_infos(&self, limit: usize) -> Vec<ConsumerInfo> {
        let mut v: Vec<Arc<Consumer>> = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.iter().take(limit).map(|c| c.info()).collect()
    }

    pub fn consumers_dir(&self) -> PathBuf {
        self.dir.join("consumers")
    }

    /// When the stream was created: its `stream.json`'s time (ns since
    /// the epoch), 0 if unknown.
    pub(crate) fn created_ns(&self) -> u64 {
        std::fs::metadata(self.dir.join("stream.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

fn fail_all(req: WriteReq, e: &StreamError, delivery: &Delivery) {
    let mut batch = delivery.batch(16);
    for en in req.entries {
        writer::send_ack(&mut batch, en.ack, Err(e.clone()));
    }
    batch.finish();
}

/// What bounds a broker's (or one account's) streams.
#[derive(Clone)]
pub struct StreamLimits {
    /// Most streams; creating one more is refused (`--max-streams`).
    pub max_streams: usize,
    /// Most stream files (segments, consumer op logs) kept open at once.
    pub open_files: usize,
    /// The open files shared with other accounts' streams (`open_files`
    /// is then theirs); None: a cache of its own.
    pub files: Option<Arc<FileCache>>,
    /// The account these streams belong to, when it has an `[[accounts]]`
    /// table: its `max-streams` (instead of `--max-streams`) and
    /// `max-stored-bytes` are what the errors name.
    pub account: Option<(String, Option<usize>, Option<u64>)>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: DEFAULT_MAX_STREAMS,
            open_files: FileCache::budget(),
            files: None,
            account: None,
        }
    }
}

/// Every stream of the broker; lives on [`State`].
pub struct Streams {
    data_dir: PathBuf,
    map: RwLock<HashMap<String, Arc<Stream>>>,
    /// Every stream's patterns: capture and overlap checks without a scan.
    index: RwLock<PatternIndex>,
    generation: AtomicU64,
    count: AtomicUsize,
    max_streams: usize,
    /// The account's name when `max_streams` is its `max-streams`.
    account_limit: Option<String>,
    /// The account's `max-stored-bytes`.
    quota: Option<Arc<Quota>>,
    /// Open files, shared by every stream.
    files: Arc<FileCache>,
    /// Bytes queued for all the writers.
    budget: Arc<QueueBudget>,
    delivery: Delivery,
    /// Told of every stream's subjects, which are interest like a
    /// subscription's: cluster peers forward publishes on them here.
    interest: Option<Arc<dyn InterestHook>>,
    /// Serialises the checks of create/delete; holds the names of the
    /// streams being created (reserved: counted and in the index, their
    /// files being written without the lock held).
    admin: Mutex<HashSet<String>>,
    /// Signalled when a create finishes (its name leaves `admin`).
    created: Condvar,
}

impl Streams {
    /// [`Streams::open_with`] with the default limits.
    #[cfg(test)]
    pub fn open(
        data_dir: &Path,
        delivery: Delivery,
        interest: Option<Arc<dyn InterestHook>>,
    ) -> anyhow::Result<Streams> {
        Self::open_with(data_dir, delivery, interest, StreamLimits::default())
    }

    /// Opens every stream found under `<data_dir>/streams`, with their
    /// consumers, and announces their subjects to `interest`. Creates
    /// nothing until the first stream is added. Must run inside a tokio
    /// runtime (writers and consumers are tasks). Streams found on disk
    /// beyond `max_streams` are opened all the same (with a warning): their
    /// data stays served; only creating more is refused.
    pub fn open_with(
        data_dir: &Path,
        delivery: Delivery,
        interest: Option<Arc<dyn InterestHook>>,
        limits: StreamLimits,
    ) -> anyhow::Result<Streams> {
        let (account_limit, max_streams, quota) = match limits.account {
            Some((name, max_streams, max_bytes)) => (
                max_streams.map(|_| name.clone()),
                max_streams.unwrap_or(limits.max_streams),
                max_bytes.map(|max| Arc::new(Quota::new(name, max))),
            ),
            None => (None, limits.max_streams, None),
        };
        let streams = Streams {
            data_dir: data_dir.to_path_buf(),
            map: RwLock::new(HashMap::new()),
            index: RwLock::new(PatternIndex::default()),
            generation: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            max_streams,
            account_limit,
            quota,
            files: limits
                .files
                .unwrap_or_else(|| FileCache::new(limits.open_files)),
            budget: QueueBudget::new(TOTAL_QUEUE_LIMIT),
            delivery,
            interest,
            admin: Mutex::new(HashSet::new()),
            created: Condvar::new(),
        };
        let root = data_dir.join("streams");
        let Ok(rd) = std::fs::read_dir(&root) else {
            return Ok(streams);
        };
        for e in rd.filter_map(|e| e.ok()) {
            let dir = e.path();
            if e.file_name().to_string_lossy().contains(".deleted-") {
                // A deleted stream whose removal a crash interrupted.
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            let cfg_path = dir.join("stream.json");
            let Ok(text) = std::fs::read(&cfg_path) else {
                continue;
            };
            // Read as strictly as when it was created (see `strict`).
            let cfg: StreamConfig = match strict::from_slice(&text) {
                Ok(c) => c,
                Err(e) => {
                    error!(
                        "skipping {}: invalid stream configuration: {e}",
                        cfg_path.display()
                    );
                    continue;
                }
            };
            let name = cfg.name.clone();
            if let Some(p) = cfg.subjects.iter().find(|p| is_inbox(p)) {
                warn!(stream = %name, "subject {p:?} is under _INBOX.: streams never capture reply subjects, so nothing is stored for it");
            }
            let s = streams.start_stream(cfg, &dir).map_err(|e| {
                anyhow::anyhow!("cannot open stream {name:?} in {}: {e}", dir.display())
            })?;
            let st = s.log.lock();
            debug!(stream = %name, messages = st.msgs(), first_seq = st.first_seq(), last_seq = st.last_seq(), segments = st.segs.len(), "stream opened");
            drop(st);
            streams.index_add(&s.config());
            streams
                .map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, s);
        }
        let n = streams.map.read().unwrap_or_else(|p| p.into_inner()).len();
        streams.count.store(n, Ordering::Release);
        if n > 0 {
            info!(
                streams = n,
                open_files = streams.files.capacity(),
                "streams opened"
            );
        }
        if n > streams.max_streams {
            warn!(
                "{n} streams found on disk, more than --max-streams {}: all are opened and served, but no new stream can be created until fewer than {} remain",
                streams.max_streams, streams.max_streams
            );
        }
        for s in streams.list_streams() {
            consumer::load_all(&s);
            if s.replicas == 1 {
                streams.announce(&s.config().subjects, true);
            }
        }
        Ok(streams)
    }

    fn start_stream(&self, cfg: StreamConfig, dir: &Path) -> std::io::Result<Arc<Stream>> {
        let (log, _report) = Log::open(dir, &cfg.name, &self.files)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let s = Arc::new(Stream::new(
            cfg,
            log,
            dir.to_path_buf(),
            tx,
            self.budget.clone(),
            self.delivery.clone(),
            self.quota.clone(),
        ));
        if let Some(q) = &s.quota {
            q.sync(&s);
        }
        if s.replicas > 1 {
            // A damaged copy is emptied before anything reads it; its
            // group refills it from the peers.
            s.log.set_strict(true);
            crate::replication::check_copy(&s);
            replicated::spawn(s.clone(), rx);
            crate::replication::hub().open_group(&s);
        } else {
            writer::spawn(s.clone(), rx);
        }
        // A replicated stream's member checks its sealed segments before
        // its group starts (replication/repair.rs).
        if s.replicas == 1 && s.log.needs_verify() {
            verify_in_background(s.log.clone());
        }
        Ok(s)
    }

    fn index_add(&self, cfg: &StreamConfig) {
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        for p in &cfg.subjects {
            ix.insert(p, &cfg.name);
        }
    }

    /// The open-file cache, to share with another account's streams.
    pub fn files(&self) -> Arc<FileCache> {
        self.files.clone()
    }

    /// Streams held now (being created included).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Bytes stored in all these streams.
    pub fn stored_bytes(&self) -> u64 {
        self.list_streams()
            .iter()
            .map(|s| s.log.lock().bytes())
            .sum()
    }

    /// Files the streams keep open now, and the most they may.
    pub fn open_files(&self) -> (usize, usize) {
        (self.files.len(), self.files.capacity())
    }

    /// Bumped whenever a stream is added or removed (capture caches check it).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    /// The stream that captures a literal subject, if any. Takes a read lock:
    /// the publish path goes through a [`CaptureCache`] instead.
    pub fn capture(&self, subject: &str) -> Option<Arc<Stream>> {
        // A request's reply is for its requester alone: never stored, so
        // never acked either (a stream on `>` stops short of `_INBOX.`).
        if self.is_empty() || is_inbox(subject) {
            return None;
        }
        let name = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .capture(subject)?
            .to_string();
        self.get(&name).filter(|s| s.captures(subject))
    }

    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn list_streams(&self) -> Vec<Arc<Stream>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every stream's info, sorted by name (`GET /v1/streams`).
    pub fn list(&self) -> Vec<StreamInfo> {
        self.list_streams().iter().map(|s| s.info()).collect()
    }

    /// Every stream's info with up to `consumers` of its consumers' infos
    /// (sorted by name), for the status page.
    pub fn list_with_consumers(&self, consumers: usize) -> Vec<(StreamInfo, Vec<ConsumerInfo>)> {
        self.list_streams()
            .iter()
            .map(|s| (s.info(), s.consumer_infos(consumers)))
            .collect()
    }

    /// One stream's info (`GET /v1/streams/{name}`).
    pub fn info(&self, name: &str) -> Result<StreamInfo, StreamError> {
        self.get(name)
            .map(|s| s.info())
            .ok_or_else(|| StreamError::NotFound(name.into()))
    }

    /// The admin lock, once no create of `name` is in progress.
    fn admin_for(&self, name: &str) -> MutexGuard<'_, HashSet<String>> {
        let mut pending = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        while pending.contains(name) {
            pending = self
                .created
                .wait(pending)
                .unwrap_or_else(|p| p.into_inner());
        }
        pending
    }

    /// Creates a stream; creating one that exists with the same configuration is a no-op.
    ///
    /// Blocks on the disk (files written and fsynced): call it from a
    /// blocking thread, not a runtime worker. The checks run under the
    /// admin lock and reserve the name, subjects and a slot under
    /// `--max-streams`; the files are written without the lock, so
    /// concurrent creates share the disk's flushes instead of queueing.
    pub fn create(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        cfg.validate()?;
        if cfg.replicas() > 1 {
            return self.create_replicated(cfg);
        }
        self.create_with(cfg, None)
    }

    /// A stream with `replicas` > 1: placed on that many nodes, created on
    /// every node of the cluster, its group initialised (crate::replication).
    fn create_replicated(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        if cfg.max_msg_size.is_some() {
            // A replica's state machine stores what the group agreed on.
            return Err(StreamError::Unsupported(
                "max_msg_size on a replicated stream".into(),
            ));
        }
        let hub = crate::replication::hub();
        let ours = hub
            .state()
            .is_some_and(|st| std::ptr::eq(Arc::as_ptr(&st.streams), self));
        if !ours {
            return Err(StreamError::BadRequest(
                "replicas > 1 needs cluster mode (--cluster, --peers) and the default account"
                    .into(),
            ));
        }
        if let Some(s) = self.get(&cfg.name) {
            return if *s.config() == cfg {
                Ok(s.info())
            } else {
                Err(StreamError::Exists(cfg.name))
            };
        }
        let members = hub
            .place(cfg.replicas())
            .map_err(|e| StreamError::BadRequest(e.to_string()))?;
        let info = self.create_with(cfg.clone(), Some(&members))?;
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| StreamError::BadRequest("no runtime".into()))?;
        if let Err(e) = rt.block_on(hub.create_everywhere(&cfg, &members)) {
            warn!(stream = %cfg.name, "creating the replicated stream failed: {e}");
            let _ = self.delete(&cfg.name);
            return Err(StreamError::BadRequest(format!(
                "creating replicated stream {}: {e}",
                cfg.name
            )));
        }
        Ok(info)
    }

    /// Replaces replica `old` of a replicated stream by node `new`; runs
    /// on the group's leader (the error names it otherwise).
    pub fn replace_peer(
        &self,
        name: &str,
        old: &str,
        new: &str,
    ) -> Result<StreamInfo, StreamError> {
        let s = self
            .get(name)
            .ok_or_else(|| StreamError::NotFound(name.into()))?;
        if s.replicas == 1 {
            return Err(StreamError::BadRequest(format!(
                "stream {name} is not replicated"
            )));
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| StreamError::BadRequest("no runtime".into()))?;
        rt.block_on(crate::replication::hub().replace_peer(name, old, new))
            .map_err(|e| {
                StreamError::BadRequest(format!("replace {old} by {new} in {name}: {e}"))
            })?;
        Ok(s.info())
    }

    /// A peer created a replicated stream: the same here, with its members
    /// (updated when the stream exists already).
    pub(crate) fn create_replica(
        &self,
        cfg: StreamConfig,
        members: &[String],
    ) -> Result<StreamInfo, StreamError> {
        cfg.validate()?;
        if let Some(s) = self.get(&cfg.name) {
            if *s.config() != cfg {
                return Err(StreamError::Exists(cfg.name));
            }
            s.set_members(members).map_err(|e| StreamError::Storage {
                name: cfg.name.clone(),
                error: e.to_string(),
            })?;
            return Ok(s.info());
        }
        self.create_with(cfg, Some(members))
    }

    fn create_with(
        &self,
        cfg: StreamConfig,
        members: Option<&[String]>,
    ) -> Result<StreamInfo, StreamError> {
        {
            let mut pending = self.admin_for(&cfg.name);
            if let Some(s) = self.get(&cfg.name) {
                return if *s.config() == cfg {
                    Ok(s.info())
                } else {
                    Err(StreamError::Exists(cfg.name))
                };
            }
            // Counts the streams being created too.
            let count = self.count.load(Ordering::Acquire);
            if count >= self.max_streams {
                return Err(match &self.account_limit {
                    Some(account) => StreamError::AccountTooMany {
                        name: cfg.name,
                        account: account.clone(),
                        count,
                        max: self.max_streams,
                    },
                    None => StreamError::TooMany {
                        name: cfg.name,
                        count,
                        max: self.max_streams,
                    },
                });
            }
            {
                let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
                for q in &cfg.subjects {
                    if let Some((p, other)) = ix.overlap(q) {
                        return Err(StreamError::BadRequest(format!(
                            "subject {q:?} overlaps {p:?} of stream {other:?}"
                        )));
                    }
                }
            }
            // Reserved. Until it is in the map, a publish the index sends
            // to it finds no stream and is not captured, as before.
            pending.insert(cfg.name.clone());
            self.index_add(&cfg);
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        let made = self.create_files(&cfg, members);
        let mut pending = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(&cfg.name);
        self.created.notify_all();
        let s = match made {
            Ok(s) => s,
            Err(e) => {
                self.index_remove(&cfg);
                self.count.fetch_sub(1, Ordering::AcqRel);
                return Err(StreamError::Storage {
                    name: cfg.name.clone(),
                    error: e.to_string(),
                });
            }
        };
        info!(stream = %cfg.name, subjects = ?cfg.subjects, fsync = ?cfg.fsync, "stream created");
        let info = s.info();
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cfg.name.clone(), s);
        self.generation.fetch_add(1, Ordering::AcqRel);
        crate::accel::routes::streams_changed(&self.delivery, &info.config.subjects);
        drop(pending);
        if info.config.replicas() == 1 {
            self.announce(&info.config.subjects, true);
        }
        Ok(info)
    }

    /// A new stream's directory, configuration and first segment, all on
    /// disk (fsynced, with the directories that name them) before it is
    /// acknowledged, so a power loss cannot make a created stream vanish.
    fn create_files(
        &self,
        cfg: &StreamConfig,
        members: Option<&[String]>,
    ) -> std::io::Result<Arc<Stream>> {
        let root = self.data_dir.join("streams");
        let dir = root.join(&cfg.name);
        // The directories about to be made: `streams/` for the first stream,
        // and for an account's first one `accounts/<name>/` (and
        // `accounts/`) too.
        let mut fresh: Vec<&Path> = Vec::new();
        let mut d = root.as_path();
        while !d.exists() {
            fresh.push(d);
            match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => d = p,
                _ => break,
            }
        }
        std::fs::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(cfg).expect("serialisable");
        // Syncs `dir` (which names stream.json) too.
        write_atomic(&dir.join("stream.json"), &json)?;
        if let Some(m) = members {
            crate::replication::write_members(&dir, m)?;
        }
        // The entries naming the stream's directory and each new one above it.
        crate::store::segment::sync_dir(&root)?;
        for made in fresh {
            if let Some(parent) = made.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::store::segment::sync_dir(parent)?;
            }
        }
        self.start_stream(cfg.clone(), &dir)
    }

    fn index_remove(&self, cfg: &StreamConfig) {
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        for p in &cfg.subjects {
            ix.remove(p, &cfg.name);
        }
    }

    /// A stream's subjects are interest like a subscription's, so cluster
    /// peers forward publishes on them here, where they are stored and acked.
    fn announce(&self, subjects: &[String], add: bool) {
        let Some(hook) = &self.interest else { return };
        for p in subjects {
            if add {
                hook.added(p, None);
            } else {
                hook.removed(p, None);
            }
        }
    }

    /// Changes a stream's configuration: its subjects (capture and the
    /// interest announced to cluster peers follow at once), limits,
    /// duplicate window, largest message, segment size, fsync interval,
    /// description. Its name, `fsync` and `replicas` are fixed, and a
    /// replicated stream's configuration is fixed altogether (every
    /// replica would have to apply the change through the group's log).
    ///
    /// The new configuration is on disk (`stream.json`) before anything
    /// uses it; the stream's writer then applies it, retention included,
    /// before this returns, so a lower `max_msgs` has dropped the oldest
    /// messages by then. Blocks on the disk: call it from a blocking thread.
    pub fn update(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        cfg.validate()?;
        let name = cfg.name.clone();
        let (s, gen) = {
            let _admin = self.admin_for(&name);
            let s = self
                .get(&name)
                .ok_or_else(|| StreamError::NotFound(name.clone()))?;
            let old = s.config();
            if *old == cfg {
                return Ok(s.info());
            }
            if old.replicas() != cfg.replicas() {
                return Err(StreamError::Unchangeable("replicas"));
            }
            if old.replicas() > 1 {
                if let Err(what) = limits_only(&old, &cfg) {
                    return Err(StreamError::Unsupported(format!(
                        "changing {what} of a replicated stream ({name} has {} replicas; its limits and description can change)",
                        old.replicas()
                    )));
                }
                // Through the group's log: every replica takes it at the
                // same entry, and cuts by the new limits there.
                crate::replication::update(&s, &cfg)?;
                info!(stream = %name, max_msgs = ?cfg.max_msgs, max_bytes = ?cfg.max_bytes, max_age_ms = ?cfg.max_age_ms, "replicated stream updated");
                return Ok(s.info());
            }
            if old.fsync != cfg.fsync {
                return Err(StreamError::Unchangeable("fsync"));
            }
            {
                // The stream's own patterns are out of the index while the
                // new ones are checked against everyone else's.
                let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
                for p in &old.subjects {
                    ix.remove(p, &name);
                }
                let clash = cfg.subjects.iter().find_map(|q| {
                    ix.overlap(q)
                        .map(|(p, other)| (q.clone(), p.to_string(), other.to_string()))
                });
                for p in &old.subjects {
                    ix.insert(p, &name);
                }
                if let Some((q, p, other)) = clash {
                    return Err(StreamError::BadRequest(format!(
                        "subject {q:?} overlaps {p:?} of stream {other:?}"
                    )));
                }
            }
            let json = serde_json::to_vec_pretty(&cfg).expect("serialisable");
            write_atomic(&s.dir.join("stream.json"), &json).map_err(|e| StreamError::Storage {
                name: name.clone(),
                error: format!("cannot save the new configuration: {e}"),
            })?;
            {
                let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
                for p in &old.subjects {
                    ix.remove(p, &name);
                }
                for p in &cfg.subjects {
                    ix.insert(p, &name);
                }
            }
            let gone: Vec<String> = old
                .subjects
                .iter()
                .filter(|p| !cfg.subjects.contains(p))
                .cloned()
                .collect();
            let new: Vec<String> = cfg
                .subjects
                .iter()
                .filter(|p| !old.subjects.contains(p))
                .cloned()
                .collect();
            info!(stream = %name, subjects = ?cfg.subjects, max_msgs = ?cfg.max_msgs, max_bytes = ?cfg.max_bytes, max_age_ms = ?cfg.max_age_ms, "stream updated");
            *s.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
            // Capture caches hold subject -> stream answers: start them over.
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.announce(&new, true);
            self.announce(&gone, false);
            // Subjects a stream now captures (or no longer does) change
            // which subscriptions may be served by a kernel route.
            let changed: Vec<String> = new.iter().chain(gone.iter()).cloned().collect();
            crate::accel::routes::streams_changed(&self.delivery, &changed);
            let gen = s.reconfig.fetch_add(1, Ordering::AcqRel) + 1;
            (s, gen)
        };
        s.wake.notify_one();
        if !s.wait_applied(gen, RECONFIG_WAIT) {
            warn!(stream = %name, "the stream's writer has not applied the new configuration yet; it will when it next runs");
        }
        Ok(s.info())
    }

    /// Deletes a stream and its data. Publishes in flight to it fail.
    pub fn delete(&self, name: &str) -> Result<(), StreamError> {
        let _g = self.admin_for(name);
        let s = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| StreamError::NotFound(name.into()))?;
        self.index_remove(&s.config());
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        crate::accel::routes::streams_changed(&self.delivery, &s.config().subjects);
        if s.replicas == 1 {
            self.announce(&s.config().subjects, false);
        } else {
            crate::replication::hub().close_group(name);
        }
        s.deleted.store(true, Ordering::Release);
        if let Some(q) = &s.quota {
            q.forget(&s);
        }
        s.space.notify_waiters();
        for (_, c) in s
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            c.stop();
        }
        s.close_writer();
        let dir = s.dir.clone();
        let trash = dir.with_extension(format!("deleted-{}", rand::random::<u32>()));
        if let Err(e) = std::fs::rename(&dir, &trash) {
            warn!(stream = name, "cannot remove the stream's directory: {e}");
        } else {
            let remove = move || {
                let _ = std::fs::remove_dir_all(&trash);
            };
            // On the runtime's (bounded) blocking pool, not a thread each.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(remove)),
                Err(_) => remove(),
            }
        }
        info!(stream = name, "stream deleted");
        Ok(())
    }
}

/// Checks the CRCs of a log's sealed segments in the background: one thread
/// for the whole broker, one log after the other, so start-up with many
/// streams starts no thread per stream and keeps the blocking pool free.
/// Reads check every record's CRC anyway, so if the thread cannot start
/// only the early warning is lost.
fn verify_in_background(log: Arc<Log>) {
    static QUEUE: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Arc<Log>>>> =
        std::sync::OnceLock::new();
    let q = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Log>>();
        if let Err(e) = std::thread::Builder::new()
            .name("verify-segments".into())
            .spawn(move || {
                for log in rx {
                    log.verify_sealed();
                }
            })
        {
            error!("cannot start the background verification of sealed segments: {e}");
        }
        Mutex::new(tx)
    });
    let _ = q.lock().unwrap_or_else(|p| p.into_inner()).send(log);
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        crate::store::segment::sync_dir(d)?;
    }
    Ok(())
}

/// A reader task's cache of `subject -> capturing stream`, valid for one
/// streams generation: a hit is one atomic load and one hash lookup.
#[derive(Default)]
pub struct CaptureCache {
    gen: u64,
    map: HashMap<Box<str>, Option<Arc<Stream>>>,
}

impl CaptureCache {
    #[inline]
    pub fn get(&mut self, streams: &Streams, subject: &str) -> Option<Arc<Stream>> {
        if streams.is_empty() {
            return None;
        }
        let gen = streams.generation();
        if gen != self.gen {
            self.map.clear();
            self.gen = gen;
        }
        if let Some(s) = self.map.get(subject) {
            return s.clone();
        }
        if is_inbox(subject) {
            // A request's one-time reply subject: never captured (and not
            // cached: an entry per reply would push out the subjects that
            // repeat).
            return None;
        }
        if self.map.len() >= 4096 {
            self.map.clear();
        }
        let s = streams.capture(subject);
        self.map.insert(subject.into(), s.clone());
        s
    }
}

/// Captured messages of one reader batch, handed to each stream's writer
/// once per batch (so a batch of publishes costs one channel send).
#[derive(Default)]
pub struct Pending {
    reqs: Vec<(Arc<Stream>, WriteReq)>,
    /// A stream whose queue is over its limit: the reader waits before reading more.
    full: Option<Arc<Stream>>,
}

impl Pending {
    pub fn add(
        &mut self,
        s: &Arc<Stream>,
        subject: &str,
        ack: AckTo,
        headers: &[u8],
        payload: &[u8],
    ) {
        let i = match self.reqs.iter().position(|(x, _)| Arc::ptr_eq(x, s)) {
            Some(i) => i,
            None => {
                self.reqs.push((
                    s.clone(),
                    WriteReq {
                        buf: BytesMut::with_capacity(16 * 1024),
                        entries: Vec::new(),
                    },
                ));
                self.reqs.len() - 1
            }
        };
        let req = &mut self.reqs[i].1;
        let before = req.buf.len();
        record::encode_unsealed(&mut req.buf, subject, headers, payload);
        let (msg_id, expect) = if headers.is_empty() {
            (None, None)
        } else {
            read_headers(subject, headers)
        };
        req.entries.push(Entry {
            len: (req.buf.len() - before) as u32,
            ack,
            msg_id,
            expect,
        });
    }

    /// Hands everything queued to the writers.
    pub fn flush(&mut self) {
        for (s, req) in self.reqs.drain(..) {
            s.send(req);
            if s.over_limit() {
                self.full = Some(s);
            }
        }
    }

    /// Backpressure: a stream this batch wrote to whose writer is behind.
    pub fn take_full(&mut self) -> Option<Arc<Stream>> {
        self.full.take()
    }
}

/// Is this header the id that makes a publish idempotent (`Msg-Id`, or
/// JetStream's `Nats-Msg-Id`)?
pub(crate) fn is_msg_id(name: &str) -> bool {
    name.eq_ignore_ascii_case(MSG_ID_HEADER) || name.eq_ignore_ascii_case("Nats-Msg-Id")
}

/// A publish's Msg-Id and `Nats-Expected-*` requirements. A number that
/// does not parse is a requirement that never holds.
fn read_headers(subject: &str, headers: &[u8]) -> (Option<Box<str>>, Option<Box<Expect>>) {
    let mut id = None;
    let mut x: Option<Box<Expect>> = None;
    let num = |v: &str| v.trim().parse::<u64>().unwrap_or(u64::MAX);
    for (k, v) in iter_headers(headers) {
        if is_msg_id(k) {
            id = Some(v.into());
        } else if k.len() > 13 && k[..13].eq_ignore_ascii_case("Nats-Expected") {
            let e = x.get_or_insert_with(Default::default);
            let k = &k[13..];
            if k.eq_ignore_ascii_case("-Stream") {
                e.stream = Some(v.into());
            } else if k.eq_ignore_ascii_case("-Last-Sequence") {
                e.last_seq = Some(num(v));
            } else if k.eq_ignore_ascii_case("-Last-Msg-Id") {
                e.last_msg_id = Some(v.into());
            } else if k.eq_ignore_ascii_case("-Last-Subject-Sequence") {
                e.last_subject_seq = Some((num(v), subject.into()));
            }
        }
    }
    (id, x)
}

/// Name, type, help text and reader of one per-stream metric.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StreamState) -> u64,
);

/// Stream figures for `/metrics`, one series per stream.
pub(crate) struct StreamsMetrics(pub Arc<Streams>);

impl crate::metrics::Source for StreamsMetrics {
    fn name(&self) -> &'static str {
        "streams_metrics"
    }

    fn prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let list = self.0.list();
        let series: [Series; 5] = [
            (
                "sockbus_stream_messages",
                "gauge",
                "Messages stored in the stream.",
                |s| s.messages,
            ),
            (
                "sockbus_stream_bytes",
                "gauge",
                "Bytes stored in the stream.",
                |s| s.bytes,
            ),
            (
                "sockbus_stream_last_sequence",
                "gauge",
                "Sequence of the newest message.",
                |s| s.last_seq,
            ),
            (
                "sockbus_stream_consumers",
                "gauge",
                "Consumers of the stream.",
                |s| s.consumers as u64,
            ),
            (
                "sockbus_stream_damaged_records_total",
                "counter",
                "Records found damaged on disk (CRC mismatch) and skipped.",
                |s| s.damaged_records,
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for i in &list {
                let _ = writeln!(
                    out,
                    "{name}{{stream=\"{}\"}} {}",
                    i.config.name,
                    get(&i.state)
                );
            }
        }
        let repairs = crate::replication::hub().repair_stats();
        if !repairs.is_empty() {
            let _ = writeln!(
                out,
                "# HELP sockbus_stream_repairs_total Damaged copies of a replicated stream repaired here from its peers since start-up.\n\
                 # TYPE sockbus_stream_repairs_total counter"
            );
            for (name, n, _) in &repairs {
                let _ = writeln!(out, "sockbus_stream_repairs_total{{stream=\"{name}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP sockbus_stream_repairing 1 while this replica's damaged copy of the stream is being repaired (it does not vote).\n\
                 # TYPE sockbus_stream_repairing gauge"
            );
            for (name, _, r) in &repairs {
                let _ = writeln!(
                    out,
                    "sockbus_stream_repairing{{stream=\"{name}\"}} {}",
                    u8::from(*r)
                );
            }
        }
        let (open, max) = self.0.open_files();
        let _ = writeln!(
            out,
            "# HELP sockbus_stream_open_files Stream files (segments, consumer op logs) open now.\n\
             # TYPE sockbus_stream_open_files gauge\nsockbus_stream_open_files {open}\n\
             # HELP sockbus_stream_open_files_max Most stream files kept open (half the open-file limit).\n\
             # TYPE sockbus_stream_open_files_max gauge\nsockbus_stream_open_files_max {max}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_delivery() -> Delivery {
        Delivery::new(
            crate::router::Router::default(),
            Default::default(),
            1 << 20,
            1 << 20,
            0,
        )
    }

    fn limits(max_streams: usize) -> StreamLimits {
        StreamLimits {
            max_streams,
            open_files: 1,
            ..StreamLimits::default()
        }
    }

    #[tokio::test]
    async fn a_stream_beyond_max_streams_is_refused_naming_the_limit_and_a_restart_with_more_on_disk_opens_them_all(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::open_with(dir.path(), test_delivery(), None, limits(3)).unwrap();
        for i in 0..3 {
            streams
                .create(StreamConfig::new(format!("S{i}"), [format!("s{i}.>")]))
                .unwrap();
        }
        let e = streams
            .create(StreamConfig::new("S3", ["s3.>"]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"cannot create stream "S3": the broker holds 3 streams, its limit is 3 (--max-streams)"#
        );
        assert_eq!(e.status(), 400);
        assert!(streams.get("S3").is_none());
        // Creating one that exists is still answered; a delete makes room.
        streams.create(StreamConfig::new("S0", ["s0.>"])).unwrap();
        streams.delete("S0").unwrap();
        streams.create(StreamConfig::new("S3", ["s3.>"])).unwrap();
        drop(streams);

        let streams = Streams::open_with(dir.path(), test_delivery(), None, limits(2)).unwrap();
        assert_eq!(streams.list().len(), 3, "every stream on disk opens");
        assert!(streams.capture("s3.x").is_some());
        let e = streams
            .create(StreamConfig::new("S4", ["s4.>"]))
            .unwrap_err();
        assert!(
            matches!(
                e,
                StreamError::TooMany {
                    count: 3,
                    max: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn overlapping_patterns_are_refused_among_many_streams() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::open_with(dir.path(), test_delivery(), None, limits(1000)).unwrap();
        for i in 0..500 {
            streams
                .create(StreamConfig::new(format!("S{i}"), [format!("m.{i}.*")]))
                .unwrap();
        }
        let e = streams
            .create(StreamConfig::new("X", ["m.7.x"]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"subject "m.7.x" overlaps "m.7.*" of stream "S7""#
        );
        assert!(streams.create(StreamConfig::new("Y", ["m.>"])).is_err());
        assert_eq!(streams.capture("m.499.a").unwrap().name, "S499");
        assert!(streams.capture("m.500.a").is_none());
        streams.delete("S7").unwrap();
        streams.create(StreamConfig::new("X", ["m.7.x"])).unwrap();
        assert_eq!(streams.capture("m.7.x").unwrap().name, "X");
        assert!(streams.capture("m.7.y").is_none());
    }

    #[tokio::test]
    async fn reply_subjects_are_never_captured_not_even_by_a_stream_on_everything() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::open(dir.path(), test_delivery(), None).unwrap();
        let e = streams
            .create(serde_json::from_str(r#"{"name":"replies","subjects":["_INBOX.>"]}"#).unwrap())
            .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("_INBOX."), "{e}");
        streams
            .create(serde_json::from_str(r#"{"name":"all","subjects":[">"]}"#).unwrap())
            .unwrap();
        let mut c = CaptureCache::default();
        for n in 0..10 {
            let inbox = format!("_INBOX.client.{n}");
            assert!(c.get(&streams, &inbox).is_none(), "{inbox}");
            assert!(streams.capture(&inbox).is_none(), "{inbox}");
        }
        assert_eq!(c.get(&streams, "orders.eu").unwrap().name, "all");
        assert_eq!(c.get(&streams, "_INBOX").unwrap().name, "all");
        // Only the repeating subjects took cache entries.
        assert_eq!(c.map.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_moves_capture_to_the_new_subjects_keeps_the_name_fsync_and_replicas_and_is_saved(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let streams = Arc::new(Streams::open(dir.path(), test_delivery(), None).unwrap());
        streams.create(StreamConfig::new("A", ["a.>"])).unwrap();
        streams.create(StreamConfig::new("B", ["b.>"])).unwrap();
        let s2 = streams.clone();
        let upd = move |cfg: StreamConfig| {
            let s2 = s2.clone();
            async move {
                tokio::task::spawn_blocking(move || s2.update(cfg))
                    .await
                    .unwrap()
            }
        };
        let info = upd(StreamConfig {
            max_msgs: Some(5),
            ..StreamConfig::new("A", ["a.>", "c.*"])
        })
        .await
        .unwrap();
        assert_eq!(info.config.max_msgs, Some(5));
        assert_eq!(streams.capture("c.x").unwrap().name, "A");
        assert_eq!(streams.capture("a.x").unwrap().name, "A");
        let e = upd(StreamConfig::new("A", ["b.x"])).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"subject "b.x" overlaps "b.>" of stream "B""#
        );
        let e = upd(StreamConfig {
            fsync: Fsync::Never,
            ..StreamConfig::new("A", ["a.>"])
        })
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream configuration update can not change fsync"
        );
        let e = upd(StreamConfig::new("Z", ["z"])).await.unwrap_err();
        assert!(matches!(e, StreamError::NotFound(_)), "{e}");
        // Refused updates changed nothing.
        assert_eq!(streams.capture("c.x").unwrap().name, "A");
        upd(StreamConfig::new("A", ["c.*"])).await.unwrap();
        assert!(streams.capture("a.x").is_none(), "a.> is free again");
        streams.create(StreamConfig::new("A2", ["a.>"])).unwrap();
        drop(streams);
        let streams = Streams::open(dir.path(), test_delivery(), None).unwrap();
        assert_eq!(
            *streams.get("A").unwrap().config(),
            StreamConfig::new("A", ["c.*"])
        );
        assert_eq!(streams.capture("a.x").unwrap().name, "A2");
    }

    #[test]
    fn overlapping_patterns_are_those_one_subject_could_match_both() {
        assert!(patterns_overlap("a.*", "a.b"));
        assert!(patterns_overlap("a.>", "a.b.c"));
        assert!(patterns_overlap(">", "x"));
        assert!(patterns_overlap("*.b", "a.*"));
        assert!(!patterns_overlap("a.>", "a"));
        assert!(!patterns_overlap("a.*", "a.b.c"));
        assert!(!patterns_overlap("a.b", "a.c"));
    }

    #[test]
    fn stream_configs_are_validated() {
        assert!(StreamConfig::validate(
            &serde_json::from_str(r#"{"name":"ok","subjects":["a.>"]}"#).unwrap()
        )
        .is_ok());
        for bad in [
            r#"{"name":"has space","subjects":["a"]}"#,
            r#"{"name":"x","subjects":[]}"#,
            r#"{"name":"x","subjects":["$SB.API.>"]}"#,
            r#"{"name":"x","subjects":["a..b"]}"#,
        ] {
            let c: StreamConfig = serde_json::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<StreamConfig>(
            r#"{"name":"x","subjects":["a"],"fsync":"sometimes"}"#
        )
        .is_err());
    }
}
