//! The Raft channel: connections to a peer's cluster port opened with the
//! route handshake (TLS and cluster secret as for routes) and the
//! `CONNECT_RAFT` flag, then request/answer frames `[len u32][bincode]`,
//! one request at a time per connection. A pool per peer keeps idle
//! connections; openraft's replication, votes and forwarded proposals each
//! take one.
//!
//! The serving side refuses (closes) a connection whose frame is larger
//! than [`MAX_FRAME`] or does not decode: a peer sending garbage loses its
//! connection, never the group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::{hub, node_id, Applied, Hub, NodeId, Proposal, TypeConfig};
use crate::server::State;
use crate::transport::Transport;

/// Largest frame either side accepts.
pub(crate) const MAX_FRAME: usize = 64 << 20;
/// Idle connections kept per peer.
const IDLE_PER_PEER: usize = 8;

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Rpc {
    Append {
        group: String,
        req: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        group: String,
        req: VoteRequest<NodeId>,
    },
    Snapshot {
        group: String,
        req: InstallSnapshotRequest<TypeConfig>,
    },
    /// A writer round proposed by a node that does not lead the group.
    Forward { group: String, proposal: Proposal },
    /// The leader's view of its replicas (for `stream info` and readiness
    /// on the other nodes).
    Progress { group: String },
    /// A replicated consumer's pull or acks, for the leader to serve.
    Consumer {
        group: String,
        call: super::ConsumerCall,
    },
    /// Messages of a forwarded pull, for this node to deliver to its
    /// client's inbox (a route would match them by their own subjects).
    Deliver {
        group: String,
        inbox: String,
        msgs: Vec<crate::streams::consumer::repl::WireMsg>,
    },
    /// Create a replicated stream here (its config as JSON) with these members.
    Create {
        config: String,
        members: Vec<String>,
    },
    /// Which entries this node applies: answered with its
    /// [`ENTRY_LEVEL`](super::ENTRY_LEVEL). Keep it last: a node built
    /// before it cannot decode it and closes the connection, which the
    /// asker reads as "older".
    Level,
}

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum ForwardError {
    /// Not the leader; the leader's name when known.
    NotLeader(Option<String>),
    Failed(String),
}

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Forwarded(Result<Applied, ForwardError>),
    Done(Result<(), String>),
    /// Not the leader (None), or its last log index and each replica's matched index.
    Progress(Option<super::Progress>),
    /// The group is not running on the peer (yet).
    NoGroup,
    /// How many messages of a `Deliver`, in order, reached the client.
    Delivered(u64),
    /// A consumer call's answer: per ack, stored or why not.
    Consumer(Result<Vec<Result<(), String>>, ForwardError>),
    /// This node's [`ENTRY_LEVEL`](super::ENTRY_LEVEL).
    Level(u32),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// Nothing reached the peer (unknown, unreachable, handshake refused).
    #[error("{0}")]
    NotSent(String),
    #[error("{0}")]
    Io(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Idle connections by peer name.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Transport>>>,
}

async fn write_frame(t: &mut Transport, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    t.write_all(&out).await?;
    t.flush().await
}

async fn read_frame(t: &mut Transport, buf: &mut BytesMut) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if buf.len() >= 4 {
            let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(std::io::Error::other(format!(
                    "a Raft frame of {len} bytes (at most {MAX_FRAME})"
                )));
            }
            if buf.len() >= 4 + len {
                let f = buf.split_to(4 + len);
                return Ok(Some(f[4..].to_vec()));
            }
        }
        if t.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

