//! A group's Raft log and vote, in `<stream>/raft/`: `log` holds entries
//! appended one after the other as `[len u32][crc32c u32][bincode entry]`,
//! `vote` and `purged` are rewritten atomically. Entries are kept in memory
//! too (until purged) for the leader's replication reads. An append is
//! written and, with `fsync = always`, fdatasync'ed by the group's log
//! thread, in order, before openraft is told it is done (its callback), so
//! a replica only acknowledges what is on its disk while the Raft core
//! goes on. Appends queued while the thread syncs share its next
//! fdatasync (group commit). Votes, truncations and purges wait for the
//! appends before them.
//!
//! A torn or damaged tail (a crash mid-append) ends the log where the last
//! whole entry ends: those entries were never acknowledged. A damaged entry
//! with whole entries after it is damage, not a crash: the log is cut there
//! too (openraft sees a shorter log, so this replica cannot win an election
//! against up-to-date peers), the vote is kept, and [`LogDamage`] tells the
//! group to repair (super::repair).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use super::{NodeId, TypeConfig};
use crate::streams::write_atomic;

/// Largest entry read back (a writer round is at most 8 MiB of records).
const MAX_ENTRY: usize = 256 << 20;

/// Work for a group's log thread, done in order.
enum Io {
    Write(Vec<u8>, LogFlushed<TypeConfig>),
    /// Answers once everything before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
    /// The log file was rewritten: append to this one from now on.
    SetFile(File),
}

