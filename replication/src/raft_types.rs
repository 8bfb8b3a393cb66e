//! The openraft type configuration of the manifest Raft group, and short aliases for its types.

use std::fmt;
use std::io::Cursor;

use serde::Deserialize;
use serde::Serialize;

use crate::manifest::ManifestCommand;
use crate::manifest::ManifestResponse;

openraft::declare_raft_types!(
    /// Raft types of the manifest group: commands are [`ManifestCommand`], node ids are `u64`
    /// and snapshots travel as in-memory JSON bytes.
    pub TypeConfig:
        D = ManifestCommand,
        R = ManifestResponse,
        NodeId = u64,
        Node = ClusterNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Node = ClusterNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;

/// A member of the manifest's Raft group as the membership records it: where peers reach it
/// over QUIC (Raft, file transfer), where clients reach it over HTTP, and an operator's name.
///
/// Compatibility: logs and snapshots written before the cluster stored `openraft::BasicNode`
/// (`{"addr": "<http address>"}`); those decode with `http_addr` = that address and no QUIC
/// address (a standalone node needs none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub quic_addr: String,
    #[serde(default, alias = "addr")]
    pub http_addr: String,
    /// "writer", "reader" or "replica-only"; empty (older records) means writer.
    #[serde(default)]
    pub role: String,
}

impl ClusterNode {
    pub fn new(
        name: impl Into<String>,
        quic_addr: impl Into<String>,
        http_addr: impl Into<String>,
    ) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            quic_addr: quic_addr.into(),
            http_addr: http_addr.into(),
            role: String::new(),
        }
    }
}

impl ClusterNode {
    /// Whether the node takes writes (writers, and records from before roles existed).
    pub fn is_writer(&self) -> bool {
        self.role.is_empty() || self.role == "writer"
    }
}

impl fmt::Display for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (quic {}, http {})",
            self.name, self.quic_addr, self.http_addr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks that the membership format written before the cluster (openraft's BasicNode)
    // still decodes, so existing Raft logs and snapshots load.
    #[test]
    fn basic_node_records_decode() {
        let node: ClusterNode = serde_json::from_str(r#"{"addr":"127.0.0.1:7000"}"#).unwrap();
        assert_eq!(node, ClusterNode::new("", "", "127.0.0.1:7000"));
        let round: ClusterNode =
            serde_json::from_str(&serde_json::to_string(&node).unwrap()).unwrap();
        assert_eq!(round, node);
    }
}
