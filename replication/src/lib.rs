//! shale-replication: the Raft-committed file manifest (openraft) and, later, peer transport,
//! file transfer and anti-entropy.
//!
//! Invariant: nothing here knows about SQL or HTTP. Boundary: [`ManifestService`] (owns the
//! control thread), [`ManifestClient`] (any thread, any async runtime) and the manifest data
//! types in [`manifest`]; [`network`] is the seam the QUIC transport will plug into.

pub mod antientropy;
pub mod cluster;
pub mod control;
mod durable;
pub mod files;
pub mod log_store;
pub mod manifest;
pub mod network;
pub mod raft_types;
pub mod state_machine;
pub mod transport;
pub mod verify;
pub mod version;
pub mod wal_stream;

pub use control::CommitReceipt;
pub use control::ManifestClient;
pub use control::ManifestConfig;
pub use control::ManifestError;
pub use control::ManifestMetrics;
pub use control::ManifestService;
pub use manifest::ColumnDeclaration;
pub use manifest::FileEntry;
pub use manifest::Manifest;
pub use manifest::ManifestCommand;
pub use manifest::ManifestResponse;
pub use manifest::NodeState;
pub use manifest::Rejection;
pub use version::ManifestVersion;
