//! A stream's writer: one OS thread that owns the log's [`Appender`].
//!
//! Group commit: it takes everything queued (from every publisher), writes
//! it with one `pwrite`, `fdatasync`s once (fsync = always) and only then
//! acks every message of the round. While it waits on the disk the next
//! round queues up, so many publishers share each fsync.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockbus_protocol::frame::iter_headers;
use tracing::{error, warn};

use super::{AckTo, Fsync, PubAck, Stream, StreamConfigExt, StreamError, WriteReq, MSG_ID_HEADER};
use crate::deliver::{Batch, Outgoing};
use crate::store::{now_ns, Appender};

/// Most bytes gathered into one round.
const ROUND_BYTES: usize = 8 << 20;
/// Longest a much-smaller-than-usual round waits for the rest of the load.
const GATHER_WAIT: Duration = Duration::from_micros(300);

pub(super) fn spawn(s: Arc<Stream>, rx: Receiver<WriteReq>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("stream-{}", s.config.name))
        .spawn(move || Writer::new(s).run(rx))?;
    Ok(())
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
type Done = (AckTo, Option<u64>, bool, Option<Box<str>>, u64);

struct Writer {
    s: Arc<Stream>,
    app: Appender,
    dedupe: Dedupe,
    interval: Duration,
    last_sync: Instant,
    last_retention: Instant,
}

impl Writer {
    fn new(s: Arc<Stream>) -> Writer {
        let cfg = &s.config;
        let app = Appender::new(
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
                    if let Some((_, v)) = iter_headers(&m.headers)
                        .find(|(k, _)| k.eq_ignore_ascii_case(MSG_ID_HEADER))
                    {
                        dedupe.insert(v.into(), m.seq, m.ts);
                    }
                }
                from = b.next;
            }
        }
        Writer {
            interval: Duration::from_millis(cfg.fsync_interval_ms.unwrap_or(100).max(1)),
            s,
            app,
            dedupe,
            last_sync: Instant::now(),
            last_retention: Instant::now() - Duration::from_secs(10),
        }
    }

    fn run(mut self, rx: Receiver<WriteReq>) {
        let tick = Duration::from_millis(if self.s.config.fsync == Fsync::Interval {
            (self.interval.as_millis() as u64).clamp(1, 1000)
        } else {
            1000
        });
        let fsync = self.s.config.fsync == Fsync::Always;
        // Messages per round, smoothed.
        let mut avg_round = 1.0f64;
        loop {
            let mut round = Vec::new();
            match rx.recv_timeout(tick) {
                Ok(r) => {
                    let mut bytes = r.buf.len();
                    let mut msgs = r.entries.len();
                    round.push(r);
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
                                if !fsync || msgs as f64 * 4.0 >= avg_round || avg_round < 8.0 {
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
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    avg_round = avg_round * 0.875 + msgs as f64 * 0.125;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if !round.is_empty() {
                self.round(round);
            }
            if self.s.config.fsync == Fsync::Interval && self.last_sync.elapsed() >= self.interval {
                if let Err(e) = self.app.sync() {
                    error!(stream = %self.s.config.name, "fsync failed: {e}");
                }
                self.last_sync = Instant::now();
            }
            if self.last_retention.elapsed() >= Duration::from_secs(1) {
                self.retention();
            }
        }
        let _ = self.app.commit(self.s.config.fsync != Fsync::Never);
    }

    fn retention(&mut self) {
        self.last_retention = Instant::now();
        let c = &self.s.config;
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
        let fsync = self.s.config.fsync == Fsync::Always;
        let name = &self.s.config.name;
        let now = now_ns();
        self.dedupe.expire(now);
        let mut bytes = 0;
        // (ack, seq or duplicate-of, msg id, ts)
        let mut done: Vec<Done> = Vec::new();
        let mut local: HashMap<Box<str>, u64> = HashMap::new();
        let mut failed: Option<StreamError> = None;
        for mut req in round {
            bytes += req.buf.len();
            let mut off = 0usize;
            for e in req.entries {
                let rec = &mut req.buf[off..off + e.len as usize];
                off += e.len as usize;
                if failed.is_some() {
                    done.push((e.ack, None, false, None, 0));
                    continue;
                }
                if let Some(id) = &e.msg_id {
                    if let Some(&seq) = self.dedupe.map.get(id).or_else(|| local.get(id)) {
                        done.push((e.ack, Some(seq), true, None, 0));
                        continue;
                    }
                }
                match self.app.stage(rec, fsync) {
                    Ok((seq, ts)) => {
                        if let Some(id) = &e.msg_id {
                            local.insert(id.clone(), seq);
                        }
                        done.push((e.ack, Some(seq), false, e.msg_id, ts));
                    }
                    Err(err) => {
                        failed = Some(self.storage_error(err));
                        done.push((e.ack, None, false, None, 0));
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
        let committed = self.s.log.lock().next_seq;
        let err = failed.unwrap_or_else(|| StreamError::Storage {
            name: name.clone(),
            error: "write failed".into(),
        });
        let mut batch = self.s.delivery.batch(16);
        for (ack, seq, dup, id, ts) in done {
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
        // One write per publishing connection for the whole commit.
        batch.finish();
    }

    fn storage_error(&self, e: std::io::Error) -> StreamError {
        error!(stream = %self.s.config.name, "cannot store messages: {e}");
        StreamError::Storage {
            name: self.s.config.name.clone(),
            error: e.to_string(),
        }
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
            let _ = batch.internal(&subject, &Outgoing::new(&subject, None, &[], &body), true);
        }
    }
}
