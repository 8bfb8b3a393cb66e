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
    /// The rows in order, as at least one chunk, all with one schema. Earlier chunks are shared
    /// with the shard's buffer, not copies.
    pub chunks: Vec<RecordBatch>,
}

impl BufferPiece {
    pub fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.chunks[0].schema()
    }

    pub fn num_rows(&self) -> usize {
        self.chunks.iter().map(RecordBatch::num_rows).sum()
    }

    /// The rows from `offset` on, as slices of the chunks (no copy).
    pub fn rows_from(&self, offset: usize) -> Vec<RecordBatch> {
        let mut skip = offset;
        let mut rows = Vec::new();
        for chunk in &self.chunks {
            if skip >= chunk.num_rows() {
                skip -= chunk.num_rows();
                continue;
            }
            rows.push(chunk.slice(skip, chunk.num_rows() - skip));
            skip = 0;
        }
        rows
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn chunk(values: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(values))]).unwrap()
    }

    // rows_from skips whole chunks, slices the one the offset falls in, and is empty at the end.
    #[test]
    fn rows_from_slices_across_chunks() {
        let piece = BufferPiece {
            table: TableName {
                database: "db".into(),
                measurement: "m".into(),
            },
            origin_node: 1,
            shard: 0,
            lsn_first: 1,
            chunks: vec![chunk(0..3), chunk(3..7)],
        };
        assert_eq!(piece.num_rows(), 7);
        for offset in 0..=7 {
            let values: Vec<i64> = piece
                .rows_from(offset)
                .iter()
                .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
                .collect();
            assert_eq!(
                values,
                (offset as i64..7).collect::<Vec<_>>(),
                "offset {offset}"
            );
        }
    }
}
