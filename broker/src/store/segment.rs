//! A segment: one append-only file of records plus its sparse index.
//!
//! `<base>.seg` starts with a 16-byte header (magic `SBSEG001`, base seq);
//! records follow back to back. `<base>.idx` is written when the segment is
//! sealed (rolled): the segment's summary and every sparse index entry,
//! with a CRC32C. A missing or stale index is rebuilt by scanning.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{CachedFile, FileCache, Mode};
use super::record::{self, Decoded};

pub const SEG_MAGIC: &[u8; 8] = b"SBSEG001";
pub const IDX_MAGIC: &[u8; 8] = b"SBIDX001";
pub const SEG_HEADER: u64 = 16;
/// One index entry per this many bytes of records (and the first record).
pub const INDEX_INTERVAL: u64 = 64 * 1024;

/// Where a record starts: the sparse index, by sequence and by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub ts: u64,
    pub off: u64,
}

/// A damaged byte range found by a scan; its records are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BadRange {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug)]
pub struct Segment {
    pub base: u64,
    pub path: PathBuf,
    /// Opened on demand through the broker's file cache: hold what
    /// `file.open()` returns for one I/O only.
    pub file: CachedFile,
    /// Bytes readers may read: everything committed.
    pub len: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub msgs: u64,
    pub index: Vec<IndexEntry>,
    pub sealed: bool,
    pub bad: Vec<BadRange>,
    /// Set once the whole file was scanned and its CRCs checked.
    pub verified: bool,
}

/// Writes a segment's 16-byte header: magic and base sequence.
fn write_header(file: &File, base: u64) -> io::Result<()> {
    let mut h = [0u8; SEG_HEADER as usize];
    h[..8].copy_from_slice(SEG_MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    file.write_all_at(&h, 0)
}

fn has_header(file: &File) -> bool {
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).is_ok() && &magic == SEG_MAGIC
}

pub fn seg_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

pub fn idx_path(seg: &Path) -> PathBuf {
    seg.with_extension("idx")
}

/// What a full scan of a segment found.
#[derive(Debug, Default)]
pub struct Scan {
    pub index: Vec<IndexEntry>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub msgs: u64,
    /// End of the last valid record.
    pub valid_end: u64,
    pub bad: Vec<BadRange>,
    /// Seqs of the records lost in bad ranges, as far as they can be told
    /// (the gap between the valid records around each range).
    pub lost: u64,
    /// Everything after the last valid record is zeros: space zero-filled
    /// ahead of the data, not a torn write.
    pub zero_tail: bool,
}

impl Segment {
    /// Creates an empty segment file for records from `base` on.
    pub fn create(
        dir: &Path,
        base: u64,
        sync: bool,
        files: &Arc<FileCache>,
    ) -> io::Result<Segment> {
        let path = seg_path(dir, base);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        if let Err(e) = write_header(&file, base).and_then(|_| {
            if sync {
                file.sync_data()?;
                sync_dir(dir)?;
            }
            Ok(())
        }) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let cached = files.file(path.clone(), Mode::ReadWrite);
        // The writer's next commit goes here.
        cached.adopt(file);
        Ok(Segment {
            base,
            path,
            file: cached,
            len: SEG_HEADER,
            first_seq: 0,
            last_seq: 0,
            first_ts: 0,
            last_ts: 0,
            msgs: 0,
            index: Vec::new(),
            sealed: false,
            bad: Vec::new(),
            verified: true,
        })
    }

