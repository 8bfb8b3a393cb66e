//! The snapshot protocol between the query engine and the shards: a copy of the unflushed rows
//! of some tables, with the manifest version read in the same instant.
//!
//! Exactly-once rule: a piece of rows from (node, shard, table) with first LSN `a` is already in
//! files of a manifest version `V` iff `V.flushed_through(node, shard, table) >= a`, because a
//! flush always takes a table's whole buffer, and one shard commits a table's files in LSN
//! order. The engine pins the newest version among the shards' answers and drops pieces that
//! version already holds; a piece a shard no longer has is in the version that shard read.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use shale_replication::ManifestVersion;

/// A table as queries name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub database: String,
    pub measurement: String,
}

/// Unflushed rows of one table from one shard.
pub struct BufferPiece {
    pub table: TableName,
    pub origin_node: u64,
    pub shard: u32,
    /// The first WAL LSN among the rows: decides whether a manifest version already has them.
    pub lsn_first: u64,
    pub batch: RecordBatch,
}

/// One shard's answer.
pub struct ShardSnapshot {
    pub version: Arc<ManifestVersion>,
    pub pieces: Vec<BufferPiece>,
}

/// What the engine sends a shard.
pub struct SnapshotRequest {
    pub tables: Vec<TableName>,
    pub reply: flume::Sender<ShardSnapshot>,
}

/// Combines the shards' answers: the newest version, and the pieces it does not hold yet.
pub fn reconcile(
    snapshots: Vec<ShardSnapshot>,
) -> Option<(Arc<ManifestVersion>, Vec<BufferPiece>)> {
    let version = snapshots
        .iter()
        .map(|s| s.version.clone())
        .max_by_key(|v| v.index)?;
    let pieces = snapshots
        .into_iter()
        .flat_map(|s| s.pieces)
        .filter(|piece| {
            let flushed = version.manifest.flushed_through(
                piece.origin_node,
                piece.shard,
                &piece.table.database,
                &piece.table.measurement,
            );
            flushed.is_none_or(|lsn| lsn < piece.lsn_first)
        })
        .collect();
    Some((version, pieces))
}
