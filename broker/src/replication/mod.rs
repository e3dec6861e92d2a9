//! Replicated streams: one Raft group (openraft) per stream with
//! `replicas` > 1, on that many of the cluster's nodes.
//!
//! Every node of the cluster holds the stream (its config and its capture
//! of local publishes); the group's members also hold its messages. A
//! stream's writer (streams/replicated.rs) turns everything queued since
//! its last round into one Raft entry (group commit), proposes it to the
//! leader (forwarded over the Raft channel when this node is not the
//! leader) and acks the publishers once the entry is committed (a quorum
//! has it in its Raft log, fsynced with `fsync = always`) and applied by
//! the leader. Every member applies committed entries into the stream's
//! own log (`sm`), Msg-Id dedupe included, so the window is part of the
//! replicated state.
//!
//! Raft RPCs travel on connections to the peers' cluster port, opened with
//! the route handshake (TLS and the cluster secret as for routes) and the
//! [`CONNECT_RAFT`](sockbus_protocol::frame::CONNECT_RAFT) flag (`net`).
//! The Raft log and vote live next to the stream (`log`).

mod log;
mod net;
mod repair;
mod sm;
mod snap;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use sockbus_protocol::api::{PeerInfo, StreamCluster, StreamConfig};
use tracing::{info, warn};

use crate::server::State;
use crate::streams::Stream;

pub(crate) use net::serve;

/// Node ids are a hash of the broker's `--node-id`; [`BasicNode::addr`] holds the name.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The stream groups' Raft types.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        SnapshotData = tokio::fs::File,
);

/// One Raft entry's payload: an rkyv-encoded [`Op`]. Serialised as bytes
/// (one copy), not as a sequence of `u8` (one call per byte: measured at
/// 7-11 % of a broker's CPU under R3 publish); bincode writes both the
/// same way, so logs and peers of either kind read each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposal(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What an entry does to the stream.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub enum Op {
    /// A writer round: records (encoded by store::record, unsealed) one
    /// after the other, each one's length and Msg-Id, stamped `ts` by the
    /// proposer so every replica stores the same timestamps.
    Publish {
        ts: u64,
        recs: Vec<u8>,
        lens: Vec<u32>,
        ids: Vec<Option<String>>,
    },
    /// Durable consumers' state changes, in the order the stream's leader
    /// made them (streams::consumer::repl): applied by every replica, so
    /// the one that leads next serves the consumer where it was.
    Consumers { changes: Vec<ConsumerChange> },
    /// The leader's clock at `ts` (nanoseconds): `max_age` is measured
    /// against it on every replica (sm.rs), so an idle stream's old
    /// messages expire at the same entry everywhere.
    Expire { ts: u64 },
    /// A purge (`$SB.API.STREAM.PURGE`, JetStream's `STREAM.PURGE`), as
    /// its request's JSON: every replica removes the same messages at this
    /// entry (streams::writer::purge_log). Answered with the count in
    /// `Applied::acks[0].0`.
    Purge { req: String },
    /// New limits (`max_msgs`, `max_bytes`, `max_age`) or description of
    /// the stream, its whole configuration as JSON: every replica cuts by
    /// the old limits, then saves and takes the new configuration, at
    /// this entry (sm.rs).
    Update { config: String },
    /// Deletes message `seq` (JetStream's `STREAM.MSG.DELETE`) on every
    /// replica at this entry. Answered with `Applied::acks[0].0`: 1 when
    /// the stream held it, else 0. Entry level 2 ([`ENTRY_LEVEL`]).
    Delete { seq: u64 },
}

/// The newest kind of entry this build writes and applies. An entry a
/// replica cannot decode stops its group on that node (it never skips an
/// entry: its copy would differ from the others'), so a leader proposes
/// an entry of a newer level only once every member has answered that it
/// applies it ([`Hub::members_apply`]). During a rolling upgrade the
/// entries of the old level go on as before; the new ones are refused
/// with an error that names the member still on an older build.
///
/// - 1: `Publish`, `Consumers`, `Expire`, `Purge`, `Update`.
/// - 2: `Delete`.
pub const ENTRY_LEVEL: u32 = 2;

impl Op {
    /// The [`ENTRY_LEVEL`] a replica needs to apply this entry.
    pub fn level(&self) -> u32 {
        match self {
            Op::Delete { .. } => 2,
            _ => 1,
        }
    }
}

/// One change to a replicated stream's durable consumers.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub enum ConsumerChange {
    /// A new durable consumer: its ConsumerConfig and (created through
    /// `$JS.API`) its JetStream configuration, as JSON. Every replica
    /// computes its start from its own copy of the stream, which is the
    /// same at this entry on every replica.
    Create {
        name: String,
        config: String,
        nats: Option<String>,
    },
    Delete {
        name: String,
    },
    /// Ops in the consumer op log's 17-byte encoding (`N`, `D`, `A`, `T`;
    /// docs/storage.md), one batch of the leader's deliveries and acks.
    Ops {
        name: String,
        ops: Vec<u8>,
    },
}

impl Proposal {
    pub fn encode(op: &Op) -> Proposal {
        Proposal(
            rkyv::to_bytes::<rkyv::rancor::Error>(op)
                .expect("an Op always serialises")
                .to_vec(),
        )
    }

    pub fn decode(&self) -> Result<Op, String> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(self.0.len());
        aligned.extend_from_slice(&self.0);
        rkyv::from_bytes::<Op, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
    }
}

/// What applying an entry answered: per message, its sequence and whether
/// it duplicated an earlier one (Msg-Id); an error refuses the whole entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub acks: Vec<(u64, bool)>,
    pub error: Option<String>,
}

/// A replicated consumer's pull or acks, forwarded to the stream's leader
/// (streams::consumer::repl).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum ConsumerCall {
    Pull {
        consumer: String,
        pull: crate::streams::consumer::repl::WirePull,
    },
    Acks {
        consumer: String,
        acks: Vec<crate::streams::consumer::repl::WireAck>,
    },
}

/// Why a forwarded consumer call did not get its answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardFailed {
    /// Not (or no longer) the leader; the leader's name when known.
    #[error("not the stream's leader")]
    NotLeader(Option<String>),
    #[error("{0}")]
    Other(String),
}

