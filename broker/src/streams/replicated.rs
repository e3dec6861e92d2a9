//! A replicated stream's writer: a round takes everything queued (group
//! commit, as the local writer), proposes it as one Raft entry
//! (crate::replication) and acks each publisher with what the group
//! applied. On the leader up to [`PIPELINE`] rounds are in flight (handed to
//! the Raft core in order, answered in order); elsewhere a round is
//! forwarded to the leader one at a time. Storing is the state machine's
//! work on every replica.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::writer::send_ack;
use super::{AckTo, PubAck, Stream, StreamError, WriteReq};
use crate::replication::{hub, Applied, Op, Proposal, Submitted};
use crate::store::now_ns;

/// Most bytes of records in one entry.
const ROUND_BYTES: usize = 4 << 20;
/// How long a round may wait for a leader and a quorum.
const PROPOSE_WITHIN: Duration = Duration::from_secs(10);

pub(super) fn spawn(s: Arc<Stream>, rx: Receiver<WriteReq>) {
    tokio::spawn(drive(s, rx));
}

/// Entries a writer has in flight at most on the stream's leader.
const PIPELINE: usize = 4;

/// A round handed to the leader's Raft core, not yet answered.
struct InFlight {
    sub: Submitted,
    acks: Vec<AckTo>,
    bytes: usize,
}

async fn drive(s: Arc<Stream>, rx: Receiver<WriteReq>) {
    let mut open = true;
    let mut flight: VecDeque<InFlight> = VecDeque::new();
    loop {
        if flight.len() < PIPELINE {
            let (reqs, bytes) = take(&rx, &mut open);
            if !reqs.is_empty() {
                let (p, acks) = encode(reqs, bytes);
                // On the leader, handed over without waiting: the next
                // round goes out while this one is replicated and synced.
                match hub().submit(&s.name, p).await {
                    Ok(sub) => flight.push_back(InFlight { sub, acks, bytes }),
                    Err(p) => {
                        // Forwarded (or no leader yet): after the rounds in
                        // flight, one at a time, so entries keep their order.
                        while let Some(f) = flight.pop_front() {
                            let r = f.sub.wait(&s, PROPOSE_WITHIN).await;
                            finish(&s, f.acks, f.bytes, r);
                        }
                        let r = hub().propose(&s, p, PROPOSE_WITHIN).await;
                        finish(&s, acks, bytes, r);
                    }
                }
                continue;
            }
        }
        let room = flight.len() < PIPELINE;
        if let Some(front) = flight.front_mut() {
            // The oldest round's answer, or more to send while there is room.
            let answered = tokio::select! {
                biased;
                _ = front.sub.ready(PROPOSE_WITHIN) => true,
                _ = s.wake.notified(), if room => false,
            };
            if answered {
                let f = flight.pop_front().expect("the front is there");
                let r = f.sub.wait(&s, PROPOSE_WITHIN).await;
                finish(&s, f.acks, f.bytes, r);
            }
            continue;
        }
        if !open {
            return;
        }
        match s.config().max_age_ms {
            None => s.wake.notified().await,
            Some(age) => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => expire(&s, age).await,
                }
            }
        }
    }
}

/// Everything queued, up to [`ROUND_BYTES`].
fn take(rx: &Receiver<WriteReq>, open: &mut bool) -> (Vec<WriteReq>, usize) {
    let mut reqs = Vec::new();
    let mut bytes = 0usize;
    while bytes < ROUND_BYTES {
        match rx.try_recv() {
            Ok(r) => {
                bytes += r.buf.len();
                reqs.push(r);
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => {
                *open = false;
                break;
            }
        }
    }
    (reqs, bytes)
}

/// On the group's leader, once a second for a stream with `max_age`: when
/// its oldest message has expired by this node's clock, an `Expire` entry
/// carries that clock to every replica, which cut at the same entry
/// (replication/sm.rs). An idle stream's messages expire this way; a busy
/// one's publish entries carry the time anyway.
async fn expire(s: &Arc<Stream>, age_ms: u64) {
    let now = now_ns();
    let due = {
        let st = s.log.lock();
        st.first_seq() < st.next_seq
            && st
                .first_ts()
                .saturating_add(age_ms.saturating_mul(1_000_000))
                < now
    };
    if !due || !hub().leads(&s.name) {
        return;
    }
    let p = Proposal::encode(&Op::Expire { ts: now });
    if let Err(e) = hub().propose(s, p, PROPOSE_WITHIN).await {
        tracing::debug!(stream = %s.name, "expiring by age: {e}");
    }
}

/// One round's entry and whom to ack.
fn encode(reqs: Vec<WriteReq>, bytes: usize) -> (Proposal, Vec<AckTo>) {
    let mut recs = Vec::with_capacity(bytes);
    let mut lens = Vec::new();
    let mut ids = Vec::new();
    let mut acks: Vec<AckTo> = Vec::new();
    for r in reqs {
        recs.extend_from_slice(&r.buf);
        for e in r.entries {
            lens.push(e.len);
            ids.push(e.msg_id.map(String::from));
            acks.push(e.ack);
        }
    }
    let op = Op::Publish {
        ts: now_ns(),
        recs,
        lens,
        ids,
    };
    (Proposal::encode(&op), acks)
}

/// A round answered: its queue space back, its publishers acked.
fn finish(s: &Arc<Stream>, acks: Vec<AckTo>, bytes: usize, r: Result<Applied, String>) {
    s.queued.fetch_sub(bytes, Ordering::AcqRel);
    s.space.notify_waiters();
    s.budget.release(bytes);
    let name = &s.name;
    let mut batch = s.delivery.batch(16);
    match r {
        Ok(applied) if applied.error.is_none() && applied.acks.len() == acks.len() => {
            for (ack, (seq, duplicate)) in acks.into_iter().zip(applied.acks) {
                send_ack(
                    &mut batch,
                    ack,
                    Ok(PubAck {
                        stream: name.clone(),
                        seq,
                        duplicate,
                    }),
                );
            }
        }
        other => {
            let error = match other {
                Ok(a) => a
                    .error
                    .unwrap_or_else(|| "the group answered for other messages".into()),
                Err(e) => e,
            };
            tracing::warn!(stream = %name, "a replicated write failed: {error}");
            let err = StreamError::Storage {
                name: name.clone(),
                error: format!("not replicated: {error}"),
            };
            for ack in acks {
                send_ack(&mut batch, ack, Err(err.clone()));
            }
        }
    }
    batch.finish();
}
