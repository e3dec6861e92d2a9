//! A group's Raft log and vote, in `<stream>/raft/`: `log` holds entries
//! one after the other as `[len u32][crc32c u32][bincode entry]`, then
//! zeros to the end of the file, `vote` and `purged` are rewritten
//! atomically. Once `log` holds [`SEGMENT_BYTES`] it is sealed as
//! `log.<last index>` and a new one started; a purge deletes the sealed
//! segments it covers whole (no rewrite), a truncation rewrites `log`
//! with every entry kept and deletes the sealed ones. The zeros are
//! written ahead ([`GROW_MIN`] to [`GROW_MAX`] at a time, not past a
//! segment's end, and after the entries whenever the file is rewritten), so an
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

/// The active file is sealed (renamed `log.<its last index>`) and a new
/// one started once it holds this much. A purge then deletes the sealed
/// files it covers whole instead of rewriting the log: a rewrite of the
/// entries kept (a quarter of those between snapshots, with zeros ahead)
/// held the Raft core for 40-115 ms per purge under load.
const SEGMENT_BYTES: u64 = 8 << 20;

/// `SOCKBUS_RAFT_SEGMENT_BYTES` overrides [`SEGMENT_BYTES`] (tests and
/// tuning); at least 4 KiB.
fn segment_bytes() -> u64 {
    std::env::var("SOCKBUS_RAFT_SEGMENT_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(SEGMENT_BYTES, |n| n.max(4096))
}

/// A sealed segment's file name: `log.` and its last index in 20 digits.
fn sealed_name(last: u64) -> String {
    format!("log.{last:020}")
}

/// The sealed segments in `dir`, oldest first: (last index, path).
fn sealed_in(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix("log.")) else {
            continue;
        };
        if n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(i) = n.parse() {
                v.push((i, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// The active log file and where its entries end (zeros from there to
/// `size`), with the sealed segments before it.
struct Tail {
    file: File,
    end: u64,
    size: u64,
    dir: PathBuf,
    /// The last index appended to the active file (0: none yet).
    last: u64,
    sealed: Vec<(u64, PathBuf)>,
    /// [`SEGMENT_BYTES`] (smaller in tests).
    segment_bytes: u64,
}

impl Tail {
    fn new(file: File, end: u64, size: u64, dir: &Path) -> Tail {
        Tail {
            file,
            end,
            size,
            dir: dir.to_path_buf(),
            last: 0,
            sealed: Vec::new(),
            segment_bytes: segment_bytes(),
        }
    }

    /// Seals the active file as `log.<last>` and starts a new `log`, its
    /// zeros written ahead and synced and the directory synced before any
    /// entry goes in (so what is appended to it is found after a crash).
    /// A crash between the two renames leaves no `log`: opening starts one.
    fn roll(&mut self) -> io::Result<()> {
        if self.end == 0 || self.last == 0 {
            return Ok(());
        }
        let new = self.dir.join("log.new");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&new)?;
        let ahead = GROW_MIN.min(self.segment_bytes);
        f.write_all_at(&vec![0u8; ahead as usize], 0)?;
        f.sync_all()?;
        // The zeros after the last entry are not needed any more (if the
        // roll fails after this, appends go on at the file's end).
        self.file.set_len(self.end)?;
        self.size = self.end;
        let sealed = self.dir.join(sealed_name(self.last));
        std::fs::rename(self.dir.join("log"), &sealed)?;
        self.sealed.push((self.last, sealed));
        std::fs::rename(&new, self.dir.join("log"))?;
        crate::store::segment::sync_dir(&self.dir)?;
        self.file = f;
        self.end = 0;
        self.size = ahead;
        Ok(())
    }

    /// Deletes the sealed segments whose entries are all purged.
    fn purge(&mut self, upto: u64) {
        let n = self.sealed.partition_point(|(last, _)| *last <= upto);
        for (_, p) in self.sealed.drain(..n) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), "cannot delete a purged Raft log segment: {e}");
            }
        }
    }

    /// Writes `bytes` after the last entry, first writing zeros ahead when
    /// the file is too short (synced with the entries by the caller).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let need = self.end + bytes.len() as u64;
        if need > self.size {
            // Not past the segment's end: the roll after this append would
            // cut those zeros off again (the append that crosses it grows
            // the file by itself, once per segment).
            let to = (need + grow_by(self.size)).min(need.max(self.segment_bytes));
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
    /// Framed entries, the last one's index, and whom to tell.
    Write(Vec<u8>, u64, LogFlushed<TypeConfig>),
    /// Answers once everything before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
    /// The log file was rewritten with every entry kept: append to this
    /// one from now on, its entries ending at the offset (the last index
    /// given), zeros after; the sealed segments go.
    SetFile(File, u64, u64),
    /// Entries up to this index are purged: sealed segments holding
    /// nothing after it go.
    Purge(u64),
}