impl Pool {
    /// One request to `peer` and its answer, within `within`.
    pub(crate) async fn call(
        &self,
        hub: &Hub,
        peer: &str,
        rpc: Rpc,
        within: Duration,
    ) -> Result<Reply, CallError> {
        let state = hub
            .state()
            .ok_or_else(|| CallError::NotSent("not in cluster mode".into()))?
            .clone();
        let body = bincode::serialize(&rpc).map_err(|e| CallError::NotSent(e.to_string()))?;
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(peer)
            .and_then(|v| v.pop());
        let r = tokio::time::timeout(within, async {
            let (mut t, fresh) = match idle {
                Some(t) => (t, false),
                None => {
                    let url = hub
                        .url_of(peer)
                        .ok_or_else(|| CallError::NotSent(format!("no route to {peer} yet")))?;
                    let t = crate::cluster::open_raft(&state, &url)
                        .await
                        .map_err(|e| CallError::NotSent(format!("{peer}: {e}")))?;
                    (t, true)
                }
            };
            let sent = write_frame(&mut t, &body).await;
            if let Err(e) = sent {
                // A pooled connection the peer closed: nothing was read.
                return Err(if fresh {
                    CallError::Io(e.to_string())
                } else {
                    CallError::NotSent(e.to_string())
                });
            }
            let mut buf = BytesMut::new();
            match read_frame(&mut t, &mut buf).await {
                Ok(Some(f)) => {
                    let reply: Reply =
                        bincode::deserialize(&f).map_err(|e| CallError::Io(e.to_string()))?;
                    Ok((reply, t))
                }
                Ok(None) => Err(CallError::Io("closed".into())),
                Err(e) => Err(CallError::Io(e.to_string())),
            }
        })
        .await;
        match r {
            Ok(Ok((reply, t))) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let v = idle.entry(peer.to_string()).or_default();
                if v.len() < IDLE_PER_PEER {
                    v.push(t);
                }
                Ok(reply)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CallError::Timeout(within)),
        }
    }
}

/// Serves a peer's Raft connection (after the cluster port's handshake).
pub(crate) async fn serve(state: Arc<State>, mut t: Transport, mut buf: BytesMut, peer: String) {
    let _ = state;
    loop {
        let f = match read_frame(&mut t, &mut buf).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                warn!(%peer, "closing a Raft connection: {e}");
                return;
            }
        };
        let rpc: Rpc = match bincode::deserialize(&f) {
            Ok(r) => r,
            Err(e) => {
                warn!(%peer, "closing a Raft connection: undecodable request: {e}");
                return;
            }
        };
        let reply = answer(rpc).await;
        let body = match bincode::serialize(&reply) {
            Ok(b) => b,
            Err(e) => {
                warn!(%peer, "cannot encode a Raft answer: {e}");
                return;
            }
        };
        if let Err(e) = write_frame(&mut t, &body).await {
            debug!(%peer, "Raft connection: {e}");
            return;
        }
    }
}

async fn answer(rpc: Rpc) -> Reply {
    let h = hub();
    match rpc {
        Rpc::Append { group, req } => match h.group(&group) {
            Some(g) => Reply::Append(g.raft.append_entries(req).await),
            None => Reply::NoGroup,
        },
        Rpc::Vote { group, req } => match h.group(&group) {
            // A damaged replica being repaired may have acknowledged
            // entries it no longer holds: its vote could elect a leader
            // lacking them (repair.rs).
            Some(g) if g.repairing() => {
                let vote = g.raft.metrics().borrow().vote;
                Reply::Vote(Ok(VoteResponse::new(vote, None, false)))
            }
            Some(g) => Reply::Vote(g.raft.vote(req).await),
            None => Reply::NoGroup,
        },
        Rpc::Snapshot { group, req } => match h.group(&group) {
            Some(g) => {
                // Counted done on drop too (this future cancelled).
                let _rx = super::SnapshotChunk::new(&g);
                Reply::Snapshot(g.raft.install_snapshot(req).await)
            }
            None => Reply::NoGroup,
        },
        Rpc::Forward { group, proposal } => match h.group(&group) {
            Some(g) => {
                use openraft::error::ClientWriteError;
                match g.raft.client_write(proposal).await {
                    Ok(r) => Reply::Forwarded(Ok(r.data)),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        Reply::Forwarded(Err(ForwardError::NotLeader(
                            f.leader_node.map(|n| n.addr),
                        )))
                    }
                    Err(e) => Reply::Forwarded(Err(ForwardError::Failed(e.to_string()))),
                }
            }
            None => Reply::Forwarded(Err(ForwardError::NotLeader(None))),
        },
        Rpc::Progress { group } => Reply::Progress(h.group(&group).and_then(|g| g.progress())),
        Rpc::Create { config, members } => Reply::Done(create_here(&config, &members).await),
        Rpc::Level => Reply::Level(super::ENTRY_LEVEL),
        Rpc::Consumer { group, call } => Reply::Consumer(consumer_call(&group, call).await),
        Rpc::Deliver { group, inbox, msgs } => {
            let d = h.state().and_then(|st| st.streams.get(&group));
            Reply::Delivered(match d {
                Some(s) => crate::streams::consumer::repl::deliver_here(&s.delivery, &inbox, &msgs),
                None => 0,
            })
        }
    }
}

