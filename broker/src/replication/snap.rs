//! A replicated stream's snapshot file, `SBSNAP01`: what a replica whose
//! needed Raft entries were purged is sent instead of them.
//!
//! ```text
//! "SBSNAP01"
//! [len u32][crc32c u32][bincode Header]     meta, next sequence, dedupe window, consumer files
//! [len u32][crc32c u32][seq u64][ts u64][record]   one per stored message, in order
//! [0 u32][0 u32]                            end of records
//! ```
//!
//! Records are the store's unsealed encoding (store::record), so the
//! receiver stages them with their sequence and timestamp as its state
//! machine would. Written and read one record at a time through buffered
//! files: a stream larger than memory goes through a few MiB of it.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use bytes::BytesMut;
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::NodeId;
use crate::store::record;
use crate::store::Log;

pub(crate) const MAGIC: &[u8; 8] = b"SBSNAP01";
/// Largest header read back (consumer op logs included).
const MAX_HEADER: usize = 256 << 20;
/// Largest record frame read back (a record is at most the max payload plus headers).
const MAX_FRAME: usize = 64 << 20;

/// Everything in a snapshot but the stream's records.
#[derive(Serialize, Deserialize)]
pub(crate) struct Header {
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    /// The stream's next sequence at `meta.last_log_id`.
    pub next_seq: u64,
    /// The first record's sequence (the stream's first after retention).
    pub first_seq: u64,
    /// Msg-Id dedupe window: (proposer's timestamp, id, sequence), oldest first.
    pub window: Vec<(u64, String, u64)>,
    /// The durable consumers' files (`consumers/NAME.{json,log,nats}`).
    pub consumers: Vec<(String, Vec<u8>)>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn write_frame(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = 0u32;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    w.write_all(&(len as u32).to_le_bytes())?;
    w.write_all(&crc.to_le_bytes())?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Reads one frame into `buf`; `Ok(false)` at the end marker.
fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len == 0 && crc == 0 {
        return Ok(false);
    }
    if len > max {
        return Err(io_err(format!("a snapshot frame of {len} bytes")));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    if crc32c::crc32c(buf) != crc {
        return Err(io_err("a snapshot frame fails its CRC"));
    }
    Ok(true)
}

/// Writes the snapshot of `log` (records `header.first_seq` up to
/// `header.next_seq`) to `path`, fsynced.
pub(crate) fn write(path: &Path, header: &Header, log: &Log) -> io::Result<u64> {
    let f = File::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.write_all(MAGIC)?;
    let h = bincode::serialize(header).map_err(io_err)?;
    write_frame(&mut w, &[&h])?;
    let mut from = header.first_seq;
    let mut pos = None;
    let mut rec = BytesMut::new();
    let mut n = 0u64;
    while from < header.next_seq {
        // A bounded batch at a time: never the whole stream in memory.
        let b = log.read(from, None, 1024, 4 << 20, pos)?;
        if b.msgs.is_empty() {
            break;
        }
        for m in &b.msgs {
            if m.seq >= header.next_seq {
                break;
            }
            rec.clear();
            record::encode_unsealed(&mut rec, m.subject(), &m.headers, &m.payload);
            write_frame(
                &mut w,
                &[&m.seq.to_le_bytes(), &m.ts.to_le_bytes(), &rec[..]],
            )?;
            n += 1;
        }
        from = b.next;
        pos = b.pos;
    }
    // A copy with damage would hand its gaps on: this replica is repaired
    // instead (replication/repair.rs), another one sends the snapshot.
    let lost = log.lock().lost;
    if lost > 0 {
        return Err(io_err(format!(
            "this copy of the stream is damaged ({lost} records): no snapshot from it"
        )));
    }
    w.write_all(&[0u8; 8])?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(n)
}

/// A snapshot file opened for reading: its header read, records next.
pub(crate) struct Reader {
    r: BufReader<File>,
    buf: Vec<u8>,
}

impl Reader {
    pub(crate) fn open(path: &Path) -> io::Result<(Header, Reader)> {
        let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(io_err("not a sockbus snapshot (SBSNAP01)"));
        }
        let mut buf = Vec::new();
        if !read_frame(&mut r, &mut buf, MAX_HEADER)? {
            return Err(io_err("a snapshot without a header"));
        }
        let h: Header = bincode::deserialize(&buf).map_err(io_err)?;
        Ok((h, Reader { r, buf }))
    }

    /// The next record: its sequence, timestamp and unsealed bytes; `None`
    /// at the end marker. A file cut short is an error, never an end.
    pub(crate) fn next(&mut self) -> io::Result<Option<(u64, u64, &mut [u8])>> {
        if !read_frame(&mut self.r, &mut self.buf, MAX_FRAME)? {
            return Ok(None);
        }
        if self.buf.len() < 16 {
            return Err(io_err("a snapshot record frame too short"));
        }
        let seq = u64::from_le_bytes(self.buf[0..8].try_into().map_err(io_err)?);
        let ts = u64::from_le_bytes(self.buf[8..16].try_into().map_err(io_err)?);
        Ok(Some((seq, ts, &mut self.buf[16..])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Appender, FileCache};
    use openraft::{LogId, StoredMembership};

    fn header(first_seq: u64, next_seq: u64) -> Header {
        Header {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 7), 99)),
                last_membership: StoredMembership::default(),
                snapshot_id: "2-7-99".into(),
            },
            next_seq,
            first_seq,
            window: vec![(5, "id-1".into(), 3)],
            consumers: vec![("d.json".into(), b"{}".to_vec())],
        }
    }

    /// A log with records 1..=n, payload `m<seq>`, several segments.
    fn log_with(dir: &Path, n: u64) -> std::sync::Arc<Log> {
        let (log, _) = Log::open(dir, "s", &FileCache::new(4)).unwrap();
        let mut app = Appender::new(log.clone(), 1024, false, false);
        for i in 1..=n {
            let mut b = BytesMut::new();
            record::encode_unsealed(&mut b, "s.x", b"", format!("m{i}").as_bytes());
            app.stage_at(&mut b, false, 1000 + i).unwrap();
        }
        app.commit(false).unwrap();
        log
    }

    #[test]
    fn a_snapshot_file_gives_back_its_header_and_every_record_up_to_its_next_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(&dir.path().join("log"), 200);
        let path = dir.path().join("snap");
        // Records past `next_seq` (applied later) are not the snapshot's.
        assert_eq!(write(&path, &header(1, 151), &log).unwrap(), 150);
        let (h, mut r) = Reader::open(&path).unwrap();
        assert_eq!((h.first_seq, h.next_seq), (1, 151));
        assert_eq!(h.meta.snapshot_id, "2-7-99");
        assert_eq!(h.window, vec![(5, "id-1".to_string(), 3)]);
        assert_eq!(h.consumers, vec![("d.json".to_string(), b"{}".to_vec())]);
        let mut want = 1u64;
        while let Some((seq, ts, rec)) = r.next().unwrap() {
            assert_eq!((seq, ts), (want, 1000 + want));
            assert!(!rec.is_empty());
            want += 1;
        }
        assert_eq!(want, 151);
    }

    #[test]
    fn a_snapshot_file_cut_short_or_flipped_is_an_error_never_a_shorter_stream() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(&dir.path().join("log"), 50);
        let path = dir.path().join("snap");
        write(&path, &header(1, 51), &log).unwrap();
        let whole = std::fs::read(&path).unwrap();
        let read_all = |bytes: &[u8]| -> io::Result<u64> {
            std::fs::write(&path, bytes)?;
            let (_, mut r) = Reader::open(&path)?;
            let mut n = 0;
            while r.next()?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(read_all(&whole).unwrap(), 50);
        // Without its end marker (a transfer or a write cut short).
        assert!(read_all(&whole[..whole.len() - 8]).is_err());
        assert!(read_all(&whole[..whole.len() / 2]).is_err());
        let mut flipped = whole.clone();
        let at = whole.len() - 20;
        flipped[at] ^= 0x40;
        assert!(read_all(&flipped).is_err());
        assert!(read_all(b"SBSNAP02").is_err());
    }
}