    /// Opens an existing segment. A sealed one with a matching index is
    /// trusted as is (its CRCs are checked when read or by the background
    /// verification); otherwise the file is scanned, and `truncate` cuts a
    /// torn tail (only ever for the last segment).
    /// A sealed segment trusted this way is not even opened: its file is
    /// opened when first read.
    pub fn open(
        path: &Path,
        base: u64,
        sealed: bool,
        truncate: bool,
        files: &Arc<FileCache>,
    ) -> io::Result<(Segment, Option<Scan>)> {
        let file_len = std::fs::metadata(path)?.len();
        let mut seg = Segment {
            base,
            path: path.to_path_buf(),
            file: files.file(path.to_path_buf(), Mode::ReadWrite),
            len: file_len,
            first_seq: 0,
            last_seq: 0,
            first_ts: 0,
            last_ts: 0,
            msgs: 0,
            index: Vec::new(),
            sealed,
            bad: Vec::new(),
            verified: false,
        };
        if sealed {
            if let Some(()) = seg.load_index(file_len) {
                return Ok((seg, None));
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let scan = scan_file(&file, base)?;
        seg.apply_scan(&scan);
        seg.verified = true;
        if truncate && scan.valid_end < file_len {
            // A torn tail: nothing valid follows, cut it off.
            file.set_len(scan.valid_end.max(SEG_HEADER))?;
            file.sync_data()?;
            seg.len = scan.valid_end.max(SEG_HEADER);
        } else {
            seg.len = file_len.max(SEG_HEADER);
        }
        if truncate && !has_header(&file) {
            // Created just before a crash: records appended after a missing
            // header would be unreadable (and cut) at the next open.
            write_header(&file, base)?;
            file.sync_data()?;
        }
        if truncate {
            // The last segment: the writer appends to it next.
            seg.file.adopt(file);
        }
        Ok((seg, Some(scan)))
    }

    pub fn apply_scan(&mut self, s: &Scan) {
        self.index = s.index.clone();
        self.first_seq = s.first_seq;
        self.last_seq = s.last_seq;
        self.first_ts = s.first_ts;
        self.last_ts = s.last_ts;
        self.msgs = s.msgs;
        self.bad = s.bad.clone();
    }

    fn load_index(&mut self, file_len: u64) -> Option<()> {
        let b = std::fs::read(idx_path(&self.path)).ok()?;
        if b.len() < 64 + 4 || &b[..8] != IDX_MAGIC {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let u = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
        if u(8) != file_len {
            return None;
        }
        let n = u(56) as usize;
        if body.len() != 64 + n * 24 {
            return None;
        }
        self.first_seq = u(16);
        self.last_seq = u(24);
        self.first_ts = u(32);
        self.last_ts = u(40);
        self.msgs = u(48);
        self.index = (0..n)
            .map(|i| {
                let o = 64 + i * 24;
                IndexEntry {
                    seq: u(o),
                    ts: u(o + 8),
                    off: u(o + 16),
                }
            })
            .collect();
        Some(())
    }

    /// What the index file of this segment holds.
    pub fn summary(&self) -> SegmentSummary {
        SegmentSummary {
            path: self.path.clone(),
            len: self.len,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
            msgs: self.msgs,
            index: self.index.clone(),
        }
    }

    /// Offset to start reading at for the first record with seq >= `seq`.
    pub fn offset_for_seq(&self, seq: u64) -> u64 {
        let i = self.index.partition_point(|e| e.seq <= seq);
        if i == 0 {
            SEG_HEADER
        } else {
            self.index[i - 1].off
        }
    }

    pub fn remove_files(&self) {
        self.file.close();
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(idx_path(&self.path));
    }
}

/// Reads a whole segment and checks every record. A damaged record is
/// skipped by searching forward for the next offset holding a valid record
/// with a plausible sequence; what cannot be resynchronised is the tail.
///
/// Reads in 4 MiB chunks so memory stays bounded; only a segment with
/// damage (or a torn tail that is not zero-fill) is read whole to resync.
pub fn scan_file(file: &File, base: u64) -> io::Result<Scan> {
    const CHUNK: usize = 4 << 20;
    let len = file.metadata()?.len();
    let whole = |file: &File| -> io::Result<Scan> {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(scan_bytes(&buf, base))
    };
    if len <= CHUNK as u64 {
        return whole(file);
    }
    let mut head = [0u8; SEG_HEADER as usize];
    file.read_exact_at(&mut head, 0)?;
    if &head[..8] != SEG_MAGIC {
        return whole(file);
    }
    let mut s = Scan {
        valid_end: SEG_HEADER,
        ..Default::default()
    };
    let mut prev_seq = base.saturating_sub(1);
    let mut prev_ts = 0u64;
    let mut last_indexed: Option<u64> = None;
    let mut off = SEG_HEADER;
    let mut want = CHUNK;
    let mut buf = Vec::new();
    while off < len {
        let n = (len - off).min(want as u64) as usize;
        buf.resize(n, 0);
        file.read_exact_at(&mut buf, off)?;
        let mut at = 0usize;
        loop {
            match record::decode(&buf[at..]) {
                Decoded::Record(r, rlen) if r.seq > prev_seq && r.ts >= prev_ts => {
                    let o = off + at as u64;
                    if last_indexed.is_none_or(|l| o - l >= INDEX_INTERVAL) {
                        s.index.push(IndexEntry {
                            seq: r.seq,
                            ts: r.ts,
                            off: o,
                        });
                        last_indexed = Some(o);
                    }
                    if s.msgs == 0 {
                        s.first_seq = r.seq;
                        s.first_ts = r.ts;
                    }
                    s.msgs += 1;
                    s.last_seq = r.seq;
                    s.last_ts = r.ts;
                    prev_seq = r.seq;
                    prev_ts = r.ts;
                    at += rlen;
                    s.valid_end = off + at as u64;
                    want = CHUNK;
                    if at == buf.len() {
                        break;
                    }
                }
                Decoded::Incomplete(need) if off + (at + need) as u64 <= len => {
                    want = want.max(need);
                    break;
                }
                _ => {
                    // Zero-fill after the data is the normal end of an active segment.
                    let rest = len - (off + at as u64);
                    if rest <= (64 << 20) {
                        let mut tail = vec![0u8; rest as usize];
                        file.read_exact_at(&mut tail, off + at as u64)?;
                        if tail.iter().all(|&b| b == 0) {
                            s.zero_tail = true;
                            return Ok(s);
                        }
                    }
                    return whole(file);
                }
            }
        }
        off += at as u64;
    }
    Ok(s)
}

pub fn scan_bytes(buf: &[u8], base: u64) -> Scan {
    let mut s = Scan {
        valid_end: SEG_HEADER,
        ..Default::default()
    };
    if buf.len() < SEG_HEADER as usize || &buf[..8] != SEG_MAGIC {
        // A header that never made it to disk: nothing in here.
        return s;
    }
    let mut off = SEG_HEADER as usize;
    let mut prev_seq = base.saturating_sub(1);
    let mut prev_ts = 0u64;
    let mut last_indexed: Option<usize> = None;
    while off < buf.len() {
        match record::decode(&buf[off..]) {
            Decoded::Record(r, n) if r.seq > prev_seq && r.ts >= prev_ts => {
                if last_indexed.is_none_or(|l| off - l >= INDEX_INTERVAL as usize) {
                    s.index.push(IndexEntry {
                        seq: r.seq,
                        ts: r.ts,
                        off: off as u64,
                    });
                    last_indexed = Some(off);
                }
                if s.msgs == 0 {
                    s.first_seq = r.seq;
                    s.first_ts = r.ts;
                }
                s.msgs += 1;
                s.last_seq = r.seq;
                s.last_ts = r.ts;
                prev_seq = r.seq;
                prev_ts = r.ts;
                off += n;
                s.valid_end = off as u64;
            }
            _ => {
                // Look for the next valid record; none means a torn tail.
                if buf[off..].iter().all(|&b| b == 0) {
                    s.zero_tail = true;
                    break;
                }
                let Some(next) = resync(buf, off + 1, prev_seq, prev_ts) else {
                    break;
                };
                s.bad.push(BadRange {
                    start: off as u64,
                    end: next as u64,
                });
                if let Decoded::Record(r, _) = record::decode(&buf[next..]) {
                    s.lost += r.seq - prev_seq - 1;
                }
                off = next;
            }
        }
    }
    s
}

/// First offset at or after `from` holding a valid record that could follow
/// `prev_seq`: its CRC matches and its sequence and time move forward.
pub fn resync(buf: &[u8], from: usize, prev_seq: u64, prev_ts: u64) -> Option<usize> {
    (from..buf.len().saturating_sub(record::RECORD_HEADER - 1)).find(|&o| {
        matches!(record::decode(&buf[o..]),
            Decoded::Record(r, _) if r.seq > prev_seq && r.seq - prev_seq < (1 << 32) && r.ts >= prev_ts)
    })
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A sealed segment's summary, written as its index file.
#[derive(Debug, Clone)]
pub struct SegmentSummary {
    pub path: PathBuf,
    pub len: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub msgs: u64,
    pub index: Vec<IndexEntry>,
}

impl SegmentSummary {
    /// Writes the index file (best effort: it can always be rebuilt by a scan).
    pub fn write_index(&self, sync: bool) -> io::Result<()> {
        let mut b = Vec::with_capacity(68 + self.index.len() * 24);
        b.extend_from_slice(IDX_MAGIC);
        for v in [
            self.len,
            self.first_seq,
            self.last_seq,
            self.first_ts,
            self.last_ts,
            self.msgs,
            self.index.len() as u64,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for e in &self.index {
            b.extend_from_slice(&e.seq.to_le_bytes());
            b.extend_from_slice(&e.ts.to_le_bytes());
            b.extend_from_slice(&e.off.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let path = idx_path(&self.path);
        let tmp = path.with_extension("idx.tmp");
        std::fs::write(&tmp, &b)?;
        if sync {
            File::open(&tmp)?.sync_data()?;
        }
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn segment_with(n: u64, payload: usize) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.extend_from_slice(SEG_MAGIC);
        b.extend_from_slice(&1u64.to_le_bytes());
        for seq in 1..=n {
            let start = b.len();
            record::encode_unsealed(&mut b, "s.x", b"", &vec![b'p'; payload]);
            record::seal(&mut b[start..], seq, seq * 10);
        }
        b.to_vec()
    }

    fn scan_of(bytes: &[u8]) -> Scan {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        scan_file(&f, 1).unwrap()
    }

    #[test]
    fn chunked_scan_of_a_large_segment_matches_the_whole_file_scan() {
        let mut bytes = segment_with(3000, 3000);
        let data_end = bytes.len() as u64;
        bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
        let s = scan_of(&bytes);
        let w = scan_bytes(&bytes, 1);
        assert_eq!(
            (s.msgs, s.last_seq, s.valid_end, s.zero_tail),
            (3000, 3000, data_end, true)
        );
        assert_eq!(s.index, w.index);
        assert!(s.index.len() > 100);
    }

    #[test]
    fn a_flipped_byte_in_a_large_segment_loses_one_record_and_keeps_the_rest() {
        let mut bytes = segment_with(3000, 3000);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        let s = scan_of(&bytes);
        assert_eq!(
            (s.msgs, s.lost, s.last_seq, s.bad.len()),
            (2999, 1, 3000, 1)
        );
        assert_eq!(s.valid_end, bytes.len() as u64);
    }

    #[test]
    fn a_torn_tail_ends_the_scan_at_the_last_valid_record() {
        let mut bytes = segment_with(10, 100);
        let end = bytes.len() as u64;
        let torn = bytes[bytes.len() - 50..].to_vec();
        bytes.extend_from_slice(&torn[..20]);
        let s = scan_bytes(&bytes, 1);
        assert_eq!(
            (s.msgs, s.valid_end, s.bad.len(), s.zero_tail),
            (10, end, 0, false)
        );
    }
}
