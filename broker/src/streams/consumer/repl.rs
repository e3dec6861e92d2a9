//! Durable consumers of replicated streams (issue 17 item 5): their state
//! is part of the stream's Raft log, so whichever replica leads next has it.
//!
//! Served by the stream's leader only. Every replica holds the messages,
//! but two nodes delivering the same consumer would have to agree on its
//! pending set for every delivery; one node that changes the state and
//! tells the others through the log it already runs is simpler and
//! obviously correct. So the leader changes the state in memory first (the
//! *live* state: deliveries, acks) and proposes the changes, batched, as
//! `Op::Consumers` entries; every replica's state machine applies them to
//! the *committed* state and to the consumer's op log on disk. Any other
//! node forwards pulls and acks to the leader over the Raft channel (as it
//! forwards publishes); deliveries reach the client over the cluster
//! routes, like any message published on the leader for a subscriber on
//! another node.
//!
//! A node that becomes leader first waits until it has applied everything
//! committed before its term (openraft's `ensure_linearizable`), then takes
//! the committed state as its live state: acked messages stay acked;
//! delivered, unacked ones are delivered again `ack_wait` after the
//! takeover (the client that had them may still be working on them).
//!
//! A round of deliveries is committed before it is sent, with every ack
//! that arrived before it: a leader that takes over knows each message a
//! client may hold, and delivers none of them again before its ack wait.
//! An ack with a reply subject is answered once the entry holding it is
//! committed; one without is proposed at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{send_status, AckKind, Consumer, Flavor, Pend, Pull};
use crate::replication::{hub, ConsumerChange, Op, Proposal};
use crate::store::files::CachedFile;
use crate::streams::{Stream, StreamError};

/// How long a pull, an ack or a create looks for the group's leader.
const FIND_LEADER: Duration = Duration::from_secs(10);
/// How long one batch of changes may take to commit.
const COMMIT_WITHIN: Duration = Duration::from_secs(10);
/// A pull forwarded from another node may arrive before that node's
/// route has told this one about the client's inbox: wait this long for it.
pub(super) const INBOX_GRACE: Duration = Duration::from_secs(2);

/// The replicated part of a durable consumer of a replicated stream.
pub(crate) struct Repl {
    pub(super) committed: Mutex<Committed>,
    /// Serialises taking over as the serving node.
    takeover: tokio::sync::Mutex<()>,
    outbox: Mutex<Outbox>,
    /// One batch of changes in flight at a time; what queues meanwhile is the next.
    flushing: tokio::sync::Mutex<()>,
    /// Acks to forward to the leader, sent together.
    fwd: Mutex<Vec<(WireAck, Option<String>)>>,
    fwd_busy: AtomicBool,
}

/// What the group has committed: applied by every replica's state machine.
pub(super) struct Committed {
    pub(super) next_seq: u64,
    /// seq -> deliveries.
    pub(super) pending: BTreeMap<u64, u32>,
    /// Deliveries made, counted from the consumer's creation.
    pub(super) delivered: u64,
    /// The term whose leader this node serves the consumer as; 0 while it
    /// does not (then the live state follows the committed one).
    pub(super) live_term: u64,
    pub(super) file: CachedFile,
    pub(super) file_len: u64,
    pub(super) path: PathBuf,
}

/// Ops of the live state not yet proposed.
#[derive(Default)]
struct Outbox {
    ops: Vec<u8>,
    /// Batches of ops queued, ever.
    queued: u64,
    /// Of those, committed.
    flushed: u64,
    /// Raised whenever the live state is rebuilt: ops of an older epoch
    /// are gone, and whoever waits for them hears it.
    epoch: u64,
}

/// An ack as forwarded to the leader.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct WireAck {
    pub seq: u64,
    /// 0 ack, 1 nak, 2 progress, 3 term.
    pub kind: u8,
    /// A nak's delay (JetStream's `-NAK {"delay": ns}`).
    pub delay_ns: Option<u64>,
    /// The client waits for the ack to be stored.
    pub confirm: bool,
}

