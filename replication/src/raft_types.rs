//! The openraft type configuration of the manifest Raft group, and short aliases for its types.

use std::io::Cursor;

use crate::manifest::ManifestCommand;
use crate::manifest::ManifestResponse;

openraft::declare_raft_types!(
    /// Raft types of the manifest group: commands are [`ManifestCommand`], node ids are `u64`
    /// and snapshots travel as in-memory JSON bytes.
    pub TypeConfig:
        D = ManifestCommand,
        R = ManifestResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type StorageError = openraft::StorageError<NodeId>;
