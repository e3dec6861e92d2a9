//! Broker-wide counters. Hot paths count locally and add here once per read
//! batch, so two cores never fight over these cache lines per message.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, TryLockError};

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub msgs_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections closed as slow consumers: over their outbound budget, or
    /// no write progress (socket full or credit withheld) for the write timeout.
    pub slow_consumers: AtomicU64,
    /// Connections closed by the keepalive: PINGs left unanswered.
    pub stale_connections: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub payload_too_large: AtomicU64,
    pub invalid_subjects: AtomicU64,
    pub no_responders: AtomicU64,
    /// Messages a matching subscriber did not get: its connection was over
    /// its outbound budget or closing.
    pub dropped_messages: AtomicU64,
    /// Messages and bytes per subject, for the status page (bounded).
    pub subjects: SubjectTable,
    /// Figures reported by other parts of the broker (fast path, streams, cluster).
    pub sources: Sources,
    /// Cluster routes that are up, dialed or accepted.
    pub routes: AtomicU64,
    /// Messages received from peers over cluster routes.
    pub route_msgs_in: AtomicU64,
    /// Route handshakes refused for a wrong or missing cluster secret.
    pub route_auth_failures: AtomicU64,
}

/// Per-batch counts, flushed into [`Metrics`] by their owner.
#[derive(Default, Debug, Clone)]
pub struct LocalCounts {
    pub msgs_in: u64,
    pub bytes_in: u64,
    pub msgs_out: u64,
    pub bytes_out: u64,
    /// Messages in per subject, merged into [`Metrics::subjects`] with the rest.
    pub subjects: SubjectTally,
}

impl LocalCounts {
    /// Counts one message published on `subject` (`hash`: its subject hash).
    #[inline]
    pub fn subject(&mut self, subject: &str, hash: u32, bytes: usize) {
        self.subjects.count(subject, hash, bytes);
    }
}

