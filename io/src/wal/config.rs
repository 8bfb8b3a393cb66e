//! WAL limits and identity, all in one struct with units in the names.

use std::path::PathBuf;

use super::{error::WalError, group::GROUP_HEADER_BYTES, record::FRAME_OVERHEAD_BYTES_MAX};

/// Configuration of one shard's WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    /// Directory holding this shard's segments (one directory per shard).
    pub dir: PathBuf,
    /// Node that writes this WAL; stamped into every segment header and record.
    pub origin_node: u64,
    /// Shard that writes this WAL; stamped into every segment header and record.
    pub shard: u32,
    /// A segment rotates before an append would take it past this size. A single record
    /// larger than this gets a segment of its own.
    pub segment_bytes_max: u64,
    /// Largest payload `append` accepts; larger ones fail with `WalError::TooLarge`.
    pub record_bytes_max: u32,
    /// Most framed bytes one group commit writes and syncs (a single larger record still
    /// forms a group of its own). Bounds the latency one fdatasync adds.
    pub write_bytes_max: usize,
    /// Most framed bytes appended but not yet durable; beyond it `append` fails with
    /// `WalError::Full` (the ingest layer answers 503).
    pub queue_bytes_max: usize,
    /// fdatasync each group and fsync the directory on segment changes. Only benchmarks set
    /// this to false; nothing is durable without it.
    pub fsync: bool,
}

impl WalConfig {
    /// Defaults sized for an ingest shard: 64 MiB segments, 8 MiB records, 4 MiB groups,
    /// 64 MiB of queue, fsync on.
    pub fn new(dir: impl Into<PathBuf>, origin_node: u64, shard: u32) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            origin_node,
            shard,
            segment_bytes_max: 64 << 20,
            record_bytes_max: 8 << 20,
            write_bytes_max: 4 << 20,
            queue_bytes_max: 64 << 20,
            fsync: true,
        }
    }

    /// Most bytes a record with the largest allowed payload takes on disk, counting the
    /// group header of a group it starts.
    pub fn frame_bytes_max(&self) -> usize {
        self.record_bytes_max as usize + FRAME_OVERHEAD_BYTES_MAX + GROUP_HEADER_BYTES
    }

    pub(crate) fn validate(&self) -> Result<(), WalError> {
        let fail = |reason: String| Err(WalError::Config(reason));
        if self.record_bytes_max == 0 || self.record_bytes_max > 1 << 30 {
            return fail(format!(
                "record_bytes_max must be in 1..=1 GiB, got {}",
                self.record_bytes_max
            ));
        }
        if self.segment_bytes_max < 4096 {
            return fail(format!(
                "segment_bytes_max must be at least 4096, got {}",
                self.segment_bytes_max
            ));
        }
        // The bound keeps a group's record count within the u32 of its group header.
        if self.write_bytes_max == 0 || self.write_bytes_max > 1 << 30 {
            return fail(format!(
                "write_bytes_max must be in 1..=1 GiB, got {}",
                self.write_bytes_max
            ));
        }
        if self.queue_bytes_max < self.frame_bytes_max() {
            return fail(format!(
                "queue_bytes_max ({}) must hold at least one record of record_bytes_max ({} framed bytes)",
                self.queue_bytes_max,
                self.frame_bytes_max()
            ));
        }
        Ok(())
    }
}
