//! Counters the WAL keeps for `/metrics`.

/// Upper bounds (inclusive, microseconds) of the sync latency histogram buckets; the last
/// bucket catches everything slower.
pub const SYNC_LATENCY_BUCKET_BOUNDS_US: [u64; 16] = [
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    u64::MAX,
];

/// A fixed-bucket latency histogram (cumulative counts are left to the exporter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `counts[i]` samples were at most `SYNC_LATENCY_BUCKET_BOUNDS_US[i]` and above the
    /// previous bound.
    pub counts: [u64; SYNC_LATENCY_BUCKET_BOUNDS_US.len()],
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

impl LatencyHistogram {
    pub(crate) fn record(&mut self, latency_us: u64) {
        let bucket = SYNC_LATENCY_BUCKET_BOUNDS_US
            .iter()
            .position(|&bound| latency_us <= bound)
            .unwrap_or(SYNC_LATENCY_BUCKET_BOUNDS_US.len() - 1);
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_us += latency_us;
        self.max_us = self.max_us.max(latency_us);
    }

    /// Smallest bucket bound at or above the given quantile (0.0..=1.0), or 0 with no samples.
    pub fn quantile_bound_us(&self, quantile: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return SYNC_LATENCY_BUCKET_BOUNDS_US[index].min(self.max_us);
            }
        }
        self.max_us
    }
}

/// A snapshot of one WAL's counters and gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records accepted by `append`.
    pub appends: u64,
    /// Framed bytes accepted by `append`, group headers included.
    pub append_bytes: u64,
    /// Appends refused with `WalError::Full`.
    pub appends_rejected_full: u64,
    /// Groups written (each is one write and, with fsync on, one fdatasync).
    pub groups: u64,
    /// Records in all written groups (`group_records / groups` is the batching factor).
    pub group_records: u64,
    /// Bytes handed to the disk, including the rewritten partial block and zero padding.
    pub write_bytes: u64,
    /// fdatasync calls on segment files that completed successfully.
    pub syncs: u64,
    /// Latency of those fdatasync calls.
    pub sync_latency: LatencyHistogram,
    /// Latency of group writes (before the sync).
    pub write_latency: LatencyHistogram,
    /// Framed bytes appended but not yet durable.
    pub queue_bytes: usize,
    /// LSN the next append will get.
    pub next_lsn: u64,
    /// Every record with an LSN at or below this is durable.
    pub durable_lsn: u64,
    /// Segment files currently on disk, including the active one.
    pub segments: usize,
    pub segments_created: u64,
    pub segments_released: u64,
    /// True once a write or sync failed; the WAL then refuses all work.
    pub failed: bool,
}
