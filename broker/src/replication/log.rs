//! A group's Raft log and vote, in `<stream>/raft/`: `log` holds entries
//! one after the other as `[len u32][crc32c u32][bincode entry]`, then
//! zeros to the end of the file, `vote` and `purged` are rewritten
//! atomically. The zeros are written ahead ([`GROW_MIN`] to [`GROW_MAX`]
//! at a time, and after the entries whenever the file is rewritten), so an
//! append overwrites blocks that are already there and its fdatasync does
//! not change the file's size or allocation: no filesystem journal commit
//! per sync (measured: ext4, three writers appending 10 KB and syncing at
//! once on one disk, two to four times the syncs a second of appending to
//! the file's end). Entries are kept in memory too (until purged) for the leader's replication reads. An append is
//! written and, with `fsync = always`, fdatasync'ed by the group's log
//! thread, in order, before openraft is told it is done (its callback), so
//! a replica only acknowledges what is on its disk while the Raft core
//! goes on. Appends queued while the thread syncs share its next
//! fdatasync (group commit). Votes, truncations and purges wait for the
//! appends before them.
//!
//! Zeros after the last whole entry end the log. A torn or damaged tail (a
//! crash mid-append) ends the log where the last whole entry ends: those
//! entries were never acknowledged. A damaged entry
//! with whole entries after it is damage, not a crash: the log is cut there
//! too (openraft sees a shorter log, so this replica cannot win an election
//! against up-to-date peers), the vote is kept, and [`LogDamage`] tells the
//! group to repair (super::repair).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
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

/// Zeros written ahead at least (a new or rewritten log's first growth) ...
const GROW_MIN: u64 = 256 << 10;
/// ... and at most: the file grows by its own size up to this.
const GROW_MAX: u64 = 8 << 20;

/// How many zeros to write ahead of a log file of `size` bytes.
fn grow_by(size: u64) -> u64 {
    size.clamp(GROW_MIN, GROW_MAX)
}

/// A log file and where its entries end (zeros from there to `size`).
struct Tail {
    file: File,
    end: u64,
    size: u64,
}

