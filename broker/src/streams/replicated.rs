//! A replicated stream's writer: a round takes everything queued (group
//! commit, as the local writer), proposes it as one Raft entry
//! (crate::replication) and acks each publisher with what the group
//! applied. One round is in flight at a time; what arrives meanwhile is the
//! next round. Storing is the state machine's work on every replica.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::writer::send_ack;
use super::{AckTo, PubAck, Stream, StreamError, WriteReq};
use crate::replication::{hub, Op, Proposal};
use crate::store::now_ns;

/// Most bytes of records in one entry.
const ROUND_BYTES: usize = 4 << 20;
/// How long a round may wait for a leader and a quorum.
const PROPOSE_WITHIN: Duration = Duration::from_secs(10);

pub(super) fn spawn(s: Arc<Stream>, rx: Receiver<WriteReq>) {
    tokio::spawn(drive(s, rx));
}

async fn drive(s: Arc<Stream>, rx: Receiver<WriteReq>) {
    let mut open = true;
    while open {
        match s.config().max_age_ms {
            None => s.wake.notified().await,
            Some(age) => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => expire(&s, age).await,
                }
            }
        }
        loop {
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
                        open = false;
                        break;
                    }
                }
            }
            if reqs.is_empty() {
                break;
            }
            round(&s, reqs, bytes).await;
        }
    }
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

async fn round(s: &Arc<Stream>, reqs: Vec<WriteReq>, bytes: usize) {
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
    let r = hub()
        .propose(s, Proposal::encode(&op), PROPOSE_WITHIN)
        .await;
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
