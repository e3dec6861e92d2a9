//! A stream's writer: a tokio task that owns the log's [`Appender`] and
//! does its disk work on the runtime's blocking pool, so a broker with
//! 10,000 streams runs them on a few threads, not 10,000.
//!
//! Group commit: a round takes everything queued (from every publisher),
//! writes it with one `pwrite`, `fdatasync`s once (fsync = always) and only
//! then acks every message of the round. While it waits on the disk the
//! next round queues up, so many publishers share each fsync. An idle
//! stream costs no thread and no wake-up (unless it has retention limits or
//! `fsync = interval`, which tick).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockbus_protocol::frame::iter_headers;
use tracing::{error, warn};

use super::{
    is_msg_id, AckTo, AdminOp, Expect, Fsync, PubAck, PurgeRequest, Stream, StreamConfig,
    StreamConfigExt, StreamError, WriteReq,
};
use crate::deliver::{Batch, Outgoing};
use crate::store::{now_ns, Appender};

/// Most bytes gathered into one round.
const ROUND_BYTES: usize = 8 << 20;
/// Longest a much-smaller-than-usual round waits for the rest of the load.
const GATHER_WAIT: Duration = Duration::from_micros(300);
/// Most rounds one turn on the blocking pool writes before it lets other
/// streams' writers have the thread.
const ROUNDS_PER_TURN: usize = 8;

/// Starts the stream's writer task (needs a tokio runtime).
pub(super) fn spawn(s: Arc<Stream>, rx: Receiver<WriteReq>) {
    tokio::spawn(async move {
        let s2 = s.clone();
        // Reads the duplicate window back from the log: disk work.
        match tokio::task::spawn_blocking(move || Writer::new(s2)).await {
            Ok(w) => drive(w, rx).await,
            Err(e) => {
                error!(stream = %s.name, "the stream's writer failed to start: {e}");
                s.writer_failed();
            }
        }
    });
}