/// One message of a forwarded pull, on its way to the node that delivers it.
/// (Copied out of the log read: this path crosses the network anyway.)
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct WireMsg {
    pub subject: String,
    pub ack: String,
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

/// A pull as forwarded to the leader.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct WirePull {
    pub reply: String,
    pub batch: u64,
    pub max_bytes: u64,
    pub expires_ns: u64,
    pub no_wait: bool,
    pub js: bool,
    pub heartbeat_ns: Option<u64>,
    /// The node whose client asked.
    pub origin: String,
}

fn kind_code(k: AckKind) -> u8 {
    match k {
        AckKind::Ack => 0,
        AckKind::Nak => 1,
        AckKind::Progress => 2,
        AckKind::Term => 3,
    }
}

fn kind_of(code: u8) -> AckKind {
    match code {
        1 => AckKind::Nak,
        2 => AckKind::Progress,
        3 => AckKind::Term,
        _ => AckKind::Ack,
    }
}

impl WirePull {
    fn of(p: &Pull) -> WirePull {
        WirePull {
            reply: p.reply.clone(),
            batch: p.batch as u64,
            max_bytes: p.max_bytes as u64,
            expires_ns: u64::try_from(p.expires.as_nanos()).unwrap_or(u64::MAX),
            no_wait: p.no_wait,
            js: p.flavor == Flavor::Js,
            heartbeat_ns: p
                .heartbeat
                .map(|h| u64::try_from(h.as_nanos()).unwrap_or(u64::MAX)),
            origin: p.origin.clone().or_else(|| hub().me()).unwrap_or_default(),
        }
    }

    fn into_pull(self) -> Pull {
        let here = hub().me().is_some_and(|me| me == self.origin);
        Pull {
            reply: self.reply,
            batch: usize::try_from(self.batch).unwrap_or(usize::MAX).max(1),
            max_bytes: usize::try_from(self.max_bytes).unwrap_or(usize::MAX).max(1),
            expires: if self.expires_ns == u64::MAX {
                Duration::MAX
            } else {
                Duration::from_nanos(self.expires_ns)
            },
            no_wait: self.no_wait,
            flavor: if self.js { Flavor::Js } else { Flavor::Native },
            heartbeat: self.heartbeat_ns.map(Duration::from_nanos),
            push: false,
            done: None,
            origin: (!here).then_some(self.origin),
        }
    }
}

impl Repl {
    pub(super) fn new(
        next_seq: u64,
        pending: BTreeMap<u64, u32>,
        path: PathBuf,
        file: CachedFile,
        file_len: u64,
    ) -> Repl {
        Repl {
            committed: Mutex::new(Committed {
                next_seq,
                pending,
                delivered: 0,
                live_term: 0,
                file,
                file_len,
                path,
            }),
            takeover: tokio::sync::Mutex::new(()),
            outbox: Mutex::new(Outbox::default()),
            flushing: tokio::sync::Mutex::new(()),
            fwd: Mutex::new(Vec::new()),
            fwd_busy: AtomicBool::new(false),
        }
    }

    pub(super) fn committed(&self) -> MutexGuard<'_, Committed> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues ops made by the live state (called with the live state locked).
    pub(super) fn queue(&self, ops: &[u8]) {
        let mut o = self.outbox();
        o.ops.extend_from_slice(ops);
        o.queued += 1;
    }

    /// (epoch, ops queued so far): what a flush must cover.
    fn mark(&self) -> (u64, u64) {
        let o = self.outbox();
        (o.epoch, o.queued)
    }
}

fn repl(c: &Consumer) -> &Repl {
    c.repl.as_ref().expect("a replicated consumer")
}

/// Where a replicated consumer is served from, as this node sees it.
enum Role {
    /// Here: this node leads and has taken the committed state over.
    Live,
    /// On that node.
    Leader(String),
    /// This node is not a member of the stream's group.
    NoGroup,
    /// No leader known right now (an election).
    Unknown,
}

