//! Open files under a bound: one least-recently-used cache of descriptors
//! shared by every stream (segments and durable consumers' op logs).
//!
//! A [`CachedFile`] is a path plus an id, not a descriptor: each use asks
//! the cache, which opens the file on a miss and closes the least recently
//! used one when full. A caller holds the `Arc<File>` it got only for one
//! read, write or fsync, so the broker keeps at most `capacity` files open
//! for streams, plus one per I/O in flight (bounded by the threads doing it),
//! however many streams exist. The rest of the process's open-file limit is
//! left to client connections (docs/storage.md, "Many streams").

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

/// The smallest cache: a few streams' active segments.
const MIN_CAPACITY: usize = 16;

/// How a cached file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Segments: read with `pread`, written with `pwrite`.
    ReadWrite,
    /// Op logs: every write goes to the end.
    Append,
}

pub struct FileCache {
    /// Unbounded as a map (nothing allocated ahead); `cap` bounds it.
    open: Mutex<LruCache<u64, Arc<File>>>,
    cap: usize,
    next_id: AtomicU64,
    opened: AtomicU64,
}

impl FileCache {
    /// A cache keeping at most `capacity` files open (at least one).
    pub fn new(capacity: usize) -> Arc<FileCache> {
        Arc::new(FileCache {
            open: Mutex::new(LruCache::unbounded()),
            cap: capacity.max(1),
            next_id: AtomicU64::new(1),
            opened: AtomicU64::new(0),
        })
    }

    /// The bound the broker uses: half of the process's open-file limit
    /// (`RLIMIT_NOFILE`, soft), so the other half stays for connections.
    pub fn budget() -> usize {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        budget_for(soft)
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<u64, Arc<File>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Files the cache holds open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Files opened since the start (misses).
    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// A handle for `path`; nothing is opened until it is used.
    pub fn file(self: &Arc<Self>, path: PathBuf, mode: Mode) -> CachedFile {
        CachedFile(Arc::new(Handle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            path,
            mode,
            cache: self.clone(),
        }))
    }

    fn get(&self, h: &Handle) -> io::Result<Arc<File>> {
        if let Some(f) = self.lock().get(&h.id) {
            return Ok(f.clone());
        }
        // Opened without the lock held: other files stay reachable meanwhile.
        let f = Arc::new(h.mode.open(&h.path)?);
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(self.put(h.id, f))
    }

    /// Keeps `f` as the open file of `id` (or the one another thread put
    /// there first); the least recently used file is closed when full.
    fn put(&self, id: u64, f: Arc<File>) -> Arc<File> {
        let evicted = {
            let mut m = self.lock();
            if let Some(f) = m.get(&id) {
                return f.clone();
            }
            m.put(id, f.clone());
            if m.len() > self.cap {
                m.pop_lru()
            } else {
                None
            }
        };
        // Closed outside the lock (close can take a while on some file systems).
        drop(evicted);
        f
    }

    fn forget(&self, id: u64) {
        let f = self.lock().pop(&id);
        drop(f);
    }
}

/// Half of the open-file limit, at least 16 (and at most 2^20, for an
/// unlimited one).
pub fn budget_for(nofile: u64) -> usize {
    (nofile / 2).clamp(MIN_CAPACITY as u64, 1 << 20) as usize
}

impl Mode {
    fn open(self, path: &Path) -> io::Result<File> {
        match self {
            Mode::ReadWrite => OpenOptions::new().read(true).write(true).open(path),
            Mode::Append => OpenOptions::new().append(true).open(path),
        }
    }
}

struct Handle {
    id: u64,
    path: PathBuf,
    mode: Mode,
    cache: Arc<FileCache>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.cache.forget(self.id);
    }
}

/// A file opened on demand through a [`FileCache`]. Clones share the
/// cache entry; when the last one is dropped the file is closed.
#[derive(Clone)]
pub struct CachedFile(Arc<Handle>);

impl CachedFile {
    /// The open file, for one I/O: do not keep it.
    pub fn open(&self) -> io::Result<Arc<File>> {
        self.0.cache.get(&self.0)
    }

    /// Hands a file just opened (created, scanned) to the cache.
    pub fn adopt(&self, f: File) -> Arc<File> {
        self.0.cache.put(self.0.id, Arc::new(f))
    }

    /// Closes the file if the cache holds it open (it was removed).
    pub fn close(&self) {
        self.0.cache.forget(self.0.id);
    }
}

impl std::fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CachedFile").field(&self.0.path).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn more_files_than_the_capacity_are_all_usable_and_at_most_capacity_stay_open() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(16);
        let files: Vec<CachedFile> = (0..100)
            .map(|i| {
                let p = dir.path().join(format!("{i}"));
                std::fs::write(&p, format!("file {i:03}")).unwrap();
                cache.file(p, Mode::ReadWrite)
            })
            .collect();
        for round in 0..3 {
            for (i, f) in files.iter().enumerate() {
                let mut b = [0u8; 8];
                f.open().unwrap().read_exact_at(&mut b, 0).unwrap();
                assert_eq!(&b, format!("file {i:03}").as_bytes(), "round {round}");
                assert!(cache.len() <= 16);
            }
        }
        assert!(cache.opened() >= 100, "files were closed and opened again");
        drop(files);
        assert_eq!(cache.len(), 0, "dropping the handles closes their files");
    }

    #[test]
    fn a_write_through_one_descriptor_is_read_through_the_next_after_an_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(16);
        let log = dir.path().join("ops.log");
        std::fs::write(&log, b"").unwrap();
        let f = cache.file(log.clone(), Mode::Append);
        (&*f.open().unwrap()).write_all(b"one ").unwrap();
        // Push it out with others.
        let others: Vec<_> = (0..20)
            .map(|i| {
                let p = dir.path().join(format!("o{i}"));
                std::fs::write(&p, b"x").unwrap();
                let c = cache.file(p, Mode::ReadWrite);
                c.open().unwrap();
                c
            })
            .collect();
        let before = cache.opened();
        (&*f.open().unwrap()).write_all(b"two").unwrap();
        assert_eq!(cache.opened(), before + 1, "reopened");
        f.open().unwrap().sync_data().unwrap();
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"one two",
            "appends go to the end"
        );
        drop(others);
    }

    #[test]
    fn the_process_keeps_no_more_descriptors_than_the_capacity_for_any_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(16);
        let files: Vec<CachedFile> = (0..300)
            .map(|i| {
                let p = dir.path().join(format!("{i}"));
                std::fs::write(&p, b"x").unwrap();
                cache.file(p, Mode::ReadWrite)
            })
            .collect();
        let base = open_fds();
        for f in &files {
            f.open().unwrap();
        }
        // Other tests run in this process too: allow for theirs.
        assert!(
            open_fds() < base + 16 + 64,
            "{} descriptors open for 300 files",
            open_fds() - base
        );
    }

    #[test]
    fn the_budget_is_half_the_open_file_limit() {
        assert_eq!(budget_for(1024), 512);
        assert_eq!(budget_for(1_048_576), 524_288);
        assert_eq!(budget_for(20), 16);
        assert_eq!(budget_for(u64::MAX), 1 << 20, "unlimited");
    }
}
