//! The snapshot protocol between the query engine and the shards: a copy of the unflushed rows
//! of some tables, with the manifest version read in the same instant.
//!
//! Exactly-once rule: a piece of rows from (node, shard, table) with first LSN `a` is already in
//! files of a manifest version `V` iff `V.flushed_through(node, shard, table) >= a`, because a
//! flush always takes a table's whole buffer, and one shard commits a table's files in LSN
//! order. The engine pins the newest version among the shards' answers and drops pieces that
//! version already holds; a piece a shard no longer has is in the version that shard read.
//!
//! Rows replicated from another node's WAL (`crate::replica`) follow the rule per row, since a
//! replica cannot know where the origin's flushes cut: a row with LSN `x` is in the stream's
//! files ending at the smallest `lsn_last >= x`. Walking the stream's files in LSN order from
//! the piece's first row, `held` is the end of the run whose files are all on this node's disk.
//! Rows above `held` are read from the buffer and the stream's files above `held` are left out
//! of the query (they are absent, or would double rows the buffer answers); rows at or below
//! it come from files. This needs the buffer to hold every row of the first group not on disk;
//! when it cannot (the replica log started inside that group) the piece keeps only rows above
//! the stream's flushed-through LSN and absent files are skipped, as for any file.

use std::collections::HashMap;
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
    /// Set for rows replicated from another node: the LSN of each record's rows.
    pub replica: Option<RowLsns>,
}

/// The LSNs of a replicated piece's rows.
#[derive(Clone, Debug)]
pub struct RowLsns {
    /// (LSN, index of the record's first row in the piece), in LSN order.
    pub records: Arc<Vec<(u64, u32)>>,
    /// The replica log holds every record of its origin from this LSN on.
    pub complete_from: u64,
}

/// (origin node, shard, table): a WAL stream.
pub type StreamKey = (u64, u32, TableName);