fn io_thread(mut tail: Tail, fsync: bool, rx: std::sync::mpsc::Receiver<Io>) {
    let mut pending: Vec<LogFlushed<TypeConfig>> = Vec::new();
    let mut next = rx.recv().ok();
    while let Some(job) = next.take() {
        match job {
            Io::Write(bytes, last, cb) => {
                // Appends queued meanwhile share this one's fdatasync
                // (group commit): written in order, each acknowledged only
                // once the sync after it returned.
                let mut r = tail.append(&bytes);
                if r.is_ok() {
                    tail.last = last;
                }
                pending.push(cb);
                while r.is_ok() {
                    match rx.try_recv() {
                        Ok(Io::Write(bytes, last, cb)) => {
                            r = tail.append(&bytes);
                            if r.is_ok() {
                                tail.last = last;
                            }
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
                if r.is_ok() && tail.end >= tail.segment_bytes {
                    // A failed roll leaves the entries where they are: the
                    // next appends go on in the same file.
                    if let Err(e) = tail.roll() {
                        tracing::warn!(dir = %tail.dir.display(), "cannot start a new Raft log segment: {e}");
                    }
                }
            }
            Io::Barrier(tx) => {
                let _ = tx.send(());
            }
            Io::SetFile(file, end, last) => {
                tail.size = file.metadata().map_or(end, |m| m.len());
                tail.file = file;
                tail.end = end;
                tail.last = last;
                tail.purge(u64::MAX);
            }
            Io::Purge(upto) => tail.purge(upto),
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

/// Reads the whole entries at the start of `data` into `entries` (an entry
/// replaces one of its index and every later one); where they end and the
/// last index read.
fn scan(data: &[u8], entries: &mut BTreeMap<u64, Entry<TypeConfig>>) -> (usize, Option<u64>) {
    let mut at = 0usize;
    let mut last = None;
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
        last = Some(e.log_id.index);
        entries.insert(e.log_id.index, e);
        at += 8 + len;
    }
    (at, last)
}

impl LogStore {
    /// Opens the group's log; also says whether it found damage (not a
    /// torn tail) and cut the log there.
    pub(crate) fn open(dir: &Path, fsync: bool) -> io::Result<(LogStore, Option<LogDamage>)> {
        std::fs::create_dir_all(dir)?;
        let vote = read_opt(&dir.join("vote"))?;
        let purged: Option<Option<LogId<NodeId>>> = read_opt(&dir.join("purged"))?;
        let purged = purged.flatten();
        // A roll cut short between its renames (its file holds no entry).
        match std::fs::remove_file(dir.join("log.new")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut sealed = sealed_in(dir)?;
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
        let mut damage = None;
        // Sealed segments first, oldest first: their entries end where the
        // file ends (or zeros follow). Anything else is damage: the log is
        // cut there, the later segments and the active file's entries go.
        let mut cut = None;
        for (k, (_, p)) in sealed.iter().enumerate() {
            let d = std::fs::read(p)?;
            let (at, _) = scan(&d, &mut entries);
            if d[at..].iter().all(|b| *b == 0) {
                continue;
            }
            let first_lost = entries.keys().next_back().map_or(0, |i| i + 1);
            let mut last_seen = valid_after(&d, at);
            for (_, later) in &sealed[k + 1..] {
                last_seen = last_seen.max(scan(&std::fs::read(later)?, &mut BTreeMap::new()).1);
            }
            last_seen = last_seen.max(scan(&data, &mut BTreeMap::new()).1);
            match last_seen {
                Some(last_seen) => {
                    tracing::error!(
                        path = %p.display(),
                        offset = at,
                        first_lost,
                        last_seen,
                        "a sealed Raft log segment has a damaged entry (CRC) with whole entries \
                         after it: cut at the damage; this replica neither votes nor campaigns \
                         until its peers have sent it the entries again"
                    );
                    damage = Some(LogDamage {
                        first_lost,
                        last_seen,
                    });
                }
                None => tracing::warn!(
                    path = %p.display(),
                    dropped = d.len() - at,
                    "a sealed Raft log segment ends in a torn or damaged entry: cut back to the last whole one"
                ),
            }
            let f = OpenOptions::new().write(true).open(p)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
            for (_, later) in &sealed[k + 1..] {
                std::fs::remove_file(later)?;
            }
            file.set_len(0)?;
            file.sync_all()?;
            data.clear();
            cut = Some(k + 1);
            break;
        }
        if let Some(k) = cut {
            sealed.truncate(k);
            crate::store::segment::sync_dir(dir)?;
        }
        let (at, last) = scan(&data, &mut entries);
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
        let mut tail = Tail::new(file, at as u64, size, dir);
        tail.last = last.unwrap_or(0);
        tail.sealed = sealed;
        // Segments a purge covered whole, left by a crash before it deleted them.
        if let Some(p) = purged {
            tail.purge(p.index);
        }
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
        let last = self.entries.keys().next_back().copied().unwrap_or(0);
        self.barrier()?;
        write_atomic(&path, &out)?;
        let f = OpenOptions::new().read(true).write(true).open(&path)?;
        self.io
            .send(Io::SetFile(f, end, last))
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
        let last = new.last().map_or(0, |e| e.log_id.index);
        for e in new {
            g.entries.insert(e.log_id.index, e);
        }
        if let Err(e) = g.io.send(Io::Write(out, last, callback)) {
            let Io::Write(_, _, cb) = e.0 else {
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
        // The marker first: entries up to it are ignored when the log is
        // read back, so the sealed segments holding only those can go
        // afterwards, on the log thread, without rewriting anything.
        let mut g = self.lock();
        let b = bincode::serialize(&Some(log_id))
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        write_atomic(&g.dir.join("purged"), &b).map_err(|e| StorageIOError::write_logs(&e))?;
        g.purged = Some(log_id);
        g.entries = g.entries.split_off(&(log_id.index + 1));
        g.io.send(Io::Purge(log_id.index))
            .map_err(|_| StorageIOError::write_logs(&io_err("the Raft log thread stopped")))?;
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
        let mut tail = Tail::new(file, 0, 0, dir);
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

    /// Entries 1..=n appended as the log thread does, sealing a segment
    /// whenever the active file holds `segment` bytes or more.
    fn written_in_segments(dir: &Path, n: u64, segment: u64) -> Vec<(u64, PathBuf)> {
        std::fs::create_dir_all(dir).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("log"))
            .unwrap();
        let mut tail = Tail::new(file, 0, 0, dir);
        tail.segment_bytes = segment;
        for i in 1..=n {
            let mut b = Vec::new();
            frame(&mut b, &entry(i)).unwrap();
            tail.append(&b).unwrap();
            tail.last = i;
            tail.file.sync_data().unwrap();
            if tail.end >= tail.segment_bytes {
                tail.roll().unwrap();
            }
        }
        tail.sealed.clone()
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.lock().entries.keys().copied().collect()
    }

    #[tokio::test]
    async fn a_log_in_sealed_segments_reads_back_whole_and_a_purge_deletes_only_segments_it_covers()
    {
        let d = tempfile::tempdir().unwrap();
        let sealed = written_in_segments(d.path(), 100, 300);
        assert!(sealed.len() >= 5, "segments sealed: {}", sealed.len());
        assert_eq!(sealed_in(d.path()).unwrap(), sealed);
        let (mut store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none());
        assert_eq!(indexes(&store), (1..=100).collect::<Vec<_>>());

        // Purge up to the middle of the third segment: the first two go,
        // the third stays (it holds entries after the purge point).
        let mid = (sealed[1].0 + sealed[2].0) / 2;
        store.purge(entry(mid).log_id).await.unwrap();
        store.lock().barrier().unwrap();
        let left = sealed_in(d.path()).unwrap();
        assert_eq!(left, sealed[2..].to_vec());
        assert_eq!(indexes(&store), (mid + 1..=100).collect::<Vec<_>>());
        drop(store);

        // Read back: the purged entries stay purged, the rest is whole.
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none());
        assert_eq!(indexes(&store), (mid + 1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_entry_in_a_sealed_segment_cuts_the_log_there_and_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let sealed = written_in_segments(d.path(), 100, 300);
        // Flip a byte in the body of the second segment's second entry.
        let path = &sealed[1].1;
        let mut b = std::fs::read(path).unwrap();
        let first_len = u32::from_le_bytes(b[0..4].try_into().unwrap()) as usize;
        let second = 8 + first_len;
        b[second + 10] ^= 0x40;
        std::fs::write(path, &b).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        let damage = damage.expect("damage reported");
        let kept = sealed[0].0 + 1;
        assert_eq!(damage.first_lost, kept + 1);
        assert_eq!(damage.last_seen, 100);
        assert_eq!(indexes(&store), (1..=kept).collect::<Vec<_>>());
        // The later segments are gone: the log reads back the same again.
        assert_eq!(sealed_in(d.path()).unwrap().len(), 2);
        drop(store);
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none(), "cut once, read back clean");
        assert_eq!(indexes(&store), (1..=kept).collect::<Vec<_>>());
    }

    #[test]
    fn zeros_are_not_written_past_the_segments_end() {
        let d = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(d.path().join("log"))
            .unwrap();
        let mut tail = Tail::new(file, 0, 0, d.path());
        tail.segment_bytes = 3 * GROW_MIN;
        let chunk = vec![7u8; 100_000];
        let mut biggest = 0;
        while tail.end < tail.segment_bytes {
            tail.append(&chunk).unwrap();
            biggest = biggest.max(tail.size);
        }
        // The append that crossed the end grew the file to itself only.
        assert_eq!(biggest, tail.end.max(tail.segment_bytes));
        assert!(file_len(d.path()) <= tail.end.max(tail.segment_bytes));
    }

    #[test]
    fn a_roll_cut_short_between_its_renames_opens_with_every_entry() {
        let d = tempfile::tempdir().unwrap();
        written_in_segments(d.path(), 40, 300);
        // As if the broker died after sealing `log` and before `log.new`
        // became `log`.
        let last = sealed_in(d.path()).unwrap().last().unwrap().0;
        std::fs::rename(
            d.path().join("log"),
            d.path().join(sealed_name(last + 1000)),
        )
        .unwrap();
        std::fs::write(d.path().join("log.new"), vec![0u8; 4096]).unwrap();
        let (store, damage) = LogStore::open(d.path(), true).unwrap();
        assert!(damage.is_none());
        assert_eq!(indexes(&store), (1..=40).collect::<Vec<_>>());
        assert!(!d.path().join("log.new").exists());
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