fn io_thread(mut file: File, fsync: bool, rx: std::sync::mpsc::Receiver<Io>) {
    let mut pending: Vec<LogFlushed<TypeConfig>> = Vec::new();
    let mut next = rx.recv().ok();
    while let Some(job) = next.take() {
        match job {
            Io::Write(bytes, cb) => {
                // Appends queued meanwhile share this one's fdatasync
                // (group commit): written in order, each acknowledged only
                // once the sync after it returned.
                let mut r = file.write_all(&bytes);
                pending.push(cb);
                while r.is_ok() {
                    match rx.try_recv() {
                        Ok(Io::Write(bytes, cb)) => {
                            r = file.write_all(&bytes);
                            pending.push(cb);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let r = r.and_then(|_| if fsync { file.sync_data() } else { Ok(()) });
                for cb in pending.drain(..) {
                    cb.log_io_completed(match &r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
            Io::Barrier(tx) => {
                let _ = tx.send(());
            }
            Io::SetFile(f) => file = f,
        }
        if next.is_none() {
            next = rx.recv().ok();
        }
    }
}

struct Inner {
    dir: PathBuf,
    io: std::sync::mpsc::Sender<Io>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

#[derive(Clone)]
pub(crate) struct LogStore(Arc<Mutex<Inner>>);

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Appends `e` to `out` as one framed record.
fn frame(out: &mut Vec<u8>, e: &Entry<TypeConfig>) -> io::Result<()> {
    let body = bincode::serialize(e).map_err(io_err)?;
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

fn read_opt<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => bincode::deserialize(&b).map(Some).map_err(io_err),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Damage found in the Raft log (not a torn tail): entries from
/// `first_lost` on were cut, and a whole entry up to `last_seen` followed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogDamage {
    pub first_lost: u64,
    pub last_seen: u64,
}

/// The highest index of a whole entry (length, CRC and body valid) found
/// after byte `from`, searching byte by byte past the damage.
fn valid_after(data: &[u8], from: usize) -> Option<u64> {
    let mut best = None;
    let mut at = from + 1;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > 0 && len <= MAX_ENTRY && at + 8 + len <= data.len() {
            let body = &data[at + 8..at + 8 + len];
            if crc32c::crc32c(body) == crc {
                if let Ok(e) = bincode::deserialize::<Entry<TypeConfig>>(body) {
                    best = best.max(Some(e.log_id.index));
                    at += 8 + len;
                    continue;
                }
            }
        }
        at += 1;
    }
    best
}

impl LogStore {
    /// Opens the group's log; also says whether it found damage (not a
    /// torn tail) and cut the log there.
    pub(crate) fn open(dir: &Path, fsync: bool) -> io::Result<(LogStore, Option<LogDamage>)> {
        std::fs::create_dir_all(dir)?;
        let vote = read_opt(&dir.join("vote"))?;
        let purged: Option<Option<LogId<NodeId>>> = read_opt(&dir.join("purged"))?;
        let purged = purged.flatten();
        let path = dir.join("log");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let mut entries = BTreeMap::new();
        let mut at = 0usize;
        while at + 8 <= data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
            if len > MAX_ENTRY || at + 8 + len > data.len() {
                break;
            }
            let body = &data[at + 8..at + 8 + len];
            if crc32c::crc32c(body) != crc {
                break;
            }
            let Ok(e) = bincode::deserialize::<Entry<TypeConfig>>(body) else {
                break;
            };
            // A later entry of the same index replaced a conflicting one.
            entries.split_off(&e.log_id.index);
            entries.insert(e.log_id.index, e);
            at += 8 + len;
        }
        let mut damage = None;
        if at < data.len() {
            // Whole entries after the bad one: damage, not a torn append.
            let first_lost = entries.keys().next_back().map_or(0, |i| i + 1);
            match valid_after(&data, at) {
                Some(last_seen) => {
                    tracing::error!(
                        path = %path.display(),
                        offset = at,
                        first_lost,
                        last_seen,
                        "the Raft log has a damaged entry (CRC) with whole entries after it: \
                         cut at the damage; this replica neither votes nor campaigns until its \
                         peers have sent it the entries again"
                    );
                    damage = Some(LogDamage {
                        first_lost,
                        last_seen,
                    });
                }
                None => tracing::warn!(
                    path = %path.display(),
                    dropped = data.len() - at,
                    "the Raft log ends in a torn or damaged entry: cut back to the last whole one"
                ),
            }
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        if let Some(p) = purged {
            entries = entries.split_off(&(p.index + 1));
        }
        let (io, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || io_thread(file, fsync, rx))?;
        let store = LogStore(Arc::new(Mutex::new(Inner {
            dir: dir.to_path_buf(),
            io,
            entries,
            vote,
            committed: None,
            purged,
        })));
        Ok((store, damage))
    }

    /// The index of the last entry held (or purged), 0 for none.
    pub(crate) fn last_index(&self) -> u64 {
        let g = self.lock();
        g.entries
            .keys()
            .next_back()
            .copied()
            .or(g.purged.map(|p| p.index))
            .unwrap_or(0)
    }

    /// Forgets every entry (the vote stays): a replica whose stream was
    /// damaged starts its log again from its peers. The file is emptied
    /// before `purged` goes, so a crash between leaves no entry openraft
    /// would take for the log's start (and the repair marker redoes this).
    pub(crate) fn clear(&self) -> io::Result<()> {
        let mut g = self.lock();
        g.entries.clear();
        g.rewrite()?;
        g.barrier()?;
        match std::fs::remove_file(g.dir.join("purged")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        g.purged = None;
        crate::store::segment::sync_dir(&g.dir)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Waits until the log thread has done everything sent before.
    fn barrier(&self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io
            .send(Io::Barrier(tx))
            .map_err(|_| io_err("the Raft log thread stopped"))?;
        rx.recv().map_err(|_| io_err("the Raft log thread stopped"))
    }

    /// Rewrites the log file with the entries kept (after a truncate or purge).
    fn rewrite(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            frame(&mut out, e)?;
        }
        let path = self.dir.join("log");
        self.barrier()?;
        write_atomic(&path, &out)?;
        let f = OpenOptions::new().read(true).append(true).open(&path)?;
        self.io
            .send(Io::SetFile(f))
            .map_err(|_| io_err("the Raft log thread stopped"))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let g = self.lock();
        Ok(g.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let g = self.lock();
        let last = g
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(g.purged);
        Ok(LogState {
            last_purged_log_id: g.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.lock();
        g.barrier().map_err(|e| StorageIOError::write_vote(&e))?;
        let b = bincode::serialize(vote).map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        write_atomic(&g.dir.join("vote"), &b).map_err(|e| StorageIOError::write_vote(&e))?;
        g.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut g = self.lock();
        let mut out = Vec::new();
        let mut new = Vec::new();
        for e in entries {
            frame(&mut out, &e).map_err(|e| StorageIOError::write_logs(&e))?;
            new.push(e);
        }
        for e in new {
            g.entries.insert(e.log_id.index, e);
        }
        if let Err(e) = g.io.send(Io::Write(out, callback)) {
            let Io::Write(_, cb) = e.0 else {
                unreachable!("sent a write")
            };
            let err = io_err("the Raft log thread stopped");
            let s = StorageIOError::write_logs(&err);
            cb.log_io_completed(Err(err));
            return Err(s.into());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.lock();
        g.entries.split_off(&log_id.index);
        g.rewrite().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.lock();
        g.barrier().map_err(|e| StorageIOError::write_logs(&e))?;
        let b = bincode::serialize(&Some(log_id))
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        write_atomic(&g.dir.join("purged"), &b).map_err(|e| StorageIOError::write_logs(&e))?;
        g.purged = Some(log_id);
        g.entries = g.entries.split_off(&(log_id.index + 1));
        g.rewrite().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