impl BufferPiece {
    pub fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.chunks[0].schema()
    }

    pub fn num_rows(&self) -> usize {
        self.chunks.iter().map(RecordBatch::num_rows).sum()
    }

    /// The replicated piece's rows with an LSN above `lsn`, or `None` if it has none.
    fn rows_above(self, lsn: u64) -> Option<BufferPiece> {
        let Some(replica) = &self.replica else {
            return (self.lsn_first > lsn).then_some(self);
        };
        let index = replica
            .records
            .partition_point(|(record, _)| *record <= lsn);
        if index == 0 {
            return Some(self);
        }
        let &(lsn_first, offset) = replica.records.get(index)?;
        let records = replica.records[index..]
            .iter()
            .map(|&(record, row)| (record, row - offset))
            .collect();
        Some(BufferPiece {
            chunks: self.rows_from(offset as usize),
            lsn_first,
            replica: Some(RowLsns {
                records: Arc::new(records),
                complete_from: replica.complete_from,
            }),
            ..self
        })
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

/// What `reconcile` decides: the pinned version, the rows to read from buffers, and for each
/// stream with replicated rows, the LSN above which its files must not be read.
pub struct Reconciled {
    pub version: Arc<ManifestVersion>,
    pub pieces: Vec<BufferPiece>,
    pub file_cuts: HashMap<StreamKey, u64>,
}

/// Combines the shards' answers: the newest version, and the rows it does not hold yet (for
/// replicated rows: not in files on this node's disk; `present` says whether a path is).
pub fn reconcile(
    snapshots: Vec<ShardSnapshot>,
    present: &dyn Fn(&str) -> bool,
) -> Option<Reconciled> {
    let version = snapshots
        .iter()
        .map(|s| s.version.clone())
        .max_by_key(|v| v.index)?;
    let manifest = &version.manifest;
    let pieces: Vec<BufferPiece> = snapshots.into_iter().flat_map(|s| s.pieces).collect();
    // The first buffered LSN and completeness of each stream with replicated rows.
    let mut streams: HashMap<StreamKey, (u64, u64)> = HashMap::new();
    for piece in &pieces {
        if let Some(replica) = &piece.replica {
            let key = (piece.origin_node, piece.shard, piece.table.clone());
            let entry = streams
                .entry(key)
                .or_insert((piece.lsn_first, replica.complete_from));
            entry.0 = entry.0.min(piece.lsn_first);
        }
    }
    let mut thresholds: HashMap<StreamKey, u64> = HashMap::new();
    let mut file_cuts = HashMap::new();
    for ((origin, shard, table), (first, complete_from)) in streams {
        let (database, measurement) = (table.database.clone(), table.measurement.clone());
        let stream = (origin, shard, database.as_str(), measurement.as_str());
        let held = crate::replica::held_through(manifest, stream, first.saturating_sub(1), present);
        let ends_after = |lsn: u64| {
            manifest
                .stream_files_after(origin, shard, stream.2, stream.3, lsn)
                .next()
                .map(|(end, _)| end)
        };
        // The first end not wholly on disk, if any; its rows start after the previous end.
        let servable = match ends_after(held) {
            None => true,
            Some(missing_end) => {
                complete_from <= 1
                    || ends_after(complete_from.saturating_sub(2))
                        .is_some_and(|end| end < missing_end)
            }
        };
        let key = (origin, shard, table);
        if servable {
            thresholds.insert(key.clone(), held);
            file_cuts.insert(key, held);
        } else {
            let flushed = manifest
                .flushed_through(origin, shard, stream.2, stream.3)
                .unwrap_or(0);
            thresholds.insert(key, flushed);
        }
    }
    let pieces = pieces
        .into_iter()
        .filter_map(|piece| {
            if piece.replica.is_some() {
                let key = (piece.origin_node, piece.shard, piece.table.clone());
                let threshold = thresholds.get(&key).copied().unwrap_or(0);
                return piece.rows_above(threshold);
            }
            let flushed = manifest.flushed_through(
                piece.origin_node,
                piece.shard,
                &piece.table.database,
                &piece.table.measurement,
            );
            flushed
                .is_none_or(|lsn| lsn < piece.lsn_first)
                .then_some(piece)
        })
        .collect();
    Some(Reconciled {
        version,
        pieces,
        file_cuts,
    })
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

    fn replica_version(files: Vec<shale_replication::manifest::FileEntry>) -> Arc<ManifestVersion> {
        Arc::new(ManifestVersion {
            index: 1,
            manifest: crate::replica::tests::manifest(files),
        })
    }

    /// The v values of the kept pieces, in order.
    fn kept_values(pieces: &[BufferPiece]) -> Vec<i64> {
        pieces
            .iter()
            .flat_map(|p| p.chunks.iter())
            .flat_map(|b| {
                let column = b.column_by_name("v").unwrap();
                column.as_primitive::<Int64Type>().values().to_vec()
            })
            .collect()
    }

    /// Replicated rows 1..=8 of node 2 shard 0 (`v` = LSN), from a log complete from
    /// `complete_from`, reconciled against files a (1..3), b1 and b2 (4..6), with `present`.
    fn reconcile_replica(
        complete_from: u64,
        present: &dyn Fn(&str) -> bool,
    ) -> (Vec<i64>, Option<u64>) {
        use crate::replica::tests::{apply, file};
        let mut buffers = crate::replica::ReplicaBuffers::with_part_rows(2, 0, complete_from, 1000);
        apply(&mut buffers, complete_from..=8);
        let table = TableName {
            database: "db".into(),
            measurement: "cpu".into(),
        };
        let snapshot = ShardSnapshot {
            version: replica_version(vec![file("a", 1, 3), file("b1", 4, 6), file("b2", 4, 6)]),
            pieces: buffers.snapshot(&table),
        };
        let reconciled = reconcile(vec![snapshot], present).unwrap();
        let cut = reconciled.file_cuts.get(&(2, 0, table)).copied();
        (kept_values(&reconciled.pieces), cut)
    }

    // The per-row rule for replicated rows: with every file present, the rows above the last
    // file come from the buffer and the files from disk; with one file of a flush missing, the
    // buffer answers that whole flush and the flush's present file is left out (never both,
    // never neither); when the replica log started inside the missing flush it cannot answer
    // it, so it keeps only rows above every file and the missing file's rows wait for the
    // fetch (eventual, like any absent file) rather than half-appearing.
    #[test]
    fn replicated_rows_are_kept_per_row_against_files_on_disk() {
        assert_eq!(reconcile_replica(1, &|_| true), (vec![7, 8], Some(6)));
        assert_eq!(
            reconcile_replica(1, &|p| p != "b2"),
            (vec![4, 5, 6, 7, 8], Some(3))
        );
        assert_eq!(
            reconcile_replica(1, &|p| p != "a"),
            ((1..=8).collect(), Some(0))
        );
        assert_eq!(reconcile_replica(5, &|p| p != "b2"), (vec![7, 8], None));
        assert_eq!(
            reconcile_replica(4, &|p| p != "b2"),
            (vec![4, 5, 6, 7, 8], Some(3))
        );
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
            replica: None,
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