/// This node's view of a name: the id Raft knows it by.
pub fn node_id(name: &str) -> NodeId {
    // FNV-1a, stable across builds and platforms.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A stopped group starts again at most this often ...
const RESTART_EVERY: Duration = Duration::from_secs(5);
/// ... and only with this much free on its disk (more than the Raft log
/// writes ahead at once).
const RESTART_FREE: u64 = 32 << 20;

/// Raft entries between snapshots (the Raft log is purged up to each).
const SNAPSHOT_EVERY: u64 = 4096;

/// `SOCKBUS_RAFT_SNAPSHOT_EVERY` overrides [`SNAPSHOT_EVERY`] (tests and
/// tuning); at least 16.
fn snapshot_every() -> u64 {
    std::env::var("SOCKBUS_RAFT_SNAPSHOT_EVERY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(SNAPSHOT_EVERY, |n| n.max(16))
}

/// Heartbeat interval and election timeout range, in ms. A follower
/// refuses votes for as long as the leader lease (openraft sets it to the
/// largest election timeout) after it last heard from the leader, and
/// stands itself after the lease plus its election timeout: a dead leader
/// is replaced after `max + [min, max]`, checked on openraft's tick (1.5
/// heartbeats). 100/400/700 gives 1.3-1.5 s under load where 200/600/1000
/// gave 1.9-2.2 s (docs/benchmarks.md, "Failover under load"); a follower
/// still waits 1.1 s without a heartbeat before it stands.
/// `SOCKBUS_RAFT_TIMING=HB,MIN,MAX` overrides them (tuning; MIN at least 3
/// heartbeats, MAX above MIN).
fn raft_timing() -> (u64, u64, u64) {
    const DEFAULT: (u64, u64, u64) = (100, 400, 700);
    let Ok(v) = std::env::var("SOCKBUS_RAFT_TIMING") else {
        return DEFAULT;
    };
    let n: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match n[..] {
        [hb, min, max] if hb > 0 && min >= 3 * hb && max > min => (hb, min, max),
        _ => {
            tracing::warn!("SOCKBUS_RAFT_TIMING={v:?} ignored: it takes HB,MIN,MAX in ms with MIN >= 3*HB and MAX > MIN");
            DEFAULT
        }
    }
}

/// Timings: [`raft_timing`]. A snapshot every
/// `snapshot_every()` applied entries, and the Raft log purged up to a
/// quarter of that before it: the Raft log holds at most about 1.25 times
/// that many entries (plus those not yet applied). A replica behind the
/// purged part catches up through a snapshot (sm.rs, snap.rs).
fn raft_config(elect: bool) -> Arc<Config> {
    let every = snapshot_every();
    let (heartbeat, elect_min, elect_max) = raft_timing();
    let c = Config {
        // Off while a damaged replica is repaired (repair.rs).
        enable_elect: elect,
        cluster_name: "sockbus".into(),
        heartbeat_interval: heartbeat,
        election_timeout_min: elect_min,
        election_timeout_max: elect_max,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(every),
        max_in_snapshot_log_to_keep: every / 4,
        purge_batch_size: (every / 4).max(1),
        // Also the threshold past which a follower is sent a snapshot.
        replication_lag_threshold: every * 2,
        // One chunk per Raft frame (net::MAX_FRAME is 64 MiB).
        snapshot_max_chunk_size: 1 << 20,
        // Per chunk; the last one waits for the whole install (the stream
        // written out on the receiver), so generous.
        install_snapshot_timeout: 60_000,
        max_payload_entries: 64,
        ..Default::default()
    };
    Arc::new(c.validate().expect("a valid Raft config"))
}

/// One stream's group on this node.
pub(crate) struct Group {
    pub raft: Raft<TypeConfig>,
    pub members: Vec<String>,
    /// A snapshot being received here (see [`Group::receiving_snapshot`]).
    snap_rx: Mutex<SnapRx>,
    /// Being repaired after damage (repair.rs): refuses votes, no elections.
    repairing: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct SnapRx {
    /// Elections are off because of it.
    on: bool,
    /// Chunk RPCs being handled (the last one waits for the install).
    inflight: usize,
    last: Option<std::time::Instant>,
}

/// One snapshot chunk being handled: [`Group::receiving_snapshot`] on
/// creation and on drop.
pub(crate) struct SnapshotChunk(Arc<Group>);

impl SnapshotChunk {
    pub(crate) fn new(g: &Arc<Group>) -> SnapshotChunk {
        g.receiving_snapshot(true);
        SnapshotChunk(g.clone())
    }
}

impl Drop for SnapshotChunk {
    fn drop(&mut self) {
        self.0.receiving_snapshot(false);
    }
}

/// Elections come back this long after the last snapshot chunk.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// The leader's last log index and each member's matched index.
pub(crate) type Progress = (u64, Vec<(String, Option<u64>)>);

impl Group {
    fn new(raft: Raft<TypeConfig>, members: Vec<String>, repairing: bool) -> Group {
        Group {
            raft,
            members,
            snap_rx: Mutex::new(SnapRx::default()),
            repairing: repairing.into(),
        }
    }

    /// A damaged replica not yet repaired: it must not vote (net.rs answers
    /// vote requests with a refusal) nor campaign.
    pub(crate) fn repairing(&self) -> bool {
        self.repairing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The repair is done: votes and elections again (elections once a
    /// snapshot being received is done, see [`Group::receiving_snapshot`]).
    fn repaired(&self) {
        let rx = self.snap_rx.lock().unwrap_or_else(|p| p.into_inner());
        self.repairing
            .store(false, std::sync::atomic::Ordering::Release);
        if !rx.on {
            self.raft.runtime_config().elect(true);
        }
    }

    /// A snapshot chunk from the leader is being handled (`start`) or was
    /// (`!start`). openraft 0.9 renews a follower's leader lease only on
    /// AppendEntries, and the leader sends it none while it streams it a
    /// snapshot: a transfer (or install) longer than the election timeout
    /// would make this replica, whose log is behind (it cannot win), call
    /// elections that depose the leader and restart the transfer, over and
    /// over. So elections stay off here while chunks keep coming and the
    /// install runs, and come back [`SNAPSHOT_QUIET`] after the last one. It
    /// still votes: the up-to-date replicas elect a leader if this one dies.
    pub(crate) fn receiving_snapshot(self: &Arc<Self>, start: bool) {
        let mut rx = self.snap_rx.lock().unwrap_or_else(|p| p.into_inner());
        if start {
            rx.inflight += 1;
        } else {
            rx.inflight = rx.inflight.saturating_sub(1);
        }
        rx.last = Some(std::time::Instant::now());
        if rx.on {
            return;
        }
        rx.on = true;
        drop(rx);
        self.raft.runtime_config().elect(false);
        let g = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let mut rx = g.snap_rx.lock().unwrap_or_else(|p| p.into_inner());
                let quiet = rx.last.is_none_or(|l| l.elapsed() >= SNAPSHOT_QUIET);
                if rx.inflight == 0 && quiet {
                    rx.on = false;
                    // A replica being repaired campaigns only once repaired.
                    if !g.repairing() {
                        g.raft.runtime_config().elect(true);
                    }
                    drop(rx);
                    return;
                }
            }
        });
    }

    /// The voters and learners by name, from the group's membership.
    pub(crate) fn names(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().clone();
        let names: Vec<String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect();
        if names.is_empty() {
            self.members.clone()
        } else {
            names
        }
    }

    pub(crate) fn name_of(&self, id: NodeId) -> Option<String> {
        self.names().into_iter().find(|n| node_id(n) == id)
    }

    /// On the leader: its last log index and each member's matched index.
    pub(crate) fn progress(&self) -> Option<Progress> {
        let m = self.raft.metrics().borrow().clone();
        let rep = m.replication.as_ref()?;
        let last = m.last_log_index.unwrap_or(0);
        Some((
            last,
            self.names()
                .iter()
                .map(|n| {
                    let id = node_id(n);
                    let matched = if id == m.id {
                        Some(last)
                    } else {
                        rep.get(&id).map(|l| l.map_or(0, |l| l.index))
                    };
                    (n.clone(), matched)
                })
                .collect(),
        ))
    }
}

/// The leader's progress as a follower last heard it.
#[derive(Clone)]
struct Heard {
    at: std::time::Instant,
    last: u64,
    matched: Vec<(String, Option<u64>)>,
}

/// Entries a replica may be behind and still count as caught up (`/readyz`).
const READY_LAG: u64 = 64;

/// The broker's replication: its identity, the peers it knows, its groups.
pub(crate) struct Hub {
    state: OnceLock<Arc<State>>,
    /// Peer node name -> cluster URL, learned when a route's handshake answers.
    peers: Mutex<BTreeMap<String, String>>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    /// Followers: the leader's progress, polled every second.
    heard: Mutex<HashMap<String, Heard>>,
    /// Groups whose Raft is being started.
    starting: Mutex<std::collections::HashSet<String>>,
    /// Per stream: repairs of a damaged copy done here since start-up.
    repairs: Mutex<HashMap<String, u64>>,
    /// Per peer: the highest entry level it answered (`members_apply`).
    levels: Mutex<HashMap<String, u32>>,
    /// Per stream: when its group here last started again after it
    /// stopped ([`Hub::restart_stopped`]).
    stopped: Mutex<HashMap<String, std::time::Instant>>,
    pool: net::Pool,
}

static HUB: OnceLock<Arc<Hub>> = OnceLock::new();

/// The process's hub (one broker per process uses replication).
pub(crate) fn hub() -> &'static Arc<Hub> {
    HUB.get_or_init(|| {
        Arc::new(Hub {
            state: OnceLock::new(),
            peers: Mutex::new(BTreeMap::new()),
            groups: Mutex::new(HashMap::new()),
            starting: Mutex::new(Default::default()),
            repairs: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            levels: Mutex::new(HashMap::new()),
            stopped: Mutex::new(HashMap::new()),
            pool: net::Pool::default(),
        })
    })
}

/// An entry handed to the leader's Raft core ([`Hub::submit`]).
pub(crate) struct Submitted {
    rx: tokio::sync::oneshot::Receiver<openraft::raft::ClientWriteResult<TypeConfig>>,
    p: Proposal,
    at: tokio::time::Instant,
    got: Option<SubmitAnswer>,
}

type SubmitAnswer = Result<
    Result<openraft::raft::ClientWriteResult<TypeConfig>, tokio::sync::oneshot::error::RecvError>,
    tokio::time::error::Elapsed,
>;

impl Submitted {
    /// Waits until the core answered or `within` of handing it over went
    /// by. Cancel-safe: [`Submitted::wait`] takes the answer.
    pub(crate) async fn ready(&mut self, within: Duration) {
        if self.got.is_none() {
            let r = tokio::time::timeout_at(self.at + within, &mut self.rx).await;
            self.got = Some(r);
        }
    }

    /// The entry committed and applied, or why not. Refused because
    /// leadership moved meanwhile (nothing was appended), the proposal goes
    /// through [`Hub::propose`] (to the new leader) instead.
    pub(crate) async fn wait(mut self, s: &Stream, within: Duration) -> Result<Applied, String> {
        self.ready(within).await;
        match self.got.take().expect("ready sets it") {
            Ok(Ok(Ok(r))) => Ok(r.data),
            Ok(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => {
                let left = within.saturating_sub(self.at.elapsed());
                hub().propose(s, self.p, left).await
            }
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) => Err("the stream's Raft group stopped".into()),
            Err(_) => Err("replication timed out".into()),
        }
    }
}

/// Why a replicated publish or create failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("replicated streams need cluster mode (--cluster and --peers)")]
    NoCluster,
    #[error("{0}")]
    Other(String),
}

