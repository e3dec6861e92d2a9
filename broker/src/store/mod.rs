//! Durable storage for streams: per stream, segmented append-only files of
//! CRC-protected records with a sparse index by sequence and time.
//! The on-disk format is described in docs/storage.md.

pub mod files;
pub mod log;
pub mod record;
pub mod segment;
pub mod verify;

pub use files::FileCache;
pub use log::{now_ns, Appender, Log, ReadPos};
pub use record::StoredMsg;
