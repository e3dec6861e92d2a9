//! A group's state machine: committed entries applied into the stream's
//! own log (crate::store), with the Msg-Id dedupe window as replicated
//! state (expired by the proposer's timestamps, so every replica decides
//! the same duplicates).
//!
//! `<stream>/raft/applied` records the last entry applied, the membership
//! and the stream's next sequence after it; it is written (not fsynced)
//! after the stream's log is committed (fsynced with `fsync = always`), so
//! it never claims more than the log holds. A crash that loses it, or the
//! last write of it, re-applies entries from the last `applied` (or the
//! Raft log's start): records whose sequence the log already holds are
//! skipped, so none is stored twice. (This relies on the Raft log being
//! kept whole: no compaction yet.)
//!
//! Durable consumers' changes (`Op::Consumers`) are applied here too, to
//! each consumer's committed state and op log (streams::consumer::repl);
//! the op logs are fsynced (with `fsync = always`) before `applied` moves.
//! Applying them again after a crash is harmless: the ops set, remove or
//! raise, so replaying a suffix twice leaves the state replaying it once
//! would.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use sockbus_protocol::frame::iter_headers;

use super::{Applied, NodeId, Op, TypeConfig};
use crate::store::files::CachedFile;
use crate::store::Appender;
use crate::streams::{Fsync, Stream, StreamConfigExt, MSG_ID_HEADER};

#[derive(Serialize, Deserialize, Default)]
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
    applied: AppliedFile,
    window: u64,
    ids: HashMap<Box<str>, u64>,
    order: VecDeque<(u64, Box<str>)>,
    /// Consumer op logs written since the last save.
    touched: Vec<CachedFile>,
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
        let mut sm = StateMachine {
            fsync: cfg.fsync == Fsync::Always,
            window: cfg.duplicate_window().as_nanos() as u64,
            app,
            applied,
            path,
            ids: HashMap::new(),
            order: VecDeque::new(),
            touched: Vec::new(),
            s,
        };
        sm.rebuild_dedupe();
        Ok(sm)
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

    fn save(&mut self) -> io::Result<()> {
        self.app.commit(self.fsync)?;
        // Consumer op logs written by these entries: on disk before
        // `applied` says so, as the stream's log.
        for f in std::mem::take(&mut self.touched) {
            if self.fsync {
                f.open().and_then(|f| f.sync_data())?;
            }
        }
        // Not fsynced: the stream's log is (above), so this file never
        // claims more than is on disk; an older one only means entries are
        // applied again (and skipped).
        let b = bincode::serialize(&self.applied).map_err(io_err)?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &b)?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = NoSnapshot;

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
        for e in entries {
            self.applied.last = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied::default()),
                EntryPayload::Membership(m) => {
                    let names: Vec<String> = m.nodes().map(|(_, n)| n.addr.clone()).collect();
                    if names != self.s.members() {
                        if let Err(err) = self.s.set_members(&names) {
                            return Err(StorageIOError::write_state_machine(&err).into());
                        }
                    }
                    self.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::default());
                }
                EntryPayload::Normal(p) => match p.decode() {
                    Ok(Op::Publish {
                        ts,
                        recs,
                        lens,
                        ids,
                    }) => match self.publish(ts, recs, lens, ids) {
                        Ok(a) => out.push(a),
                        Err(err) => {
                            return Err(StorageIOError::write_state_machine(&err).into());
                        }
                    },
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
                                    return Err(StorageIOError::write_state_machine(&err).into());
                                }
                            }
                        }
                        out.push(Applied {
                            acks: Vec::new(),
                            error,
                        });
                    }
                    Err(err) => out.push(Applied {
                        acks: Vec::new(),
                        error: Some(format!("undecodable entry: {err}")),
                    }),
                },
            }
        }
        self.save()
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        NoSnapshot
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        Err(StorageIOError::write_snapshot(
            None,
            AnyError::error("snapshots of replicated streams are not supported yet"),
        )
        .into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(None)
    }
}

/// Snapshots are not built (the Raft log is kept whole): see docs/storage.md.
pub(crate) struct NoSnapshot;

impl RaftSnapshotBuilder<TypeConfig> for NoSnapshot {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        Err(StorageIOError::read_snapshot(
            None,
            AnyError::error("snapshots of replicated streams are not built yet"),
        )
        .into())
    }
}
