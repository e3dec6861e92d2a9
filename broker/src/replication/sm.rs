//! A group's state machine: committed entries applied into the stream's
//! own log (crate::store), with the Msg-Id dedupe window as replicated
//! state (expired by the proposer's timestamps, so every replica decides
//! the same duplicates).
//!
//! `<stream>/raft/applied` records a checkpoint: the last entry applied,
//! the membership and the stream's next sequence after it, written (not
//! fsynced) once the stream's log up to there is fdatasync'ed (with
//! `fsync = always`), so it never claims more than the log holds on disk.
//! Publish entries in between are written to the stream's log without an
//! fdatasync of their own: the Raft log holds them fdatasync'ed and is
//! never purged past the checkpoint (snapshots are taken at one). A
//! checkpoint is taken every [`CHECKPOINT_ENTRIES`] entries or
//! [`CHECKPOINT_EVERY`], at the end of a batch holding anything but
//! publishes, and before and after a purge, an update or a consumer's
//! creation or deletion (those with `applied` fsynced: applied again over
//! later entries they could remove acked messages). A crash (or a power
//! loss that takes the stream log's unsynced tail, or `applied`'s last
//! write) re-applies entries from the last checkpoint that made it to disk
//! (or the Raft log's start): records whose sequence the log already holds
//! are skipped, so none is stored twice, and those it lost are stored
//! again.
//!
//! Snapshots (docs/storage.md "Snapshots and log compaction"): the stream's
//! own files already hold every applied entry, so building a snapshot only
//! records where it stands (`raft/snapshot.meta`, fsynced) and openraft may
//! then purge the Raft log up to there. The `SBSNAP01` file a lagging
//! replica is sent (`snap`) is written only when a replica needs it,
//! from the state machine's current state. A replica installs one in
//! `raft/snapshot.install` until it is done: a crash midway installs it
//! again at the next start.
//!
//! Durable consumers' changes (`Op::Consumers`) are applied here too, to
//! each consumer's committed state and op log (streams::consumer::repl);
//! the op logs are fsynced (with `fsync = always`) before `applied` moves.
//! Applying them again after a crash is harmless: the ops set, remove or
//! raise, so replaying a suffix twice leaves the state replaying it once
//! would.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use sockbus_protocol::frame::iter_headers;

use super::snap;
use super::{Applied, NodeId, Op, TypeConfig};

/// Entries applied between checkpoints at most (see [`StateMachine::save`]).
const CHECKPOINT_ENTRIES: u64 = 1024;
/// The longest time between checkpoints while entries are applied.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
use crate::store::files::CachedFile;
use crate::store::Appender;
use crate::streams::{write_atomic, Fsync, Stream, StreamConfigExt, MSG_ID_HEADER};

#[derive(Serialize, Deserialize, Default, Clone)]
struct AppliedFile {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    next_seq: u64,
}

pub(crate) struct StateMachine {
    s: Arc<Stream>,
    path: PathBuf,
    app: Appender,
    fsync: bool,
    /// What has been applied (in memory; the stream's log may not have
    /// all of it on disk yet, see [`StateMachine::checkpoint`]).
    applied: AppliedFile,
    /// What `applied` on disk says: the last checkpoint, where the
    /// stream's log (and the consumers' op logs) were last fdatasync'ed.
    durable: AppliedFile,
    /// Entries applied since the last checkpoint, and when it was.
    unsynced: u64,
    synced_at: std::time::Instant,
    window: u64,
    ids: HashMap<Box<str>, u64>,
    order: VecDeque<(u64, Box<str>)>,
    /// Consumer op logs written since the last save.
    touched: Vec<CachedFile>,
    dir: PathBuf,
    /// The meta of `raft/snapshot.data`, the last snapshot file written or installed.
    data: Option<SnapshotMeta<NodeId, BasicNode>>,
    /// `get_current_snapshot` was called before (the first call is
    /// openraft's start-up, which reads only the meta).
    asked: bool,
    /// The newest timestamp of the entries applied (the proposers' clocks):
    /// what `max_age` is measured against, never this node's clock.
    now: u64,
}