impl Metrics {
    pub fn add(&self, c: &mut LocalCounts) {
        if c.msgs_in != 0 {
            self.msgs_in.fetch_add(c.msgs_in, Relaxed);
            self.bytes_in.fetch_add(c.bytes_in, Relaxed);
        }
        if c.msgs_out != 0 {
            self.msgs_out.fetch_add(c.msgs_out, Relaxed);
            self.bytes_out.fetch_add(c.bytes_out, Relaxed);
        }
        c.msgs_in = 0;
        c.bytes_in = 0;
        c.msgs_out = 0;
        c.bytes_out = 0;
        if c.subjects.active {
            self.subjects.merge(&mut c.subjects, false);
        }
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

// ---------------------------------------------------------------- subjects
//
// The status page lists the busiest subjects. Counting them must not cost the
// publish path a lock or an allocation per message: each delivery batch counts
// into its own small table (a hash-indexed array, strings reused), and merges it
// into the shared table once per batch with `try_lock`; when the shared
// table is busy the counts wait for the next batch.

const TALLY_SLOTS: usize = 16;
const TALLY_PROBES: usize = 4;
/// Batches a tally may wait for a busy shared table before it blocks on it.
const TALLY_MAX_PENDING: u32 = 32;
/// Subjects tracked by the shared table.
const TABLE_CAP: usize = 1024;
/// Replies to requests go to unique `_INBOX.` subjects: not worth tracking.
use sockbus_protocol::subject::INBOX_PREFIX;

#[derive(Default, Debug, Clone)]
struct TallySlot {
    hash: u32,
    subject: String,
    msgs: u64,
    bytes: u64,
}

/// One reader's per-subject counts since its last merge.
#[derive(Default, Debug, Clone)]
pub struct SubjectTally {
    slots: [TallySlot; TALLY_SLOTS],
    /// Messages that found no free slot in this batch (too many subjects at once).
    other_msgs: u64,
    other_bytes: u64,
    active: bool,
    pending: u32,
}

impl SubjectTally {
    #[inline]
    pub fn count(&mut self, subject: &str, hash: u32, bytes: usize) {
        let s = &mut self.slots[hash as usize % TALLY_SLOTS];
        if s.hash == hash && s.subject == subject {
            s.msgs += 1;
            s.bytes += bytes as u64;
            self.active = true;
            return;
        }
        self.count_slow(subject, hash, bytes);
    }

    #[cold]
    fn count_slow(&mut self, subject: &str, hash: u32, bytes: usize) {
        if subject.starts_with(INBOX_PREFIX) {
            return;
        }
        self.active = true;
        let mut free = None;
        for i in 0..TALLY_PROBES {
            let at = (hash as usize + i) % TALLY_SLOTS;
            let s = &mut self.slots[at];
            if s.hash == hash && s.subject == subject {
                s.msgs += 1;
                s.bytes += bytes as u64;
                return;
            }
            if s.msgs == 0 && free.is_none() {
                free = Some(at);
            }
        }
        match free {
            Some(at) => {
                let s = &mut self.slots[at];
                s.hash = hash;
                s.subject.clear();
                s.subject.push_str(subject);
                s.msgs = 1;
                s.bytes = bytes as u64;
            }
            None => {
                self.other_msgs += 1;
                self.other_bytes += bytes as u64;
            }
        }
    }
}

/// One subject's counts in the shared table.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectStat {
    pub subject: String,
    pub msgs: u64,
    pub bytes: u64,
    /// Rates over the last [`SubjectTable::tick`] interval.
    pub msgs_per_sec: f64,
    pub bytes_per_sec: f64,
}

#[derive(Debug)]
struct Entry {
    subject: Box<str>,
    msgs: u64,
    bytes: u64,
    prev_msgs: u64,
    prev_bytes: u64,
    msgs_rate: f64,
    bytes_rate: f64,
}

#[derive(Debug, Default)]
struct Table {
    entries: Vec<Entry>,
    index: HashMap<Box<str>, usize>,
    /// Messages of subjects the table had no room for.
    other_msgs: u64,
    other_bytes: u64,
    seed: u64,
}

impl Table {
    fn add(&mut self, subject: &str, msgs: u64, bytes: u64) {
        if let Some(&i) = self.index.get(subject) {
            let e = &mut self.entries[i];
            e.msgs += msgs;
            e.bytes += bytes;
            return;
        }
        let entry = Entry {
            subject: subject.into(),
            msgs,
            bytes,
            prev_msgs: 0,
            prev_bytes: 0,
            msgs_rate: 0.0,
            bytes_rate: 0.0,
        };
        if self.entries.len() < TABLE_CAP {
            self.index.insert(entry.subject.clone(), self.entries.len());
            self.entries.push(entry);
            return;
        }
        // Full: replace the least active of a few sampled entries if it saw
        // no more since the last tick than this newcomer did in one batch.
        let mut victim = usize::MAX;
        let mut least = u64::MAX;
        for _ in 0..8 {
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (self.seed >> 33) as usize % self.entries.len();
            let recent = self.entries[i].msgs - self.entries[i].prev_msgs;
            if recent < least {
                least = recent;
                victim = i;
            }
        }
        if least > msgs {
            self.other_msgs += msgs;
            self.other_bytes += bytes;
            return;
        }
        let old = std::mem::replace(&mut self.entries[victim], entry);
        self.other_msgs += old.msgs;
        self.other_bytes += old.bytes;
        self.index.remove(&old.subject);
        self.index
            .insert(self.entries[victim].subject.clone(), victim);
    }
}

/// Per-subject counts shared by every reader: at most 1024 subjects; the
/// least active ones make room for new ones, their counts go to "other".
#[derive(Debug, Default)]
pub struct SubjectTable {
    table: Mutex<Table>,
}

impl SubjectTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges a reader's tally. Without `force`, a busy table is left alone
    /// and the tally keeps its counts for the next batch (a bounded number of times).
    pub fn merge(&self, t: &mut SubjectTally, force: bool) {
        let mut g = match self.table.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if !force && t.pending < TALLY_MAX_PENDING => {
                t.pending += 1;
                return;
            }
            Err(TryLockError::WouldBlock) => self.lock(),
        };
        for s in t.slots.iter_mut().filter(|s| s.msgs > 0) {
            g.add(&s.subject, s.msgs, s.bytes);
            s.msgs = 0;
            s.bytes = 0;
        }
        g.other_msgs += std::mem::take(&mut t.other_msgs);
        g.other_bytes += std::mem::take(&mut t.other_bytes);
        t.active = false;
        t.pending = 0;
    }

    /// Counts messages on one subject directly (for callers without a tally).
    pub fn record(&self, subject: &str, msgs: u64, bytes: u64) {
        if !subject.starts_with(INBOX_PREFIX) {
            self.lock().add(subject, msgs, bytes);
        }
    }

    /// Recomputes every subject's rate over the `secs` since the last tick.
    pub fn tick(&self, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let mut g = self.lock();
        for e in &mut g.entries {
            e.msgs_rate = (e.msgs - e.prev_msgs) as f64 / secs;
            e.bytes_rate = (e.bytes - e.prev_bytes) as f64 / secs;
            e.prev_msgs = e.msgs;
            e.prev_bytes = e.bytes;
        }
    }

    /// The `n` busiest subjects: highest message rate first, then most messages.
    pub fn top(&self, n: usize) -> Vec<SubjectStat> {
        let g = self.lock();
        let mut v: Vec<&Entry> = g.entries.iter().collect();
        v.sort_by(|a, b| {
            b.msgs_rate
                .total_cmp(&a.msgs_rate)
                .then(b.msgs.cmp(&a.msgs))
                .then(a.subject.cmp(&b.subject))
        });
        v.into_iter()
            .take(n)
            .map(|e| SubjectStat {
                subject: e.subject.to_string(),
                msgs: e.msgs,
                bytes: e.bytes,
                msgs_per_sec: e.msgs_rate,
                bytes_per_sec: e.bytes_rate,
            })
            .collect()
    }

    /// Subjects tracked, and messages/bytes counted under none of them.
    pub fn summary(&self) -> (usize, u64, u64) {
        let g = self.lock();
        (g.entries.len(), g.other_msgs, g.other_bytes)
    }
}

