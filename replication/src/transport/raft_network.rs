//! openraft's network over the QUIC [`Transport`]: [`QuicNetwork`] sends append-entries, vote and
//! snapshot-chunk RPCs as calls, and [`RaftServer`] answers them with the local Raft handle.
//!
//! Encoding: append-entries and vote requests and every response are JSON (openraft's serde
//! types). A snapshot chunk is `[header length u32 BE][JSON header][raw chunk bytes]`, so the
//! snapshot's bytes are not inflated by JSON. A peer may only send RPCs in its own name: the
//! server refuses a request whose vote names another node than the certificate of the stream.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RaftNetwork;
use openraft::RaftNetworkFactory;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;

use super::CallHandler;
use super::StreamKind;
use super::Transport;
use super::TransportError;
use crate::raft_types::Node;
use crate::raft_types::NodeId;
use crate::raft_types::Raft;
use crate::raft_types::SnapshotMeta;
use crate::raft_types::TypeConfig;
use crate::raft_types::Vote;

/// The QUIC address peers dial a member at, read from its membership entry (a host name is
/// resolved).
pub fn node_quic_addr(node: &Node) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = node.quic_addr.parse() {
        return Ok(addr);
    }
    node.quic_addr
        .to_socket_addrs()
        .map_err(|e| format!("member QUIC address {:?}: {e}", node.quic_addr))?
        .next()
        .ok_or_else(|| {
            format!(
                "member QUIC address {:?} resolves to nothing",
                node.quic_addr
            )
        })
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("node {target}: {reason}")]
    Address { target: NodeId, reason: String },
    #[error("encode request: {0}")]
    Encode(serde_json::Error),
    #[error("decode response: {0}")]
    Decode(serde_json::Error),
}

/// The Raft network factory: one [`QuicPeer`] per target, all sharing the transport.
#[derive(Clone)]
pub struct QuicNetwork {
    transport: Transport,
}

impl QuicNetwork {
    pub fn new(transport: Transport) -> QuicNetwork {
        QuicNetwork { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = QuicPeer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> QuicPeer {
        QuicPeer {
            transport: self.transport.clone(),
            target,
            addr: node_quic_addr(node),
        }
    }
}

/// The client side of Raft RPCs to one peer.
pub struct QuicPeer {
    transport: Transport,
    target: NodeId,
    addr: Result<SocketAddr, String>,
}

impl fmt::Debug for QuicPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicPeer")
            .field("target", &self.target)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

/// The longest pause of replication to an unreachable peer.
const UNREACHABLE_PAUSE_MAX: Duration = Duration::from_secs(2);

impl QuicPeer {
    /// Sends one encoded request and decodes the peer's `Result<Resp, RaftError<E>>`, mapping
    /// failures so openraft backs off from unreachable peers and retries slow ones.
    async fn rpc<Resp, E>(
        &self,
        kind: StreamKind,
        action: RPCTypes,
        request: Vec<u8>,
        timeout: Duration,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr = match &self.addr {
            Ok(addr) => *addr,
            Err(reason) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &PeerError::Address {
                        target: self.target,
                        reason: reason.clone(),
                    },
                )))
            }
        };
        let answer = match self
            .transport
            .call(self.target, addr, kind, request, timeout)
            .await
        {
            Ok(answer) => answer,
            Err(TransportError::Timeout { .. }) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.transport.node_id(),
                    target: self.target,
                    timeout,
                }))
            }
            Err(error) if error.is_unreachable() => {
                return Err(RPCError::Unreachable(Unreachable::new(&PeerError::from(
                    error,
                ))))
            }
            Err(error) => {
                return Err(RPCError::Network(NetworkError::new(&PeerError::from(
                    error,
                ))))
            }
        };
        let decoded: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&PeerError::Decode(e))))?;
        decoded.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, PeerError> {
    serde_json::to_vec(value).map_err(PeerError::Encode)
}

fn network_error<E: std::error::Error>(error: PeerError) -> RPCError<NodeId, Node, E> {
    RPCError::Network(NetworkError::new(&error))
}

