//! A stream's log: its segments in sequence order, the writer's
//! [`Appender`] and the readers' [`Log::read`].
//!
//! One thread appends (the stream's writer); any number read with `pread`
//! on shared file handles. The segment list sits behind a mutex held only to
//! look things up or publish a commit, never during I/O. Readers see a record
//! only once it is committed (for `fsync = always`: once it is on disk).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tracing::{error, warn};

use super::files::{CachedFile, FileCache};
use super::record::{self, Decoded, StoredMsg};
use super::segment::{
    scan_file, seg_path, sync_dir, BadRange, IndexEntry, Segment, INDEX_INTERVAL, SEG_HEADER,
};

/// Bytes read per `pread` when reading forward.
const READ_CHUNK: usize = 256 * 1024;
/// With fsync on every commit, the active segment is zero-filled ahead of
/// the data: `fdatasync` of an overwrite needs no metadata journal commit
/// (the file size does not change), which makes it about twice as fast.
/// As far ahead as the segment already holds, between these two: a stream
/// written once costs 4 KiB of zeros, not 4 MiB (10,000 streams: 40 MB).
const PREALLOC: u64 = 4 << 20;
const PREALLOC_MIN: u64 = 4 << 10;
/// Staging memory an appender keeps between commits.
const STAGING_KEEP: usize = 64 << 10;
/// Most bytes a filtered read looks at before returning what it has.
const SCAN_LIMIT: u64 = 16 << 20;
/// The file keeping a log's floor (see [`LogState::floor`]), in its directory.
pub const FLOOR_FILE: &str = "floor";
/// The file listing messages deleted one by one: 16-byte entries, u64
/// sequence, u32 record bytes, u32 CRC32C of the first 12.
pub const DELETED_FILE: &str = "deleted";
const DEL_ENTRY: usize = 16;

fn del_entry(buf: &mut Vec<u8>, seq: u64, len: u32) {
    let at = buf.len();
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&buf[at..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Debug)]
pub struct LogState {
    pub segs: VecDeque<Segment>,
    /// Next sequence the writer will assign (committed ones are below it).
    pub next_seq: u64,
    pub last_ts: u64,
    /// Records found damaged (skipped) since the broker started.
    pub lost: u64,
    /// Sequences below this are removed even where their segment is still
    /// on disk: a purge, or a `max_msgs`/`max_bytes` limit cutting into a
    /// segment. Kept in the `floor` file (see [`Log::open`]).
    pub floor: u64,
    /// Where `floor` falls inside a segment, when it does.
    floor_at: Option<FloorAt>,
    /// Messages at or above the floor deleted one by one (a filtered
    /// purge, a message delete): sequence -> record bytes. Shared with
    /// readers, who skip them; copied when changed (deletes are rare).
    dels: Arc<BTreeMap<u64, u32>>,
    /// Per segment (by base): how many of `dels` it holds, and their bytes.
    del_seg: HashMap<u64, (u64, u64)>,
}

/// The floor's place inside a segment: the message it starts at, its
/// record's offset and time, and how many of the segment's messages are
/// below it.
#[derive(Debug, Clone, Copy)]
struct FloorAt {
    base: u64,
    seq: u64,
    off: u64,
    ts: u64,
    below: u64,
}

/// Where a new floor falls.
enum Place {
    /// At a segment's first message, or past every message: nothing to note.
    Boundary,
    /// Inside a segment.
    At(FloorAt),
    /// Inside a segment with no message left from there on: the floor
    /// belongs at this next sequence instead.
    Past(u64),
}

impl LogState {
    /// Messages of `s` at or above the floor, not deleted.
    fn seg_msgs(&self, s: &Segment) -> u64 {
        if s.msgs == 0 || s.last_seq < self.floor {
            return 0;
        }
        let n = match self.floor_at {
            Some(f) if f.base == s.base => s.msgs.saturating_sub(f.below),
            _ => s.msgs,
        };
        n.saturating_sub(self.del_seg.get(&s.base).map_or(0, |d| d.0))
    }
    /// Bytes of `s` at or above the floor, not deleted (its header included).
    fn seg_bytes(&self, s: &Segment) -> u64 {
        // An empty segment (its 16-byte header alone) holds nothing: an
        // empty stream reports 0 bytes, as nats-server's does.
        if self.seg_msgs(s) == 0 {
            return 0;
        }
        let n = match self.floor_at {
            Some(f) if f.base == s.base => s.len.saturating_sub(f.off - SEG_HEADER),
            _ => s.len,
        };
        n.saturating_sub(self.del_seg.get(&s.base).map_or(0, |d| d.1))
    }
    /// The base of the segment that holds `seq`, if one may.
    fn seg_of(&self, seq: u64) -> Option<u64> {
        let i = self
            .segs
            .partition_point(|s| s.base <= seq)
            .checked_sub(1)?;
        Some(self.segs[i].base)
    }
    /// Forgets deletes below the floor (the floor removes them now) and
    /// those of a segment that is gone. True if any were.
    fn prune_dels(&mut self) -> bool {
        let floor = self.floor;
        let first_base = self.segs.front().map_or(0, |s| s.base);
        let low = floor.max(first_base);
        if self.dels.range(..low).next().is_none() {
            return false;
        }
        let dels = Arc::make_mut(&mut self.dels);
        let keep = dels.split_off(&low);
        *dels = keep;
        self.del_seg.clear();
        let counts: Vec<(u64, u32)> = self.dels.iter().map(|(k, v)| (*k, *v)).collect();
        for (seq, len) in counts {
            if let Some(b) = self.seg_of(seq) {
                let e = self.del_seg.entry(b).or_default();
                e.0 += 1;
                e.1 += len as u64;
            }
        }
        true
    }
    /// Messages deleted one by one that the stream still counts in its
    /// sequence range (JetStream's `num_deleted`).
    pub fn deleted(&self) -> u64 {
        self.dels.len() as u64
    }
    pub fn first_seq(&self) -> u64 {
        // Deleting the first message raises the floor past it, so the
        // first message at or above the floor is never a deleted one.
        self.segs
            .iter()
            .find(|s| self.seg_msgs(s) > 0)
            .map_or(self.next_seq, |s| s.first_seq.max(self.floor))
    }
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
    pub fn msgs(&self) -> u64 {
        self.segs.iter().map(|s| self.seg_msgs(s)).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| self.seg_bytes(s)).sum()
    }
    pub fn first_ts(&self) -> u64 {
        self.segs
            .iter()
            .find(|s| self.seg_msgs(s) > 0)
            .map_or(0, |s| match self.floor_at {
                Some(f) if f.base == s.base => f.ts,
                _ => s.first_ts,
            })
    }
}

/// Where a forward read stopped, so the next read skips the index lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPos {
    pub seg_base: u64,
    pub off: u64,
    pub seq: u64,
}

#[derive(Debug, Default)]
pub struct ReadBatch {
    pub msgs: Vec<StoredMsg>,
    /// The next sequence to ask for.
    pub next: u64,
    pub pos: Option<ReadPos>,
}

pub struct Log {
    pub dir: PathBuf,
    pub name: String,
    /// Where its files are opened (shared by every stream of the broker).
    files: Arc<FileCache>,
    state: Mutex<LogState>,
    /// The last committed sequence, for consumers waiting for new messages.
    pub committed: tokio::sync::watch::Sender<u64>,
    /// `fdatasync`s of the active segment so far (group commit: one per round).
    pub fsyncs: AtomicU64,
    /// Reads stop at a damaged record instead of skipping it (a replicated
    /// stream's copy, repaired from its peers: readers wait for that).
    strict: AtomicBool,
}

/// What opening a log found, for the start-up report.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub segments: usize,
    pub truncated_bytes: u64,
    pub damaged_ranges: usize,
    pub lost: u64,
}