impl Hub {
    /// Called once the cluster starts: groups of streams already opened start now.
    pub(crate) fn start(&self, state: Arc<State>) {
        if self.state.set(state.clone()).is_ok() {
            tokio::spawn(poll_progress());
        }
        for s in state.streams.list_streams() {
            if s.replicas > 1 {
                self.open_group(&s);
            }
        }
    }

    pub(crate) fn state(&self) -> Option<&Arc<State>> {
        self.state.get()
    }

    pub(crate) fn me(&self) -> Option<String> {
        self.state.get().map(|s| s.config.node_id.clone())
    }

    /// Whether every member of `s`'s group applies entries of `level`
    /// ([`ENTRY_LEVEL`]): each other member is asked (`Rpc::Level`). A
    /// member on a build from before levels closes the connection on the
    /// question. One that does not answer within 2 s (down, partitioned)
    /// is vouched for by what it answered before since this broker
    /// started; never asked, it cannot be, and the answer names it.
    pub(crate) async fn members_apply(&self, s: &Stream, level: u32) -> Result<(), String> {
        if level <= 1 {
            return Ok(());
        }
        let me = self.me().unwrap_or_default();
        for m in s.members().into_iter().filter(|m| *m != me) {
            let r = self
                .pool
                .call(self, &m, net::Rpc::Level, Duration::from_secs(2))
                .await;
            let known = |levels: &Mutex<HashMap<String, u32>>| {
                levels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&m)
                    .copied()
            };
            let l = match r {
                Ok(net::Reply::Level(l)) => {
                    self.levels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m.clone(), l);
                    l
                }
                Ok(_) => return Err(format!("replica {m} gave an unexpected answer")),
                Err(e) => match known(&self.levels) {
                    Some(l) => l,
                    None => {
                        return Err(format!(
                            "replica {m} cannot confirm that it applies this change (an older sockbus build, or unreachable: {e}); upgrade or restore it first"
                        ))
                    }
                },
            };
            if l < level {
                return Err(format!(
                    "replica {m} runs a sockbus build that applies entries up to level {l}, this needs {level}: finish the upgrade of every replica first"
                ));
            }
        }
        Ok(())
    }

    /// A route's handshake named a peer at `url`.
    pub(crate) fn learn(&self, name: &str, url: &str) {
        let mut p = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if p.get(name).map(String::as_str) != Some(url) {
            p.insert(name.to_string(), url.to_string());
        }
    }

    pub(crate) fn url_of(&self, name: &str) -> Option<String> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn known_nodes(&self) -> Vec<String> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn group(&self, stream: &str) -> Option<Arc<Group>> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()
    }

    /// This node leads the stream's group.
    pub(crate) fn leads(&self, stream: &str) -> bool {
        self.group(stream)
            .is_some_and(|g| g.raft.metrics().borrow().state == ServerState::Leader)
    }

    /// Picks the members of a new replicated stream: this node and the
    /// first others by name. Errors when the cluster has too few nodes.
    pub(crate) fn place(&self, replicas: u32) -> Result<Vec<String>, ReplError> {
        let me = self.me().ok_or(ReplError::NoCluster)?;
        let mut members = vec![me.clone()];
        let others: Vec<String> = self.known_nodes();
        members.extend(
            others
                .iter()
                .filter(|n| **n != me)
                .take(replicas as usize - 1)
                .cloned(),
        );
        if members.len() < replicas as usize {
            return Err(ReplError::Other(format!(
                "replicas {replicas} needs {replicas} nodes connected; this node sees {} ({})",
                members.len(),
                members.join(", ")
            )));
        }
        Ok(members)
    }

    /// After the stream was created here: creates it on every known peer,
    /// then initialises its group. `members` from [`Hub::place`].
    pub(crate) async fn create_everywhere(
        &self,
        cfg: &StreamConfig,
        members: &[String],
    ) -> Result<(), ReplError> {
        let me = self.me().ok_or(ReplError::NoCluster)?;
        let json = serde_json::to_string(cfg).expect("serialisable");
        for peer in self.known_nodes() {
            if peer == me {
                continue;
            }
            let r = self
                .pool
                .call(
                    self,
                    &peer,
                    net::Rpc::Create {
                        config: json.clone(),
                        members: members.to_vec(),
                    },
                    Duration::from_secs(10),
                )
                .await;
            match r {
                Ok(net::Reply::Done(Ok(()))) => {}
                Ok(net::Reply::Done(Err(e))) if members.contains(&peer) => {
                    return Err(ReplError::Other(format!("{peer}: {e}")))
                }
                Ok(other) if members.contains(&peer) => {
                    return Err(ReplError::Other(format!("{peer}: {other:?}")))
                }
                Err(e) if members.contains(&peer) => {
                    return Err(ReplError::Other(format!("{peer}: {e}")))
                }
                _ => warn!(stream = %cfg.name, %peer, "a non-member did not take the stream"),
            }
        }
        // Its Raft starts on a task (after the stream's copy is checked).
        let g = self
            .wait_group(&cfg.name, Duration::from_secs(10))
            .await
            .ok_or_else(|| ReplError::Other("the group did not start".into()))?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|m| (node_id(m), BasicNode::new(m)))
            .collect();
        match g.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(e) => Err(ReplError::Other(format!("initialise: {e}"))),
        }
    }

    /// Starts the stream's group on this node when it is a member (members
    /// are kept in `<stream>/raft/members`).
    pub(crate) fn open_group(&self, s: &Arc<Stream>) {
        let Some(me) = self.me() else {
            // Started by `start` once the cluster runs.
            return;
        };
        let dir = s.dir().join("raft");
        let members: Vec<String> = match std::fs::read(dir.join("members")) {
            Ok(b) => String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => return,
        };
        if !members.contains(&me) {
            return;
        }
        if self.group(&s.name).is_some()
            || !self
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(s.name.clone())
        {
            return;
        }
        let name = s.name.clone();
        let net = net::Factory {
            group: name.clone(),
        };
        let id = node_id(&me);
        let s = s.clone();
        tokio::spawn(async move {
            // Blocking: the damage check reads every sealed segment.
            let opened = tokio::task::spawn_blocking(move || {
                let fsync = s.config().fsync == crate::streams::Fsync::Always;
                let (store, marker) = repair::prepare(&s, &dir, fsync)
                    .map_err(|e| format!("cannot open the Raft log: {e}"))?;
                let sm = sm::StateMachine::open(s.clone(), &dir)
                    .map_err(|e| format!("cannot open the stream's state machine: {e}"))?;
                Ok::<_, String>((store, sm, marker, dir))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match opened {
                Err(e) => warn!(stream = %name, "{e}"),
                Ok((store, sm, marker, dir)) => {
                    let repairing = marker.is_some();
                    match Raft::new(id, raft_config(!repairing), net, store, sm).await {
                        Ok(raft) => {
                            info!(stream = %name, members = ?members, repairing, "replicated stream's group started");
                            let g = Arc::new(Group::new(raft, members, repairing));
                            hub()
                                .groups
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name.clone(), g.clone());
                            if let Some(m) = marker {
                                tokio::spawn(repair::watch(name.clone(), g, dir, m));
                            }
                        }
                        Err(e) => warn!(stream = %name, "the Raft group failed to start: {e}"),
                    }
                }
            }
            hub()
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
    }

    /// Waits (bounded) for the stream's group to be running here.
    pub(crate) async fn wait_group(&self, stream: &str, within: Duration) -> Option<Arc<Group>> {
        let end = tokio::time::Instant::now() + within;
        loop {
            if let Some(g) = self.group(stream) {
                return Some(g);
            }
            if tokio::time::Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops a deleted stream's group.
    pub(crate) fn close_group(&self, stream: &str) {
        let g = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
        if let Some(g) = g {
            tokio::spawn(async move {
                let _ = g.raft.shutdown().await;
            });
        }
    }

    /// Proposes one writer round and waits for it to be committed and
    /// applied: through the local group when this node leads, else
    /// forwarded to the leader. Retries while no leader is known or the
    /// proposal went to a node that is not the leader (nothing was
    /// appended then); a proposal that may have been appended is never
    /// retried here (the publisher's retry with its Msg-Id is).
    pub(crate) async fn propose(
        &self,
        s: &Stream,
        p: Proposal,
        within: Duration,
    ) -> Result<Applied, String> {
        let name = &s.name;
        let end = tokio::time::Instant::now() + within;
        let members = s.members();
        let mut hint: Option<String> = None;
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            if tokio::time::Instant::now() >= end {
                return Err(format!(
                    "no leader of replicated stream {name} answered within {within:?}"
                ));
            }
            let local = self.group(name);
            let me = self.me().unwrap_or_default();
            let target = match (&local, &hint) {
                (_, Some(h)) if *h != me => Some(h.clone()),
                (Some(g), _) => {
                    let m = g.raft.metrics().borrow().clone();
                    match (m.state, m.current_leader) {
                        (ServerState::Leader, _) => None,
                        (_, Some(l)) => g.name_of(l).or_else(|| Some(String::new())),
                        (_, None) => Some(String::new()),
                    }
                }
                // Not a member: ask the members in turn.
                (None, _) => members
                    .get(attempt % members.len().max(1))
                    .cloned()
                    .or_else(|| Some(String::new())),
            };
            hint = None;
            match target {
                None => {
                    let g = local.expect("leader has a group");
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(left, g.raft.client_write(p.clone())).await {
                        Ok(Ok(r)) => return Ok(r.data),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                            hint = f.leader_node.map(|n| n.addr);
                        }
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => return Err("replication timed out".into()),
                    }
                }
                Some(t) if t.is_empty() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Some(t) => {
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    let r = self
                        .pool
                        .call(
                            self,
                            &t,
                            net::Rpc::Forward {
                                group: name.clone(),
                                proposal: p.clone(),
                            },
                            left,
                        )
                        .await;
                    match r {
                        Ok(net::Reply::Forwarded(Ok(a))) => return Ok(a),
                        Ok(net::Reply::Forwarded(Err(net::ForwardError::NotLeader(l)))) => {
                            hint = l;
                            if hint.is_none() {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        Ok(net::Reply::Forwarded(Err(net::ForwardError::Failed(e)))) => {
                            return Err(e)
                        }
                        Ok(other) => return Err(format!("unexpected answer {other:?}")),
                        Err(net::CallError::NotSent(_)) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
    }

    /// On the stream's leader: hands `p` to the local Raft core without
    /// waiting for it to be committed, so a writer can have several
    /// entries in flight; they are appended in the order handed over.
    /// `p` back when this node does not lead the stream (then [`Hub::propose`]).
    pub(crate) async fn submit(&self, stream: &str, p: Proposal) -> Result<Submitted, Proposal> {
        let Some(g) = self.group(stream) else {
            return Err(p);
        };
        if g.raft.metrics().borrow().state != ServerState::Leader {
            return Err(p);
        }
        let at = tokio::time::Instant::now();
        match g.raft.client_write_ff(p.clone()).await {
            Ok(rx) => Ok(Submitted {
                rx,
                p,
                at,
                got: None,
            }),
            Err(_) => Err(p),
        }
    }

    /// Sends a replicated consumer's pull or acks to the stream's leader
    /// as this node knows it; per ack, whether it is stored.
    pub(crate) async fn forward_consumer(
        &self,
        stream: &str,
        call: ConsumerCall,
        within: Duration,
    ) -> Result<Vec<Result<(), String>>, ForwardFailed> {
        let g = self
            .group(stream)
            .ok_or_else(|| ForwardFailed::Other("this node is not a replica".into()))?;
        let m = g.raft.metrics().borrow().clone();
        let leader = m
            .current_leader
            .filter(|l| *l != m.id)
            .and_then(|l| g.name_of(l))
            .ok_or(ForwardFailed::NotLeader(None))?;
        let rpc = net::Rpc::Consumer {
            group: stream.to_string(),
            call,
        };
        match self.pool.call(self, &leader, rpc, within).await {
            Ok(net::Reply::Consumer(Ok(v))) => Ok(v),
            Ok(net::Reply::Consumer(Err(net::ForwardError::NotLeader(l)))) => {
                Err(ForwardFailed::NotLeader(l))
            }
            Ok(net::Reply::Consumer(Err(net::ForwardError::Failed(e)))) => {
                Err(ForwardFailed::Other(e))
            }
            Ok(other) => Err(ForwardFailed::Other(format!(
                "unexpected answer from {leader}: {other:?}"
            ))),
            Err(e) => Err(ForwardFailed::Other(format!("{leader}: {e}"))),
        }
    }

    /// Hands a forwarded pull's messages to the node whose client asked;
    /// how many (in order) it delivered.
    pub(crate) async fn deliver_to(
        &self,
        node: &str,
        stream: &str,
        inbox: &str,
        msgs: Vec<crate::streams::consumer::repl::WireMsg>,
        within: Duration,
    ) -> usize {
        let rpc = net::Rpc::Deliver {
            group: stream.to_string(),
            inbox: inbox.to_string(),
            msgs,
        };
        match self.pool.call(self, node, rpc, within).await {
            Ok(net::Reply::Delivered(n)) => usize::try_from(n).unwrap_or(0),
            Ok(other) => {
                warn!(%node, "unexpected answer to a delivery: {other:?}");
                0
            }
            Err(e) => {
                warn!(%node, "cannot hand a consumer's messages over: {e}");
                0
            }
        }
    }

    /// A damaged copy of `stream` was repaired here.
    fn count_repair(&self, stream: &str) {
        *self
            .repairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(stream.to_string())
            .or_default() += 1;
    }

    /// For `/metrics`: per replicated stream with a group here, the repairs
    /// done since start-up and whether one is under way.
    pub(crate) fn repair_stats(&self) -> Vec<(String, u64, bool)> {
        let groups: Vec<(String, bool)> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, g)| (k.clone(), g.repairing()))
            .collect();
        let repairs = self.repairs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64, bool)> = groups
            .into_iter()
            .map(|(k, r)| {
                let n = repairs.get(&k).copied().unwrap_or(0);
                (k, n, r)
            })
            .collect();
        out.sort();
        out
    }

    /// A damaged record was found in a running replica's copy (a read or
    /// a check met it): its group stops and starts again, which empties
    /// the copy and repairs it from the peers (repair.rs).
    fn restart_damaged(&self, name: &str) {
        self.restart_group(
            name,
            "damaged records found in this replica's copy: its group restarts to repair it from its peers",
        );
    }

    /// The group's Raft core here stopped (a storage error: a full disk, a
    /// failed write or fsync): it starts again from what is on disk and
    /// catches up from its peers, once the data directory has
    /// [`RESTART_FREE`] bytes free and at most every [`RESTART_EVERY`] (a
    /// replica on a full disk would otherwise stop again at once, and as
    /// a candidate it could win an election it cannot serve).
    fn restart_stopped(&self, name: &str, s: &Stream, why: &str) {
        let now = std::time::Instant::now();
        {
            let mut last = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
            if last
                .get(name)
                .is_some_and(|t| now.duration_since(*t) < RESTART_EVERY)
            {
                return;
            }
            let free = crate::store::free_bytes(s.dir()).unwrap_or(u64::MAX);
            if free < RESTART_FREE {
                warn!(stream = %name, free, "this replica's Raft group stopped ({why}); it starts again once the disk has room");
                last.insert(name.to_string(), now);
                return;
            }
            last.insert(name.to_string(), now);
        }
        self.restart_group(
            name,
            &format!("this replica's Raft group stopped ({why}): it starts again and catches up from its peers"),
        );
    }

    /// Stops the stream's group here (if running) and opens it again.
    fn restart_group(&self, name: &str, why: &str) {
        if !self
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("repair\n{name}"))
        {
            return;
        }
        let g = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let name = name.to_string();
        let why = why.to_string();
        tokio::spawn(async move {
            let h = hub();
            if let Some(g) = g {
                warn!(stream = %name, "{why}");
                let _ = g.raft.shutdown().await;
            }
            if let Some(s) = h.state().and_then(|st| st.streams.get(&name)) {
                h.open_group(&s);
            }
            h.starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&format!("repair\n{name}"));
        });
    }

    /// `/readyz`: every group here has a leader and this replica is at
    /// most [`READY_LAG`] entries behind it (as the leader last said).
    pub(crate) fn ready(&self) -> Result<(), String> {
        let groups: Vec<(String, Arc<Group>)> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let me = self.me().unwrap_or_default();
        let mut behind = Vec::new();
        for (name, g) in groups {
            if g.repairing() {
                behind.push(format!("{name}: damaged copy being repaired"));
                continue;
            }
            let m = g.raft.metrics().borrow().clone();
            if m.state == ServerState::Leader {
                continue;
            }
            if m.current_leader.is_none() {
                behind.push(format!("{name}: no leader"));
                continue;
            }
            let heard = self
                .heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
            match heard {
                Some(h) if h.at.elapsed() < Duration::from_secs(5) => {
                    let mine = h.matched.iter().find(|(n, _)| *n == me).and_then(|x| x.1);
                    match mine {
                        Some(x) if h.last.saturating_sub(x) <= READY_LAG => {}
                        x => behind.push(format!(
                            "{name}: {} of {} entries replicated here",
                            x.unwrap_or(0),
                            h.last
                        )),
                    }
                }
                _ => behind.push(format!("{name}: no word from the leader")),
            }
        }
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!("replicas catching up: {}", behind.join(", ")))
        }
    }

    /// The group as this node sees it, for `stream info`.
    pub(crate) fn cluster_info(&self, s: &Stream) -> StreamCluster {
        let members = s.members();
        let Some(g) = self.group(&s.name) else {
            return StreamCluster {
                leader: None,
                term: 0,
                committed: 0,
                replicas: members
                    .into_iter()
                    .map(|name| PeerInfo {
                        name,
                        ..Default::default()
                    })
                    .collect(),
            };
        };
        let m = g.raft.metrics().borrow().clone();
        let name_of = |id: NodeId| g.name_of(id);
        let leader = m.current_leader.and_then(name_of);
        let last = m.last_log_index.unwrap_or(0);
        let replication = m.replication.clone();
        let me = self.me().unwrap_or_default();
        if replication.is_none() {
            let heard = self
                .heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&s.name)
                .cloned();
            if let Some(h) = heard.filter(|h| h.at.elapsed() < Duration::from_secs(5)) {
                return StreamCluster {
                    replicas: h
                        .matched
                        .iter()
                        .map(|(n, x)| PeerInfo {
                            name: n.clone(),
                            matched: *x,
                            lag: x.map(|x| h.last.saturating_sub(x)),
                            leader: leader.as_deref() == Some(n.as_str()),
                        })
                        .collect(),
                    leader,
                    term: m.current_term,
                    committed: m.last_applied.map_or(0, |l| l.index),
                };
            }
        }
        let replicas = g
            .names()
            .iter()
            .map(|n| {
                let id = node_id(n);
                let matched = if *n == me {
                    Some(last)
                } else {
                    replication
                        .as_ref()
                        .and_then(|r| r.get(&id))
                        .map(|l| l.map_or(0, |l| l.index))
                };
                PeerInfo {
                    name: n.clone(),
                    matched,
                    lag: if replication.is_some() || *n == me {
                        matched.map(|x| last.saturating_sub(x))
                    } else {
                        None
                    },
                    leader: leader.as_deref() == Some(n.as_str()),
                }
            })
            .collect();
        StreamCluster {
            leader,
            term: m.current_term,
            committed: m.last_applied.map_or(0, |l| l.index),
            replicas,
        }
    }

    /// Sends a member that has no group for `stream` the stream again (at
    /// most one such call per peer and stream at a time).
    pub(crate) fn recreate_on(&self, stream: &str, peer: &str) {
        let key = format!("{stream}\n{peer}");
        if !self
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let Some(s) = self.state.get().and_then(|st| st.streams.get(stream)) else {
            self.starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            return;
        };
        let json = serde_json::to_string(&*s.config()).expect("serialisable");
        let members = s.members();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let h = hub();
            let r = h
                .pool
                .call(
                    h,
                    &peer,
                    net::Rpc::Create {
                        config: json,
                        members,
                    },
                    Duration::from_secs(10),
                )
                .await;
            match r {
                Ok(net::Reply::Done(Ok(()))) => {
                    info!(stream = %s.name, %peer, "gave a replica that had lost it the stream again")
                }
                other => {
                    warn!(stream = %s.name, %peer, "could not give a replica the stream: {other:?}")
                }
            }
            // Not again for a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
            h.starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// Replaces member `old` of a stream's group by `new` (a node gone for
    /// good by a fresh one): adds `new` as a learner, waits for it to catch
    /// up, then changes the voters. Run on the leader (forwarded otherwise
    /// by the caller).
    pub(crate) async fn replace_peer(
        &self,
        stream: &str,
        old: &str,
        new: &str,
    ) -> Result<(), String> {
        let g = self
            .group(stream)
            .ok_or_else(|| format!("this node is not a member of {stream}'s group"))?;
        let s = self
            .state
            .get()
            .and_then(|st| st.streams.get(stream))
            .ok_or_else(|| format!("no stream {stream}"))?;
        let mut members = s.members();
        let Some(i) = members.iter().position(|m| m == old) else {
            return Err(format!("{old} is not a replica of {stream}"));
        };
        members[i] = new.to_string();
        // The new node needs the stream (and the members list naming it).
        let json = serde_json::to_string(&*s.config()).expect("serialisable");
        match self
            .pool
            .call(
                self,
                new,
                net::Rpc::Create {
                    config: json,
                    members: members.clone(),
                },
                Duration::from_secs(10),
            )
            .await
        {
            Ok(net::Reply::Done(Ok(()))) => {}
            Ok(other) => return Err(format!("{new}: {other:?}")),
            Err(e) => return Err(format!("{new}: {e}")),
        }
        g.raft
            .add_learner(node_id(new), BasicNode::new(new), true)
            .await
            .map_err(|e| e.to_string())?;
        let voters: BTreeSet<NodeId> = members.iter().map(|m| node_id(m)).collect();
        g.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        s.set_members(&members).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Checks a replicated stream's copy here when it opens and empties it
/// when damaged (repair.rs); its group repairs it once it starts.
pub(crate) fn check_copy(s: &Arc<Stream>) {
    let dir = s.dir().join("raft");
    if !dir.join("members").exists() {
        return;
    }
    let fsync = s.config().fsync == crate::streams::Fsync::Always;
    if let Err(e) = repair::check_stream(s, &dir, fsync) {
        warn!(stream = %s.name, "cannot check this replica's copy of the stream: {e}");
    }
}

/// Purges a replicated stream: one `Op::Purge` entry through its group
/// (forwarded to the leader), answered once applied with the number of
/// messages removed. Blocks: call from a blocking thread of the runtime.
pub(crate) fn purge(
    s: &Stream,
    req: &sockbus_protocol::api::PurgeRequest,
) -> Result<u64, crate::streams::StreamError> {
    use crate::streams::StreamError;
    let failed = |error: String| StreamError::Storage {
        name: s.name.clone(),
        error,
    };
    let json = serde_json::to_string(req).map_err(|e| failed(e.to_string()))?;
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| failed("no runtime to reach the group".into()))?;
    let p = Proposal::encode(&Op::Purge { req: json });
    let a = rt
        .block_on(hub().propose(s, p, Duration::from_secs(10)))
        .map_err(|e| failed(format!("not replicated: {e}")))?;
    match (a.error, a.acks.first()) {
        (Some(e), _) => Err(StreamError::BadRequest(e)),
        (None, Some((n, _))) => Ok(*n),
        (None, None) => Err(failed("the group answered no count".into())),
    }
}

/// Deletes message `seq` of a replicated stream: one `Op::Delete` entry
/// through its group, once every member has said it applies it (an entry
/// of level 2: see [`ENTRY_LEVEL`]). True when the stream held it.
/// Blocks: call from a blocking thread of the runtime.
pub(crate) fn delete_msg(s: &Stream, seq: u64) -> Result<bool, crate::streams::StreamError> {
    use crate::streams::StreamError;
    let failed = |error: String| StreamError::Storage {
        name: s.name.clone(),
        error,
    };
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| failed("no runtime to reach the group".into()))?;
    let op = Op::Delete { seq };
    rt.block_on(hub().members_apply(s, op.level()))
        .map_err(|e| {
            StreamError::BadRequest(format!("cannot delete message {seq} of {}: {e}", s.name))
        })?;
    let a = rt
        .block_on(hub().propose(s, Proposal::encode(&op), Duration::from_secs(10)))
        .map_err(|e| failed(format!("not replicated: {e}")))?;
    match (a.error, a.acks.first()) {
        (Some(e), _) => Err(StreamError::BadRequest(e)),
        (None, Some((n, _))) => Ok(*n == 1),
        (None, None) => Err(failed("the group answered no count".into())),
    }
}

/// Changes a replicated stream's limits or description: one `Op::Update`
/// entry through its group, answered once applied by the leader and here
/// (waited for at most 10 s on a replica; a node that holds no replica
/// saves it itself).
/// Blocks: call from a blocking thread of the runtime.
pub(crate) fn update(s: &Stream, cfg: &StreamConfig) -> Result<(), crate::streams::StreamError> {
    use crate::streams::StreamError;
    let failed = |error: String| StreamError::Storage {
        name: s.name.clone(),
        error,
    };
    let json = serde_json::to_string(cfg).map_err(|e| failed(e.to_string()))?;
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| failed("no runtime to reach the group".into()))?;
    let p = Proposal::encode(&Op::Update { config: json });
    let a = rt
        .block_on(hub().propose(s, p, Duration::from_secs(10)))
        .map_err(|e| failed(format!("not replicated: {e}")))?;
    if let Some(e) = a.error {
        return Err(StreamError::BadRequest(e));
    }
    if hub().group(&s.name).is_none() {
        s.set_replicated_config(cfg.clone())
            .map_err(|e| failed(format!("cannot save the new configuration: {e}")))?;
        return Ok(());
    }
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while *s.config() != *cfg && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The members file of a stream created replicated here or by a peer.
pub(crate) fn write_members(dir: &std::path::Path, members: &[String]) -> std::io::Result<()> {
    let raft = dir.join("raft");
    std::fs::create_dir_all(&raft)?;
    crate::streams::write_atomic(&raft.join("members"), members.join("\n").as_bytes())
}

/// Followers ask each group's leader for its progress every second.
async fn poll_progress() {
    let h = hub();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let groups: Vec<(String, Arc<Group>)> = h
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, g) in groups {
            let stream = h.state().and_then(|st| st.streams.get(&name));
            let damaged = stream.as_ref().is_some_and(|s| s.log.lock().lost > 0);
            if damaged {
                h.restart_damaged(&name);
                continue;
            }
            let m = g.raft.metrics().borrow().clone();
            if let (Err(fatal), Some(s)) = (&m.running_state, &stream) {
                h.restart_stopped(&name, s, &fatal.to_string());
                continue;
            }
            if m.state == ServerState::Leader {
                continue;
            }
            let Some(leader) = m.current_leader.and_then(|l| g.name_of(l)) else {
                continue;
            };
            let r = h
                .pool
                .call(
                    h,
                    &leader,
                    net::Rpc::Progress {
                        group: name.clone(),
                    },
                    Duration::from_secs(1),
                )
                .await;
            if let Ok(net::Reply::Progress(Some((last, matched)))) = r {
                h.heard.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    name,
                    Heard {
                        at: std::time::Instant::now(),
                        last,
                        matched,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Proposal {
        Proposal(
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect(),
        )
    }

    /// Entries as builds of level 1 wrote them (encoded before `Delete`
    /// existed): a replica upgraded first still applies what the others
    /// propose during a rolling upgrade, and what its own Raft log holds.
    #[test]
    fn entries_written_by_a_level_1_build_still_decode() {
        let publish = "0102030003000000010000006d31ffffffffffff0000000000000000000000000700000000000000d8ffffff03000000d4ffffff01000000d0ffffff01000000";
        match hex(publish).decode().unwrap() {
            Op::Publish {
                ts,
                recs,
                lens,
                ids,
            } => {
                assert_eq!((ts, recs, lens), (7, vec![1, 2, 3], vec![3]));
                assert_eq!(ids, vec![Some("m1".to_string())]);
            }
            o => panic!("{o:?}"),
        }
        let consumers = "0100000063ffffffffffffff000000000000000000000000000000000000000001000000dcffffff0100000000000000000000000000000000000000000000000000000000000000";
        match hex(consumers).decode().unwrap() {
            Op::Consumers { changes } => {
                assert!(matches!(&changes[..], [ConsumerChange::Delete { name }] if name == "c"))
            }
            o => panic!("{o:?}"),
        }
        let expire =
            "02000000000000000900000000000000000000000000000000000000000000000000000000000000";
        assert!(matches!(
            hex(expire).decode().unwrap(),
            Op::Expire { ts: 9 }
        ));
        let purge =
            "030000007b7dffffffffffff00000000000000000000000000000000000000000000000000000000";
        assert!(matches!(hex(purge).decode().unwrap(), Op::Purge { req } if req == "{}"));
        let update =
            "040000007b7dffffffffffff00000000000000000000000000000000000000000000000000000000";
        assert!(matches!(hex(update).decode().unwrap(), Op::Update { config } if config == "{}"));
        for h in [publish, consumers, expire, purge, update] {
            assert_eq!(hex(h).decode().unwrap().level(), 1);
        }
    }

    /// What a replica of an older build sees of an entry kind it does not
    /// know: an error (sm.rs then stops the group there), never another op.
    #[test]
    fn a_proposal_is_written_as_before_it_was_serialised_as_bytes() {
        // What a build that serialised the payload as a sequence of u8 wrote
        // into its Raft log and sent its peers.
        let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let old = bincode::serialize(&payload).unwrap();
        let p = Proposal(payload.clone());
        assert_eq!(bincode::serialize(&p).unwrap(), old);
        let back: Proposal = bincode::deserialize(&old).unwrap();
        assert_eq!(back.0, payload);
    }

    #[test]
    fn an_entry_of_an_unknown_kind_does_not_decode() {
        let d = Proposal::encode(&Op::Delete { seq: 5 });
        assert!(matches!(d.decode().unwrap(), Op::Delete { seq: 5 }));
        assert_eq!(Op::Delete { seq: 5 }.level(), ENTRY_LEVEL);
        let mut newer = d.clone();
        newer.0[0] = 6;
        assert!(newer.decode().is_err(), "{:?}", newer.decode());
        let mut garbage = d;
        garbage.0[0] = 0xff;
        assert!(garbage.decode().is_err());
    }
}