/// The writer's loop: sleeps (no thread) until a publisher queues records
/// (`Stream::wake`) or periodic work is due, then takes one turn on the
/// blocking pool. Ends once the stream is deleted and everything queued
/// is answered.
pub(super) async fn drive(mut w: Writer, mut rx: Receiver<WriteReq>) {
    let s = w.s.clone();
    loop {
        // Read each time round: an update may have changed the limits.
        let cfg = w.cfg.clone();
        let tick = if cfg.fsync == Fsync::Interval {
            w.interval
                .clamp(Duration::from_millis(1), Duration::from_secs(1))
        } else {
            Duration::from_secs(1)
        };
        let ticks = cfg.fsync == Fsync::Interval
            || cfg.max_age_ms.is_some()
            || cfg.max_bytes.is_some()
            || cfg.max_msgs.is_some();
        if ticks {
            tokio::select! {
                _ = s.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        } else {
            s.wake.notified().await;
        }
        let turn = tokio::task::spawn_blocking(move || {
            let open = w.turn(&rx);
            (w, rx, open)
        });
        match turn.await {
            Ok((w2, rx2, true)) => (w, rx) = (w2, rx2),
            Ok((_, _, false)) => return,
            Err(e) => {
                error!(stream = %s.name, "the stream's writer failed: {e}");
                s.writer_failed();
                return;
            }
        }
    }
}

/// Msg-Ids seen within the duplicate window, oldest first.
struct Dedupe {
    window: u64,
    map: HashMap<Box<str>, u64>,
    order: VecDeque<(u64, Box<str>)>,
}

impl Dedupe {
    fn expire(&mut self, now: u64) {
        while let Some((ts, _)) = self.order.front() {
            if ts + self.window >= now {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.map.remove(&id);
        }
    }
    fn insert(&mut self, id: Box<str>, seq: u64, ts: u64) {
        self.map.insert(id.clone(), seq);
        self.order.push_back((ts, id));
    }
}

/// One message of a round: its ack target, its sequence (or the one it
/// duplicates), whether it was a duplicate, its Msg-Id and timestamp.
/// A refused expectation carries its own error.
type Done = (
    AckTo,
    Option<u64>,
    bool,
    Option<Box<str>>,
    u64,
    Option<StreamError>,
);

pub(super) struct Writer {
    s: Arc<Stream>,
    /// The configuration the writer works to (see [`Writer::reconfigure`]).
    cfg: Arc<StreamConfig>,
    /// The stream's configuration update this writer last applied.
    applied: u64,
    app: Appender,
    dedupe: Dedupe,
    /// The Msg-Id of the newest message stored with one (JetStream's
    /// `Nats-Expected-Last-Msg-Id`; after a restart, the newest within
    /// the duplicate window).
    last_msg_id: Option<Box<str>>,
    interval: Duration,
    last_sync: Instant,
    last_retention: Instant,
    /// Messages per round, smoothed.
    avg_round: f64,
}

impl Writer {
    pub(super) fn new(s: Arc<Stream>) -> Writer {
        // Updates made before this writer ran are applied (again) on its
        // first turn, which also answers whoever waits for them.
        let applied = 0;
        let cfg = s.config();
        let mut app = Appender::new(
            s.log.clone(),
            cfg.segment_bytes(),
            cfg.fsync != Fsync::Never,
            cfg.fsync == Fsync::Always,
        );
        let mut dedupe = Dedupe {
            window: cfg.duplicate_window().as_nanos() as u64,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        // Rebuild the window from the log, so a publish retried across a
        // restart is still stored once.
        let since = now_ns().saturating_sub(dedupe.window);
        let mut last_msg_id = None;
        if let Ok(mut from) = s.log.seq_for_time(since) {
            loop {
                let Ok(b) = s.log.read(from, None, 4096, 32 << 20, None) else {
                    break;
                };
                if b.msgs.is_empty() {
                    break;
                }
                for m in &b.msgs {
                    if m.headers.is_empty() {
                        continue;
                    }
                    if let Some((_, v)) = iter_headers(&m.headers).find(|(k, _)| is_msg_id(k)) {
                        dedupe.insert(v.into(), m.seq, m.ts);
                        last_msg_id = Some(v.into());
                    }
                }
                from = b.next;
            }
        }
        // Segments that hold nothing any more (a crash between saving a
        // purge's floor and unlinking them) go now, whatever the limits.
        if let Err(e) = app.retention(
            cfg.max_age_ms.map(Duration::from_millis),
            cfg.max_bytes,
            cfg.max_msgs,
        ) {
            warn!(stream = %s.name, "retention at start failed: {e}");
        }
        Writer {
            interval: Duration::from_millis(cfg.fsync_interval_ms.unwrap_or(100).max(1)),
            cfg,
            applied,
            s,
            app,
            dedupe,
            last_msg_id,
            last_sync: Instant::now(),
            last_retention: Instant::now() - Duration::from_secs(10),
            avg_round: 1.0,
        }
    }

    /// One turn on the blocking pool: the rounds queued now (a few at
    /// most), then what is due (interval fsync, retention). False once the
    /// stream is deleted and everything queued is answered.
    fn turn(&mut self, rx: &Receiver<WriteReq>) -> bool {
        #[cfg(test)]
        if self.s.name == tests::PANICS {
            panic!("a writer bug, injected by a test");
        }
        self.admin();
        let mut open = true;
        for n in 0.. {
            if n == ROUNDS_PER_TURN {
                // More may be queued: come back after the others.
                self.s.wake.notify_one();
                break;
            }
            match self.gather(rx) {
                Ok(Some(round)) => self.round(round),
                Ok(None) => break,
                Err(()) => {
                    open = false;
                    break;
                }
            }
        }
        if self.cfg.fsync == Fsync::Interval && self.last_sync.elapsed() >= self.interval {
            if let Err(e) = self.app.sync() {
                error!(stream = %self.s.name, "fsync failed: {e}");
            }
            self.last_sync = Instant::now();
        }
        if self.last_retention.elapsed() >= Duration::from_secs(1) {
            self.retention();
        }
        if !open {
            let _ = self.app.commit(self.cfg.fsync != Fsync::Never);
        }
        if let Some(q) = &self.s.quota {
            q.sync(&self.s);
        }
        open
    }

    /// Everything queued, as one round (None: nothing is); Err once the
    /// stream is deleted and its queue is empty.
    fn gather(&mut self, rx: &Receiver<WriteReq>) -> Result<Option<Vec<WriteReq>>, ()> {
        let fsync = self.cfg.fsync == Fsync::Always;
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return Ok(None),
            Err(TryRecvError::Disconnected) => return Err(()),
        };
        let mut bytes = r.buf.len();
        let mut msgs = r.entries.len();
        let mut round = vec![r];
        let mut waited = None;
        while bytes < ROUND_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.buf.len();
                    msgs += r.entries.len();
                    round.push(r);
                }
                Err(_) => {
                    // Under load a window of publishers tends to split
                    // into a large and a tiny group, each waiting for
                    // the other's fsync. A round much smaller than
                    // usual waits a moment for the rest (never at low
                    // load, where every round is small).
                    if !fsync || msgs as f64 * 4.0 >= self.avg_round || self.avg_round < 8.0 {
                        break;
                    }
                    let since = *waited.get_or_insert_with(Instant::now);
                    let left = GATHER_WAIT.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(r) => {
                            bytes += r.buf.len();
                            msgs += r.entries.len();
                            round.push(r);
                        }
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        self.avg_round = self.avg_round * 0.875 + msgs as f64 * 0.125;
        Ok(Some(round))
    }

    /// Applies a configuration update when there is one: the new limits
    /// (at once, so a lower `max_msgs` drops the oldest messages before
    /// the update is answered), duplicate window, segment size and fsync
    /// interval. Then the stream's waiting purges.
    fn admin(&mut self) {
        let want = self.s.reconfig_wanted();
        if want != self.applied {
            let cfg = self.s.config();
            self.dedupe.window = cfg.duplicate_window().as_nanos() as u64;
            self.app.set_max_seg(cfg.segment_bytes());
            self.interval = Duration::from_millis(cfg.fsync_interval_ms.unwrap_or(100).max(1));
            self.cfg = cfg;
            self.retention();
            self.applied = want;
            self.s.reconfigured(want);
        }
        for op in self.s.take_admin_ops() {
            match op {
                AdminOp::Purge(req, done) => {
                    let r = self.purge(&req);
                    let _ = done.send(r);
                }
                AdminOp::Delete(seq, done) => {
                    let r = self.delete(seq);
                    let _ = done.send(r);
                }
            }
        }
    }

    /// A purge (see [`PurgeRequest`]). A filter that covers every subject
    /// of the stream is no filter: the floor is raised, segments go whole.
    /// Otherwise the matching messages are deleted one by one.
    fn purge(&mut self, req: &PurgeRequest) -> std::io::Result<u64> {
        let n = purge_log(&mut self.app, &self.s, &self.cfg, req)?;
        if let Some(q) = &self.s.quota {
            q.sync(&self.s);
        }
        Ok(n)
    }

    /// Deletes message `seq`: false if the stream does not hold it.
    fn delete(&mut self, seq: u64) -> std::io::Result<bool> {
        let b = self.s.log.read(seq, None, 1, 1, None)?;
        let Some(m) = b.msgs.first().filter(|m| m.seq == seq) else {
            return Ok(false);
        };
        let n = self.app.delete(&[(seq, m.stored_len())])?;
        if let Some(q) = &self.s.quota {
            q.sync(&self.s);
        }
        Ok(n == 1)
    }

    fn retention(&mut self) {
        self.last_retention = Instant::now();
        let c = self.cfg.clone();
        if c.max_age_ms.is_none() && c.max_bytes.is_none() && c.max_msgs.is_none() {
            return;
        }
        match self.app.retention(
            c.max_age_ms.map(Duration::from_millis),
            c.max_bytes,
            c.max_msgs,
        ) {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(stream = %c.name, removed = n, "retention removed old segments")
            }
            Err(e) => warn!(stream = %c.name, "retention failed: {e}"),
        }
    }

    fn round(&mut self, round: Vec<WriteReq>) {
        let fsync = self.cfg.fsync == Fsync::Always;
        let name = &self.s.name;
        let now = now_ns();
        self.dedupe.expire(now);
        let mut bytes = 0;
        // (ack, seq or duplicate-of, msg id, ts)
        let mut done: Vec<Done> = Vec::new();
        let mut local: HashMap<Box<str>, u64> = HashMap::new();
        // Subjects stored this round by publishes that expect a subject's
        // last sequence: not yet readable from the log.
        let mut subjects: HashMap<Box<str>, u64> = HashMap::new();
        let mut failed: Option<StreamError> = None;
        // The account's `max-stored-bytes`: what is left of it for this round.
        let mut room = self.s.quota.as_ref().map(|q| {
            q.sync(&self.s);
            q.max.saturating_sub(q.used.load(Ordering::Acquire))
        });
        let mut over: Vec<AckTo> = Vec::new();
        for mut req in round {
            bytes += req.buf.len();
            let mut off = 0usize;
            for e in req.entries {
                let rec = &mut req.buf[off..off + e.len as usize];
                off += e.len as usize;
                if failed.is_some() {
                    done.push((e.ack, None, false, None, 0, None));
                    continue;
                }
                if let Some(max) = self.cfg.max_msg_size {
                    if msg_size(rec) > max {
                        done.push((e.ack, None, false, None, 0, Some(too_large())));
                        continue;
                    }
                }
                if let Some(r) = &mut room {
                    if (e.len as u64) > *r {
                        over.push(e.ack);
                        continue;
                    }
                    *r -= e.len as u64;
                }
                if let Some(id) = &e.msg_id {
                    if let Some(&seq) = self.dedupe.map.get(id).or_else(|| local.get(id)) {
                        done.push((e.ack, Some(seq), true, None, 0, None));
                        continue;
                    }
                }
                if let Some(x) = &e.expect {
                    if let Err(err) = self.check(x, &subjects) {
                        done.push((e.ack, None, false, None, 0, Some(err)));
                        continue;
                    }
                }
                match self.app.stage(rec, fsync) {
                    Ok((seq, ts)) => {
                        if let Some(id) = &e.msg_id {
                            local.insert(id.clone(), seq);
                            self.last_msg_id = Some(id.clone());
                        }
                        if let Some((_, subj)) =
                            e.expect.as_ref().and_then(|x| x.last_subject_seq.as_ref())
                        {
                            subjects.insert(subj.clone(), seq);
                        }
                        done.push((e.ack, Some(seq), false, e.msg_id, ts, None));
                    }
                    Err(err) => {
                        failed = Some(self.storage_error(err));
                        done.push((e.ack, None, false, None, 0, None));
                    }
                }
            }
        }
        if failed.is_none() {
            if let Err(err) = self.app.commit(fsync) {
                failed = Some(self.storage_error(err));
            } else if fsync {
                self.last_sync = Instant::now();
            }
        }
        self.s.queued.fetch_sub(bytes, Ordering::AcqRel);
        self.s.space.notify_waiters();
        self.s.budget.release(bytes);
        let committed = self.s.log.lock().next_seq;
        let err = failed.unwrap_or_else(|| StreamError::Storage {
            name: name.clone(),
            error: "write failed".into(),
        });
        let mut batch = self.s.delivery.batch(16);
        for (ack, seq, dup, id, ts, refused) in done {
            if let Some(e) = refused {
                send_ack(&mut batch, ack, Err(e));
                continue;
            }
            let r = match seq {
                Some(seq) if seq < committed => {
                    if let Some(id) = id {
                        self.dedupe.insert(id, seq, ts);
                    }
                    Ok(PubAck {
                        stream: name.clone(),
                        seq,
                        duplicate: dup,
                    })
                }
                _ => Err(err.clone()),
            };
            send_ack(&mut batch, ack, r);
        }
        if let (Some(q), false) = (&self.s.quota, over.is_empty()) {
            let full = StreamError::AccountFull {
                name: name.clone(),
                account: q.account.clone(),
                used: q.used.load(Ordering::Acquire),
                max: q.max,
            };
            warn!(stream = %name, account = %q.account, refused = over.len(), "publishes refused: the account's max-stored-bytes is reached");
            for ack in over {
                send_ack(&mut batch, ack, Err(full.clone()));
            }
        }
        // One write per publishing connection for the whole commit.
        batch.finish();
    }

    /// Do a publish's `Nats-Expected-*` headers hold now, before it is
    /// stored? `round` has the subjects stored earlier in this round.
    fn check(&self, x: &Expect, round: &HashMap<Box<str>, u64>) -> Result<(), StreamError> {
        let name = &self.s.name;
        if let Some(want) = &x.stream {
            if **want != **name {
                return Err(StreamError::Expected {
                    err_code: 10060,
                    text: "expected stream does not match".into(),
                });
            }
        }
        let last = self.app.next_seq() - 1;
        if let Some(want) = x.last_seq {
            if want != last {
                return Err(StreamError::Expected {
                    err_code: 10071,
                    text: format!("wrong last sequence: {last}"),
                });
            }
        }
        if let Some(want) = &x.last_msg_id {
            let have = self.last_msg_id.as_deref().unwrap_or("");
            if **want != *have {
                return Err(StreamError::Expected {
                    err_code: 10070,
                    text: format!("wrong last msg ID: {have}"),
                });
            }
        }
        if let Some((want, subject)) = &x.last_subject_seq {
            let have = match round.get(subject) {
                Some(&seq) => seq,
                None => self.last_for_subject(subject),
            };
            if *want != have {
                return Err(StreamError::Expected {
                    err_code: 10071,
                    text: format!("wrong last sequence: {have}"),
                });
            }
        }
        Ok(())
    }

    /// The sequence of the newest stored message on `subject` (0: none,
    /// or the log could not be read).
    fn last_for_subject(&self, subject: &str) -> u64 {
        match self.s.log.last_matching(subject) {
            Ok(m) => m.map_or(0, |m| m.seq),
            Err(_) => 0,
        }
    }

    fn storage_error(&self, e: std::io::Error) -> StreamError {
        error!(stream = %self.s.name, "cannot store messages: {e}");
        StreamError::Storage {
            name: self.s.name.clone(),
            error: e.to_string(),
        }
    }
}

/// A record's message size as JetStream counts it against `max_msg_size`:
/// headers and payload.
fn msg_size(rec: &[u8]) -> u64 {
    let subject = rec
        .get(24..26)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize);
    rec.len()
        .saturating_sub(crate::store::record::RECORD_HEADER + subject) as u64
}