impl Log {
    /// Opens (or creates) the log in `dir`: every segment is listed, the last
    /// one is scanned and a torn tail cut at the last valid record.
    pub fn open(
        dir: &Path,
        name: &str,
        files: &Arc<FileCache>,
    ) -> io::Result<(Arc<Log>, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        let mut bases: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                n.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut report = OpenReport::default();
        let mut segs = VecDeque::new();
        let mut scanned = Vec::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let path = seg_path(dir, base);
            let before = std::fs::metadata(&path)?.len();
            let (seg, scan) = Segment::open(&path, base, !last, last, files)?;
            if let Some(s) = &scan {
                if !s.zero_tail {
                    report.truncated_bytes += before - seg.len.min(before);
                }
                if !s.bad.is_empty() {
                    error!(stream = name, segment = %path.display(), ranges = ?s.bad, lost = s.lost,
                        "damaged records found (CRC mismatch); they are skipped, everything else is served");
                    report.damaged_ranges += s.bad.len();
                    report.lost += s.lost;
                }
            }
            scanned.push(scan.is_some());
            segs.push_back(seg);
        }
        // A segment is sealed when the next one starts, at the sequence after
        // its last record: a scanned sealed segment that ends earlier was cut
        // short (truncated) or lost its last records to damage.
        for i in 0..segs.len().saturating_sub(1) {
            let (seg, next) = (&segs[i], &segs[i + 1]);
            if !scanned[i] || seg.msgs == 0 || next.base <= seg.last_seq + 1 {
                continue;
            }
            let (from, to) = (seg.last_seq + 1, next.base - 1);
            error!(stream = name, segment = %seg.path.display(), lost_from = from, lost_to = to,
                "sealed segment cut short or its last records damaged (CRC); these sequences are lost, everything else is served");
            report.damaged_ranges += 1;
            report.lost += to - from + 1;
        }
        if report.truncated_bytes > 0 {
            warn!(
                stream = name,
                bytes = report.truncated_bytes,
                "torn write at the end of the log truncated at the last valid record"
            );
        }
        let next_seq = segs
            .iter()
            .filter(|s| s.msgs > 0)
            .map(|s| s.last_seq + 1)
            .max()
            .unwrap_or(1)
            .max(segs.back().map_or(1, |s| s.base));
        let last_ts = segs.iter().map(|s| s.last_ts).max().unwrap_or(0);
        if segs.is_empty() {
            segs.push_back(Segment::create(dir, next_seq, true, files)?);
        }
        report.segments = segs.len();
        let log = Arc::new(Log {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            files: files.clone(),
            state: Mutex::new(LogState {
                segs,
                next_seq,
                last_ts,
                lost: report.lost,
                floor: 1,
                floor_at: None,
                dels: Arc::new(BTreeMap::new()),
                del_seg: HashMap::new(),
            }),
            committed: tokio::sync::watch::channel(next_seq - 1).0,
            fsyncs: AtomicU64::new(0),
            strict: AtomicBool::new(false),
        });
        // A floor saved by a purge or a retention cut: what it removed
        // stays removed. A file that does not parse is ignored (the floor
        // only ever hides messages; retention cuts again where it must).
        if let Ok(text) = std::fs::read_to_string(dir.join(FLOOR_FILE)) {
            match text.trim().parse::<u64>() {
                Ok(floor) if floor > 1 => {
                    log.raise_floor(floor.min(next_seq))?;
                }
                Ok(_) => {}
                Err(e) => warn!(stream = name, "ignoring an unreadable floor file: {e}"),
            }
        }
        // Messages deleted one by one: entries up to the first torn or
        // damaged one (a crash while appending loses at most that delete).
        if let Ok(bytes) = std::fs::read(dir.join(DELETED_FILE)) {
            let mut st = log.lock();
            let mut dels = BTreeMap::new();
            for e in bytes.chunks_exact(DEL_ENTRY) {
                if crc32c::crc32c(&e[..12]) != u32::from_le_bytes([e[12], e[13], e[14], e[15]]) {
                    warn!(stream = name, "the deleted-messages file ends in a damaged entry; the entries before it count");
                    break;
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&e[..8]);
                let seq = u64::from_le_bytes(seq);
                let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
                if seq >= st.floor && seq < st.next_seq {
                    dels.insert(seq, len);
                }
            }
            for (seq, len) in &dels {
                if let Some(b) = st.seg_of(*seq) {
                    let e = st.del_seg.entry(b).or_default();
                    e.0 += 1;
                    e.1 += *len as u64;
                }
            }
            st.dels = Arc::new(dels);
            let first = st.first_seq();
            if st.dels.contains_key(&first) {
                drop(st);
                log.raise_floor(first)?;
            }
        }
        Ok((log, report))
    }

    /// Where a floor at `seq` falls (see [`Place`]).
    fn locate(&self, seq: u64) -> io::Result<Place> {
        let (base, first, last) = {
            let st = self.lock();
            match st
                .segs
                .iter()
                .find(|s| s.msgs > 0 && s.first_seq < seq && seq <= s.last_seq)
            {
                Some(s) => (s.base, s.first_seq, s.last_seq),
                None => return Ok(Place::Boundary),
            }
        };
        let b = self.read(seq, None, 1, 1, None)?;
        let (Some(m), Some(pos)) = (b.msgs.first(), b.pos) else {
            return Ok(Place::Past(last + 1));
        };
        if pos.seg_base != base || m.seq > last {
            // Nothing left of this segment from `seq` on (deleted, or
            // lost to damage): the floor moves to the next one.
            return Ok(Place::Past(last + 1));
        }
        let len =
            (record::RECORD_HEADER + m.subject().len() + m.headers.len() + m.payload.len()) as u64;
        Ok(Place::At(FloorAt {
            base,
            seq: m.seq,
            off: pos.off.saturating_sub(len).max(SEG_HEADER),
            ts: m.ts,
            below: m.seq - first,
        }))
    }

    /// Puts the floor at `seq` or, where deletes leave nothing there, at
    /// the next message still held; forgets the deletes it passes. Returns
    /// the floor set. Does not save it.
    fn raise_floor(&self, mut seq: u64) -> io::Result<u64> {
        let at = loop {
            match self.locate(seq)? {
                Place::Boundary => break None,
                Place::At(a) => {
                    seq = a.seq;
                    break Some(a);
                }
                Place::Past(next) => seq = next,
            }
        };
        let mut st = self.lock();
        // Deleted messages right at the floor: past them too (so the
        // first message at or above the floor is never a deleted one).
        if at.is_none() {
            while st.dels.contains_key(&seq) {
                seq += 1;
            }
            if seq < st.next_seq
                && st
                    .segs
                    .iter()
                    .any(|s| s.msgs > 0 && s.first_seq < seq && seq <= s.last_seq)
            {
                drop(st);
                return self.raise_floor(seq);
            }
        }
        seq = seq.min(st.next_seq);
        if seq > st.floor {
            st.floor = seq;
            st.floor_at = at;
        }
        st.prune_dels();
        Ok(st.floor)
    }

    /// Rewrites the deleted-messages file with the deletes still held.
    fn save_dels(&self, sync: bool) -> io::Result<()> {
        let dels = self.lock().dels.clone();
        let mut buf = Vec::with_capacity(dels.len() * DEL_ENTRY);
        for (seq, len) in dels.iter() {
            del_entry(&mut buf, *seq, *len);
        }
        let path = self.dir.join(DELETED_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &buf)?;
        if sync {
            File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The sequence after the `n`-th message held from the first on (a
    /// cut that keeps all but the oldest `n`).
    fn seq_after(&self, n: u64) -> io::Result<u64> {
        let (mut from, mut pos) = (self.lock().first_seq(), None);
        let mut seen = 0u64;
        loop {
            let b = self.read(from, None, 4096, 8 << 20, pos)?;
            if b.msgs.is_empty() {
                return Ok(b.next);
            }
            for m in &b.msgs {
                seen += 1;
                if seen >= n {
                    return Ok(m.seq + 1);
                }
            }
            (from, pos) = (b.next, b.pos);
        }
    }

    /// The messages matching `filter` from the first message up to (not
    /// including) `before`: sequence and record bytes of each.
    pub fn matching(&self, filter: &str, before: u64) -> io::Result<Vec<(u64, u32)>> {
        let (mut from, mut pos) = (self.lock().first_seq(), None);
        let mut out = Vec::new();
        while from < before {
            let b = self.read(from, Some(filter), 4096, 32 << 20, pos)?;
            for m in &b.msgs {
                if m.seq >= before {
                    return Ok(out);
                }
                out.push((m.seq, m.stored_len()));
            }
            if b.next <= from {
                break;
            }
            (from, pos) = (b.next, b.pos);
        }
        Ok(out)
    }

    /// The first sequence from which on the log holds at most `keep`
    /// bytes of records (a `max_bytes` cut): reads forward from the first
    /// message adding up record sizes.
    fn seq_keeping_bytes(&self, excess: u64) -> io::Result<u64> {
        let (mut from, mut pos) = (self.lock().first_seq(), None);
        let mut cut = 0u64;
        loop {
            let b = self.read(from, None, 4096, 8 << 20, pos)?;
            if b.msgs.is_empty() {
                return Ok(b.next);
            }
            for m in &b.msgs {
                cut +=
                    (record::RECORD_HEADER + m.subject().len() + m.headers.len() + m.payload.len())
                        as u64;
                if cut >= excess {
                    return Ok(m.seq + 1);
                }
            }
            (from, pos) = (b.next, b.pos);
        }
    }

    /// Writes the floor file (temporary name, rename; fsynced with the
    /// directory when `sync`).
    fn save_floor(&self, floor: u64, sync: bool) -> io::Result<()> {
        let path = self.dir.join(FLOOR_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{floor}\n"))?;
        if sync {
            File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Empties the log: every segment removed, one new empty segment for
    /// records from `base` on. A replicated stream's replica installing a
    /// snapshot does this before writing the snapshot's records; its only
    /// writer (an [`Appender`]) must be made again afterwards. The new
    /// segment is created before the old ones go, so a failure leaves the
    /// log as it was (and a crash midway is redone by the installer).
    pub fn reset(&self, base: u64, sync: bool) -> io::Result<()> {
        let base = base.max(1);
        let mut st = self.lock();
        let path = seg_path(&self.dir, base);
        // An old segment at the same base is the file about to be replaced.
        for seg in st.segs.iter().filter(|s| s.path == path) {
            seg.file.close();
        }
        let fresh = Segment::create(&self.dir, base, sync, &self.files)?;
        for seg in st.segs.drain(..) {
            if seg.path != path {
                seg.remove_files();
            }
        }
        // Leftovers of an earlier reset cut short by a crash.
        for e in std::fs::read_dir(&self.dir)?.filter_map(|e| e.ok()) {
            let p = e.path();
            let old = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|b| b.parse::<u64>().ok())
                .is_some_and(|b| b != base);
            if old {
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_file(crate::store::segment::idx_path(&p));
            }
        }
        if sync {
            sync_dir(&self.dir)?;
        }
        st.segs.push_back(fresh);
        st.next_seq = base;
        st.last_ts = 0;
        st.lost = 0;
        // Nothing below `base` is left to hide, and no deletes to skip.
        st.floor = 0;
        st.floor_at = None;
        st.dels = Default::default();
        st.del_seg.clear();
        let _ = std::fs::remove_file(self.dir.join(FLOOR_FILE));
        let _ = std::fs::remove_file(self.dir.join(DELETED_FILE));
        drop(st);
        self.committed.send_replace(base - 1);
        Ok(())
    }

    /// What happens to damage found, for the logs.
    fn on_damage(&self) -> &'static str {
        if self.strict.load(Ordering::Relaxed) {
            "reads stop there until this replica's copy is repaired from its peers"
        } else {
            "these sequences are lost and skipped, everything else is served"
        }
    }

    /// Reads stop at damage instead of skipping it (see `strict`).
    pub fn set_strict(&self, on: bool) {
        self.strict.store(on, Ordering::Relaxed);
    }

    pub fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache its files are opened through.
    pub fn files(&self) -> &Arc<FileCache> {
        &self.files
    }

    /// Whether a sealed segment still waits for its background CRC check.
    pub fn needs_verify(&self) -> bool {
        self.lock().segs.iter().any(|s| s.sealed && !s.verified)
    }

    /// Checks the CRC of every sealed segment not yet checked (run in the
    /// background after start-up), recording damaged ranges.
    pub fn verify_sealed(&self) {
        loop {
            let next = {
                let st = self.lock();
                st.segs
                    .iter()
                    .find(|s| s.sealed && !s.verified)
                    .map(|s| (s.base, s.file.clone()))
            };
            let Some((base, file)) = next else { return };
            let scan = file.open().and_then(|f| scan_file(&f, base));
            let mut st = self.lock();
            let next_base = st.segs.iter().find(|s| s.base > base).map(|s| s.base);
            let Some(seg) = st.segs.iter_mut().find(|s| s.base == base) else {
                continue;
            };
            if seg.verified {
                // A reader met the damage while this scan ran and counted
                // it (`on_corrupt`): counting it here too counted it twice.
                continue;
            }
            seg.verified = true;
            let lost = match scan {
                Ok(s) => {
                    if !s.bad.is_empty() {
                        error!(stream = %self.name, segment = %seg.path.display(), ranges = ?s.bad, lost = s.lost,
                            then = self.on_damage(), "damaged records found (CRC mismatch)");
                        seg.bad = s.bad.clone();
                    }
                    let tail = self.tail_lost(seg, &s, next_base);
                    if !s.bad.is_empty() || tail > 0 {
                        seg.msgs = s.msgs;
                    }
                    s.lost + tail
                }
                Err(e) => {
                    warn!(stream = %self.name, "cannot verify segment {base}: {e}");
                    0
                }
            };
            st.lost += lost;
        }
    }

    /// Sequences lost at the end of a sealed segment (cut short, or its last
    /// records damaged with no valid record after them): between its last
    /// valid record and the next segment's base. Logged when there are any.
    fn tail_lost(&self, seg: &Segment, s: &super::segment::Scan, next_base: Option<u64>) -> u64 {
        let Some(next) = next_base else { return 0 };
        let from = if s.msgs > 0 { s.last_seq + 1 } else { seg.base };
        if next <= from {
            return 0;
        }
        error!(stream = %self.name, segment = %seg.path.display(), lost_from = from, lost_to = next - 1,
            then = self.on_damage(), "sealed segment cut short or its last records damaged (CRC)");
        next - from
    }

    /// A reader met a bad record at `off`: scan the segment, remember its
    /// damaged ranges, and return where reading resumes.
    fn on_corrupt(&self, base: u64, file: &File, off: u64) -> (u64, Vec<BadRange>) {
        let scan = scan_file(file, base);
        let mut st = self.lock();
        let next_base = st.segs.iter().find(|s| s.base > base).map(|s| s.base);
        let Some(seg) = st.segs.iter_mut().find(|s| s.base == base) else {
            return (u64::MAX, Vec::new());
        };
        let mut lost = 0;
        let resume = match scan {
            Ok(s) => {
                if !seg.verified {
                    // Not scanned before: damage at its end is news too.
                    lost += self.tail_lost(seg, &s, next_base);
                    seg.msgs = s.msgs;
                    seg.verified = true;
                }
                if seg.bad != s.bad {
                    error!(stream = %self.name, segment = %seg.path.display(), ranges = ?s.bad, lost = s.lost,
                        then = self.on_damage(), "damaged records found (CRC mismatch)");
                    seg.bad = s.bad.clone();
                    seg.msgs = s.msgs;
                    seg.verified = true;
                    lost += s.lost;
                }
                s.bad
                    .iter()
                    .find(|r| r.start <= off && off < r.end)
                    .map_or(u64::MAX, |r| r.end)
            }
            Err(e) => {
                error!(stream = %self.name, "cannot rescan a damaged segment: {e}");
                u64::MAX
            }
        };
        // u64::MAX: nothing valid after it in this segment.
        let bad = seg.bad.clone();
        st.lost += lost;
        (resume, bad)
    }

    /// Reads forward from `from`: up to `max_msgs` messages and about
    /// `max_bytes` of payload (always at least one message when there is
    /// one), only those whose subject matches `filter` when given. Damaged
    /// records are skipped. A filtered read gives up after looking at
    /// `SCAN_LIMIT` bytes; `next` says where to continue.
    pub fn read(
        &self,
        mut from: u64,
        filter: Option<&str>,
        max_msgs: usize,
        max_bytes: usize,
        hint: Option<ReadPos>,
    ) -> io::Result<ReadBatch> {
        let mut out = ReadBatch::default();
        let mut bytes = 0usize;
        let mut scanned = 0u64;
        let mut pos = hint.filter(|h| h.seq == from);
        let mut want = READ_CHUNK;
        let strict = self.strict.load(Ordering::Relaxed);
        'segments: loop {
            let (file, base, start, end, mut bad, is_last, seg_last, dels) = {
                let st = self.lock();
                let first = st.first_seq();
                if from < first {
                    from = first;
                    pos = None;
                }
                if from >= st.next_seq {
                    break;
                }
                let Some(i) = st.segs.partition_point(|s| s.base <= from).checked_sub(1) else {
                    from = st.segs.front().map_or(from + 1, |s| s.base);
                    pos = None;
                    continue;
                };
                let seg = &st.segs[i];
                let is_last = i + 1 == st.segs.len();
                if !is_last && (seg.msgs == 0 || from > seg.last_seq) {
                    from = from.max(st.segs[i + 1].base);
                    pos = None;
                    continue;
                }
                let start = match pos {
                    Some(p) if p.seg_base == seg.base => p.off,
                    _ => seg.offset_for_seq(from),
                };
                // Opened under the lock: retention removes a segment from
                // the list before it unlinks the file, so this one exists.
                (
                    seg.file.open()?,
                    seg.base,
                    start,
                    seg.len,
                    seg.bad.clone(),
                    is_last,
                    seg.last_seq,
                    (!st.dels.is_empty()).then(|| st.dels.clone()),
                )
            };
            let mut off = start;
            while off < end {
                if let Some(r) = bad.iter().find(|r| r.start <= off && off < r.end) {
                    if strict {
                        // Not past damage: the reader waits for the repair.
                        pos = None;
                        break 'segments;
                    }
                    off = r.end;
                    continue;
                }
                let n = (end - off).min(want as u64) as usize;
                let mut buf = BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, off)?;
                let chunk: Bytes = buf.freeze();
                scanned += n as u64;
                let mut at = 0usize;
                let mut jump = None;
                while at < chunk.len() {
                    let abs = off + at as u64;
                    if bad.iter().any(|r| r.start <= abs && abs < r.end) {
                        break;
                    }
                    match record::decode(&chunk[at..]) {
                        Decoded::Record(r, len) => {
                            at += len;
                            want = READ_CHUNK;
                            if r.seq < from {
                                continue;
                            }
                            from = r.seq + 1;
                            if dels.as_ref().is_some_and(|d| d.contains_key(&r.seq)) {
                                continue;
                            }
                            if filter.is_none_or(|f| sockbus_protocol::matches(f, r.subject)) {
                                bytes += r.payload.len() + r.headers.len() + r.subject.len();
                                out.msgs.push(StoredMsg::from_ref(&chunk, &r));
                                if out.msgs.len() >= max_msgs || bytes >= max_bytes {
                                    pos = Some(ReadPos {
                                        seg_base: base,
                                        off: off + at as u64,
                                        seq: from,
                                    });
                                    break 'segments;
                                }
                            }
                        }
                        Decoded::Incomplete(need) if abs + need as u64 <= end => {
                            // The record continues past this chunk: read it whole next time.
                            want = want.max(need);
                            break;
                        }
                        Decoded::Incomplete(_) | Decoded::Corrupt => {
                            let (resume, now_bad) = self.on_corrupt(base, &file, abs);
                            if strict {
                                pos = None;
                                break 'segments;
                            }
                            bad = now_bad;
                            jump = Some(resume.max(abs + 1).min(end));
                            break;
                        }
                    }
                }
                off = jump.unwrap_or(off + at as u64);
                if filter.is_some() && scanned >= SCAN_LIMIT {
                    pos = Some(ReadPos {
                        seg_base: base,
                        off,
                        seq: from,
                    });
                    break 'segments;
                }
            }
            pos = Some(ReadPos {
                seg_base: base,
                off,
                seq: from,
            });
            if is_last {
                break;
            }
            from = from.max(seg_last + 1);
        }
        out.next = from;
        out.pos = pos.filter(|p| p.seq == from);
        Ok(out)
    }

    /// The newest stored message whose subject matches `filter` (a subject
    /// or a pattern), by a filtered scan from the first sequence: its cost
    /// grows with the stream, for occasional lookups (`Nats-Expected-Last-
    /// Subject-Sequence`, JetStream's `last_by_subj`).
    pub fn last_matching(&self, filter: &str) -> io::Result<Option<StoredMsg>> {
        let (mut from, mut pos, mut last) = (self.lock().first_seq(), None, None);
        loop {
            let b = self.read(from, Some(filter), 4096, 32 << 20, pos)?;
            let end = b.next <= from;
            if let Some(m) = b.msgs.into_iter().last() {
                last = Some(m);
            }
            if end {
                return Ok(last);
            }
            (from, pos) = (b.next, b.pos);
        }
    }

    /// The first sequence whose timestamp is at or after `ts` (the next
    /// sequence to be written when there is none).
    pub fn seq_for_time(&self, ts: u64) -> io::Result<u64> {
        let mut from = {
            let st = self.lock();
            match st.segs.iter().find(|s| s.msgs > 0 && s.last_ts >= ts) {
                None => return Ok(st.next_seq),
                Some(s) => {
                    let i = s.index.partition_point(|e| e.ts < ts);
                    if i == 0 {
                        s.first_seq
                    } else {
                        s.index[i - 1].seq
                    }
                }
            }
        };
        loop {
            let b = self.read(from, None, 4096, 64 << 20, None)?;
            if let Some(m) = b.msgs.iter().find(|m| m.ts >= ts) {
                return Ok(m.seq);
            }
            if b.msgs.is_empty() {
                return Ok(b.next);
            }
            from = b.next;
        }
    }
}

/// The only writer of a log: stages sealed records, writes them with one
/// `pwrite` per commit, rolls segments, applies retention.
pub struct Appender {
    log: Arc<Log>,
    max_seg: u64,
    /// fsync segment seals and directory changes (every mode but `never`).
    sync_meta: bool,
    /// The active segment; opened for each commit, never held between them.
    file: CachedFile,
    off: u64,
    staging: Vec<u8>,
    staged: Vec<IndexEntry>,
    next_seq: u64,
    last_ts: u64,
    last_indexed: Option<u64>,
    dirty: bool,
    /// Zero-fill ahead (`fsync = always` only); `alloc_end` is the file's length.
    prealloc: bool,
    alloc_end: u64,
}

impl Appender {
    pub fn new(log: Arc<Log>, max_seg: u64, sync_meta: bool, prealloc: bool) -> Appender {
        let (file, off, next_seq, last_ts, last_indexed) = {
            let st = log.lock();
            let seg = st.segs.back().expect("a log always has a segment");
            (
                seg.file.clone(),
                seg.len,
                st.next_seq,
                st.last_ts,
                seg.index.last().map(|e| e.off),
            )
        };
        Appender {
            log,
            max_seg: max_seg.max(SEG_HEADER + 1),
            sync_meta,
            file,
            off,
            staging: Vec::new(),
            staged: Vec::new(),
            next_seq,
            last_ts,
            last_indexed,
            dirty: false,
            prealloc,
            alloc_end: off,
        }
    }

    /// Zero-fills the active segment past `end` (see `PREALLOC`).
    fn extend(&mut self, file: &File, end: u64) -> io::Result<()> {
        if !self.prealloc || end <= self.alloc_end {
            return Ok(());
        }
        let ahead = end.clamp(PREALLOC_MIN, PREALLOC);
        let target = (end + ahead).min(self.max_seg.max(end));
        let zeros = vec![0u8; (target - self.alloc_end).min(1 << 20) as usize];
        let mut at = self.alloc_end;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.alloc_end = target;
        Ok(())
    }

    /// Size at which later segments are sealed (a stream's `max_bytes`
    /// changed); the active one keeps growing to the new size.
    pub fn set_max_seg(&mut self, max_seg: u64) {
        self.max_seg = max_seg.max(SEG_HEADER + 1);
    }

    /// The sequence the next staged record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Assigns the next sequence to an encoded record and stages it, first
    /// committing and rolling the segment when the record would overflow it.
    pub fn stage(&mut self, rec: &mut [u8], fsync: bool) -> io::Result<(u64, u64)> {
        self.stage_at(rec, fsync, now_ns())
    }

    /// [`Appender::stage`] with the timestamp given (a replicated stream's
    /// proposer stamps its records so every replica stores the same), kept
    /// at or after the last one.
    pub fn stage_at(&mut self, rec: &mut [u8], fsync: bool, ts: u64) -> io::Result<(u64, u64)> {
        let end = self.off + self.staging.len() as u64;
        if end > SEG_HEADER && end + rec.len() as u64 > self.max_seg {
            self.commit(fsync)?;
            self.roll()?;
        }
        let seq = self.next_seq;
        let ts = ts.max(self.last_ts);
        record::seal(rec, seq, ts);
        self.staged.push(IndexEntry {
            seq,
            ts,
            off: self.off + self.staging.len() as u64,
        });
        self.staging.extend_from_slice(rec);
        self.next_seq += 1;
        self.last_ts = ts;
        Ok((seq, ts))
    }

    /// Moves the next sequence forward to `seq` (records the source lost to
    /// damage are not there to copy): what is staged is committed and a
    /// new segment starts at `seq`, as a log that lost those records reads.
    pub fn skip_to(&mut self, seq: u64, fsync: bool) -> io::Result<()> {
        if seq <= self.next_seq {
            return Ok(());
        }
        self.commit(fsync)?;
        self.next_seq = seq;
        self.roll()?;
        self.log.lock().next_seq = seq;
        Ok(())
    }

    /// Writes what is staged (one `pwrite`), optionally `fdatasync`s, then
    /// makes it visible to readers. On failure nothing staged is kept: the
    /// file is cut back to the last commit and the sequences are reused.
    pub fn commit(&mut self, fsync: bool) -> io::Result<()> {
        if self.staging.is_empty() {
            return if fsync { self.sync() } else { Ok(()) };
        }
        let end = self.off + self.staging.len() as u64;
        // One descriptor for the write and its fsync: a write-back error is
        // reported to the descriptors open when it happens.
        let r = self.file.open().and_then(|file| {
            self.extend(&file, end)?;
            file.write_all_at(&self.staging, self.off)?;
            self.dirty = true;
            if fsync {
                file.sync_data()?;
                self.log.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.dirty = false;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.rollback();
            return Err(e);
        }
        let new_off = self.off + self.staging.len() as u64;
        {
            let mut st = self.log.lock();
            let seg = st.segs.back_mut().expect("a log always has a segment");
            for e in &self.staged {
                if self
                    .last_indexed
                    .is_none_or(|l| e.off - l >= INDEX_INTERVAL)
                {
                    seg.index.push(*e);
                    self.last_indexed = Some(e.off);
                }
                if seg.msgs == 0 {
                    seg.first_seq = e.seq;
                    seg.first_ts = e.ts;
                }
                seg.msgs += 1;
                seg.last_seq = e.seq;
                seg.last_ts = e.ts;
            }
            seg.len = new_off;
            st.next_seq = self.next_seq;
            st.last_ts = self.last_ts;
        }
        self.off = new_off;
        self.clear_staging();
        self.log.committed.send_replace(self.next_seq - 1);
        Ok(())
    }

    fn clear_staging(&mut self) {
        self.staging.clear();
        self.staged.clear();
        // An idle stream keeps little memory (10,000 streams: not 10 GB).
        if self.staging.capacity() > STAGING_KEEP {
            self.staging.shrink_to(STAGING_KEEP);
        }
    }

    fn rollback(&mut self) {
        // Cutting a file back frees space, so this works on a full disk too.
        if let Err(e) = self.file.open().and_then(|f| f.set_len(self.off)) {
            error!(stream = %self.log.name, "cannot cut the segment back after a failed write: {e}");
        }
        self.alloc_end = self.off;
        self.clear_staging();
        let st = self.log.lock();
        self.next_seq = st.next_seq;
        self.last_ts = st.last_ts;
    }

    /// `fdatasync`s the active segment if anything was written since the last one.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.open()?.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Seals the active segment (index file written) and starts a new one.
    fn roll(&mut self) -> io::Result<()> {
        if self.alloc_end > self.off {
            // A sealed segment ends with its last record.
            self.file.open()?.set_len(self.off)?;
            self.dirty = true;
        }
        if self.sync_meta {
            self.sync()?;
        }
        let dir = self.log.dir.clone();
        let next = Segment::create(&dir, self.next_seq, self.sync_meta, &self.log.files)?;
        let sealed = {
            let mut st = self.log.lock();
            let seg = st.segs.back_mut().expect("a log always has a segment");
            seg.sealed = true;
            seg.verified = true;
            let snapshot = seg.summary();
            st.segs.push_back(next);
            let seg = st.segs.back().expect("just pushed");
            self.file = seg.file.clone();
            self.off = seg.len;
            self.alloc_end = seg.len;
            snapshot
        };
        self.last_indexed = None;
        self.dirty = false;
        if let Err(e) = sealed.write_index(self.sync_meta) {
            warn!(stream = %self.log.name, "cannot write a segment index (it will be rebuilt): {e}");
        }
        Ok(())
    }

    /// Removes messages from the front: whole segments older than
    /// `max_age`, then as many of the oldest messages as it takes for the
    /// stream to hold at most `max_msgs` messages and `max_bytes` bytes
    /// (whole segments where it can, else by raising the floor inside
    /// one). Returns the messages removed.
    pub fn retention(
        &mut self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
        max_msgs: Option<u64>,
    ) -> io::Result<u64> {
        let now = now_ns();
        let mut removed = 0;
        loop {
            enum Act {
                Drop,
                Roll,
                Done,
            }
            let act = {
                let st = self.log.lock();
                let front = st.segs.front().expect("a log always has a segment");
                let expired = |s: &Segment| {
                    max_age.is_some_and(|a| {
                        s.msgs > 0 && s.last_ts.saturating_add(a.as_nanos() as u64) < now
                    })
                };
                if st.segs.len() > 1 {
                    let (msgs, bytes) = (st.msgs(), st.bytes());
                    if st.seg_msgs(front) == 0
                        || expired(front)
                        || max_msgs.is_some_and(|m| msgs - st.seg_msgs(front) >= m)
                        || max_bytes.is_some_and(|b| bytes - st.seg_bytes(front) >= b)
                    {
                        Act::Drop
                    } else {
                        Act::Done
                    }
                } else if expired(front) && self.staging.is_empty() {
                    Act::Roll
                } else {
                    Act::Done
                }
            };
            match act {
                Act::Done => break,
                Act::Roll => self.roll()?,
                Act::Drop => {
                    let seg = self.log.lock().segs.pop_front().expect("checked");
                    removed += self.log.lock().seg_msgs(&seg);
                    seg.remove_files();
                    if self.sync_meta {
                        let _ = sync_dir(&self.log.dir);
                    }
                    if self.log.lock().prune_dels() {
                        self.log.save_dels(self.sync_meta)?;
                    }
                }
            }
        }
        if !self.staging.is_empty() {
            return Ok(removed);
        }
        let (msgs, bytes) = {
            let st = self.log.lock();
            (st.msgs(), st.bytes())
        };
        if let Some(m) = max_msgs.filter(|m| msgs > *m) {
            removed += self.keep_newest(m)?;
        }
        let bytes = if max_msgs.is_some() {
            self.log.lock().bytes()
        } else {
            bytes
        };
        if let Some(b) = max_bytes.filter(|b| bytes > *b) {
            let seq = self.log.seq_keeping_bytes(bytes - b)?;
            removed += self.set_floor(seq)?;
        }
        Ok(removed)
    }

    /// Removes every message below `seq` (at most the next sequence: all
    /// of them): the floor is raised and saved, the segments wholly below
    /// it are deleted. Returns the messages removed.
    pub fn set_floor(&mut self, seq: u64) -> io::Result<u64> {
        let seq = seq.min(self.next_seq);
        let (before, cur, active_msgs) = {
            let st = self.log.lock();
            let active = st.segs.back().map_or(0, |s| s.msgs);
            (st.msgs(), st.floor, active)
        };
        if seq <= cur {
            return Ok(0);
        }
        if seq == self.next_seq && active_msgs > 0 && self.staging.is_empty() {
            // Everything goes: seal the active segment so it is deleted
            // whole; the next message starts a new one.
            self.roll()?;
        }
        let had_dels = !self.log.lock().dels.is_empty();
        let floor = self.log.raise_floor(seq)?;
        self.log.save_floor(floor, self.sync_meta)?;
        self.drop_below_floor()?;
        if had_dels {
            self.log.save_dels(self.sync_meta)?;
        }
        let after = self.log.lock().msgs();
        Ok(before.saturating_sub(after))
    }

    /// Deletes segments (never the active one) that hold no message any
    /// more, and forgets the deletes they held.
    fn drop_below_floor(&mut self) -> io::Result<()> {
        let mut dropped = false;
        loop {
            let gone = {
                let mut st = self.log.lock();
                let drop =
                    st.segs.len() > 1 && st.segs.front().is_some_and(|f| st.seg_msgs(f) == 0);
                if drop {
                    st.segs.pop_front()
                } else {
                    None
                }
            };
            let Some(seg) = gone else { break };
            seg.remove_files();
            dropped = true;
        }
        if dropped {
            if self.sync_meta {
                let _ = sync_dir(&self.log.dir);
            }
            if self.log.lock().prune_dels() {
                self.log.save_dels(self.sync_meta)?;
            }
        }
        Ok(())
    }

    /// Keeps only the newest `keep` messages (a purge's `keep`, a stream's
    /// `max_msgs`). Returns the messages removed.
    pub fn keep_newest(&mut self, keep: u64) -> io::Result<u64> {
        let (msgs, dels) = {
            let st = self.log.lock();
            (st.msgs(), !st.dels.is_empty())
        };
        if msgs <= keep {
            return Ok(0);
        }
        let cut = if dels {
            // Deleted messages leave gaps: count the ones held.
            self.log.seq_after(msgs - keep)?
        } else {
            self.next_seq.saturating_sub(keep)
        };
        self.set_floor(cut)
    }

    /// Deletes these messages (sequence, record bytes) one by one, those
    /// still held: listed in the deleted-messages file (appended, fsynced
    /// unless `fsync = never`) before readers stop seeing them. Their
    /// bytes stay in their segments until retention or a purge removes
    /// those. Returns how many were deleted.
    pub fn delete(&mut self, msgs: &[(u64, u32)]) -> io::Result<u64> {
        let fresh: Vec<(u64, u32)> = {
            let st = self.log.lock();
            let first = st.first_seq();
            msgs.iter()
                .copied()
                .filter(|(seq, _)| {
                    *seq >= first && *seq < st.next_seq && !st.dels.contains_key(seq)
                })
                .collect()
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::with_capacity(fresh.len() * DEL_ENTRY);
        for (seq, len) in &fresh {
            del_entry(&mut buf, *seq, *len);
        }
        let path = self.log.dir.join(DELETED_FILE);
        let new = !path.exists();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(&buf)?;
            if self.sync_meta {
                f.sync_data()?;
                if new {
                    sync_dir(&self.log.dir)?;
                }
            }
        }
        let first = {
            let mut st = self.log.lock();
            for (seq, len) in &fresh {
                Arc::make_mut(&mut st.dels).insert(*seq, *len);
                if let Some(b) = st.seg_of(*seq) {
                    let e = st.del_seg.entry(b).or_default();
                    e.0 += 1;
                    e.1 += *len as u64;
                }
            }
            st.first_seq()
        };
        if self.log.lock().dels.contains_key(&first) {
            // The first message went: the floor moves to the next one held.
            let floor = self.log.raise_floor(first)?;
            self.log.save_floor(floor, self.sync_meta)?;
            self.drop_below_floor()?;
            self.log.save_dels(self.sync_meta)?;
        }
        Ok(fresh.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segment::seg_path;

    /// Small segments, so a few dozen records span several of them.
    const SEG: u64 = 1024;

    /// A cache holding one file open: every segment switch closes one and
    /// opens another, as with many streams and a small open-file limit.
    fn files() -> Arc<FileCache> {
        FileCache::new(1)
    }

    /// A record whose payload is `p` padded to 100 bytes (133 bytes on disk:
    /// seven to a `SEG` segment).
    fn rec(p: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        record::encode_unsealed(&mut b, "s.x", b"", format!("{p:<100}").as_bytes());
        b.to_vec()
    }

    /// Stages and commits records `from..to`, payload `m<seq>`; returns their sequences.
    fn append(app: &mut Appender, range: std::ops::Range<u64>) -> Vec<u64> {
        let seqs = range
            .map(|i| app.stage(&mut rec(&format!("m{i}")), false).unwrap().0)
            .collect();
        app.commit(false).unwrap();
        seqs
    }

    /// Every readable record: (seq, payload without its padding).
    fn read_all(log: &Log, from: u64) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut at = from;
        loop {
            let b = log.read(at, None, 7, usize::MAX, None).unwrap();
            if b.msgs.is_empty() {
                return out;
            }
            for m in &b.msgs {
                let p = std::str::from_utf8(&m.payload).unwrap().trim_end();
                out.push((m.seq, p.to_string()));
            }
            at = b.next;
        }
    }

    fn expected(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
        seqs.map(|i| (i, format!("m{i}"))).collect()
    }

    fn seg_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count()
    }

    #[test]
    fn the_newest_record_on_a_subject_is_found_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), SEG, false, false);
        // Thirty records over several segments: a.N on odd, b.N on even
        // sequences, and one c.1 at 7.
        for i in 1..=30u64 {
            let subject = match i {
                7 => "c.1".to_string(),
                i if i % 2 == 1 => format!("a.{i}"),
                i => format!("b.{i}"),
            };
            let mut b = BytesMut::new();
            record::encode_unsealed(&mut b, &subject, b"", format!("{i:<100}").as_bytes());
            app.stage(&mut b, false).unwrap();
        }
        app.commit(false).unwrap();
        assert!(log.lock().segs.len() > 2, "spans segments");
        let last = |f: &str| log.last_matching(f).unwrap().map(|m| m.seq);
        assert_eq!(last("a.*"), Some(29));
        assert_eq!(last("b.*"), Some(30));
        assert_eq!(last("c.1"), Some(7));
        assert_eq!(last(">"), Some(30));
        assert_eq!(last("a.2"), None);
    }

    #[test]
    fn appended_records_read_back_in_order_across_segments_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), SEG, false, false);
        let mut seqs = Vec::new();
        for round in 0..5 {
            seqs.extend(append(&mut app, round * 10 + 1..round * 10 + 11));
        }
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        assert_eq!(read_all(&log, 1), expected(1..=50));
        assert_eq!(*log.committed.borrow(), 50);
        drop((app, log));

        let (log, report) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!((report.segments, report.truncated_bytes), (8, 0));
        assert_eq!(read_all(&log, 1), expected(1..=50));
        assert_eq!(
            read_all(&log, 23),
            expected(23..=50),
            "a read from the middle"
        );
        let st = log.lock();
        assert_eq!((st.first_seq(), st.last_seq(), st.msgs()), (1, 50, 50));
        drop(st);
        let mut app = Appender::new(log.clone(), SEG, false, false);
        assert_eq!(append(&mut app, 51..53), [51, 52]);
        assert_eq!(read_all(&log, 48), expected(48..=52));
    }

    #[test]
    fn a_reset_log_starts_empty_at_the_given_sequence_and_keeps_a_skip_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), SEG, false, false);
        append(&mut app, 1..31);
        // A replica installing a snapshot whose records start at 41.
        log.reset(41, false).unwrap();
        assert!(read_all(&log, 1).is_empty());
        let mut app = Appender::new(log.clone(), SEG, false, false);
        assert_eq!(append(&mut app, 41..46), [41, 42, 43, 44, 45]);
        // 46..=49 lost to damage at the source: the copy skips them too.
        app.skip_to(50, false).unwrap();
        assert_eq!(append(&mut app, 50..52), [50, 51]);
        let mut want = expected(41..=45);
        want.extend(expected(50..=51));
        assert_eq!(read_all(&log, 1), want);
        drop((app, log));
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(read_all(&log, 1), want, "after a reopen");
        let st = log.lock();
        assert_eq!((st.first_seq(), st.next_seq), (41, 52));
    }

    #[test]
    fn records_of_many_logs_sharing_one_open_file_are_all_kept_and_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let files = files();
        let dirs: Vec<PathBuf> = (0..5).map(|i| dir.path().join(format!("s{i}"))).collect();
        let logs: Vec<Arc<Log>> = dirs
            .iter()
            .map(|d| Log::open(d, "s", &files).unwrap().0)
            .collect();
        // fsync = always: zero-fill ahead, fdatasync per commit.
        let mut apps: Vec<Appender> = logs
            .iter()
            .map(|l| Appender::new(l.clone(), SEG, true, true))
            .collect();
        for round in 0..6u64 {
            for app in &mut apps {
                for i in round * 5 + 1..round * 5 + 6 {
                    app.stage(&mut rec(&format!("m{i}")), true).unwrap();
                }
                app.commit(true).unwrap();
            }
            for log in &logs {
                assert_eq!(read_all(log, 1), expected(1..=round * 5 + 5));
            }
        }
        assert!(files.len() <= 1);
        assert!(files.opened() > 30, "segments were closed and opened again");
        drop((apps, logs));
        for d in &dirs {
            let (log, report) = Log::open(d, "s", &files).unwrap();
            assert_eq!(report.truncated_bytes, 0);
            assert_eq!(read_all(&log, 1), expected(1..=30));
        }
    }

    #[test]
    fn a_torn_tail_is_cut_on_reopen_and_appending_continues_from_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), 1 << 20, false, false);
        append(&mut app, 1..6);
        drop((app, log));
        // A crash in the middle of writing record 6: half of it reached the disk.
        let seg = seg_path(dir.path(), 1);
        let whole = std::fs::metadata(&seg).unwrap().len();
        let mut torn = rec("m6");
        record::seal(&mut torn, 6, now_ns());
        let f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all_at(&torn[..torn.len() / 2], whole).unwrap();
        drop(f);

        let (log, report) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(report.truncated_bytes, (torn.len() / 2) as u64);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole);
        assert_eq!(read_all(&log, 1), expected(1..=5));
        let mut app = Appender::new(log.clone(), 1 << 20, false, false);
        assert_eq!(append(&mut app, 6..8), [6, 7], "sequences carry on");
        drop((app, log));

        let (log, report) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(read_all(&log, 1), expected(1..=7));
    }

    #[test]
    fn zero_filled_space_after_the_last_record_is_not_a_torn_write_and_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        // prealloc: the active segment is zero-filled ahead (fsync = always).
        let mut app = Appender::new(log.clone(), 64 << 20, true, true);
        append(&mut app, 1..4);
        drop((app, log));
        let seg = seg_path(dir.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        assert!(len >= PREALLOC_MIN, "zero-filled ahead: {len}");
        // As far ahead as the segment holds: a little written costs little disk.
        assert!(len < 64 << 10, "{len} bytes for three records");

        let (log, report) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(report.truncated_bytes, 0, "zero fill is no damage");
        assert_eq!(read_all(&log, 1), expected(1..=3));
        let mut app = Appender::new(log.clone(), 64 << 20, true, true);
        assert_eq!(append(&mut app, 4..6), [4, 5]);
        drop((app, log));
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(read_all(&log, 1), expected(1..=5));
    }

    /// 50 records in 1024-byte segments: seven segments of 7 (947 bytes
    /// each) and the active one holding seq 50.
    fn fifty(dir: &Path) -> (Arc<Log>, Appender) {
        let (log, _) = Log::open(dir, "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), SEG, false, false);
        append(&mut app, 1..51);
        assert_eq!(log.lock().segs.len(), 8);
        (log, app)
    }

    #[test]
    fn a_strict_log_read_stops_at_a_damaged_record_where_a_plain_one_skips_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _app) = fifty(dir.path());
        // Seq 10: the third record of the segment starting at 8.
        let path = seg_path(dir.path(), 8);
        let mut b = std::fs::read(&path).unwrap();
        b[(crate::store::segment::SEG_HEADER + 2 * 133 + 80) as usize] ^= 0x01;
        std::fs::write(&path, &b).unwrap();
        log.set_strict(true);
        let r = log.read(1, None, 100, usize::MAX, None).unwrap();
        let seqs: Vec<u64> = r.msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
        assert_eq!(r.next, 10, "the reader waits at the damaged record");
        let again = log.read(10, None, 100, usize::MAX, r.pos).unwrap();
        assert!(again.msgs.is_empty());
        assert_eq!(again.next, 10);
        assert_eq!(log.lock().lost, 1, "the damage is counted");
        log.set_strict(false);
        let mut want = expected(1..=50);
        want.remove(9);
        assert_eq!(read_all(&log, 1), want);
    }

    #[test]
    fn retention_by_count_keeps_exactly_the_limit_dropping_whole_segments_and_cutting_into_one() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut app) = fifty(dir.path());
        // Four whole segments go (28 messages), then the floor cuts two
        // more out of the fifth: 20 stay.
        assert_eq!(app.retention(None, None, Some(20)).unwrap(), 30);
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs()), (31, 20));
        assert_eq!(st.bytes(), 3 * 947 + 149 - 2 * 133);
        drop(st);
        assert_eq!(seg_files(dir.path()), 4, "their files are gone");
        assert_eq!(
            read_all(&log, 1),
            expected(31..=50),
            "a read from 1 starts at 31"
        );
        assert_eq!(app.retention(None, None, Some(20)).unwrap(), 0);
        drop((app, log));
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(read_all(&log, 1), expected(31..=50), "the floor was kept");
        assert_eq!(log.lock().msgs(), 20);
    }

    /// (sequence, record bytes) of these messages, as a purge finds them.
    fn recs(log: &Log, seqs: &[u64]) -> Vec<(u64, u32)> {
        seqs.iter()
            .map(|&q| {
                let m = log.read(q, None, 1, 1, None).unwrap().msgs.remove(0);
                assert_eq!(m.seq, q);
                (q, m.stored_len())
            })
            .collect()
    }

    #[test]
    fn deleted_messages_are_skipped_uncounted_and_stay_deleted_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut app) = fifty(dir.path());
        let before = log.lock().bytes();
        // 8..=14 is a whole segment; 20 one message; 99 is not there.
        let mut gone: Vec<u64> = (8..=14).collect();
        gone.push(20);
        let mut del = recs(&log, &gone);
        del.push((99, 133));
        assert_eq!(app.delete(&del).unwrap(), 8);
        assert_eq!(app.delete(&recs(&log, &[21])).unwrap(), 1);
        let want: Vec<(u64, String)> = expected(1..=50)
            .into_iter()
            .filter(|(q, _)| !(8..=14).contains(q) && *q != 20 && *q != 21)
            .collect();
        assert_eq!(read_all(&log, 1), want);
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs()), (1, 41));
        assert_eq!(
            st.bytes(),
            before - 9 * 133 - 16,
            "the emptied segment's header too"
        );
        drop(st);
        // Deleting the first messages moves the first sequence past them.
        assert_eq!(app.delete(&recs(&log, &[1, 2])).unwrap(), 2);
        assert_eq!(log.lock().first_seq(), 3);
        drop((app, log));
        let (log, mut app) = {
            let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
            let app = Appender::new(log.clone(), SEG, false, false);
            (log, app)
        };
        assert_eq!(read_all(&log, 1), want[2..].to_vec());
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs()), (3, 39));
        drop(st);
        // Retention removes the front segment and the emptied one, then
        // cuts four more (15..=18, counting only what is held).
        assert_eq!(app.retention(None, None, Some(30)).unwrap(), 9);
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs()), (19, 30));
        assert_eq!(st.dels.keys().copied().collect::<Vec<_>>(), [20, 21]);
        drop(st);
        assert_eq!(app.set_floor(22).unwrap(), 1);
        assert!(log.lock().dels.is_empty(), "the floor passed them");
    }

    #[test]
    fn segments_a_saved_floor_passed_are_removed_by_the_next_retention_even_without_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (log, app) = fifty(dir.path());
        drop((app, log));
        // A crash after the floor was saved, before the segments went.
        std::fs::write(dir.path().join(FLOOR_FILE), "20\n").unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs()), (20, 31));
        drop(st);
        assert_eq!(read_all(&log, 1), expected(20..=50));
        assert_eq!(seg_files(dir.path()), 8);
        let mut app = Appender::new(log.clone(), SEG, false, false);
        assert_eq!(app.retention(None, None, None).unwrap(), 0);
        assert_eq!(seg_files(dir.path()), 6, "[1-7] and [8-14] are gone");
        assert_eq!(read_all(&log, 1), expected(20..=50));
    }

    #[test]
    fn a_floor_to_the_next_sequence_empties_the_log_which_then_goes_on_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut app) = fifty(dir.path());
        assert_eq!(app.set_floor(u64::MAX).unwrap(), 50);
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs(), st.last_seq()), (51, 0, 50));
        drop(st);
        assert_eq!(seg_files(dir.path()), 1, "only the new active segment");
        assert!(read_all(&log, 1).is_empty());
        append(&mut app, 51..53);
        assert_eq!(read_all(&log, 1), expected(51..=52));
        assert_eq!(app.set_floor(52).unwrap(), 1);
        drop((app, log));
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs(), st.next_seq), (52, 1, 53));
        drop(st);
        assert_eq!(read_all(&log, 1), expected(52..=52));
    }

    #[test]
    fn retention_by_bytes_drops_the_oldest_records_until_the_log_fits_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut app) = fifty(dir.path());
        let total = log.lock().bytes();
        assert_eq!(total, 7 * 947 + 149);
        // 6778 bytes; after three segments go, 3937 are left; the 937
        // over the limit take eight more records (the fourth segment and
        // one of the fifth): 2857 stay.
        assert_eq!(app.retention(None, Some(3000), None).unwrap(), 29);
        let st = log.lock();
        assert_eq!((st.first_seq(), st.msgs(), st.bytes()), (30, 21, 2857));
        drop(st);
        assert_eq!(read_all(&log, 1), expected(30..=50));
    }

    #[test]
    fn retention_by_age_drops_segments_whose_newest_record_expired_and_keeps_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        let mut app = Appender::new(log.clone(), SEG, false, false);
        append(&mut app, 1..11);
        std::thread::sleep(Duration::from_millis(400));
        append(&mut app, 11..29);
        // Segments: [1-7] old, [8-14] old and new, [15-21], [22-28] new.
        assert_eq!(
            app.retention(Some(Duration::from_millis(200)), None, None)
                .unwrap(),
            7
        );
        assert_eq!(
            read_all(&log, 1),
            expected(8..=28),
            "old 8-10 stay with the newer records of their segment"
        );
        // Once everything is old, even the active segment goes; the
        // sequence carries on.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            app.retention(Some(Duration::from_millis(1)), None, None)
                .unwrap(),
            21
        );
        let st = log.lock();
        assert_eq!((st.msgs(), st.first_seq(), st.next_seq), (0, 29, 29));
        drop(st);
        assert_eq!(append(&mut app, 29..30), [29]);
        assert_eq!(read_all(&log, 1), expected(29..=29));
    }

    #[test]
    fn an_emptied_stream_keeps_its_next_sequence_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut app) = fifty(dir.path());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            app.retention(Some(Duration::from_millis(1)), None, None)
                .unwrap(),
            50
        );
        drop((app, log));
        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(log.lock().next_seq, 51);
        let mut app = Appender::new(log.clone(), SEG, false, false);
        assert_eq!(append(&mut app, 51..52), [51]);
    }

    #[test]
    fn records_appended_to_a_segment_whose_header_a_crash_lost_survive_the_next_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, app) = fifty(dir.path());
        drop((app, log));
        // A crash right after the next segment's file was created, before
        // its header reached the disk.
        std::fs::File::create(seg_path(dir.path(), 51)).unwrap();

        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(log.lock().next_seq, 51);
        let mut app = Appender::new(log.clone(), SEG, false, false);
        assert_eq!(append(&mut app, 51..54), [51, 52, 53]);
        assert_eq!(read_all(&log, 48), expected(48..=53));
        drop((app, log));

        let (log, _) = Log::open(dir.path(), "s", &files()).unwrap();
        assert_eq!(read_all(&log, 48), expected(48..=53), "acked records kept");
    }
}
