//! The seam between Raft and the transport to peers. A standalone node has no peers, so its
//! network reports every peer unreachable; the QUIC transport replaces it by implementing the
//! same openraft traits and passing its factory to
//! [`ManifestService::start_with_network`](crate::ManifestService::start_with_network).

use openraft::error::InstallSnapshotError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RaftNetwork;
use openraft::RaftNetworkFactory;

use crate::raft_types::Node;
use crate::raft_types::NodeId;
use crate::raft_types::TypeConfig;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("node {target} is unreachable: this node has no peer transport")]
    NoTransport { target: NodeId },
}

/// Network factory for a node without peers.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnreachableNetwork;

/// A client to one peer that fails every RPC with [`Unreachable`], so openraft backs off.
#[derive(Debug, Clone, Copy)]
pub struct UnreachablePeer {
    target: NodeId,
}

impl UnreachablePeer {
    fn error<E: std::error::Error>(&self) -> RPCError<NodeId, Node, E> {
        RPCError::Unreachable(Unreachable::new(&NetworkError::NoTransport {
            target: self.target,
        }))
    }
}

impl RaftNetworkFactory<TypeConfig> for UnreachableNetwork {
    type Network = UnreachablePeer;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> UnreachablePeer {
        UnreachablePeer { target }
    }
}

impl RaftNetwork<TypeConfig> for UnreachablePeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        Err(self.error())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.error())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        Err(self.error())
    }
}
