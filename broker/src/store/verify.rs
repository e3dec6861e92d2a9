//! Offline check of one stream directory (`sockbus-broker verify-stream`):
//! every segment is read and every record's CRC checked, without opening
//! the stream, writing or truncating anything. The fault harness reads each
//! node's copy of a stream this way (loadtest/faults, docs/reliability.md).

use std::io;
use std::path::{Path, PathBuf};

use super::record::{self, Decoded, RecordRef};
use super::segment::{scan_bytes, BadRange, SEG_HEADER};

/// What the check found in one segment file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentCheck {
    pub path: PathBuf,
    pub base: u64,
    pub bytes: u64,
    pub msgs: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Damaged byte ranges (CRC mismatch) with valid records after them.
    pub bad: Vec<BadRange>,
    /// Sequences lost in `bad` (the gap between the valid records around them).
    pub lost: u64,
    /// Bytes after the last valid record that are not zero-fill: a torn or
    /// damaged tail (the broker cuts it off when this is the last segment).
    pub tail_bytes: u64,
    /// Sequences missing between this segment's last record and the next
    /// segment's base: a sealed segment cut short (its tail truncated).
    pub missing_before_next: u64,
}

impl SegmentCheck {
    pub fn damaged(&self) -> bool {
        !self.bad.is_empty() || self.tail_bytes > 0 || self.missing_before_next > 0
    }
}

/// The `.seg` files of a stream directory, by base sequence.
pub fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let base = n.strip_suffix(".seg")?.parse::<u64>().ok()?;
            Some((base, e.path()))
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Checks every segment of the stream in `dir` and hands each valid record
/// (in sequence order, damaged ones skipped) to `each`.
pub fn verify_dir(
    dir: &Path,
    mut each: impl FnMut(&RecordRef<'_>),
) -> io::Result<Vec<SegmentCheck>> {
    let files = segment_files(dir)?;
    let mut out: Vec<SegmentCheck> = Vec::with_capacity(files.len());
    for (i, (base, path)) in files.iter().enumerate() {
        let buf = std::fs::read(path)?;
        let scan = scan_bytes(&buf, *base);
        // Walk the records the scan accepted: the same rule, skipping its bad ranges.
        let mut off = SEG_HEADER as usize;
        let mut prev_seq = base.saturating_sub(1);
        while off < scan.valid_end as usize {
            if let Some(r) = scan.bad.iter().find(|r| r.start as usize == off) {
                off = r.end as usize;
                continue;
            }
            match record::decode(&buf[off..]) {
                Decoded::Record(r, n) if r.seq > prev_seq => {
                    each(&r);
                    prev_seq = r.seq;
                    off += n;
                }
                _ => break,
            }
        }
        let tail_bytes = if scan.zero_tail {
            0
        } else {
            (buf.len() as u64).saturating_sub(scan.valid_end.max(SEG_HEADER))
        };
        let missing_before_next = match files.get(i + 1) {
            Some((next, _)) if scan.msgs > 0 => next.saturating_sub(scan.last_seq + 1),
            Some((next, _)) => next.saturating_sub(*base),
            None => 0,
        };
        out.push(SegmentCheck {
            path: path.clone(),
            base: *base,
            bytes: buf.len() as u64,
            msgs: scan.msgs,
            first_seq: scan.first_seq,
            last_seq: scan.last_seq,
            bad: scan.bad,
            lost: scan.lost,
            tail_bytes,
            missing_before_next,
        });
    }
    Ok(out)
}