// ---------------------------------------------------------------- sources

/// A part of the broker that reports its own figures (the eBPF fast path,
/// streams, cluster routes). Registered once with [`Sources::register`];
/// `/metrics`, `/v1/status` and `/readyz` ask every registered source.
pub trait Source: Send + Sync {
    /// Its key in `/v1/status` and on the status page: `fast_path`, `streams`, `cluster`, ...
    fn name(&self) -> &'static str;
    /// Appends Prometheus text-format lines (`# HELP`, `# TYPE`, samples);
    /// metric names start with `sockbus_` and follow Prometheus conventions.
    fn prometheus(&self, _out: &mut String) {}
    /// Its section of the status page: any JSON value (an object of figures,
    /// or a list of objects shown as a table).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// `Err(reason)` while this part cannot serve yet (a store still
    /// recovering): `/readyz` answers 503 with the reason.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Default)]
pub struct Sources(RwLock<Vec<Arc<dyn Source>>>);

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.all().iter().map(|s| s.name()).collect();
        f.debug_tuple("Sources").field(&names).finish()
    }
}

impl Sources {
    pub fn register(&self, s: Arc<dyn Source>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(s);
    }

    pub fn all(&self) -> Vec<Arc<dyn Source>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Figures of the busy-poll task (`--busy-poll`), when it runs.
pub struct BusyPollSource(pub std::time::Duration);

impl Source for BusyPollSource {
    fn name(&self) -> &'static str {
        "busy_poll"
    }

    fn prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let s = sockbus_protocol::busy_poll::stats();
        let _ = write!(
            out,
            "# HELP sockbus_busy_poll_window_seconds How long the broker polls after a read or write before sleeping.\n\
             # TYPE sockbus_busy_poll_window_seconds gauge\n\
             sockbus_busy_poll_window_seconds {}\n\
             # HELP sockbus_busy_poll_sleeping 1 while the poller sleeps (no traffic for its window).\n\
             # TYPE sockbus_busy_poll_sleeping gauge\n\
             sockbus_busy_poll_sleeping {}\n\
             # HELP sockbus_busy_poll_polls_total Non-blocking looks for I/O made by the poller.\n\
             # TYPE sockbus_busy_poll_polls_total counter\n\
             sockbus_busy_poll_polls_total {}\n\
             # HELP sockbus_busy_poll_sleeps_total Times the poller went to sleep after a quiet window.\n\
             # TYPE sockbus_busy_poll_sleeps_total counter\n\
             sockbus_busy_poll_sleeps_total {}\n",
            self.0.as_secs_f64(),
            s.sleeping,
            s.polls,
            s.sleeps
        );
    }

    fn status(&self) -> serde_json::Value {
        let s = sockbus_protocol::busy_poll::stats();
        serde_json::json!({
            "window_us": self.0.as_micros() as u64,
            "sleeping": s.sleeping > 0,
            "polls": s.polls,
            "sleeps": s.sleeps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> u32 {
        sockbus_protocol::subject::subject_hash(s.as_bytes())
    }

    #[test]
    fn tallies_merge_into_the_shared_table_per_subject() {
        let m = Metrics::default();
        let mut c = LocalCounts::default();
        for _ in 0..3 {
            c.subject("a.b", h("a.b"), 10);
        }
        c.subject("c", h("c"), 1);
        c.subject("_INBOX.x.1", h("_INBOX.x.1"), 1);
        m.add(&mut c);
        c.subject("a.b", h("a.b"), 10);
        m.add(&mut c);
        m.subjects.tick(1.0);
        let top = m.subjects.top(10);
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(
            (top[0].subject.as_str(), top[0].msgs, top[0].bytes),
            ("a.b", 4, 40)
        );
        assert_eq!(top[0].msgs_per_sec, 4.0);
        assert_eq!((top[1].subject.as_str(), top[1].msgs), ("c", 1));
    }

    #[test]
    fn many_subjects_in_one_batch_are_all_counted() {
        let m = Metrics::default();
        let mut c = LocalCounts::default();
        let mut total = 0;
        for i in 0..100 {
            let s = format!("s.{i}");
            c.subject(&s, h(&s), 1);
            total += 1;
        }
        m.add(&mut c);
        let (n, other, _) = m.subjects.summary();
        let listed: u64 = m.subjects.top(usize::MAX).iter().map(|s| s.msgs).sum();
        assert!(n > 0);
        assert_eq!(listed + other, total);
    }

    #[test]
    fn the_shared_table_stays_bounded() {
        let t = SubjectTable::default();
        for i in 0..(TABLE_CAP * 3) {
            t.record(&format!("x.{i}"), 1, 1);
        }
        let (n, other, _) = t.summary();
        assert_eq!(n, TABLE_CAP);
        assert_eq!(n as u64 + other, (TABLE_CAP * 3) as u64);
    }
}