/// Is the consumer served here right now?
pub(super) fn is_live(c: &Consumer) -> bool {
    let term = repl(c).committed().live_term;
    if term == 0 {
        return false;
    }
    let live = hub().group(&c.stream).is_some_and(|g| {
        let m = g.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_term == term
    });
    if !live {
        stop_live(c);
    }
    live
}

async fn role(c: &Consumer) -> Role {
    let Some(g) = hub().group(&c.stream) else {
        return Role::NoGroup;
    };
    let m = g.raft.metrics().borrow().clone();
    if m.state != ServerState::Leader {
        stop_live(c);
        return match m.current_leader.and_then(|l| g.name_of(l)) {
            Some(n) => Role::Leader(n),
            None => Role::Unknown,
        };
    }
    let r = repl(c);
    if r.committed().live_term == m.current_term {
        return Role::Live;
    }
    let _t = r.takeover.lock().await;
    if r.committed().live_term == m.current_term {
        return Role::Live;
    }
    // Everything committed before this term applied here first: the state
    // taken over then holds every ack that was ever confirmed.
    match tokio::time::timeout(COMMIT_WITHIN, g.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => {
            let now = g.raft.metrics().borrow().clone();
            if now.state == ServerState::Leader && now.current_term == m.current_term {
                go_live(c, m.current_term);
                Role::Live
            } else {
                Role::Unknown
            }
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
            match f.leader_node {
                Some(n) => Role::Leader(n.addr),
                None => Role::Unknown,
            }
        }
        Ok(Err(e)) => {
            debug!(consumer = %c.name, "cannot take the consumer over: {e}");
            Role::Unknown
        }
        Err(_) => Role::Unknown,
    }
}

/// A role other than `Unknown`, waiting through an election up to `within`.
async fn find_role(c: &Consumer, within: Duration) -> Role {
    let end = tokio::time::Instant::now() + within;
    loop {
        match role(c).await {
            Role::Unknown if tokio::time::Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            r => return r,
        }
    }
}

/// The live state from the committed one: this node serves the consumer.
fn go_live(c: &Consumer, term: u64) {
    let r = repl(c);
    let mut com = r.committed();
    let mut st = c.lock();
    let due = Instant::now() + c.config.ack_wait();
    st.next_seq = com.next_seq;
    st.pos = None;
    st.pending = com
        .pending
        .iter()
        .map(|(s, n)| {
            (
                *s,
                Pend {
                    deliveries: *n,
                    deadline: due,
                },
            )
        })
        .collect();
    c.delivered
        .store(com.delivered, std::sync::atomic::Ordering::Relaxed);
    let mut o = r.outbox();
    o.ops.clear();
    o.epoch += 1;
    o.flushed = o.queued;
    com.live_term = term;
    info!(stream = %c.stream, consumer = %c.name, term, next_seq = com.next_seq, pending = com.pending.len(), "serving the replicated consumer here (leader)");
    drop(o);
    drop(st);
    drop(com);
    c.kick.notify_one();
}

/// This node no longer serves the consumer: the live state follows the
/// committed one again, unproposed ops are dropped.
pub(super) fn stop_live(c: &Consumer) {
    reset(c, false)
}

/// The live state from the committed one, unproposed ops dropped: when
/// this node served the consumer, or (`always`) after a failed flush,
/// whose ops may come from a round that raced with losing the lead.
fn reset(c: &Consumer, always: bool) {
    let r = repl(c);
    let mut com = r.committed();
    if com.live_term == 0 && !always {
        return;
    }
    let mut st = c.lock();
    let now = Instant::now();
    st.next_seq = com.next_seq;
    st.pos = None;
    st.pending = com
        .pending
        .iter()
        .map(|(s, n)| {
            (
                *s,
                Pend {
                    deliveries: *n,
                    deadline: now,
                },
            )
        })
        .collect();
    let mut o = r.outbox();
    o.ops.clear();
    o.epoch += 1;
    o.flushed = o.queued;
    if com.live_term != 0 {
        info!(stream = %c.stream, consumer = %c.name, term = com.live_term, "no longer serving the replicated consumer here");
    }
    com.live_term = 0;
}