/// The leader's side of a replicated consumer's forwarded pull or acks.
async fn consumer_call(
    group: &str,
    call: super::ConsumerCall,
) -> Result<Vec<Result<(), String>>, ForwardError> {
    use crate::streams::consumer::repl;
    let h = hub();
    let name = match &call {
        super::ConsumerCall::Pull { consumer, .. } | super::ConsumerCall::Acks { consumer, .. } => {
            consumer
        }
    };
    let c = h
        .state()
        .and_then(|st| st.streams.get(group))
        .and_then(|s| s.consumer(name))
        .ok_or_else(|| {
            ForwardError::Failed(format!("no consumer {name} of stream {group} here"))
        })?;
    let r = match call {
        super::ConsumerCall::Pull { pull, .. } => repl::serve_forwarded_pull(c, pull)
            .await
            .map(|()| Vec::new()),
        super::ConsumerCall::Acks { acks, .. } => repl::serve_forwarded_acks(c, acks).await,
    };
    r.map_err(|e| match e {
        super::ForwardFailed::NotLeader(l) => ForwardError::NotLeader(l),
        super::ForwardFailed::Other(e) => ForwardError::Failed(e),
    })
}

/// A peer created a replicated stream: create it here too (or update the
/// members of the one here).
async fn create_here(config: &str, members: &[String]) -> Result<(), String> {
    let h = hub();
    let state = h.state().ok_or("not in cluster mode")?.clone();
    let cfg: sockbus_protocol::api::StreamConfig =
        serde_json::from_str(config).map_err(|e| e.to_string())?;
    let name = cfg.name.clone();
    let members = members.to_vec();
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.streams.create_replica(cfg, &members))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let me = state.config.node_id.clone();
    if h.group(&name).is_none() {
        if let Some(s) = state.streams.get(&name) {
            if s.members().contains(&me) {
                h.open_group(&s);
                if h.wait_group(&name, Duration::from_secs(5)).await.is_none() {
                    return Err(format!("the group of {name} did not start on {me}"));
                }
            }
        }
    }
    Ok(())
}

/// openraft's view of the channel to one peer of one group.
pub(crate) struct Factory {
    pub group: String,
}

pub(crate) struct Client {
    group: String,
    peer: String,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Client;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Client {
        Client {
            group: self.group.clone(),
            peer: node.addr.clone(),
            target,
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Client {
    async fn send<E>(&self, rpc: Rpc, option: &RPCOption) -> Result<Reply, RpcErr<E>>
    where
        E: std::error::Error,
    {
        debug_assert_eq!(self.target, node_id(&self.peer));
        match hub()
            .pool
            .call(hub(), &self.peer, rpc, option.hard_ttl())
            .await
        {
            Ok(Reply::NoGroup) => {
                // A member that lost its data (or never got the stream):
                // give it the stream again, then it catches up from the log.
                hub().recreate_on(&self.group, &self.peer);
                Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!(
                        "{} has no group {} yet",
                        self.peer, self.group
                    )),
                )))
            }
            Ok(r) => Ok(r),
            Err(CallError::NotSent(e)) => Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(e),
            ))),
            Err(e) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(e.to_string()),
            ))),
        }
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            BasicNode::new(&self.peer),
            e,
        ))
    }

    fn unexpected<E: std::error::Error>(&self, r: Reply) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
            "unexpected answer from {}: {r:?}",
            self.peer
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let rpc = Rpc::Append {
            group: self.group.clone(),
            req,
        };
        match self.send(rpc, &option).await? {
            Reply::Append(Ok(r)) => Ok(r),
            Reply::Append(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let rpc = Rpc::Snapshot {
            group: self.group.clone(),
            req,
        };
        match self.send(rpc, &option).await? {
            Reply::Snapshot(Ok(r)) => Ok(r),
            Reply::Snapshot(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let rpc = Rpc::Vote {
            group: self.group.clone(),
            req,
        };
        match self.send(rpc, &option).await? {
            Reply::Vote(Ok(r)) => Ok(r),
            Reply::Vote(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }
}