/// A publish over the stream's `max_msg_size` (JetStream's error).
fn too_large() -> StreamError {
    StreamError::Expected {
        err_code: 10054,
        text: "message size exceeds maximum allowed".into(),
    }
}

/// Answers one publish: JSON on its reply subject, or through its channel.
pub(super) fn send_ack(batch: &mut Batch, ack: AckTo, r: Result<PubAck, StreamError>) {
    match ack {
        AckTo::None => {}
        AckTo::Chan(tx) => {
            let _ = tx.send(r);
        }
        AckTo::Reply(subject) => {
            let body = match &r {
                Ok(a) => serde_json::to_vec(a).expect("serialisable"),
                Err(e) => super::api::error_body(e),
            };
            let _ = batch.internal(&Outgoing::new(&subject, None, &[], &body));
        }
        AckTo::Js(subject) => {
            let body = crate::jetstream::pub_ack_body(&r);
            let _ = batch.internal(&Outgoing::new(&subject, None, &[], &body));
        }
    }
}

/// Removes what a purge asks from the log `app` writes (this stream's
/// writer, or a replicated stream's state machine at the purge's entry):
/// the oldest messages by raising the floor when the filter (if any)
/// covers every subject of the stream, else the matching messages one by
/// one. Returns how many. The result depends only on the log's contents,
/// so every replica removes the same messages.
pub(crate) fn purge_log(
    app: &mut Appender,
    s: &Stream,
    cfg: &StreamConfig,
    req: &PurgeRequest,
) -> std::io::Result<u64> {
    let all = req
        .filter
        .as_deref()
        .is_none_or(|f| cfg.subjects.iter().all(|p| super::covers(f, p)));
    if all {
        return match (req.seq, req.keep) {
            (Some(seq), _) => app.set_floor(seq),
            (None, Some(keep)) => app.keep_newest(keep),
            (None, None) => app.set_floor(u64::MAX),
        };
    }
    let f = req.filter.as_deref().unwrap_or(">");
    let before = req.seq.unwrap_or(u64::MAX).min(app.next_seq());
    let mut msgs = s.log.matching(f, before)?;
    if let Some(keep) = req.keep {
        let n = msgs.len().saturating_sub(keep as usize);
        msgs.truncate(n);
    }
    app.delete(&msgs)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc::{channel, Receiver};

    use sockbus_protocol::frame::push_header;
    use tokio::sync::oneshot;

    use super::*;
    use crate::deliver::{Delivery, Publisher};
    use crate::store::{FileCache, Log};
    use crate::streams::testing::{delivery, Inbox};
    use crate::streams::{Pending, QueueBudget, StreamConfig, Streams};

    type AckRx = oneshot::Receiver<Result<PubAck, StreamError>>;

    /// A stream whose writer the test runs by hand: what producers queue
    /// waits in the returned receiver until the test hands it to a round.
    fn stream(dir: &Path, cfg: StreamConfig, d: &Delivery) -> (Arc<Stream>, Receiver<WriteReq>) {
        stream_in(
            dir,
            cfg,
            d,
            &QueueBudget::new(crate::streams::TOTAL_QUEUE_LIMIT),
        )
    }

    /// [`stream`] counting its queued bytes in `budget`.
    fn stream_in(
        dir: &Path,
        cfg: StreamConfig,
        d: &Delivery,
        budget: &Arc<QueueBudget>,
    ) -> (Arc<Stream>, Receiver<WriteReq>) {
        let (log, _) = Log::open(dir, &cfg.name, &FileCache::new(4)).unwrap();
        let (tx, rx) = channel();
        let s = Arc::new(Stream::new(
            cfg,
            log,
            dir.to_path_buf(),
            tx,
            budget.clone(),
            d.clone(),
            None,
        ));
        (s, rx)
    }

    fn headers(msg_id: Option<&str>) -> Vec<u8> {
        let mut h = Vec::new();
        if let Some(id) = msg_id {
            push_header(&mut h, crate::streams::MSG_ID_HEADER, id).unwrap();
        }
        h
    }

    /// One producer's reader batch: its publishes, handed to the writer in
    /// one send, each with its ack on a channel.
    fn produce(s: &Arc<Stream>, msgs: &[(&str, Option<&str>)]) -> Vec<AckRx> {
        let mut p = Pending::default();
        let acks = msgs
            .iter()
            .map(|(payload, id)| {
                let (tx, rx) = oneshot::channel();
                p.add(
                    s,
                    "orders.eu",
                    AckTo::Chan(tx),
                    &headers(*id),
                    payload.as_bytes(),
                );
                rx
            })
            .collect();
        p.flush();
        acks
    }

    /// Runs one round with everything queued so far.
    fn round(w: &mut Writer, rx: &Receiver<WriteReq>) {
        let reqs: Vec<_> = rx.try_iter().collect();
        assert!(!reqs.is_empty());
        w.round(reqs);
    }

    fn ack(rx: &mut AckRx) -> Result<PubAck, StreamError> {
        rx.try_recv().expect("answered")
    }

    fn stored(s: &Stream) -> Vec<String> {
        let b = s.log.read(1, None, 1000, usize::MAX, None).unwrap();
        b.msgs
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn publishes_from_many_producers_in_one_round_are_acked_with_consecutive_sequences_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let (s, rx) = stream(dir.path(), StreamConfig::new("S", ["orders.>"]), &d);
        let mut w = Writer::new(s.clone());
        let payloads: Vec<Vec<String>> = (0..8)
            .map(|p| (0..4).map(|i| format!("p{p}-{i}")).collect())
            .collect();
        let mut acks: Vec<AckRx> = payloads
            .iter()
            .flat_map(|batch| {
                let msgs: Vec<_> = batch.iter().map(|m| (m.as_str(), None)).collect();
                produce(&s, &msgs)
            })
            .collect();
        assert_eq!(
            *s.log.committed.borrow(),
            0,
            "nothing stored before the round"
        );
        round(&mut w, &rx);
        let seqs: Vec<u64> = acks.iter_mut().map(|a| ack(a).unwrap().seq).collect();
        assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
        assert_eq!(stored(&s), payloads.concat(), "stored in queue order");
        assert_eq!(*s.log.committed.borrow(), 32);
        assert_eq!(
            s.queued.load(Ordering::Acquire),
            0,
            "the queue is empty again"
        );
    }

    #[tokio::test]
    async fn publishers_to_an_idle_stream_wait_while_all_streams_together_have_too_much_queued() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        // A broker-wide limit of 4 KiB, far under one stream's own.
        let budget = QueueBudget::new(4096);
        let (a, a_rx) = stream_in(
            &dir.path().join("a"),
            StreamConfig::new("A", ["orders.>"]),
            &d,
            &budget,
        );
        let (b, b_rx) = stream_in(
            &dir.path().join("b"),
            StreamConfig::new("B", ["orders.>"]),
            &d,
            &budget,
        );
        let big = "x".repeat(1000);
        let msgs: Vec<(&str, Option<&str>)> = (0..8).map(|_| (big.as_str(), None)).collect();
        let _acks = produce(&a, &msgs);
        assert!(
            b.over_limit(),
            "B has nothing queued but the streams together have 8 KB"
        );
        let wait = tokio::spawn({
            let b = b.clone();
            async move { b.wait_space().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!wait.is_finished(), "B's publishers wait");
        // A's writer catches up: B's publishers go on.
        round(&mut Writer::new(a.clone()), &a_rx);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("woken when A's round freed the space")
            .unwrap();
        assert!(!b.over_limit());
        drop(b_rx);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishers_share_fsyncs_through_the_writer_task() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let (s, rx) = stream(dir.path(), StreamConfig::new("S", ["orders.>"]), &d);
        let writer = tokio::spawn(drive(Writer::new(s.clone()), rx));
        // 16 publishers, each waiting for its ack before the next publish.
        let tasks: Vec<_> = (0..16)
            .map(|p| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..50 {
                        let payload = format!("p{p}-{i}");
                        let ack = produce(&s, &[(payload.as_str(), None)]).pop().unwrap();
                        seqs.push(ack.await.unwrap().unwrap().seq);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            all.extend(seqs);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=800).collect::<Vec<u64>>());
        let fsyncs = s.log.fsyncs.load(Ordering::Relaxed);
        assert!(
            fsyncs <= 800 / 4,
            "{fsyncs} fsyncs for 800 acks from 16 publishers: rounds are not shared"
        );
        // Deleting the stream ends the writer task.
        s.close_writer();
        writer.await.unwrap();
    }

    /// Name of a stream whose writer panics on its first turn.
    pub(super) const PANICS: &str = "PANICS";

    /// A writer that panics gives its queued bytes back to the broker-wide
    /// budget (other streams' publishers would otherwise wait forever once
    /// it had filled) and later publishes to its stream fail at once with a
    /// storage error instead of queuing for nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_panics_releases_the_shared_budget_and_fails_later_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let budget = QueueBudget::new(4096);
        let (bad, bad_rx) = stream_in(
            &dir.path().join("bad"),
            StreamConfig::new(PANICS, ["bad.>"]),
            &d,
            &budget,
        );
        let (good, good_rx) = stream_in(
            &dir.path().join("good"),
            StreamConfig::new("GOOD", ["good.>"]),
            &d,
            &budget,
        );
        let big = "x".repeat(1000);
        let msgs: Vec<(&str, Option<&str>)> = (0..8).map(|_| (big.as_str(), None)).collect();
        let lost = produce(&bad, &msgs);
        assert!(
            good.over_limit(),
            "the panicking stream holds the shared budget"
        );
        let writer = tokio::spawn(drive(Writer::new(bad.clone()), bad_rx));
        bad.wake.notify_one();
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer task ends")
            .unwrap();
        assert!(!good.over_limit(), "the budget was given back");
        for a in lost {
            // Queued before the panic: lost with the writer, never acked.
            assert!(
                !matches!(a.await, Ok(Ok(_))),
                "a message the writer never stored was acked"
            );
        }
        let mut after = produce(&bad, &[("later", None)]);
        match ack(&mut after[0]) {
            Err(StreamError::Storage { error, .. }) => {
                assert!(error.contains("internal error"), "{error}")
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
        drop(good_rx);
    }

    #[test]
    fn a_duplicate_msg_id_in_the_window_is_acked_with_the_first_sequence_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let cfg = StreamConfig {
            duplicate_window_ms: Some(300),
            ..StreamConfig::new("S", ["orders.>"])
        };
        let (s, rx) = stream(dir.path(), cfg, &d);
        let mut w = Writer::new(s.clone());
        // Within one round, and in the next one.
        let mut first = produce(&s, &[("a", Some("id-a")), ("a again", Some("id-a"))]);
        round(&mut w, &rx);
        let mut next = produce(&s, &[("a retried", Some("id-a")), ("b", Some("id-b"))]);
        round(&mut w, &rx);
        let answers: Vec<(u64, bool)> = first
            .iter_mut()
            .chain(next.iter_mut())
            .map(|a| ack(a).map(|a| (a.seq, a.duplicate)).unwrap())
            .collect();
        assert_eq!(answers, [(1, false), (1, true), (1, true), (2, false)]);
        assert_eq!(stored(&s), ["a", "b"]);

        // Once the window has passed, the same Msg-Id is a new message.
        std::thread::sleep(Duration::from_millis(450));
        let mut late = produce(&s, &[("a later", Some("id-a"))]);
        round(&mut w, &rx);
        let a = ack(&mut late[0]).unwrap();
        assert_eq!((a.seq, a.duplicate), (3, false));
        assert_eq!(stored(&s), ["a", "b", "a later"]);
    }

    #[test]
    fn a_duplicate_msg_id_is_still_recognised_by_a_writer_started_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let (s, rx) = stream(dir.path(), StreamConfig::new("S", ["orders.>"]), &d);
        let mut w = Writer::new(s.clone());
        let mut a = produce(&s, &[("x", Some("id-x")), ("y", None)]);
        round(&mut w, &rx);
        assert_eq!(ack(&mut a[0]).unwrap().seq, 1);
        drop((w, rx, s));

        let (s, rx) = stream(dir.path(), StreamConfig::new("S", ["orders.>"]), &d);
        let mut w = Writer::new(s.clone());
        let mut retry = produce(&s, &[("x", Some("id-x"))]);
        round(&mut w, &rx);
        let r = ack(&mut retry[0]).unwrap();
        assert_eq!((r.seq, r.duplicate), (1, true));
        assert_eq!(stored(&s), ["x", "y"]);
    }

    #[tokio::test]
    async fn an_ack_goes_as_json_to_the_publishers_reply_subject() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let streams = Arc::new(Streams::open(dir.path(), d.clone(), None).unwrap());
        streams
            .create(StreamConfig::new("ORDERS", ["orders.>"]))
            .unwrap();
        let inbox = Inbox::new(&d, "_INBOX.pub.1");
        // The path a client's PUB with a reply subject takes.
        let mut batch = d.ingress(&streams, 16);
        let from = Publisher {
            id: d.next_id(),
            echo: false,
            no_responders: true,
            api: true,
            explicit_acks: true,
        };
        for p in ["one", "two"] {
            let r = batch
                .publish(
                    &from,
                    "orders.eu",
                    Some(&inbox.subject),
                    &[],
                    p.as_bytes(),
                    crate::deliver::Ack::Flags(sockbus_protocol::frame::PUB_ACK),
                )
                .unwrap();
            assert!(r.stored);
        }
        batch.finish();
        let mut got = inbox.next().await;
        if got.len() < 2 {
            got.extend(inbox.next().await);
        }
        let bodies: Vec<PubAck> = got
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect();
        assert_eq!(
            bodies,
            [1, 2].map(|seq| PubAck {
                stream: "ORDERS".into(),
                seq,
                duplicate: false
            })
        );
        assert_eq!(
            std::str::from_utf8(&got[0].payload).unwrap(),
            r#"{"stream":"ORDERS","seq":1}"#
        );
        assert_eq!(got[0].subject, inbox.subject);
    }

    #[tokio::test]
    async fn publishes_reaching_a_deleted_stream_are_answered_with_an_error_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let streams = Streams::open(dir.path(), d.clone(), None).unwrap();
        streams
            .create(StreamConfig::new("ORDERS", ["orders.>"]))
            .unwrap();
        // A reader whose capture cache still holds the stream when it is deleted.
        let s = streams.get("ORDERS").unwrap();
        streams.delete("ORDERS").unwrap();
        let inbox = Inbox::new(&d, "_INBOX.pub.2");
        let mut p = Pending::default();
        let (tx, mut rx) = oneshot::channel();
        p.add(&s, "orders.eu", AckTo::Chan(tx), &[], b"lost?");
        p.add(
            &s,
            "orders.eu",
            AckTo::Reply(inbox.subject.clone().into()),
            &[],
            b"lost?",
        );
        p.flush();
        let e = rx.try_recv().expect("answered at once").unwrap_err();
        assert!(matches!(e, StreamError::Deleted(_)), "{e:?}");
        assert_eq!(e.to_string(), r#"stream "ORDERS" was deleted"#);
        let got = inbox.next().await;
        assert_eq!(
            std::str::from_utf8(&got[0].payload).unwrap(),
            r#"{"error":"stream \"ORDERS\" was deleted","status":503}"#
        );
    }

    #[tokio::test]
    async fn publishes_queued_when_the_stream_is_deleted_are_all_answered_before_the_writer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let (s, rx) = stream(dir.path(), StreamConfig::new("S", ["orders.>"]), &d);
        let w = Writer::new(s.clone());
        let mut queued = produce(&s, &[("1", None), ("2", None), ("3", None)]);
        // What Streams::delete does to the writer's queue.
        s.close_writer();
        let mut after = produce(&s, &[("4", None)]);
        let e = ack(&mut after[0]).unwrap_err();
        assert!(matches!(e, StreamError::Deleted(_)), "{e:?}");
        // The writer answers what it already had, then ends.
        drive(w, rx).await;
        let seqs: Vec<u64> = queued.iter_mut().map(|a| ack(a).unwrap().seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }
}