/// `raft/snapshot.meta`: the last snapshot built (what the Raft log may be
/// purged up to) and the stream's next sequence there.
#[derive(Serialize, Deserialize, Clone)]
struct BuiltFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    next_seq: u64,
}

fn read_built(dir: &Path) -> io::Result<Option<BuiltFile>> {
    match std::fs::read(dir.join("snapshot.meta")) {
        Ok(b) => bincode::deserialize(&b).map(Some).map_err(io_err),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `write_atomic` with a temporary file of its own: the snapshot builder
/// (its own task) and an install (the state machine's) may write
/// `snapshot.meta` at once, and must not share a temporary file.
fn write_meta(dir: &Path, tmp: &str, built: &BuiltFile) -> io::Result<()> {
    let b = bincode::serialize(built).map_err(io_err)?;
    let t = dir.join(tmp);
    std::fs::write(&t, &b)?;
    std::fs::File::open(&t)?.sync_all()?;
    std::fs::rename(&t, dir.join("snapshot.meta"))?;
    crate::store::segment::sync_dir(dir)
}

/// Runs a long piece of disk work (a whole stream copied) on this task
/// without stalling the others queued on the same runtime thread (the
/// group's Raft core among them: its heartbeats must go on). A
/// current-thread runtime (`--busy-poll`) cannot hand its thread over: there
/// it runs inline.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Removes the stream's durable consumers (the replicated state), live and
/// on disk. Ephemeral ones stay: they read on once the stream is back.
fn clear_consumers(s: &Arc<Stream>) -> io::Result<()> {
    let names: Vec<String> = s
        .consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, c)| c.is_durable())
        .map(|(k, _)| k.clone())
        .collect();
    for n in names {
        let _ = crate::streams::consumer::delete(s, &n);
    }
    if let Ok(rd) = std::fs::read_dir(s.consumers_dir()) {
        for e in rd.filter_map(|e| e.ok()) {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// What the state machine's files in `dir` say the stream holds: the next
/// sequence after the last entry applied, and that entry's index (0 for none).
pub(crate) fn claimed(dir: &Path) -> (u64, u64) {
    let applied: Option<AppliedFile> = std::fs::read(dir.join("applied"))
        .ok()
        .and_then(|b| bincode::deserialize(&b).ok());
    let built = read_built(dir).ok().flatten();
    let next = applied
        .as_ref()
        .map_or(1, |a| a.next_seq)
        .max(built.as_ref().map_or(1, |b| b.next_seq));
    let index = applied
        .and_then(|a| a.last)
        .max(built.and_then(|b| b.meta.last_log_id))
        .map_or(0, |l| l.index);
    (next, index)
}

/// Whether a snapshot install was cut short (it is redone at start-up).
pub(crate) fn install_pending(dir: &Path) -> bool {
    dir.join("snapshot.install").exists()
}

/// Empties a damaged replica's copy of the stream: its messages, durable
/// consumers and state machine files, so it is filled again from its
/// peers (the leader's log or a snapshot). The Raft log is cleared by the
/// caller; the vote stays.
pub(crate) fn wipe(s: &Arc<Stream>, dir: &Path) -> io::Result<()> {
    clear_consumers(s)?;
    s.log.reset(1, s.config().fsync != Fsync::Never)?;
    for f in [
        "applied",
        "snapshot.meta",
        "snapshot.data",
        "snapshot.install",
        "snapshot.recv",
        "snapshot.partial",
    ] {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    crate::store::segment::sync_dir(dir)
}

fn snapshot_id(last: &Option<LogId<NodeId>>) -> String {
    match last {
        Some(l) => format!("{}-{}", l.leader_id, l.index),
        None => "none".into(),
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl StateMachine {
    pub(crate) fn open(s: Arc<Stream>, dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("applied");
        let applied = match std::fs::read(&path) {
            Ok(b) => match bincode::deserialize(&b) {
                Ok(a) => a,
                // Written without fsync: lost in a crash, everything is
                // applied again from the Raft log's start, skipping what
                // the stream already holds.
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable, applying the Raft log again: {e}");
                    AppliedFile {
                        next_seq: 1,
                        ..Default::default()
                    }
                }
            },
            // Nothing applied yet (or the file was lost): from the start.
            Err(e) if e.kind() == io::ErrorKind::NotFound => AppliedFile {
                next_seq: 1,
                ..Default::default()
            },
            Err(e) => return Err(e),
        };
        let cfg = s.config();
        let app = Appender::new(
            s.log.clone(),
            cfg.segment_bytes(),
            cfg.fsync != Fsync::Never,
            cfg.fsync == Fsync::Always,
        );
        // `applied` is written without fsync; the snapshot meta is, and the
        // Raft log may be purged up to it: never claim less than it.
        let mut applied = applied;
        if let Some(b) = read_built(dir)? {
            if b.meta.last_log_id > applied.last {
                applied = AppliedFile {
                    last: b.meta.last_log_id,
                    membership: b.meta.last_membership.clone(),
                    next_seq: b.next_seq,
                };
            }
        }
        let data = match snap::Reader::open(&dir.join("snapshot.data")) {
            Ok((h, _)) => Some(h.meta),
            Err(_) => None,
        };
        let now = s.log.lock().last_ts;
        let mut sm = StateMachine {
            now,
            dir: dir.to_path_buf(),
            data,
            asked: false,
            fsync: cfg.fsync == Fsync::Always,
            window: cfg.duplicate_window().as_nanos() as u64,
            app,
            durable: applied.clone(),
            applied,
            unsynced: 0,
            synced_at: std::time::Instant::now(),
            path,
            ids: HashMap::new(),
            order: VecDeque::new(),
            touched: Vec::new(),
            s,
        };
        let pending = dir.join("snapshot.install");
        if pending.exists() {
            // A crash while installing a snapshot: install it again whole.
            tracing::warn!(stream = %sm.s.name, "a snapshot install was cut short: installing it again");
            sm.install_file(&pending)?;
            return Ok(sm);
        }
        sm.rebuild_dedupe();
        Ok(sm)
    }

    /// Writes `raft/snapshot.data` from the current state (on the state
    /// machine's task, so nothing is applied meanwhile).
    fn write_snapshot(&mut self) -> io::Result<SnapshotMeta<NodeId, BasicNode>> {
        // The snapshot's point made durable here too, before any replica
        // (or openraft) takes it as a point the Raft log may be purged to.
        self.checkpoint(false)?;
        let meta = SnapshotMeta {
            last_log_id: self.applied.last,
            last_membership: self.applied.membership.clone(),
            snapshot_id: snapshot_id(&self.applied.last),
        };
        let mut consumers = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.s.consumers_dir()) {
            for e in rd.filter_map(|e| e.ok()) {
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if name.ends_with(".tmp") {
                    continue;
                }
                consumers.push((name, std::fs::read(e.path())?));
            }
        }
        let window = self
            .order
            .iter()
            .map(|(ts, id)| (*ts, id.to_string(), self.ids.get(id).copied().unwrap_or(0)))
            .collect();
        let first_seq = self.s.log.lock().first_seq();
        let header = snap::Header {
            meta: meta.clone(),
            next_seq: self.applied.next_seq,
            first_seq,
            window,
            consumers,
        };
        let tmp = self.dir.join("snapshot.partial");
        let n = snap::write(&tmp, &header, &self.s.log)?;
        std::fs::rename(&tmp, self.dir.join("snapshot.data"))?;
        tracing::info!(stream = %self.s.name, records = n, last = ?meta.last_log_id, "snapshot file written for a replica that needs it");
        self.data = Some(meta.clone());
        Ok(meta)
    }

    /// Replaces the stream's messages, dedupe window and durable consumers
    /// by a snapshot's. Redone whole after a crash (the file stays in
    /// `snapshot.install` until this returns).
    fn install_file(&mut self, path: &Path) -> io::Result<()> {
        let (h, mut r) = snap::Reader::open(path)?;
        // Consumers first: none may read the log while it is replaced.
        clear_consumers(&self.s)?;
        let cdir = self.s.consumers_dir();
        let cfg = self.s.config();
        self.s.log.reset(h.first_seq, cfg.fsync != Fsync::Never)?;
        self.app = Appender::new(
            self.s.log.clone(),
            cfg.segment_bytes(),
            cfg.fsync != Fsync::Never,
            cfg.fsync == Fsync::Always,
        );
        let mut staged = 0usize;
        while let Some((seq, ts, rec)) = r.next()? {
            if seq < self.app.next_seq() {
                return Err(io_err(format!(
                    "snapshot record {seq} out of order (expected {})",
                    self.app.next_seq()
                )));
            }
            // The leader's stream lost these to damage: so does this copy.
            self.app.skip_to(seq, false)?;
            staged += rec.len();
            self.app.stage_at(rec, false, ts)?;
            if staged >= 4 << 20 {
                self.app.commit(false)?;
                staged = 0;
            }
        }
        self.app.skip_to(h.next_seq, false)?;
        // The whole stream on disk before `applied` says so.
        self.app.commit(false)?;
        self.app.sync()?;
        if !h.consumers.is_empty() {
            std::fs::create_dir_all(&cdir)?;
            for (name, bytes) in &h.consumers {
                if name.contains('/') || name.starts_with('.') {
                    return Err(io_err(format!("snapshot consumer file name {name:?}")));
                }
                write_atomic(&cdir.join(name), bytes)?;
            }
            crate::streams::consumer::load_all(&self.s);
        }
        self.ids.clear();
        self.order.clear();
        for (ts, id, seq) in h.window {
            let id: Box<str> = id.into();
            self.ids.insert(id.clone(), seq);
            self.order.push_back((ts, id));
        }
        let names: Vec<String> = h
            .meta
            .last_membership
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect();
        if !names.is_empty() && names != self.s.members() {
            self.s.set_members(&names)?;
        }
        self.applied = AppliedFile {
            last: h.meta.last_log_id,
            membership: h.meta.last_membership.clone(),
            next_seq: h.next_seq,
        };
        let built = BuiltFile {
            meta: h.meta.clone(),
            next_seq: h.next_seq,
        };
        write_meta(&self.dir, "meta-install.tmp", &built)?;
        let b = bincode::serialize(&self.applied).map_err(io_err)?;
        write_atomic(&self.path, &b)?;
        self.durable = self.applied.clone();
        self.unsynced = 0;
        std::fs::rename(path, self.dir.join("snapshot.data"))?;
        crate::store::segment::sync_dir(&self.dir)?;
        self.data = Some(h.meta);
        Ok(())
    }

    /// The window's Msg-Ids back from the log (as the local writer does),
    /// up to what `applied` covers.
    fn rebuild_dedupe(&mut self) {
        let last_ts = self.s.log.lock().last_ts;
        let since = last_ts.saturating_sub(self.window);
        let Ok(mut from) = self.s.log.seq_for_time(since) else {
            return;
        };
        loop {
            let Ok(b) = self.s.log.read(from, None, 4096, 32 << 20, None) else {
                break;
            };
            if b.msgs.is_empty() {
                break;
            }
            for m in &b.msgs {
                // Records past `applied` belong to entries about to be
                // applied again: their ids must not count as seen.
                if m.headers.is_empty() || m.seq >= self.applied.next_seq {
                    continue;
                }
                if let Some((_, v)) =
                    iter_headers(&m.headers).find(|(k, _)| k.eq_ignore_ascii_case(MSG_ID_HEADER))
                {
                    self.ids.insert(v.into(), m.seq);
                    self.order.push_back((m.ts, v.into()));
                }
            }
            from = b.next;
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some((ts, _)) = self.order.front() {
            if ts + self.window >= now {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.ids.remove(&id);
        }
    }

    /// One publish entry; records already in the log (re-applied after a
    /// crash) are skipped.
    fn publish(
        &mut self,
        ts: u64,
        mut recs: Vec<u8>,
        lens: Vec<u32>,
        ids: Vec<Option<String>>,
    ) -> io::Result<Applied> {
        self.expire(ts);
        self.now = self.now.max(ts);
        let have = self.s.log.lock().next_seq;
        let mut acks = Vec::with_capacity(lens.len());
        let mut off = 0usize;
        for (len, id) in lens.into_iter().zip(ids) {
            let len = len as usize;
            if off + len > recs.len() {
                return Err(io_err("an entry's record lengths overrun its records"));
            }
            let rec = &mut recs[off..off + len];
            off += len;
            if let Some(id) = &id {
                if let Some(&seq) = self.ids.get(id.as_str()) {
                    acks.push((seq, true));
                    continue;
                }
            }
            let seq = self.applied.next_seq;
            if seq >= have {
                let (got, _) = self.app.stage_at(rec, self.fsync, ts)?;
                debug_assert_eq!(got, seq);
            }
            self.applied.next_seq += 1;
            if let Some(id) = id {
                let id: Box<str> = id.into();
                self.ids.insert(id.clone(), seq);
                self.order.push_back((ts, id));
            }
            acks.push((seq, false));
        }
        Ok(Applied { acks, error: None })
    }

    /// The stream's retention limits, from the applied entries alone, so
    /// every replica holds the same messages after the same entry:
    /// `max_msgs` and `max_bytes` keep the newest messages that fit (the
    /// cut depends only on what the stream holds, not on how entries were
    /// batched into applies or segments), `max_age` removes the messages
    /// older than the newest applied timestamp minus the age, by sequence
    /// (not whole segments, whose boundaries differ between a replica that
    /// installed a snapshot and one that did not).
    fn limits(&mut self) -> io::Result<()> {
        let cfg = self.s.config();
        self.limits_by(&cfg)
    }

    fn limits_by(&mut self, cfg: &sockbus_protocol::api::StreamConfig) -> io::Result<()> {
        if let Some(age) = cfg.max_age_ms {
            let since = self.now.saturating_sub(age.saturating_mul(1_000_000));
            let (first, first_ts) = {
                let st = self.s.log.lock();
                (st.first_seq(), st.first_ts())
            };
            if first < self.app.next_seq() && first_ts < since {
                let seq = self.s.log.seq_for_time(since)?;
                if seq > first {
                    self.app.set_floor(seq)?;
                }
            }
        }
        if cfg.max_msgs.is_some() || cfg.max_bytes.is_some() {
            self.app.retention(None, cfg.max_bytes, cfg.max_msgs)?;
        }
        Ok(())
    }

    /// A purge entry: what the entries before it staged is committed
    /// first, then the purge is done as a local stream's writer does it;
    /// consumers positioned before the new first message go on from it.
    /// A request that does not decode is refused the same way everywhere.
    fn purge(&mut self, req: &str) -> io::Result<Applied> {
        let req: crate::streams::PurgeRequest = match serde_json::from_str(req) {
            Ok(r) => r,
            Err(e) => {
                return Ok(Applied {
                    acks: Vec::new(),
                    error: Some(format!("a purge entry that does not decode: {e}")),
                })
            }
        };
        self.app.commit(self.fsync)?;
        let cfg = self.s.config();
        let n = crate::streams::purge_log(&mut self.app, &self.s, &cfg, &req)?;
        // The leader serves the durable consumers: moving them past the
        // new first message are consumer changes it proposes through the
        // group like its deliveries (streams::consumer::repl).
        if super::hub().leads(&self.s.name) {
            let first = self.s.log.lock().first_seq();
            let consumers: Vec<_> = self
                .s
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for c in consumers {
                c.forget_below(first);
            }
        }
        Ok(Applied {
            acks: vec![(n, false)],
            error: None,
        })
    }

    /// A message deletion (`Op::Delete`), as a local stream's writer does
    /// it; acks `[(1, false)]` when the stream held `seq`, `[(0, false)]`
    /// when not (never stored, purged, expired or deleted before: applying
    /// it again after a crash changes nothing).
    fn delete(&mut self, seq: u64) -> io::Result<Applied> {
        self.app.commit(self.fsync)?;
        let b = self.s.log.read(seq, None, 1, 1, None)?;
        let n = match b.msgs.first().filter(|m| m.seq == seq) {
            Some(m) => self.app.delete(&[(seq, m.stored_len())])?,
            None => 0,
        };
        if let Some(q) = &self.s.quota {
            q.sync(&self.s);
        }
        Ok(Applied {
            acks: vec![(n, false)],
            error: None,
        })
    }

    /// A configuration update: the old limits cut first (what the entries
    /// before it stored, as a replica applying them in a batch of their
    /// own would have cut), then the new configuration is saved and taken.
    /// Only limits and the description may change; anything else is
    /// refused the same way on every replica.
    fn update(&mut self, config: &str) -> io::Result<Applied> {
        let refuse = |e: String| Applied {
            acks: Vec::new(),
            error: Some(e),
        };
        let cfg: sockbus_protocol::api::StreamConfig = match serde_json::from_str(config) {
            Ok(c) => c,
            Err(e) => return Ok(refuse(format!("an update entry that does not decode: {e}"))),
        };
        let old = self.s.config();
        if let Err(what) = crate::streams::limits_only(&old, &cfg) {
            return Ok(refuse(format!(
                "changing {what} of a replicated stream is not supported"
            )));
        }
        self.app.commit(self.fsync)?;
        self.limits_by(&old)?;
        // The new limits hold before anyone sees the new configuration.
        self.limits_by(&cfg)?;
        self.s.set_replicated_config(cfg)?;
        Ok(Applied::default())
    }

    /// After a batch of entries. With `fsync = always` a batch of publish
    /// (blank, expire) entries is written to the stream's log without
    /// fdatasync: this replica's Raft log holds those entries fdatasync'ed
    /// (a quorum's does before anything is acked), `applied` on disk stays
    /// at the last checkpoint, and the Raft log is never purged past it
    /// (snapshots are built at a checkpoint, see `get_snapshot_builder`).
    /// So whatever a power loss takes from the stream log's tail is
    /// applied again from the Raft log at the next start (records the log
    /// still holds are skipped). A batch with anything else (`state`), or
    /// [`CHECKPOINT_ENTRIES`] / [`CHECKPOINT_EVERY`] since the last one, ends
    /// with a checkpoint, `hard` (see [`StateMachine::checkpoint`]) when it
    /// held a purge, an update or a consumer's creation or deletion.
    fn save(&mut self, state: bool, hard: bool) -> io::Result<()> {
        self.app.commit(false)?;
        self.limits()?;
        if !self.fsync
            || state
            || self.unsynced >= CHECKPOINT_ENTRIES
            || self.synced_at.elapsed() >= CHECKPOINT_EVERY
        {
            self.checkpoint(hard)
        } else {
            Ok(())
        }
    }

    /// Makes everything applied so far durable (with `fsync = always`: the
    /// stream's log and the consumers' op logs fdatasync'ed), then records
    /// it in `applied`, so that file never claims more than is on disk.
    /// `applied` itself is fsynced only when `hard` (around purges,
    /// updates and consumer creations, which must not be applied twice
    /// over later entries); an older copy of it otherwise only means
    /// entries are applied again (and their records skipped).
    fn checkpoint(&mut self, hard: bool) -> io::Result<()> {
        self.app.commit(self.fsync)?;
        // Consumer op logs written by these entries: on disk before
        // `applied` says so, as the stream's log.
        for f in std::mem::take(&mut self.touched) {
            if self.fsync {
                f.open().and_then(|f| f.sync_data())?;
            }
        }
        let b = bincode::serialize(&self.applied).map_err(io_err)?;
        if hard && self.fsync {
            write_atomic(&self.path, &b)?;
        } else {
            let tmp = self.path.with_extension("tmp");
            std::fs::write(&tmp, &b)?;
            std::fs::rename(&tmp, &self.path)?;
        }
        self.durable = self.applied.clone();
        self.unsynced = 0;
        self.synced_at = std::time::Instant::now();
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok((self.applied.last, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut state = false;
        let mut hard = false;
        let werr = |err: io::Error| -> StorageError<NodeId> {
            StorageIOError::write_state_machine(&err).into()
        };
        for e in entries {
            // Purges, updates and consumer creations or deletions change
            // what is already stored: applying one again over entries
            // applied after it could remove acked messages. So everything
            // before one is made durable first, and the batch ends with a
            // checkpoint (fsynced): after a crash it is never applied twice.
            let op = match &e.payload {
                EntryPayload::Normal(p) => Some(p.decode()),
                _ => None,
            };
            let once = match &op {
                Some(Ok(Op::Purge { .. } | Op::Update { .. } | Op::Delete { .. })) => true,
                Some(Ok(Op::Consumers { changes })) => changes
                    .iter()
                    .any(|c| !matches!(c, super::ConsumerChange::Ops { .. })),
                _ => false,
            };
            if once || matches!(op, Some(Ok(Op::Consumers { .. }))) {
                state = true;
            }
            hard |= once;
            if once && self.fsync && self.durable.last != self.applied.last {
                self.checkpoint(true).map_err(werr)?;
            }
            self.applied.last = Some(e.log_id);
            self.unsynced += 1;
            match (e.payload, op) {
                (EntryPayload::Blank, _) => out.push(Applied::default()),
                (EntryPayload::Membership(m), _) => {
                    state = true;
                    let names: Vec<String> = m.nodes().map(|(_, n)| n.addr.clone()).collect();
                    if names != self.s.members() {
                        self.s.set_members(&names).map_err(werr)?;
                    }
                    self.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::default());
                }
                (EntryPayload::Normal(_), None) => unreachable!("decoded above"),
                (EntryPayload::Normal(_), Some(op)) => match op {
                    Ok(Op::Publish {
                        ts,
                        recs,
                        lens,
                        ids,
                    }) => out.push(self.publish(ts, recs, lens, ids).map_err(werr)?),
                    Ok(Op::Purge { req }) => out.push(self.purge(&req).map_err(werr)?),
                    Ok(Op::Update { config }) => out.push(self.update(&config).map_err(werr)?),
                    Ok(Op::Delete { seq }) => out.push(self.delete(seq).map_err(werr)?),
                    Ok(Op::Expire { ts }) => {
                        self.now = self.now.max(ts);
                        out.push(Applied::default());
                    }
                    Ok(Op::Consumers { changes }) => {
                        let mut error = None;
                        for ch in changes {
                            match crate::streams::consumer::apply_change(&self.s, ch) {
                                Ok(Some(f)) => self.touched.push(f),
                                Ok(None) => {}
                                // Refused the same way on every replica
                                // (a bad start, say): the proposer hears it.
                                Err(crate::streams::consumer::ApplyError::Refused(e)) => {
                                    error = Some(e)
                                }
                                Err(crate::streams::consumer::ApplyError::Io(err)) => {
                                    return Err(werr(err));
                                }
                            }
                        }
                        out.push(Applied {
                            acks: Vec::new(),
                            error,
                        });
                    }
                    // Never skipped: this copy would then differ from the
                    // others' from here on. The group stops on this node
                    // (the others go on) until it runs a build that reads
                    // the entry (mod.rs, ENTRY_LEVEL).
                    Err(err) => {
                        tracing::error!(
                            stream = %self.s.name,
                            index = e.log_id.index,
                            "a committed entry this build cannot read (written by a newer sockbus?): {err}; this replica stops applying until it is upgraded"
                        );
                        return Err(werr(io::Error::other(format!(
                            "entry {} does not decode: {err}",
                            e.log_id.index
                        ))));
                    }
                },
            }
        }
        self.save(state, hard)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Taken on the state machine's task: a consistent point. The Raft
        // log is purged up to (before) it, so it must be durable in the
        // stream's files: a checkpoint first, and the snapshot stands at
        // the last checkpoint (the one just taken, or an older one if it
        // failed).
        if let Err(e) = blocking(|| self.checkpoint(false)) {
            tracing::error!(stream = %self.s.name, "cannot sync the stream before a snapshot: {e}");
        }
        let d = &self.durable;
        Builder {
            dir: self.dir.clone(),
            built: BuiltFile {
                meta: SnapshotMeta {
                    last_log_id: d.last,
                    last_membership: d.membership.clone(),
                    snapshot_id: snapshot_id(&d.last),
                },
                next_seq: d.next_seq,
            },
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        // Chunks go straight to disk: a snapshot larger than memory is fine.
        let f = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join("snapshot.recv"))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let err = |e: &io::Error| StorageIOError::write_snapshot(Some(meta.signature()), e);
        let mut f = *snapshot;
        use tokio::io::AsyncWriteExt;
        f.flush().await.map_err(|e| err(&e))?;
        f.sync_all().await.map_err(|e| err(&e))?;
        drop(f);
        let pending = self.dir.join("snapshot.install");
        std::fs::rename(self.dir.join("snapshot.recv"), &pending).map_err(|e| err(&e))?;
        crate::store::segment::sync_dir(&self.dir).map_err(|e| err(&e))?;
        // The header must be the snapshot openraft announced.
        match snap::Reader::open(&pending) {
            Ok((h, _)) if h.meta.last_log_id == meta.last_log_id => {}
            Ok(_) => {
                let _ = std::fs::remove_file(&pending);
                return Err(
                    err(&io_err("the snapshot file's header names another snapshot")).into(),
                );
            }
            Err(e) => {
                let _ = std::fs::remove_file(&pending);
                return Err(err(&e).into());
            }
        }
        blocking(|| self.install_file(&pending)).map_err(|e| err(&e))?;
        tracing::info!(stream = %self.s.name, last = ?meta.last_log_id, next_seq = self.applied.next_seq, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let first = !self.asked;
        self.asked = true;
        let built = read_built(&self.dir).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(built) = built else {
            return Ok(None);
        };
        let open = |p: PathBuf| async move {
            tokio::fs::File::open(p)
                .await
                .map_err(|e| StorageIOError::read_snapshot(None, &e))
        };
        // A snapshot file at or past the last one built serves as is.
        if let Some(m) = self.data.clone() {
            if m.last_log_id >= built.meta.last_log_id {
                let f = open(self.dir.join("snapshot.data")).await?;
                return Ok(Some(Snapshot {
                    meta: m,
                    snapshot: Box::new(f),
                }));
            }
        }
        if first {
            // openraft's start-up reads only the meta: no need to copy the
            // stream now (the data handle is the meta file, never sent).
            let f = open(self.dir.join("snapshot.meta")).await?;
            return Ok(Some(Snapshot {
                meta: built.meta,
                snapshot: Box::new(f),
            }));
        }
        // A replica needs it: written now, from the current state (at or
        // past the last one built, which openraft accepts).
        let meta = blocking(|| self.write_snapshot())
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let f = open(self.dir.join("snapshot.data")).await?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(f),
        }))
    }
}

/// Builds a snapshot: records the point it stands at (`snapshot.meta`,
/// fsynced), after which the Raft log may be purged up to there. The
/// stream's files are the data; the `SBSNAP01` file is written only when a
/// replica needs one.
pub(crate) struct Builder {
    dir: PathBuf,
    built: BuiltFile,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let path = self.dir.join("snapshot.meta");
        write_meta(&self.dir, "meta-build.tmp", &self.built)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // openraft keeps only the meta of a built snapshot.
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Snapshot {
            meta: self.built.meta.clone(),
            snapshot: Box::new(f),
        })
    }
}