impl RaftNetwork<TypeConfig> for QuicPeer {
    /// Replication to an unreachable peer pauses 250 ms, doubling up to 2 s, instead of
    /// openraft's constant 500 ms: a node that is down costs an attempt (and a log line) every
    /// two seconds, and one that comes back hears the leader well within its election timeout,
    /// before it would campaign and disturb the cluster.
    fn backoff(&self) -> openraft::network::Backoff {
        let pauses = (0..).map(|attempt: u32| {
            Duration::from_millis(250u64.saturating_mul(1 << attempt.min(5)))
                .min(UNREACHABLE_PAUSE_MAX)
        });
        openraft::network::Backoff::new(pauses)
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let request = encode(&rpc).map_err(network_error)?;
        self.rpc(
            StreamKind::RaftAppend,
            RPCTypes::AppendEntries,
            request,
            option.hard_ttl(),
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let request = encode_snapshot_chunk(rpc).map_err(network_error)?;
        self.rpc(
            StreamKind::RaftSnapshot,
            RPCTypes::InstallSnapshot,
            request,
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        let request = encode(&rpc).map_err(network_error)?;
        self.rpc(
            StreamKind::RaftVote,
            RPCTypes::Vote,
            request,
            option.hard_ttl(),
        )
        .await
    }
}

/// Everything of a snapshot chunk but its bytes.
#[derive(Serialize, Deserialize)]
struct ChunkHeader {
    vote: Vote,
    meta: SnapshotMeta,
    offset: u64,
    done: bool,
}

fn encode_snapshot_chunk(rpc: InstallSnapshotRequest<TypeConfig>) -> Result<Vec<u8>, PeerError> {
    let header = encode(&ChunkHeader {
        vote: rpc.vote,
        meta: rpc.meta,
        offset: rpc.offset,
        done: rpc.done,
    })?;
    let header_len = u32::try_from(header.len()).map_err(|_| {
        PeerError::Transport(TransportError::TooLarge {
            what: "snapshot chunk header",
            limit: u32::MAX as usize,
        })
    })?;
    let mut frame = Vec::with_capacity(4 + header.len() + rpc.data.len());
    frame.extend_from_slice(&header_len.to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&rpc.data);
    Ok(frame)
}

fn decode_snapshot_chunk(frame: &[u8]) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
    let (len, rest) = frame
        .split_first_chunk::<4>()
        .ok_or_else(|| "snapshot chunk shorter than its header length".to_owned())?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(format!(
            "snapshot chunk header of {len} bytes exceeds the {} bytes sent",
            rest.len()
        ));
    }
    let (header, data) = rest.split_at(len);
    let header: ChunkHeader =
        serde_json::from_slice(header).map_err(|e| format!("snapshot chunk header: {e}"))?;
    Ok(InstallSnapshotRequest {
        vote: header.vote,
        meta: header.meta,
        offset: header.offset,
        data: data.to_vec(),
        done: header.done,
    })
}

/// Answers peers' Raft RPCs with the local Raft handle. Register it once Raft exists; until
/// then peers see "no handler" and treat this node as unreachable.
#[derive(Clone)]
pub struct RaftServer {
    raft: Raft,
}

impl RaftServer {
    pub fn new(raft: Raft) -> RaftServer {
        RaftServer { raft }
    }

    /// Serves append-entries, vote and snapshot streams of `transport` with this Raft handle.
    pub fn register(self, transport: &Transport) {
        for kind in [
            StreamKind::RaftAppend,
            StreamKind::RaftVote,
            StreamKind::RaftSnapshot,
        ] {
            transport.set_call_handler(
                kind,
                Arc::new(RaftRpc {
                    raft: self.raft.clone(),
                    kind,
                }),
            );
        }
    }
}

struct RaftRpc {
    raft: Raft,
    kind: StreamKind,
}

/// Refuses a request whose vote names another node than the authenticated peer.
fn check_sender(peer: NodeId, vote: &Vote) -> Result<(), String> {
    match vote.leader_id().voted_for() {
        Some(node) if node == peer => Ok(()),
        named => Err(format!(
            "peer {peer} sent a request in the name of node {named:?}"
        )),
    }
}

fn answer<T: Serialize>(result: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(result).map_err(|e| format!("encode response: {e}"))
}

impl CallHandler for RaftRpc {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> {
        let raft = self.raft.clone();
        let kind = self.kind;
        Box::pin(async move {
            match kind {
                StreamKind::RaftAppend => {
                    let rpc: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&request)
                        .map_err(|e| format!("decode append-entries: {e}"))?;
                    check_sender(peer, &rpc.vote)?;
                    answer(&raft.append_entries(rpc).await)
                }
                StreamKind::RaftVote => {
                    let rpc: VoteRequest<NodeId> = serde_json::from_slice(&request)
                        .map_err(|e| format!("decode vote: {e}"))?;
                    check_sender(peer, &rpc.vote)?;
                    answer(&raft.vote(rpc).await)
                }
                StreamKind::RaftSnapshot => {
                    let rpc = decode_snapshot_chunk(&request)?;
                    check_sender(peer, &rpc.vote)?;
                    answer(&raft.install_snapshot(rpc).await)
                }
                other => Err(format!("{other:?} is not a Raft RPC")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunk_round_trips_and_rejects_truncation() {
        // The chunk framing carries raw bytes beside a JSON header; a truncated frame must be an
        // error, never a chunk with wrong bytes.
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new(3, 2),
            meta: SnapshotMeta::default(),
            offset: 4096,
            data: (0..=255u8).collect(),
            done: false,
        };
        let frame = encode_snapshot_chunk(rpc.clone()).unwrap();
        assert_eq!(decode_snapshot_chunk(&frame).unwrap(), rpc);
        assert!(decode_snapshot_chunk(&frame[..3]).is_err());
        let header_len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert!(decode_snapshot_chunk(&frame[..4 + header_len - 1]).is_err());
    }

    #[test]
    fn requests_in_another_nodes_name_are_refused() {
        // A member must not be able to campaign or lead in another member's name.
        assert!(check_sender(2, &Vote::new(5, 2)).is_ok());
        assert!(check_sender(2, &Vote::new(5, 3)).is_err());
    }
}