/// Proposes the live state's ops queued up to `upto` (of `epoch`) and
/// waits until they are committed. Only through the local group: a node
/// that no longer leads must not have its stale ops applied by the next.
pub(super) async fn flush(c: &Consumer, epoch: u64, upto: u64) -> Result<(), String> {
    let r = repl(c);
    let _f = r.flushing.lock().await;
    // Ops of a term this node no longer leads never reach the log, not
    // even if it leads again now (they were never sent or confirmed).
    if !is_live(c) {
        return Err("this node no longer serves the consumer".into());
    }
    let (ops, end) = {
        let mut o = r.outbox();
        if o.epoch != epoch {
            return Err("the stream's leader changed before the ack was stored".into());
        }
        if o.flushed >= upto {
            return Ok(());
        }
        (std::mem::take(&mut o.ops), o.queued)
    };
    let Some(g) = hub().group(&c.stream) else {
        return Err("this node is not a replica of the stream".into());
    };
    let p = Proposal::encode(&Op::Consumers {
        changes: vec![ConsumerChange::Ops {
            name: c.name.clone(),
            ops,
        }],
    });
    let r2 = tokio::time::timeout(COMMIT_WITHIN, g.raft.client_write(p)).await;
    let err = match r2 {
        Ok(Ok(resp)) => match resp.data.error {
            None => {
                let mut o = r.outbox();
                if o.epoch == epoch {
                    o.flushed = o.flushed.max(end);
                }
                return Ok(());
            }
            Some(e) => e,
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("not committed within {COMMIT_WITHIN:?}"),
    };
    // What was in flight may or may not commit: start again from what
    // the group has (unconfirmed acks may then be delivered again).
    warn!(stream = %c.stream, consumer = %c.name, "consumer state not replicated: {err}");
    reset(c, true);
    Err(err)
}

/// Commits everything queued so far (the serving loop, before it sends a
/// round); on failure the live state is the committed one again.
pub(super) async fn flush_all(c: &Consumer) -> Result<(), String> {
    let (e, u) = repl(c).mark();
    let r = flush(c, e, u).await;
    if r.is_err() {
        reset(c, true);
    }
    r
}

/// A pull for a replicated consumer: served here when this node leads,
/// else forwarded to the leader.
pub(super) fn dispatch_pull(c: Arc<Consumer>, p: Pull) {
    tokio::spawn(pull_task(c, p));
}

async fn pull_task(c: Arc<Consumer>, p: Pull) {
    let end = tokio::time::Instant::now() + FIND_LEADER;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match find_role(&c, left).await {
            Role::Live => {
                c.queue_pull(p);
                return;
            }
            Role::Leader(_) if p.push => {
                // A push consumer's loop runs on every replica; the
                // leader's delivers. Here it just waits a round.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
            Role::Leader(l) => {
                let r = hub()
                    .forward_consumer(
                        &c.stream,
                        crate::replication::ConsumerCall::Pull {
                            consumer: c.name.clone(),
                            pull: WirePull::of(&p),
                        },
                        left.max(Duration::from_millis(100)),
                    )
                    .await;
                match r {
                    Ok(_) => return,
                    // Leadership moved meanwhile: look again (forward_consumer
                    // goes to whichever leader this node's group knows).
                    Err(crate::replication::ForwardFailed::NotLeader(_)) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(crate::replication::ForwardFailed::Other(e)) => {
                        debug!(consumer = %c.name, leader = %l, "forwarding a pull: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Role::NoGroup => {
                return refuse_pull(
                    &c,
                    &p,
                    "this node holds no copy of the replicated stream: consume through one of its replicas",
                )
            }
            Role::Unknown => {}
        }
        if tokio::time::Instant::now() >= end {
            return refuse_pull(&c, &p, "the replicated stream has no leader");
        }
    }
}

fn refuse_pull(c: &Consumer, p: &Pull, why: &str) {
    if p.push {
        return;
    }
    match p.flavor {
        Flavor::Native => send_status(&c.delivery, &p.reply, 503, why, p.batch),
        Flavor::Js => crate::jetstream::send_status(&c.delivery, &p.reply, 503, p.batch, 0),
    }
}

/// The leader's side of a forwarded pull.
pub(crate) async fn serve_forwarded_pull(
    c: Arc<Consumer>,
    pull: WirePull,
) -> Result<(), crate::replication::ForwardFailed> {
    match role(&c).await {
        Role::Live => {
            c.queue_pull(pull.into_pull());
            Ok(())
        }
        Role::Leader(l) => Err(crate::replication::ForwardFailed::NotLeader(Some(l))),
        _ => Err(crate::replication::ForwardFailed::NotLeader(None)),
    }
}

/// Sends a forwarded pull's messages to `node` for its client's `inbox`;
/// how many of them, in order, it delivered.
pub(super) async fn deliver_remote(
    c: &Consumer,
    node: &str,
    inbox: &str,
    batch: &[(crate::store::StoredMsg, u32)],
    acks: &[String],
) -> usize {
    let msgs = batch
        .iter()
        .zip(acks)
        .map(|((m, _), ack)| WireMsg {
            subject: m.subject().to_string(),
            ack: ack.clone(),
            headers: m.headers.to_vec(),
            payload: m.payload.to_vec(),
        })
        .collect();
    hub()
        .deliver_to(node, &c.stream, inbox, msgs, Duration::from_secs(5))
        .await
}

/// The asking node's side: the messages to its client's inbox.
pub(crate) fn deliver_here(d: &crate::deliver::Delivery, inbox: &str, msgs: &[WireMsg]) -> u64 {
    let (m, _) = d.router().compute(inbox);
    let mut out = d.batch(4);
    let mut n = 0;
    for w in msgs {
        let msg = crate::deliver::Outgoing {
            reply: Some(&w.ack),
            ..crate::deliver::Outgoing::new(&w.subject, None, &w.headers, &w.payload)
        };
        if out.redeliver(&m, &msg) == 0 {
            break;
        }
        n += 1;
    }
    out.finish();
    n
}

/// An ack (or nak, progress, term) of a replicated consumer.
pub(super) fn dispatch_ack(
    c: Arc<Consumer>,
    seq: u64,
    kind: AckKind,
    delay: Option<Duration>,
    reply: Option<String>,
) {
    let a = WireAck {
        seq,
        kind: kind_code(kind),
        delay_ns: delay.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        confirm: reply.is_some(),
    };
    tokio::spawn(ack_task(c, a, reply));
}

async fn ack_task(c: Arc<Consumer>, a: WireAck, reply: Option<String>) {
    match find_role(&c, FIND_LEADER).await {
        Role::Live => {
            let r = acks_live(&c, std::slice::from_ref(&a)).await;
            if let (Some(reply), Some(r)) = (reply, r.into_iter().next()) {
                answer_ack(&c, &reply, &r);
            }
        }
        Role::Leader(_) => {
            let r = repl(&c);
            r.fwd
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((a, reply));
            if !r.fwd_busy.swap(true, Ordering::AcqRel) {
                forward_acks(&c).await;
            }
        }
        Role::NoGroup => {
            if let Some(reply) = reply {
                answer_ack(
                    &c,
                    &reply,
                    &Err("this node holds no copy of the replicated stream".into()),
                );
            }
        }
        Role::Unknown => {
            if let Some(reply) = reply {
                answer_ack(
                    &c,
                    &reply,
                    &Err("the replicated stream has no leader".into()),
                );
            }
        }
    }
}

/// Sends the queued acks to the leader, as few calls as possible: what
/// queues while one call is out goes in the next.
async fn forward_acks(c: &Consumer) {
    let r = repl(c);
    loop {
        let batch = std::mem::take(&mut *r.fwd.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            r.fwd_busy.store(false, Ordering::Release);
            // One queued after the take and before the store: ours to send.
            let more = !r.fwd.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
            if more && !r.fwd_busy.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
        let acks: Vec<WireAck> = batch.iter().map(|(a, _)| a.clone()).collect();
        let end = tokio::time::Instant::now() + FIND_LEADER;
        let answers: Vec<Result<(), String>> = loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let res = hub()
                .forward_consumer(
                    &c.stream,
                    crate::replication::ConsumerCall::Acks {
                        consumer: c.name.clone(),
                        acks: acks.clone(),
                    },
                    left.max(Duration::from_millis(100)),
                )
                .await;
            match res {
                Ok(v) if v.len() == acks.len() => break v,
                Ok(_) => break vec![Err("the leader answered for other acks".into()); acks.len()],
                Err(e) if tokio::time::Instant::now() >= end => {
                    break vec![Err(e.to_string()); acks.len()]
                }
                Err(crate::replication::ForwardFailed::NotLeader(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(crate::replication::ForwardFailed::Other(e)) => {
                    // Not sent, or lost with its connection: an ack sent
                    // twice is harmless.
                    debug!(consumer = %c.name, "forwarding acks: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        };
        for ((_, reply), r) in batch.into_iter().zip(answers) {
            if let Some(reply) = reply {
                answer_ack(c, &reply, &r);
            }
        }
    }
}

/// The leader's side of forwarded acks.
pub(crate) async fn serve_forwarded_acks(
    c: Arc<Consumer>,
    acks: Vec<WireAck>,
) -> Result<Vec<Result<(), String>>, crate::replication::ForwardFailed> {
    match role(&c).await {
        Role::Live => Ok(acks_live(&c, &acks).await),
        Role::Leader(l) => Err(crate::replication::ForwardFailed::NotLeader(Some(l))),
        _ => Err(crate::replication::ForwardFailed::NotLeader(None)),
    }
}

/// Applies acks to the live state; those that asked for confirmation are
/// answered once their ops are committed, the others are proposed soon.
async fn acks_live(c: &Arc<Consumer>, acks: &[WireAck]) -> Vec<Result<(), String>> {
    let mut out: Vec<Result<(), String>> = acks.iter().map(|a| ack_live(c, a)).collect();
    let (epoch, upto) = repl(c).mark();
    if acks.iter().any(|a| a.confirm) {
        if let Err(e) = flush(c, epoch, upto).await {
            for r in out.iter_mut() {
                if r.is_ok() {
                    *r = Err(e.clone());
                }
            }
        }
    } else {
        let c = c.clone();
        tokio::spawn(async move {
            let _ = flush(&c, epoch, upto).await;
        });
    }
    out
}

fn ack_live(c: &Consumer, a: &WireAck) -> Result<(), String> {
    let kind = kind_of(a.kind);
    if let (AckKind::Nak, Some(ns)) = (kind, a.delay_ns) {
        c.nak_after_local(a.seq, Duration::from_nanos(ns));
        return Ok(());
    }
    if matches!(kind, AckKind::Ack | AckKind::Term) {
        let st = c.lock();
        // Delivered by a leader whose record of it never committed: this
        // leader will deliver it again, so it must not say it is acked.
        if a.seq >= st.next_seq && !st.pending.contains_key(&a.seq) {
            return Err(format!(
                "message {} was delivered by a former leader of the stream and will be delivered again; ack that delivery",
                a.seq
            ));
        }
    }
    c.ack_state(a.seq, kind);
    Ok(())
}

fn answer_ack(c: &Consumer, reply: &str, r: &Result<(), String>) {
    let body = match r {
        Ok(()) => br#"{"ok":true}"#.to_vec(),
        Err(e) => serde_json::to_vec(&serde_json::json!({
            "error": format!("cannot store the ack: {e}"),
            "status": 503,
        }))
        .unwrap_or_default(),
    };
    let _ = c.delivery.publish_now(reply, &[], &body);
}

/// Creates a durable consumer of a replicated stream through the group
/// (any node; forwarded to the leader), then returns it as this replica
/// has applied it.
pub(crate) async fn create(
    s: Arc<Stream>,
    cfg: super::ConsumerConfig,
    nats: Option<serde_json::Value>,
) -> Result<Arc<Consumer>, StreamError> {
    cfg.validate()?;
    let name = cfg
        .durable
        .clone()
        .ok_or_else(|| StreamError::BadRequest("a replicated consumer is durable".into()))?;
    // The start is parsed again by every replica; a bad one is refused here.
    super::parse_start(&s.log, &cfg.start)?;
    if let Some(c) = s.consumer(&name) {
        super::same_durable(&c, &cfg)?;
        return Ok(c);
    }
    if hub().group(&s.name).is_none() {
        return Err(not_a_replica(&s));
    }
    let storage = |e: String| StreamError::Storage {
        name: s.name.clone(),
        error: e,
    };
    let p = Proposal::encode(&Op::Consumers {
        changes: vec![ConsumerChange::Create {
            name: name.clone(),
            config: serde_json::to_string(&cfg).expect("serialisable"),
            nats: nats.map(|n| n.to_string()),
        }],
    });
    let applied = hub()
        .propose(&s, p, FIND_LEADER)
        .await
        .map_err(|e| storage(format!("the consumer was not created: {e}")))?;
    if let Some(e) = applied.error {
        return Err(StreamError::BadRequest(e));
    }
    wait_applied(&s, &name)
        .await
        .ok_or_else(|| storage("created, but not yet applied on this replica".into()))
}

/// The consumer once this replica has applied the entry that made it.
async fn wait_applied(s: &Stream, name: &str) -> Option<Arc<Consumer>> {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(c) = s.consumer(name) {
            return Some(c);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn not_a_replica(s: &Stream) -> StreamError {
    StreamError::BadRequest(format!(
        "this node holds no copy of replicated stream {}: use one of its replicas ({})",
        s.name,
        s.members().join(", ")
    ))
}

/// Deletes a durable consumer of a replicated stream on every replica.
pub(crate) async fn delete(s: Arc<Stream>, name: String) -> Result<(), StreamError> {
    if s.consumer(&name).is_none() {
        return Err(StreamError::ConsumerNotFound(name));
    }
    let p = Proposal::encode(&Op::Consumers {
        changes: vec![ConsumerChange::Delete { name: name.clone() }],
    });
    hub()
        .propose(&s, p, FIND_LEADER)
        .await
        .map_err(|e| StreamError::Storage {
            name: s.name.clone(),
            error: format!("the consumer was not deleted: {e}"),
        })?;
    Ok(())
}

/// The state machine's side: one batch of committed ops onto the committed
/// state, its op log, and (while this node does not serve it) the live state.
pub(super) fn apply_ops(c: &Consumer, ops: &[u8]) -> std::io::Result<CachedFile> {
    use std::io::Write;
    let r = repl(c);
    let mut com = r.committed();
    let live = com.live_term != 0;
    let mut st = (!live).then(|| c.lock());
    let now = Instant::now();
    let mut valid = 0;
    for rec in ops.chunks(super::OP_LEN) {
        let Some((kind, seq, n)) = super::read_op(rec) else {
            break;
        };
        valid += rec.len();
        let Committed {
            next_seq, pending, ..
        } = &mut *com;
        super::replay(next_seq, pending, kind, seq, n);
        if kind == b'D' {
            com.delivered += 1;
        }
        if let Some(st) = st.as_mut() {
            match kind {
                b'N' => st.next_seq = st.next_seq.max(seq),
                b'D' => {
                    st.pending.insert(
                        seq,
                        Pend {
                            deliveries: n,
                            deadline: now,
                        },
                    );
                    st.next_seq = st.next_seq.max(seq + 1);
                }
                _ => {
                    st.pending.remove(&seq);
                }
            }
        }
    }
    drop(st);
    let f = com.file.clone();
    f.open().and_then(|f| (&*f).write_all(&ops[..valid]))?;
    com.file_len += valid as u64;
    if com.file_len > super::COMPACT_AT {
        let b = super::state_ops(com.next_seq, com.pending.iter().map(|(s, n)| (*s, *n)));
        super::write_atomic(&com.path, &b)?;
        com.file = c
            .log
            .files()
            .file(com.path.clone(), crate::store::files::Mode::Append);
        com.file_len = b.len() as u64;
    }
    Ok(com.file.clone())
}
