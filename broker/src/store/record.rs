//! One stored message on disk: a fixed 30-byte header, then subject, header
//! block and payload, protected by a CRC32C. Layout in docs/storage.md.
//!
//! ```text
//! 0   u32 LE  len      bytes after this field (crc .. end of payload)
//! 4   u32 LE  crc      CRC32C of bytes 8 .. 4+len
//! 8   u64 LE  seq
//! 16  u64 LE  ts       nanoseconds since the Unix epoch
//! 24  u16 LE  subject length s
//! 26  u32 LE  header block length h
//! 30  subject (s bytes) | header block (h bytes) | payload (the rest)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

pub const RECORD_HEADER: usize = 30;
/// Upper bound on one record, so a corrupted length field is recognised as
/// nonsense instead of making the scanner wait for gigabytes.
pub const MAX_RECORD: usize = (64 << 20) + (1 << 17);

/// Appends a record with seq, timestamp and CRC left at zero; the stream's
/// writer fills them in with [`seal`] once it assigns the sequence.
pub fn encode_unsealed(buf: &mut BytesMut, subject: &str, headers: &[u8], payload: &[u8]) {
    let total = RECORD_HEADER + subject.len() + headers.len() + payload.len();
    buf.reserve(total);
    buf.put_u32_le((total - 4) as u32);
    buf.put_u32_le(0);
    buf.put_u64_le(0);
    buf.put_u64_le(0);
    buf.put_u16_le(subject.len() as u16);
    buf.put_u32_le(headers.len() as u32);
    buf.put_slice(subject.as_bytes());
    buf.put_slice(headers);
    buf.put_slice(payload);
}

/// Writes `seq` and `ts` into an encoded record and computes its CRC.
pub fn seal(rec: &mut [u8], seq: u64, ts: u64) {
    rec[8..16].copy_from_slice(&seq.to_le_bytes());
    rec[16..24].copy_from_slice(&ts.to_le_bytes());
    let crc = crc32c::crc32c(&rec[8..]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Length of the record starting at `buf[0]` as its length field says.
pub fn record_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    Some(len + 4)
}

/// A record's fixed fields, borrowed from a buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub ts: u64,
    pub subject: &'a str,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

#[derive(Debug)]
pub enum Decoded<'a> {
    /// A whole valid record and its length in bytes.
    Record(RecordRef<'a>, usize),
    /// The buffer ends inside the record (or inside its header).
    Incomplete(usize),
    /// The bytes here are not a valid record.
    Corrupt,
}

/// Decodes and verifies the record at the front of `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < RECORD_HEADER {
        // A header cut short is a torn write only if it is plausible at all.
        return match record_len(buf) {
            Some(n) if !(RECORD_HEADER..=MAX_RECORD).contains(&n) => Decoded::Corrupt,
            _ => Decoded::Incomplete(RECORD_HEADER),
        };
    }
    let total = record_len(buf).unwrap_or(0);
    if !(RECORD_HEADER..=MAX_RECORD).contains(&total) {
        return Decoded::Corrupt;
    }
    if buf.len() < total {
        return Decoded::Incomplete(total);
    }
    let u32at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
    let u64at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    if crc32c::crc32c(&buf[8..total]) != u32at(4) {
        return Decoded::Corrupt;
    }
    let s = u16::from_le_bytes([buf[24], buf[25]]) as usize;
    let h = u32at(26) as usize;
    if RECORD_HEADER + s + h > total {
        return Decoded::Corrupt;
    }
    let Ok(subject) = std::str::from_utf8(&buf[RECORD_HEADER..RECORD_HEADER + s]) else {
        return Decoded::Corrupt;
    };
    Decoded::Record(
        RecordRef {
            seq: u64at(8),
            ts: u64at(16),
            subject,
            headers: &buf[RECORD_HEADER + s..RECORD_HEADER + s + h],
            payload: &buf[RECORD_HEADER + s + h..total],
        },
        total,
    )
}

/// A message read back from a stream; the fields share one read buffer.
#[derive(Debug, Clone)]
pub struct StoredMsg {
    pub seq: u64,
    pub ts: u64,
    subject: Bytes,
    pub headers: Bytes,
    pub payload: Bytes,
}

impl StoredMsg {
    /// Builds from a record decoded out of `chunk` (zero-copy slices of it).
    pub fn from_ref(chunk: &Bytes, r: &RecordRef<'_>) -> StoredMsg {
        StoredMsg {
            seq: r.seq,
            ts: r.ts,
            subject: chunk.slice_ref(r.subject.as_bytes()),
            headers: chunk.slice_ref(r.headers),
            payload: chunk.slice_ref(r.payload),
        }
    }

    /// The bytes its record takes on disk.
    pub fn stored_len(&self) -> u32 {
        (RECORD_HEADER + self.subject.len() + self.headers.len() + self.payload.len()) as u32
    }

    pub fn subject(&self) -> &str {
        // Checked as UTF-8 when the record was decoded.
        std::str::from_utf8(&self.subject).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_decodes_and_any_flipped_byte_is_caught() {
        let mut b = BytesMut::new();
        encode_unsealed(&mut b, "orders.eu", b"\x01\x00k\x01\x00v", b"hello");
        seal(&mut b, 42, 7);
        match decode(&b) {
            Decoded::Record(r, n) => {
                assert_eq!(
                    (r.seq, r.ts, r.subject, r.payload),
                    (42, 7, "orders.eu", &b"hello"[..])
                );
                assert_eq!(n, b.len());
            }
            other => panic!("{other:?}"),
        }
        for i in 4..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(
                matches!(decode(&c), Decoded::Corrupt),
                "flip at {i} not caught"
            );
        }
        assert!(matches!(decode(&b[..b.len() - 1]), Decoded::Incomplete(_)));
    }
}
