//! Pull consumers: a cursor over a stream plus the set of delivered,
//! unacknowledged messages. A client asks for a batch (`NEXT`), the broker
//! reads that much from disk and sends it to the client's inbox, so a
//! consumer reads a stream of any size with bounded memory on both sides.
//!
//! A durable consumer keeps its state in an append-only op log
//! (`consumers/<name>.log`): `N` next sequence, `D` delivered (with count),
//! `A` acked, `T` terminated, each 17 bytes with a CRC32C. Replaying it gives
//! the position and the pending set; a torn last op is ignored. Confirmed
//! acks (an ack with a reply subject) are answered after an fsync.
//!
//! A durable consumer of a replicated stream keeps that state in the
//! stream's Raft log instead and is served by the stream's leader (`repl`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sockbus_protocol::api::{header, subject, Start};
use sockbus_protocol::frame::push_header;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{strict, write_atomic, Stream, StreamError};
use crate::deliver::{Delivery, Outgoing};
use crate::store::files::{CachedFile, Mode};
use crate::store::{now_ns, Log, ReadPos, StoredMsg};

pub(crate) mod repl;

const OP_LEN: usize = 17;
const COMPACT_AT: u64 = 1 << 20;
/// Most a single round of a pull reads from disk.
const ROUND_MSGS: usize = 1024;
const ROUND_BYTES: usize = 4 << 20;

/// The API's types are shared with the SDK (sockbus_protocol::api).
pub use sockbus_protocol::api::{AckKind, AckPolicy, ConsumerConfig, ConsumerInfo, PullRequest};

struct Pend {
    deliveries: u32,
    deadline: Instant,
}

struct CState {
    next_seq: u64,
    pending: BTreeMap<u64, Pend>,
    pos: Option<ReadPos>,
    redelivered: u64,
    /// The op log (durable consumers), opened through the streams' file cache.
    file: Option<CachedFile>,
    file_len: u64,
}

/// How a pull's deliveries and statuses are framed for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// `$SB.ACK.` ack subjects, `Sb-Status` statuses with sockbus's texts.
    Native,
    /// JetStream's `$JS.ACK.` ack subjects and status texts (crate::jetstream).
    Js,
}

/// One pull: a batch to deliver to `reply`.
pub(crate) struct Pull {
    pub reply: String,
    pub batch: usize,
    pub max_bytes: usize,
    pub expires: Duration,
    pub no_wait: bool,
    pub flavor: Flavor,
    /// Send an idle-heartbeat status this often while nothing is delivered.
    pub heartbeat: Option<Duration>,
    /// A push consumer's round: no 404/408 statuses at its end.
    pub push: bool,
    /// Told when the pull has ended (push consumers start the next one).
    pub done: Option<oneshot::Sender<()>>,
    /// A replicated consumer's pull forwarded by another node: the node
    /// whose client asked, which delivers what this one sends it (`repl`).
    pub origin: Option<String>,
}

pub struct Consumer {
    pub name: String,
    pub stream: String,
    pub config: ConsumerConfig,
    log: Arc<Log>,
    path: Option<PathBuf>,
    st: Mutex<CState>,
    pulls: mpsc::UnboundedSender<Pull>,
    kick: Notify,
    stop: CancellationToken,
    last_pull: AtomicU64,
    /// Where deliveries and ack answers go.
    delivery: Delivery,
    /// Messages delivered, counted from the consumer's start in this
    /// process (JetStream's consumer sequence; not kept across restarts).
    pub(crate) delivered: AtomicU64,
    /// Pulls queued or being served.
    waiting: AtomicUsize,
    /// The JetStream configuration it was created with through `$JS.API`
    /// (crate::jetstream), kept beside a durable one as `<name>.nats`.
    pub(crate) nats: Option<serde_json::Value>,
    /// When it was created or loaded, ns since the epoch.
    pub(crate) created: u64,
    /// Itself, for the tasks a replicated consumer's pulls and acks start.
    me: Weak<Consumer>,
    /// A durable consumer of a replicated stream: its replicated state.
    pub(crate) repl: Option<repl::Repl>,
}

/// One op of an op log: (kind, seq, n), or `None` when torn or damaged.
fn read_op(rec: &[u8]) -> Option<(u8, u64, u32)> {
    if rec.len() < OP_LEN
        || crc32c::crc32c(&rec[..13]) != u32::from_le_bytes(rec[13..17].try_into().ok()?)
    {
        return None;
    }
    let seq = u64::from_le_bytes(rec[1..9].try_into().ok()?);
    let n = u32::from_le_bytes(rec[9..13].try_into().ok()?);
    matches!(rec[0], b'N' | b'D' | b'A' | b'T').then_some((rec[0], seq, n))
}

/// One op onto a position and its pending set (seq -> deliveries): the
/// same at start-up and in a replicated stream's state machine.
fn replay(next_seq: &mut u64, pending: &mut BTreeMap<u64, u32>, kind: u8, seq: u64, n: u32) {
    match kind {
        b'N' => *next_seq = (*next_seq).max(seq),
        b'D' => {
            pending.insert(seq, n);
            *next_seq = (*next_seq).max(seq + 1);
        }
        _ => {
            pending.remove(&seq);
        }
    }
}

/// A state as the ops that rebuild it: `N` and one `D` per pending message.
fn state_ops(next_seq: u64, pending: impl Iterator<Item = (u64, u32)>) -> Vec<u8> {
    let mut b = Vec::new();
    op(&mut b, b'N', next_seq, 0);
    for (seq, n) in pending {
        op(&mut b, b'D', seq, n);
    }
    b
}