impl Tail {
    /// Writes `bytes` after the last entry, first writing zeros ahead when
    /// the file is too short (synced with the entries by the caller).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let need = self.end + bytes.len() as u64;
        if need > self.size {
            let to = need + grow_by(self.size);
            let zeros = vec![0u8; 1 << 20];
            let mut at = self.size.max(self.end);
            while at < to {
                let n = (to - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            self.size = to;
        }
        self.file.write_all_at(bytes, self.end)?;
        self.end = need;
        Ok(())
    }
}

/// Work for a group's log thread, done in order.
enum Io {
    Write(Vec<u8>, LogFlushed<TypeConfig>),
    /// Answers once everything before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
    /// The log file was rewritten: append to this one from now on, its
    /// entries ending at the offset, zeros after.
    SetFile(File, u64),
}

fn io_thread(mut tail: Tail, fsync: bool, rx: std::sync::mpsc::Receiver<Io>) {
    let mut pending: Vec<LogFlushed<TypeConfig>> = Vec::new();
    let mut next = rx.recv().ok();
    while let Some(job) = next.take() {
        match job {
            Io::Write(bytes, cb) => {
                // Appends queued meanwhile share this one's fdatasync
                // (group commit): written in order, each acknowledged only
                // once the sync after it returned.
                let mut r = tail.append(&bytes);
                pending.push(cb);
                while r.is_ok() {
                    match rx.try_recv() {
                        Ok(Io::Write(bytes, cb)) => {
                            r = tail.append(&bytes);
                            pending.push(cb);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let r = r.and_then(|_| if fsync { tail.file.sync_data() } else { Ok(()) });
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
            Io::SetFile(file, end) => {
                let size = file.metadata().map_or(end, |m| m.len());
                tail = Tail { file, end, size };
            }
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
            .write(true)
            .create(true)
            .truncate(false)
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
        // Zeros after the last whole entry: the end of the log (written
        // ahead). Anything else there is a torn append or damage.
        let zeros = data[at..].iter().all(|b| *b == 0);
        if !zeros {
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
        let size = if zeros { data.len() as u64 } else { at as u64 };
        let tail = Tail {
            file,
            end: at as u64,
            size,
        };
        if let Some(p) = purged {
            entries = entries.split_off(&(p.index + 1));
        }
        let (io, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || io_thread(tail, fsync, rx))?;
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

    /// Rewrites the log file with the entries kept (after a truncate or
    /// purge), zeros written ahead after them.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            frame(&mut out, e)?;
        }
        let end = out.len() as u64;
        out.resize((end + grow_by(end)) as usize, 0);
        let path = self.dir.join("log");
        self.barrier()?;
        write_atomic(&path, &out)?;
        let f = OpenOptions::new().read(true).write(true).open(&path)?;
        self.io
            .send(Io::SetFile(f, end))
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(i: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 7), i),
            payload: EntryPayload::Blank,
        }
    }

    /// Entries 1..=n appended as the log thread does, one append each;
    /// the file's bytes and where each entry starts.
    fn written(dir: &Path, n: u64) -> (Vec<u8>, Vec<usize>) {
        std::fs::create_dir_all(dir).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("log"))
            .unwrap();
        let mut tail = Tail {
            file,
            end: 0,
            size: 0,
        };
        let mut starts = Vec::new();
        for i in 1..=n {
            let mut b = Vec::new();
            frame(&mut b, &entry(i)).unwrap();
            starts.push(tail.end as usize);
            tail.append(&b).unwrap();
        }
        tail.file.sync_data().unwrap();
        (std::fs::read(dir.join("log")).unwrap(), starts)
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("log")).unwrap().len()
    }

    #[test]
    fn the_zeros_written_ahead_read_back_as_the_end_of_the_log_not_as_damage() {
        let d = tempfile::tempdir().unwrap();
        let (data, starts) = written(d.path(), 300);
        let mut last = Vec::new();
        frame(&mut last, &entry(300)).unwrap();
        let end = starts[299] + last.len();
        assert!(
            data.len() >= GROW_MIN as usize
                && data.len() > end
                && data[end..].iter().all(|b| *b == 0),
            "no zeros ahead: {} bytes, entries end at {end}",
            data.len()
        );
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none(), "{damage:?}");
        assert_eq!(store.last_index(), 300);
        // Nothing cut: the zeros stay for the next appends.
        assert_eq!(file_len(d.path()), data.len() as u64);
    }

    #[test]
    fn a_torn_append_before_the_zeros_ends_the_log_at_the_last_whole_entry() {
        let d = tempfile::tempdir().unwrap();
        let (mut data, starts) = written(d.path(), 40);
        // A crash mid-append of entry 40: its second half never written.
        let at = starts[39];
        let mut whole = Vec::new();
        frame(&mut whole, &entry(40)).unwrap();
        for b in &mut data[at + whole.len() / 2..at + whole.len()] {
            *b = 0;
        }
        std::fs::write(d.path().join("log"), &data).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none(), "{damage:?}");
        assert_eq!(store.last_index(), 39);
    }

    #[test]
    fn a_damaged_entry_with_whole_entries_after_it_is_found_among_the_zeros() {
        let d = tempfile::tempdir().unwrap();
        let (mut data, starts) = written(d.path(), 60);
        data[starts[24] + 10] ^= 0x10;
        std::fs::write(d.path().join("log"), &data).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        let damage = damage.expect("damage found");
        assert_eq!((damage.first_lost, damage.last_seen), (25, 60));
        assert_eq!(store.last_index(), 24);
    }

    #[test]
    fn an_entry_zeroed_in_the_middle_is_damage_not_the_end_of_the_log() {
        let d = tempfile::tempdir().unwrap();
        let (mut data, starts) = written(d.path(), 60);
        for b in &mut data[starts[29]..starts[30]] {
            *b = 0;
        }
        std::fs::write(d.path().join("log"), &data).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        let damage = damage.expect("damage found");
        assert_eq!((damage.first_lost, damage.last_seen), (30, 60));
        assert_eq!(store.last_index(), 29);
    }

    #[test]
    fn a_log_without_zeros_ahead_still_opens_whole() {
        let d = tempfile::tempdir().unwrap();
        let (data, starts) = written(d.path(), 20);
        let mut whole = Vec::new();
        frame(&mut whole, &entry(20)).unwrap();
        // As an earlier version wrote it: entries up to the file's end.
        let end = starts[19] + whole.len();
        std::fs::write(d.path().join("log"), &data[..end]).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none(), "{damage:?}");
        assert_eq!(store.last_index(), 20);
    }
}
