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

/// Bytes an unprivileged writer may still put on the filesystem holding
/// `path`.
pub(crate) fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