fn op(buf: &mut Vec<u8>, kind: u8, seq: u64, n: u32) {
    let start = buf.len();
    buf.push(kind);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&n.to_le_bytes());
    let crc = crc32c::crc32c(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

impl Consumer {
    fn lock(&self) -> MutexGuard<'_, CState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_durable(&self) -> bool {
        self.config.durable.is_some()
    }

    pub fn info(&self) -> ConsumerInfo {
        let st = self.lock();
        ConsumerInfo {
            stream: self.stream.clone(),
            name: self.name.clone(),
            durable: self.is_durable(),
            config: self.config.clone(),
            next_seq: st.next_seq,
            ack_floor: st.pending.keys().next().map_or(st.next_seq, |s| *s) - 1,
            num_ack_pending: st.pending.len(),
            num_redelivered: st.redelivered,
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    fn write_ops(&self, st: &mut CState, ops: &[u8]) {
        if ops.is_empty() {
            return;
        }
        if let Some(r) = &self.repl {
            // Stored by the group's state machine once committed.
            r.queue(ops);
            return;
        }
        if let Some(f) = &st.file {
            match f.open().and_then(|f| (&*f).write_all(ops)) {
                Ok(()) => st.file_len += ops.len() as u64,
                Err(e) => warn!(consumer = %self.name, "cannot record consumer state: {e}"),
            }
        }
        if st.file_len > COMPACT_AT {
            if let Err(e) = self.compact(st) {
                warn!(consumer = %self.name, "cannot compact consumer state: {e}");
            }
        }
    }

    /// Rewrites the op log as the current state only.
    fn compact(&self, st: &mut CState) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let b = state_ops(
            st.next_seq,
            st.pending.iter().map(|(s, p)| (*s, p.deliveries)),
        );
        write_atomic(path, &b)?;
        // A new file took the old one's name: open that one from now on.
        st.file = Some(self.log.files().file(path.clone(), Mode::Append));
        st.file_len = b.len() as u64;
        Ok(())
    }

    pub(crate) fn pull(&self, reply: &str, p: PullRequest) {
        self.pull_with(Pull {
            reply: reply.to_string(),
            batch: p.batch.max(1),
            max_bytes: p.max_bytes.unwrap_or(usize::MAX).max(1),
            expires: Duration::from_millis(p.expires_ms.unwrap_or(5000)),
            no_wait: p.no_wait,
            flavor: Flavor::Native,
            heartbeat: None,
            push: false,
            done: None,
            origin: None,
        });
    }

    /// Queues a pull; they are served one after the other (a replicated
    /// consumer's by the stream's leader).
    pub(crate) fn pull_with(&self, p: Pull) {
        if self.repl.is_some() {
            self.last_pull.store(now_ns(), Ordering::Relaxed);
            if let Some(me) = self.me.upgrade() {
                repl::dispatch_pull(me, p);
            }
            return;
        }
        self.queue_pull(p);
    }

    fn queue_pull(&self, p: Pull) {
        self.last_pull.store(now_ns(), Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        if self.pulls.send(p).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Where its deliveries go.
    pub(crate) fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Pulls queued or being served now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Marks activity (an ephemeral consumer in use is not removed).
    pub(crate) fn touch(&self) {
        self.last_pull.store(now_ns(), Ordering::Relaxed);
    }

    /// Has the consumer been deleted (or its stream)?
    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Waits until the consumer is deleted.
    pub(crate) async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Redelivers a pending message no sooner than `delay` from now (a
    /// JetStream `-NAK {"delay": ns}`).
    pub(crate) fn nak_after(&self, seq: u64, delay: Duration) {
        if self.repl.is_some() {
            if let Some(me) = self.me.upgrade() {
                repl::dispatch_ack(me, seq, AckKind::Nak, Some(delay), None);
            }
            return;
        }
        self.nak_after_local(seq, delay);
    }

    fn nak_after_local(&self, seq: u64, delay: Duration) {
        let mut st = self.lock();
        if let Some(p) = st.pending.get_mut(&seq) {
            p.deadline = Instant::now() + delay;
        }
        drop(st);
        self.kick.notify_one();
    }

    /// The pending sequences up to and including `seq` (an ack of `seq` under
    /// JetStream's `ack_policy: all` acks them all).
    pub(crate) fn pending_upto(&self, seq: u64) -> Vec<u64> {
        self.lock().pending.range(..=seq).map(|(s, _)| *s).collect()
    }

    /// Messages of the stream past the consumer's position (not counting
    /// its filter): what is left to deliver.
    pub(crate) fn num_pending(&self) -> u64 {
        let next = self.lock().next_seq;
        let (first, last) = {
            let st = self.log.lock();
            (st.first_seq(), st.last_seq())
        };
        // A position below the first message (a purge, retention) reads
        // on from the first.
        (last + 1).saturating_sub(next.max(first))
    }

    /// The stream's messages below `first` are gone (a purge): pending
    /// acks of them are dropped (as terminated) and a position before it
    /// moves to it, so the consumer goes on with what is left.
    pub(crate) fn forget_below(&self, first: u64) {
        let mut st = self.lock();
        let gone: Vec<u64> = st.pending.range(..first).map(|(s, _)| *s).collect();
        let mut ops = Vec::new();
        for seq in gone {
            st.pending.remove(&seq);
            op(&mut ops, b'T', seq, 0);
        }
        if st.next_seq < first {
            st.next_seq = first;
            st.pos = None;
            op(&mut ops, b'N', first, 0);
        }
        if !ops.is_empty() {
            self.write_ops(&mut st, &ops);
            self.kick.notify_one();
        }
    }

    pub(crate) fn ack(&self, seq: u64, kind: AckKind, reply: Option<&str>) {
        if self.repl.is_some() {
            if let Some(me) = self.me.upgrade() {
                repl::dispatch_ack(me, seq, kind, None, reply.map(str::to_string));
            }
            return;
        }
        let file = self.ack_state(seq, kind);
        let Some(reply) = reply else { return };
        let reply = reply.to_string();
        let delivery = self.delivery.clone();
        match file {
            Some(f) => {
                tokio::task::spawn_blocking(move || {
                    let body: &[u8] = match f.open().and_then(|f| f.sync_data()) {
                        Ok(()) => br#"{"ok":true}"#,
                        Err(_) => br#"{"error":"cannot store the ack","status":503}"#,
                    };
                    let _ = delivery.publish_now(&reply, &[], body);
                });
            }
            None => {
                let _ = delivery.publish_now(&reply, &[], br#"{"ok":true}"#);
            }
        }
    }

    /// An ack's change to the state (and its op); the op log to fsync for
    /// a confirmation.
    fn ack_state(&self, seq: u64, kind: AckKind) -> Option<CachedFile> {
        {
            let mut st = self.lock();
            let mut ops = Vec::new();
            match kind {
                AckKind::Ack | AckKind::Term => {
                    if st.pending.remove(&seq).is_some() {
                        op(
                            &mut ops,
                            if kind == AckKind::Ack { b'A' } else { b'T' },
                            seq,
                            0,
                        );
                        self.kick.notify_one();
                    }
                }
                AckKind::Nak => {
                    if let Some(p) = st.pending.get_mut(&seq) {
                        p.deadline = Instant::now();
                        self.kick.notify_one();
                    }
                }
                AckKind::Progress => {
                    if let Some(p) = st.pending.get_mut(&seq) {
                        p.deadline = Instant::now() + self.config.ack_wait();
                    }
                }
            }
            self.write_ops(&mut st, &ops);
            st.file.clone()
        }
    }

    /// Picks what to deliver next: due redeliveries first, then new messages.
    fn collect(&self, max_msgs: usize, max_bytes: usize) -> std::io::Result<Vec<(StoredMsg, u32)>> {
        let now = Instant::now();
        let explicit = self.config.ack_policy == AckPolicy::Explicit;
        let ack_wait = self.config.ack_wait();
        let mut out = Vec::new();
        let mut ops = Vec::new();
        let due: Vec<u64> = {
            let st = self.lock();
            st.pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(s, _)| *s)
                .take(max_msgs)
                .collect()
        };
        for seq in due {
            let b = self.log.read(seq, None, 1, 1, None)?;
            let mut st = self.lock();
            let Some(p) = st.pending.get_mut(&seq) else {
                continue;
            };
            match b.msgs.into_iter().next() {
                Some(m) if m.seq == seq => {
                    if self
                        .config
                        .max_deliver
                        .is_some_and(|max| p.deliveries >= max)
                    {
                        st.pending.remove(&seq);
                        op(&mut ops, b'T', seq, 0);
                        continue;
                    }
                    p.deliveries += 1;
                    p.deadline = now + ack_wait;
                    let d = p.deliveries;
                    st.redelivered += 1;
                    op(&mut ops, b'D', seq, d);
                    out.push((m, d));
                }
                _ => {
                    // Removed by retention meanwhile.
                    st.pending.remove(&seq);
                    op(&mut ops, b'T', seq, 0);
                }
            }
        }
        let (from, pos, room) = {
            let st = self.lock();
            let room = if explicit {
                self.config
                    .max_ack_pending()
                    .saturating_sub(st.pending.len())
            } else {
                usize::MAX
            };
            (st.next_seq, st.pos, room)
        };
        let want = (max_msgs - out.len()).min(room);
        if want > 0 {
            let b = self.log.read(
                from,
                self.config.filter_subject.as_deref(),
                want,
                max_bytes,
                pos,
            )?;
            let mut st = self.lock();
            if st.next_seq == from {
                for m in b.msgs {
                    if explicit {
                        st.pending.insert(
                            m.seq,
                            Pend {
                                deliveries: 1,
                                deadline: now + ack_wait,
                            },
                        );
                        op(&mut ops, b'D', m.seq, 1);
                    }
                    out.push((m, 1));
                }
                if b.next != from {
                    st.next_seq = b.next;
                    st.pos = b.pos;
                    if !explicit {
                        op(&mut ops, b'N', b.next, 0);
                    }
                }
            }
            self.write_ops(&mut st, &ops);
        } else {
            let mut st = self.lock();
            self.write_ops(&mut st, &ops);
        }
        Ok(out)
    }

    /// Messages that could not be handed to a client go back to be delivered again.
    fn undeliver(&self, seqs: &[u64]) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(&first) = seqs.first() {
            if self.config.ack_policy == AckPolicy::None && first < st.next_seq {
                st.next_seq = first;
                st.pos = None;
            }
        }
        for s in seqs {
            if let Some(p) = st.pending.get_mut(s) {
                p.deadline = now;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().pending.values().map(|p| p.deadline).min()
    }
}

fn parse_start(log: &Log, start: &str) -> Result<u64, StreamError> {
    let st_next = log.lock().next_seq;
    let bad = || {
        StreamError::BadRequest(format!(
            "start {start:?} must be first, last, new, seq:N or time:RFC3339"
        ))
    };
    let start = match start {
        "" => Start::First,
        s => s.parse().map_err(|_| bad())?,
    };
    Ok(match start {
        Start::First => log.lock().first_seq(),
        Start::Last => st_next.saturating_sub(1).max(1).max(log.lock().first_seq()),
        Start::New => st_next,
        Start::Seq(n) => n.max(1),
        Start::Time(t) => {
            let ns = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            log.seq_for_time(ns).map_err(|e| StreamError::Storage {
                name: log.name.clone(),
                error: e.to_string(),
            })?
        }
    })
}

/// Creates a consumer (or returns the existing durable of that name).
pub fn create(s: &Arc<Stream>, cfg: ConsumerConfig) -> Result<ConsumerInfo, StreamError> {
    create_named(s, cfg, None, None).map(|c| c.info())
}

/// Creates a consumer: an ephemeral one named `name` when given, and with
/// the JetStream configuration `nats` it was asked for through `$JS.API`.
pub(crate) fn create_named(
    s: &Arc<Stream>,
    mut cfg: ConsumerConfig,
    name: Option<String>,
    nats: Option<serde_json::Value>,
) -> Result<Arc<Consumer>, StreamError> {
    cfg.validate()?;
    if let Some(n) = &name {
        sockbus_protocol::api::validate_name("consumer", n)?;
    }
    let name = match &cfg.durable {
        Some(n) => {
            if let Some(c) = s.consumer(n) {
                same_durable(&c, &cfg)?;
                return Ok(c);
            }
            if s.replicas > 1 {
                // Made by the group (repl::create), never here alone.
                return Err(StreamError::BadRequest(format!(
                    "durable consumer {n:?} of a replicated stream is created through its group"
                )));
            }
            n.clone()
        }
        None => match name {
            Some(n) => {
                if let Some(c) = s.consumer(&n) {
                    if c.config != cfg {
                        return Err(StreamError::BadRequest(format!(
                            "consumer {n:?} exists with a different configuration"
                        )));
                    }
                    return Ok(c);
                }
                n
            }
            None => format!("eph-{:016x}", rand::random::<u64>()),
        },
    };
    if cfg.start.is_empty() {
        cfg.start = Start::First.to_string();
    }
    let next_seq = parse_start(&s.log, &cfg.start)?;
    let storage = |e: std::io::Error| StreamError::Storage {
        name: s.name.clone(),
        error: e.to_string(),
    };
    let (path, file, file_len) = if cfg.durable.is_some() {
        let (path, f, len) =
            durable_files(s, &name, &cfg, nats.as_ref(), next_seq).map_err(storage)?;
        (Some(path), Some(f), len)
    } else {
        (None, None, 0)
    };
    let c = start(
        s,
        name,
        cfg,
        CState {
            next_seq,
            pending: BTreeMap::new(),
            pos: None,
            redelivered: 0,
            file,
            file_len,
        },
        path,
        nats,
        None,
    );
    info!(stream = %s.name, consumer = %c.name, durable = c.is_durable(), next_seq, "consumer created");
    Ok(c)
}

/// An existing durable asked for again: the same filter and ack policy, or refused.
fn same_durable(c: &Consumer, cfg: &ConsumerConfig) -> Result<(), StreamError> {
    if c.config.filter_subject != cfg.filter_subject || c.config.ack_policy != cfg.ack_policy {
        return Err(StreamError::BadRequest(format!(
            "durable consumer {:?} exists with a different filter or ack policy",
            c.name
        )));
    }
    Ok(())
}

/// A new durable consumer's files: its config, its JetStream config, an
/// op log holding its start. The op log's path, file and length.
fn durable_files(
    s: &Stream,
    name: &str,
    cfg: &ConsumerConfig,
    nats: Option<&serde_json::Value>,
    next_seq: u64,
) -> std::io::Result<(PathBuf, CachedFile, u64)> {
    let dir = s.consumers_dir();
    std::fs::create_dir_all(&dir)?;
    write_atomic(
        &dir.join(format!("{name}.json")),
        &serde_json::to_vec_pretty(cfg).expect("serialisable"),
    )?;
    if let Some(n) = nats {
        write_atomic(
            &dir.join(format!("{name}.nats")),
            &serde_json::to_vec_pretty(n).expect("serialisable"),
        )?;
    }
    let path = dir.join(format!("{name}.log"));
    let b = state_ops(next_seq, std::iter::empty());
    write_atomic(&path, &b)?;
    let f = s.log.files().file(path.clone(), Mode::Append);
    Ok((path, f, b.len() as u64))
}

/// Why a replicated stream's state machine could not apply a consumer change.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// Refused, the same way on every replica (the proposer hears why).
    Refused(String),
    /// The disk failed here.
    Io(std::io::Error),
}

/// A replicated stream's state machine applies one committed change to its
/// durable consumers; the op log written, to fsync before `applied` moves.
pub(crate) fn apply_change(
    s: &Arc<Stream>,
    ch: crate::replication::ConsumerChange,
) -> Result<Option<CachedFile>, ApplyError> {
    use crate::replication::ConsumerChange;
    match ch {
        ConsumerChange::Create { name, config, nats } => {
            // Applied again after a crash, or created twice at once.
            if s.consumer(&name).is_some() {
                return Ok(None);
            }
            let cfg: ConsumerConfig = serde_json::from_str(&config)
                .map_err(|e| ApplyError::Refused(format!("consumer configuration: {e}")))?;
            let nats: Option<serde_json::Value> = nats.and_then(|n| serde_json::from_str(&n).ok());
            // Every replica's copy is the same at this entry, so is the start.
            let next_seq =
                parse_start(&s.log, &cfg.start).map_err(|e| ApplyError::Refused(e.to_string()))?;
            let (path, file, len) =
                durable_files(s, &name, &cfg, nats.as_ref(), next_seq).map_err(ApplyError::Io)?;
            let c = start(
                s,
                name,
                cfg,
                CState {
                    next_seq,
                    pending: BTreeMap::new(),
                    pos: None,
                    redelivered: 0,
                    file: None,
                    file_len: 0,
                },
                Some(path.clone()),
                nats,
                Some(repl::Repl::new(next_seq, BTreeMap::new(), path, file, len)),
            );
            info!(stream = %s.name, consumer = %c.name, next_seq, "replicated durable consumer created");
            Ok(None)
        }
        ConsumerChange::Delete { name } => {
            match delete(s, &name) {
                Ok(()) | Err(StreamError::ConsumerNotFound(_)) => {}
                Err(e) => return Err(ApplyError::Refused(e.to_string())),
            }
            Ok(None)
        }
        ConsumerChange::Ops { name, ops } => match s.consumer(&name) {
            // Deleted by a later entry that was applied before a crash.
            None => Ok(None),
            Some(c) if c.repl.is_none() => Ok(None),
            Some(c) => repl::apply_ops(&c, &ops).map(Some).map_err(ApplyError::Io),
        },
    }
}

fn start(
    s: &Arc<Stream>,
    name: String,
    config: ConsumerConfig,
    st: CState,
    path: Option<PathBuf>,
    nats: Option<serde_json::Value>,
    repl: Option<repl::Repl>,
) -> Arc<Consumer> {
    let (tx, rx) = mpsc::unbounded_channel();
    let c = Arc::new_cyclic(|me| Consumer {
        name: name.clone(),
        stream: s.name.clone(),
        config,
        log: s.log.clone(),
        path,
        st: Mutex::new(st),
        pulls: tx,
        kick: Notify::new(),
        stop: CancellationToken::new(),
        last_pull: AtomicU64::new(now_ns()),
        delivery: s.delivery.clone(),
        delivered: AtomicU64::new(0),
        waiting: AtomicUsize::new(0),
        nats,
        created: now_ns(),
        me: me.clone(),
        repl,
    });
    s.consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name, c.clone());
    tokio::spawn(serve(c.clone(), Arc::downgrade(s), rx));
    crate::jetstream::started(&c);
    c
}

/// Loads every durable consumer of a stream (at start-up).
pub(crate) fn load_all(s: &Arc<Stream>) {
    let dir = s.consumers_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let cfg: ConsumerConfig = match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| strict::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                warn!("skipping consumer {}: {e}", p.display());
                continue;
            }
        };
        let Some(name) = cfg.durable.clone() else {
            continue;
        };
        let log_path = dir.join(format!("{name}.log"));
        let bytes = std::fs::read(&log_path).unwrap_or_default();
        let mut next_seq = 1u64;
        let mut pending = BTreeMap::new();
        let now = Instant::now();
        let mut valid = 0;
        for rec in bytes.chunks(OP_LEN) {
            let Some((kind, seq, n)) = read_op(rec) else {
                break;
            };
            valid += OP_LEN;
            replay(&mut next_seq, &mut pending, kind, seq, n);
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .ok()
            .map(|f| {
                // A torn last op is cut so new ops follow valid ones.
                let _ = f.set_len(valid as u64);
                s.log.files().file(log_path.clone(), Mode::Append)
            });
        let pend = pending.len();
        // Its JetStream configuration, when it was created through `$JS.API`.
        let nats = std::fs::read(dir.join(format!("{name}.nats")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // A replicated stream's: the op log holds what the group committed
        // and applied here; the state machine writes it from now on.
        let (file, repl) = match file {
            Some(f) if s.replicas > 1 => (
                None,
                Some(repl::Repl::new(
                    next_seq,
                    pending.clone(),
                    log_path.clone(),
                    f,
                    valid as u64,
                )),
            ),
            f => (f, None),
        };
        let c = start(
            s,
            name,
            cfg,
            CState {
                next_seq,
                pending: pending
                    .into_iter()
                    .map(|(seq, deliveries)| {
                        (
                            seq,
                            Pend {
                                deliveries,
                                deadline: now,
                            },
                        )
                    })
                    .collect(),
                pos: None,
                redelivered: 0,
                file,
                file_len: valid as u64,
            },
            Some(log_path),
            nats,
            repl,
        );
        info!(stream = %s.name, consumer = %c.name, next_seq, pending = pend, "durable consumer loaded");
    }
}

pub(crate) fn delete(s: &Arc<Stream>, name: &str) -> Result<(), StreamError> {
    let c = s
        .consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name)
        .ok_or_else(|| StreamError::ConsumerNotFound(name.into()))?;
    c.stop();
    if let Some(p) = &c.path {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(p.with_extension("json"));
        let _ = std::fs::remove_file(p.with_extension("nats"));
    }
    Ok(())
}

/// A status message to a pull's inbox: no payload, headers `Sb-Status`,
/// `Sb-Description` and `Sb-Pending` (messages of the pull not delivered).
pub(crate) fn send_status(d: &Delivery, reply: &str, code: u16, text: &str, pending: usize) {
    let mut h = Vec::new();
    let _ = push_header(&mut h, header::STATUS, &code.to_string());
    let _ = push_header(&mut h, header::DESCRIPTION, text);
    let _ = push_header(&mut h, header::PENDING, &pending.to_string());
    let _ = d.publish_now(reply, &h, &[]);
}

/// A pull's status in its flavor: sockbus's, or JetStream's (the NATS port
/// writes `Sb-Status` and `Sb-Description` as the status line).
fn pull_status(c: &Consumer, pull: &Pull, code: u16, text: &str, left: usize, bytes: usize) {
    match pull.flavor {
        Flavor::Native => send_status(&c.delivery, &pull.reply, code, text, left),
        Flavor::Js => crate::jetstream::send_status(&c.delivery, &pull.reply, code, left, bytes),
    }
}

async fn serve(c: Arc<Consumer>, stream: Weak<Stream>, mut rx: mpsc::UnboundedReceiver<Pull>) {
    let mut committed = c.log.committed.subscribe();
    let inactive = Duration::from_millis(c.config.inactive_ms.unwrap_or(60_000).max(100));
    loop {
        let pull = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = c.stop.cancelled() => {
                // Pulls still waiting hear that the consumer is gone.
                rx.close();
                while let Ok(p) = rx.try_recv() {
                    if p.flavor == Flavor::Js && !p.push {
                        pull_status(&c, &p, 409, "", p.batch, p.max_bytes);
                    }
                }
                return;
            }
            _ = tokio::time::sleep(inactive), if !c.is_durable() => {
                let idle = now_ns().saturating_sub(c.last_pull.load(Ordering::Relaxed));
                if idle >= inactive.as_nanos() as u64 && c.waiting() == 0 {
                    if let Some(s) = stream.upgrade() {
                        let _ = delete(&s, &c.name);
                    }
                    return;
                }
                continue;
            }
        };
        let mut pull = pull;
        let done = pull.done.take();
        serve_pull(&c, &pull, &mut committed).await;
        c.waiting.fetch_sub(1, Ordering::AcqRel);
        c.touch();
        if let Some(d) = done {
            let _ = d.send(());
        }
    }
}

/// What is left of a replicated consumer's pull, to whichever node leads
/// now (a push consumer's loop pulls again by itself).
fn resend(c: &Arc<Consumer>, pull: &Pull, left: usize, bytes_left: usize, deadline: Instant) {
    if pull.push {
        return;
    }
    repl::dispatch_pull(
        c.clone(),
        Pull {
            reply: pull.reply.clone(),
            batch: left,
            max_bytes: bytes_left,
            expires: deadline.saturating_duration_since(Instant::now()),
            no_wait: pull.no_wait,
            flavor: pull.flavor,
            heartbeat: pull.heartbeat,
            push: false,
            done: None,
            origin: pull.origin.clone(),
        },
    );
}

async fn serve_pull(
    c: &Arc<Consumer>,
    pull: &Pull,
    committed: &mut tokio::sync::watch::Receiver<u64>,
) {
    let start = Instant::now();
    // `expires` of 0 with JetStream: the pull waits until it is filled or
    // its client goes away.
    let deadline = start
        .checked_add(pull.expires)
        .unwrap_or(start + Duration::from_secs(365 * 86_400));
    let mut left = pull.batch;
    let mut bytes_left = pull.max_bytes;
    let mut quiet_since = start;
    loop {
        if c.stop.is_cancelled() {
            if pull.flavor == Flavor::Js && !pull.push {
                pull_status(c, pull, 409, "", left, bytes_left);
            }
            return;
        }
        // A replicated consumer is served by the stream's leader only.
        if c.repl.is_some() && !repl::is_live(c) {
            resend(c, pull, left, bytes_left, deadline);
            return;
        }
        committed.borrow_and_update();
        let (inbox, _) = c.delivery.router().compute(&pull.reply);
        if inbox.is_empty() {
            // A pull forwarded from another node may be here before that
            // node's interest in its inbox.
            if c.repl.is_some() && start.elapsed() < repl::INBOX_GRACE {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // The client is gone; its pull with it.
            return;
        }
        let c2 = c.clone();
        let (n, b) = (left.min(ROUND_MSGS), bytes_left.min(ROUND_BYTES));
        let batch = match tokio::task::spawn_blocking(move || c2.collect(n, b)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(consumer = %c.name, "cannot read the stream: {e}");
                if pull.flavor == Flavor::Native {
                    send_status(
                        &c.delivery,
                        &pull.reply,
                        503,
                        &format!("cannot read the stream: {e}"),
                        left,
                    );
                }
                return;
            }
            Err(_) => return,
        };
        // A replicated consumer's deliveries (and the acks that came
        // before them) are committed before any of them is sent: a leader
        // that takes over knows every message that reached a client, so it
        // delivers none of them again before its ack wait (by when the
        // client's ack has reached it).
        if c.repl.is_some() && repl::flush_all(c).await.is_err() {
            // The batch was never sent; the state is the group's again.
            resend(c, pull, left, bytes_left, deadline);
            return;
        }
        if !batch.is_empty() {
            quiet_since = Instant::now();
            let pending = match pull.flavor {
                Flavor::Js => c.num_pending(),
                Flavor::Native => 0,
            };
            let first = c.delivered.load(Ordering::Relaxed) + 1;
            let acks: Vec<String> = batch
                .iter()
                .enumerate()
                .map(|(i, (msg, deliveries))| match pull.flavor {
                    Flavor::Native => subject::ack(&c.stream, &c.name, msg.seq, *deliveries),
                    Flavor::Js => crate::jetstream::ack_subject(
                        &c.stream,
                        &c.name,
                        *deliveries,
                        msg.seq,
                        first + i as u64,
                        msg.ts,
                        pending,
                    ),
                })
                .collect();
            // How many, in order, reached the client.
            let sent = match &pull.origin {
                None => {
                    let mut out = c.delivery.batch(4);
                    let mut n = 0;
                    for ((msg, _), ack) in batch.iter().zip(&acks) {
                        let m = Outgoing {
                            reply: Some(ack),
                            ..Outgoing::new(msg.subject(), None, &msg.headers, &msg.payload)
                        };
                        if out.redeliver(&inbox, &m) == 0 {
                            break;
                        }
                        n += 1;
                    }
                    out.finish();
                    n
                }
                Some(node) => repl::deliver_remote(c, node, &pull.reply, &batch, &acks).await,
            };
            for (msg, _) in &batch[..sent] {
                c.delivered.fetch_add(1, Ordering::Relaxed);
                left -= 1;
                bytes_left = bytes_left
                    .saturating_sub(msg.payload.len() + msg.headers.len() + msg.subject().len());
            }
            if sent < batch.len() {
                let failed: Vec<u64> = batch[sent..].iter().map(|(m, _)| m.seq).collect();
                c.undeliver(&failed);
                return;
            }
        }
        if left == 0 || bytes_left == 0 {
            return;
        }
        if !batch.is_empty() {
            // There may be more right away.
            continue;
        }
        if pull.no_wait {
            if !pull.push {
                let text = match pull.flavor {
                    Flavor::Native => "no messages",
                    Flavor::Js => "",
                };
                pull_status(c, pull, 404, text, left, bytes_left);
            }
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            if !pull.push {
                pull_status(c, pull, 408, "request expired", left, bytes_left);
            }
            return;
        }
        if let Some(hb) = pull.heartbeat {
            if now >= quiet_since + hb {
                pull_status(c, pull, 100, "", left, bytes_left);
                quiet_since = now;
            }
        }
        let mut wake_at = deadline.min(now + Duration::from_secs(1));
        if let Some(hb) = pull.heartbeat {
            wake_at = wake_at.min(quiet_since + hb);
        }
        if let Some(d) = c.next_deadline() {
            wake_at = wake_at.min(d.max(now + Duration::from_millis(1)));
        }
        tokio::select! {
            _ = committed.changed() => {}
            _ = c.kick.notified() => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = c.stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::sync::oneshot;

    use super::*;
    use crate::deliver::Publisher;
    use crate::streams::testing::{delivery, Inbox, Received};
    use crate::streams::{StreamConfig, Streams};

    /// A broker's streams without a server: stream `S` on `s.>`, and an
    /// inbox subscribed for pulls.
    struct Fx {
        d: Delivery,
        streams: Arc<Streams>,
        s: Arc<Stream>,
        inbox: Inbox,
    }

    /// One delivered message, as the client sees it.
    #[derive(Debug)]
    struct Got {
        seq: u64,
        deliveries: u32,
        payload: String,
        ack: String,
    }

    impl Fx {
        /// Opens (or reopens, as after a restart) the streams in `dir`.
        async fn open(dir: &Path) -> Fx {
            let d = delivery();
            let streams = Arc::new(Streams::open(dir, d.clone(), None).unwrap());
            if streams.get("S").is_none() {
                streams.create(StreamConfig::new("S", ["s.>"])).unwrap();
            }
            let s = streams.get("S").unwrap();
            let inbox = Inbox::new(&d, "_INBOX.pull.1");
            Fx {
                d,
                streams,
                s,
                inbox,
            }
        }

        /// Stores messages `m<from>`..`m<to>` and waits for their acks.
        async fn publish(&self, seqs: std::ops::RangeInclusive<u64>) {
            let mut b = self.d.ingress(&self.streams, 16);
            let from = Publisher {
                id: self.d.next_id(),
                echo: false,
                no_responders: false,
                api: true,
                explicit_acks: true,
            };
            let mut acks = Vec::new();
            for i in seqs {
                let (tx, rx) = oneshot::channel();
                b.publish(
                    &from,
                    "s.x",
                    None,
                    &[],
                    format!("m{i}").as_bytes(),
                    crate::deliver::Ack::Chan(tx),
                )
                .unwrap();
                acks.push((i, rx));
            }
            b.finish();
            for (i, rx) in acks {
                assert_eq!(rx.await.unwrap().unwrap().seq, i);
            }
        }

        fn consumer(&self, cfg: ConsumerConfig) -> Arc<Consumer> {
            let info = create(&self.s, cfg).unwrap();
            self.s.consumer(&info.name).unwrap()
        }

        /// A pull that does not wait (`no_wait`), the way a client sends it:
        /// everything the consumer has for it now, up to 100 messages.
        async fn pull(&self, c: &Consumer) -> Vec<Got> {
            c.pull(
                &self.inbox.subject,
                PullRequest {
                    batch: 100,
                    no_wait: true,
                    ..PullRequest::default()
                },
            );
            let mut got = Vec::new();
            loop {
                for m in self.inbox.next().await {
                    if let Some(status) = m.header(header::STATUS) {
                        assert_eq!(status, "404", "{m:?}");
                        return got;
                    }
                    got.push(delivered(m));
                }
            }
        }

        /// Acks one delivery the way a client does: a PUB to its ack subject.
        fn ack(&self, m: &Got, kind: AckKind) {
            super::super::api::handle(&self.streams, &self.d, &m.ack, None, kind.payload());
        }

        /// What a shutdown does to the streams (their consumers stop, their
        /// writers end), so the directory can be opened again.
        fn close(self) {
            for s in self.streams.list_streams() {
                for c in s.consumers.lock().unwrap().values() {
                    c.stop();
                }
                s.close_writer();
            }
        }
    }

    fn delivered(m: Received) -> Got {
        let ack = m.reply.expect("a delivery carries its ack subject");
        let a = subject::parse_ack(&ack).expect("an ack subject");
        Got {
            seq: a.seq,
            deliveries: a.deliveries,
            payload: String::from_utf8(m.payload).unwrap(),
            ack,
        }
    }

    /// (seq, deliveries) of each message.
    fn seqs(got: &[Got]) -> Vec<(u64, u32)> {
        got.iter().map(|g| (g.seq, g.deliveries)).collect()
    }

    fn explicit(ack_wait_ms: u64) -> ConsumerConfig {
        ConsumerConfig {
            ack_wait_ms: Some(ack_wait_ms),
            ..ConsumerConfig::default()
        }
    }

    fn durable(name: &str, ack_wait_ms: u64) -> ConsumerConfig {
        ConsumerConfig {
            durable: Some(name.into()),
            ..explicit(ack_wait_ms)
        }
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A replicated stream's state machine may apply consumer ops again
    /// after a crash (its `applied` file lags the op log it appended to,
    /// which may also have been compacted meanwhile): the state must come
    /// out as if each op had been applied once.
    #[test]
    fn replaying_a_suffix_of_consumer_ops_again_leaves_the_state_applying_it_once_would() {
        let ops: &[(u8, u64, u32)] = &[
            (b'D', 1, 1),
            (b'D', 2, 1),
            (b'A', 1, 0),
            (b'D', 3, 1),
            (b'D', 2, 2),
            (b'T', 2, 0),
            (b'N', 6, 0),
            (b'A', 3, 0),
            (b'D', 6, 1),
            (b'D', 7, 1),
            (b'D', 6, 2),
            (b'A', 7, 0),
        ];
        let run = |from: (u64, BTreeMap<u64, u32>), seq: &[(u8, u64, u32)]| {
            let (mut next, mut pending) = from;
            for &(k, s, n) in seq {
                replay(&mut next, &mut pending, k, s, n);
            }
            (next, pending)
        };
        let start = || (1u64, BTreeMap::new());
        let once = run(start(), ops);
        assert_eq!(once, (8, BTreeMap::from([(6, 2)])));
        for applied in 0..=ops.len() {
            for written in applied..=ops.len() {
                // Written up to `written`, applied again from `applied`.
                let twice: Vec<_> = ops[..written]
                    .iter()
                    .chain(&ops[applied..])
                    .copied()
                    .collect();
                assert_eq!(run(start(), &twice), once, "{applied}..{written}");
                // The same with the op log compacted at `written`.
                let (n, p) = run(start(), &ops[..written]);
                let mut compacted = start();
                for rec in state_ops(n, p.into_iter()).chunks(OP_LEN) {
                    let (k, s, d) = read_op(rec).expect("a whole op");
                    replay(&mut compacted.0, &mut compacted.1, k, s, d);
                }
                assert_eq!(
                    run(compacted, &ops[applied..]),
                    once,
                    "compacted {applied}..{written}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_unacked_message_is_delivered_again_after_ack_wait_with_its_delivery_count_raised() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(explicit(200));
        let first = fx.pull(&c).await;
        assert_eq!(seqs(&first), [(1, 1), (2, 1), (3, 1)]);
        assert_eq!(first[0].payload, "m1");
        assert!(
            fx.pull(&c).await.is_empty(),
            "nothing again before ack_wait"
        );
        sleep_ms(300).await;
        let again = fx.pull(&c).await;
        assert_eq!(seqs(&again), [(1, 2), (2, 2), (3, 2)]);
        assert_eq!(again[2].payload, "m3", "the same message");
        let info = c.info();
        assert_eq!((info.num_redelivered, info.num_ack_pending), (3, 3));
    }

    #[tokio::test]
    async fn an_acked_message_leaves_pending_and_is_never_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(explicit(200));
        let got = fx.pull(&c).await;
        fx.ack(&got[1], AckKind::Ack);
        let info = c.info();
        assert_eq!((info.num_ack_pending, info.ack_floor), (2, 0));
        fx.ack(&got[0], AckKind::Ack);
        assert_eq!(c.info().ack_floor, 2, "everything up to 2 is acked");
        sleep_ms(300).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(3, 2)], "only the unacked one");
        // An ack of the first delivery still counts for the redelivered message.
        fx.ack(&got[2], AckKind::Ack);
        sleep_ms(300).await;
        assert!(fx.pull(&c).await.is_empty());
        let info = c.info();
        assert_eq!((info.num_ack_pending, info.ack_floor), (0, 3));
    }

    #[tokio::test]
    async fn a_nak_makes_a_message_due_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(explicit(60_000));
        let got = fx.pull(&c).await;
        assert!(fx.pull(&c).await.is_empty());
        fx.ack(&got[1], AckKind::Nak);
        assert_eq!(seqs(&fx.pull(&c).await), [(2, 2)]);
        assert_eq!(c.info().num_redelivered, 1);
    }

    #[tokio::test]
    async fn progress_pushes_a_messages_redelivery_out_by_another_ack_wait() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(explicit(400));
        let got = fx.pull(&c).await;
        sleep_ms(200).await;
        fx.ack(&got[0], AckKind::Progress);
        // 500 ms after delivery: 2 and 3 are due (400), 1 not before 600.
        sleep_ms(300).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(2, 2), (3, 2)]);
        sleep_ms(200).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(1, 2)]);
    }

    #[tokio::test]
    async fn a_terminated_message_is_never_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(explicit(200));
        let got = fx.pull(&c).await;
        fx.ack(&got[0], AckKind::Term);
        let info = c.info();
        assert_eq!((info.num_ack_pending, info.ack_floor), (2, 1));
        sleep_ms(300).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(2, 2), (3, 2)]);
    }

    #[tokio::test]
    async fn max_deliver_stops_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=2).await;
        let c = fx.consumer(ConsumerConfig {
            max_deliver: Some(2),
            ..explicit(100)
        });
        assert_eq!(seqs(&fx.pull(&c).await), [(1, 1), (2, 1)]);
        sleep_ms(150).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(1, 2), (2, 2)]);
        sleep_ms(150).await;
        assert!(
            fx.pull(&c).await.is_empty(),
            "given up after two deliveries"
        );
        let info = c.info();
        assert_eq!((info.num_ack_pending, info.ack_floor), (0, 2));
        // New messages still flow.
        fx.publish(3..=3).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(3, 1)]);
    }

    #[tokio::test]
    async fn max_ack_pending_holds_back_new_messages_until_acks_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=5).await;
        let c = fx.consumer(ConsumerConfig {
            max_ack_pending: Some(2),
            ..explicit(60_000)
        });
        let a = fx.pull(&c).await;
        assert_eq!(seqs(&a), [(1, 1), (2, 1)]);
        assert!(fx.pull(&c).await.is_empty(), "two are pending: no more");
        fx.ack(&a[0], AckKind::Ack);
        let b = fx.pull(&c).await;
        assert_eq!(seqs(&b), [(3, 1)]);
        fx.ack(&a[1], AckKind::Ack);
        fx.ack(&b[0], AckKind::Ack);
        assert_eq!(seqs(&fx.pull(&c).await), [(4, 1), (5, 1)]);
    }

    #[tokio::test]
    async fn a_durable_consumer_comes_back_after_a_restart_with_the_same_pending_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=5).await;
        let c = fx.consumer(durable("d", 60_000));
        let got = fx.pull(&c).await;
        assert_eq!(got.len(), 5);
        fx.ack(&got[1], AckKind::Ack);
        fx.ack(&got[4], AckKind::Term);
        // A confirmed ack is answered once it is on disk.
        let confirm = Inbox::new(&fx.d, "_INBOX.ack.1");
        let handle = super::super::api::handle;
        handle(
            &fx.streams,
            &fx.d,
            &got[3].ack,
            Some(&confirm.subject),
            b"+ACK",
        );
        assert_eq!(confirm.next().await[0].payload, br#"{"ok":true}"#);
        let before = c.info();
        assert_eq!((before.next_seq, before.num_ack_pending), (6, 2));
        fx.close();

        let fx = Fx::open(dir.path()).await;
        let c = fx.s.consumer("d").expect("the durable consumer is loaded");
        let after = c.info();
        assert_eq!(
            (after.next_seq, after.num_ack_pending, after.ack_floor),
            (before.next_seq, before.num_ack_pending, before.ack_floor)
        );
        assert_eq!(after.config, before.config);
        // Pending messages are due at once after a restart, counted on.
        assert_eq!(seqs(&fx.pull(&c).await), [(1, 2), (3, 2)]);
        fx.publish(6..=6).await;
        assert_eq!(seqs(&fx.pull(&c).await), [(6, 1)]);
    }

    #[tokio::test]
    async fn a_torn_last_op_is_cut_on_reopen_and_later_ops_count() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=3).await;
        let c = fx.consumer(durable("d", 60_000));
        let got = fx.pull(&c).await;
        fx.ack(&got[0], AckKind::Ack);
        let path = fx.s.consumers_dir().join("d.log");
        fx.close();
        // A crash while writing the ack of 2: part of its op reached the disk.
        let mut op_bytes = Vec::new();
        op(&mut op_bytes, b'A', 2, 0);
        let whole = std::fs::metadata(&path).unwrap().len();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&op_bytes[..9]).unwrap();
        drop(f);

        let fx = Fx::open(dir.path()).await;
        let c = fx.s.consumer("d").unwrap();
        let info = c.info();
        assert_eq!(
            (info.num_ack_pending, info.next_seq),
            (2, 4),
            "2 and 3 pending"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "cut");
        let again = fx.pull(&c).await;
        assert_eq!(seqs(&again), [(2, 2), (3, 2)]);
        fx.ack(&again[0], AckKind::Ack);
        fx.close();

        let fx = Fx::open(dir.path()).await;
        let c = fx.s.consumer("d").unwrap();
        let info = c.info();
        assert_eq!(
            (info.num_ack_pending, info.ack_floor),
            (1, 2),
            "the ack written after the cut is read back"
        );
    }

    #[tokio::test]
    async fn compaction_of_the_op_log_keeps_pending_counts_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx::open(dir.path()).await;
        fx.publish(1..=100).await;
        let c = fx.consumer(durable("d", 1));
        let path = fx.s.consumers_dir().join("d.log");
        // Redeliver (everything is due again after 1 ms) until the op log
        // passes COMPACT_AT and is rewritten.
        let mut longest = 0;
        loop {
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(c.collect(1000, usize::MAX).unwrap().len(), 100);
            let len = std::fs::metadata(&path).unwrap().len();
            if len < longest {
                break;
            }
            longest = len;
            assert!(
                longest <= COMPACT_AT + 100 * OP_LEN as u64,
                "never compacted"
            );
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            101 * OP_LEN as u64,
            "one N op and one D op per pending message"
        );
        for seq in (2..=100).step_by(2) {
            c.ack(seq, AckKind::Ack, None);
        }
        let deliveries = |c: &Consumer| -> Vec<(u64, u32)> {
            c.lock()
                .pending
                .iter()
                .map(|(s, p)| (*s, p.deliveries))
                .collect()
        };
        let before = deliveries(&c);
        assert_eq!(before.len(), 50);
        assert!(before.iter().all(|&(_, n)| n > 2 && n == before[0].1));
        let next = c.info().next_seq;
        fx.close();

        let fx = Fx::open(dir.path()).await;
        let c = fx.s.consumer("d").unwrap();
        assert_eq!(deliveries(&c), before);
        assert_eq!(c.info().next_seq, next);
    }
}
