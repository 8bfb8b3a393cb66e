//! Counters and histograms for `/metrics`, in the Prometheus text format.
//!
//! Each shard owns one `ShardMetrics` and is its only writer (relaxed atomics, no locks, one
//! cache line family per shard); a scrape on any shard reads them all.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of histogram buckets, in seconds.
const BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    pub fn increment(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(index) = BUCKETS_SECONDS.iter().position(|&bound| seconds <= bound) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(duration.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// A copy of one shard's WAL statistics (the WAL itself is shard-local and `!Sync`), refreshed
/// by the shard after every acknowledged write and on every flush-loop tick.
#[derive(Default)]
pub struct WalMirror {
    pub groups: Counter,
    pub group_records: Counter,
    pub syncs: Counter,
    pub sync_buckets: [Counter; SYNC_BUCKETS],
    pub sync_sum_us: Counter,
    pub queue_bytes: Counter,
    pub durable_lsn: Counter,
    pub segments: Counter,
    pub segments_released: Counter,
    pub failed: Counter,
}

const SYNC_BUCKETS: usize = shale_io::wal::SYNC_LATENCY_BUCKET_BOUNDS_US.len();

impl WalMirror {
    pub fn update(&self, stats: &shale_io::wal::WalStats) {
        self.groups.set(stats.groups);
        self.group_records.set(stats.group_records);
        self.syncs.set(stats.syncs);
        for (bucket, &count) in self.sync_buckets.iter().zip(&stats.sync_latency.counts) {
            bucket.set(count);
        }
        self.sync_sum_us.set(stats.sync_latency.sum_us);
        self.queue_bytes.set(stats.queue_bytes as u64);
        self.durable_lsn.set(stats.durable_lsn);
        self.segments.set(stats.segments as u64);
        self.segments_released.set(stats.segments_released);
        self.failed.set(u64::from(stats.failed));
    }
}

/// Request outcome classes on `/metrics`.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Write = 0,
    Other = 1,
    Query = 2,
}

const ENDPOINT_NAMES: [&str; 3] = ["write", "other", "query"];
const STATUS_CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "other"];

/// Everything one shard counts.
#[derive(Default)]
pub struct ShardMetrics {
    pub requests: [[Counter; 4]; 3],
    pub request_latency: [Histogram; 3],
    pub write_rows: Counter,
    pub write_bytes: Counter,
    pub write_rejected_overload: Counter,
    pub wal_appends: Counter,
    pub wal_bytes: Counter,
    pub wal: WalMirror,
    pub buffer_rows: Counter,
    pub buffer_bytes: Counter,
    pub flushes: Counter,
    pub flush_errors: Counter,
    pub flush_latency: Histogram,
    pub files_written: Counter,
    pub file_bytes_written: Counter,
    pub manifest_commits: Counter,
    pub manifest_commit_errors: Counter,
    pub manifest_commit_latency: Histogram,
    pub registrations_rejected: Counter,
    pub body_read_timeouts: Counter,
    /// Writes durable here whose wanted peer copies did not arrive in time.
    pub write_not_replicated: Counter,
    /// Rows and bytes replicated from other nodes' WALs held in this shard's replica buffers.
    pub replica_buffer_rows: Counter,
    pub replica_buffer_bytes: Counter,
    /// Time a write waited for peer copies after its local fdatasync (ack above `local`).
    pub replication_wait: Histogram,
    /// When the shard's executor last ran its heartbeat task, in ms since the node started;
    /// a value that stops advancing means the shard is stuck.
    pub heartbeat_ms: Counter,
}

impl ShardMetrics {
    pub fn record_request(&self, endpoint: Endpoint, status: u16, latency: Duration) {
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            500..=599 => 2,
            _ => 3,
        };
        self.requests[endpoint as usize][class].increment();
        self.request_latency[endpoint as usize].observe(latency);
    }
}

/// All shards' metrics, shared by every shard for scraping.
#[derive(Clone)]
pub struct NodeMetrics {
    pub shards: Arc<Vec<Arc<ShardMetrics>>>,
}

impl NodeMetrics {
    pub fn new(shard_count: usize) -> Self {
        Self {
            shards: Arc::new(
                (0..shard_count)
                    .map(|_| Arc::new(ShardMetrics::default()))
                    .collect(),
            ),
        }
    }

    /// Renders every metric; `extra` appends node-level gauges (e.g. the manifest's).
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(16 * 1024);
        type Pick = fn(&ShardMetrics) -> &Counter;
        #[rustfmt::skip]
        let counters: [(&str, &str, Pick); 26] = [
            ("shale_write_rows_total", "Rows acknowledged to writers.", |m| &m.write_rows),
            ("shale_write_bytes_total", "Line-protocol bytes acknowledged (after decompression).", |m| &m.write_bytes),
            ("shale_write_rejected_overload_total", "Writes answered 503 because a buffer or queue was full.", |m| &m.write_rejected_overload),
            ("shale_wal_appends_total", "Records appended to the WAL.", |m| &m.wal_appends),
            ("shale_wal_bytes_total", "Payload bytes appended to the WAL.", |m| &m.wal_bytes),
            ("shale_wal_groups_total", "WAL group commits written.", |m| &m.wal.groups),
            ("shale_wal_group_records_total", "Records in written WAL groups (divide by groups for the batching factor).", |m| &m.wal.group_records),
            ("shale_wal_syncs_total", "WAL fdatasync calls completed.", |m| &m.wal.syncs),
            ("shale_wal_queue_bytes", "WAL bytes appended and not yet durable.", |m| &m.wal.queue_bytes),
            ("shale_wal_durable_lsn", "Every WAL record at or below this LSN is durable.", |m| &m.wal.durable_lsn),
            ("shale_wal_segments", "WAL segment files on disk.", |m| &m.wal.segments),
            ("shale_wal_segments_released_total", "WAL segments deleted after their data reached the manifest.", |m| &m.wal.segments_released),
            ("shale_wal_failed", "1 once a WAL write or sync failed (the shard then refuses writes).", |m| &m.wal.failed),
            ("shale_buffer_rows", "Rows held in Arrow buffers, not yet in Parquet.", |m| &m.buffer_rows),
            ("shale_buffer_bytes", "Estimated bytes held in Arrow buffers.", |m| &m.buffer_bytes),
            ("shale_flushes_total", "Buffer flushes completed.", |m| &m.flushes),
            ("shale_flush_errors_total", "Buffer flushes that failed and will be retried.", |m| &m.flush_errors),
            ("shale_files_written_total", "Parquet files published.", |m| &m.files_written),
            ("shale_file_bytes_written_total", "Bytes of Parquet published.", |m| &m.file_bytes_written),
            ("shale_manifest_commits_total", "Files whose registration this shard committed to the manifest.", |m| &m.manifest_commits),
            ("shale_manifest_commit_errors_total", "Registration attempts that failed and were retried.", |m| &m.manifest_commit_errors),
            ("shale_registrations_rejected_total", "Flushes whose registration the manifest refused for good (rows stay in the WAL).", |m| &m.registrations_rejected),
            ("shale_http_body_read_timeouts_total", "Requests whose body did not arrive within http.body_read_timeout_ms.", |m| &m.body_read_timeouts),
            ("shale_replica_buffer_rows", "Rows replicated from other nodes' WALs buffered here until their files are on this node.", |m| &m.replica_buffer_rows),
            ("shale_replica_buffer_bytes", "Estimated bytes of those rows.", |m| &m.replica_buffer_bytes),
            ("shale_write_not_replicated_total", "Writes durable on this node whose wanted peer copies did not arrive within cluster.ack_timeout_ms (answered 503, X-Shale-Stored: local).", |m| &m.write_not_replicated),
        ];
        for (name, help, pick) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (shard, metrics) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", pick(metrics).get());
            }
        }

        let _ = writeln!(
            out,
            "# HELP shale_http_requests_total HTTP requests by endpoint and status class.\n\
             # TYPE shale_http_requests_total counter"
        );
        for (shard, metrics) in self.shards.iter().enumerate() {
            for (endpoint, classes) in metrics.requests.iter().enumerate() {
                for (class, counter) in classes.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "shale_http_requests_total{{shard=\"{shard}\",endpoint=\"{}\",status=\"{}\"}} {}",
                        ENDPOINT_NAMES[endpoint],
                        STATUS_CLASSES[class],
                        counter.get()
                    );
                }
            }
        }

        type PickHistogram = fn(&ShardMetrics) -> &Histogram;
        let name = "shale_wal_sync_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} WAL fdatasync latency.\n# TYPE {name} histogram"
        );
        let bounds = shale_io::wal::SYNC_LATENCY_BUCKET_BOUNDS_US;
        for (shard, metrics) in self.shards.iter().enumerate() {
            let mut cumulative = 0;
            // The WAL's last bucket is unbounded; it is the +Inf line below.
            for (bound, bucket) in bounds
                .iter()
                .zip(&metrics.wal.sync_buckets)
                .take(SYNC_BUCKETS - 1)
            {
                cumulative += bucket.get();
                let seconds = *bound as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{shard=\"{shard}\",le=\"{seconds}\"}} {cumulative}"
                );
            }
            let count = metrics.wal.syncs.get();
            let sum = metrics.wal.sync_sum_us.get() as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {count}");
        }

        #[rustfmt::skip]
        let histograms: [(&str, &str, PickHistogram); 6] = [
            ("shale_query_request_seconds", "Query latency, receipt to the first byte of the answer.", |m| &m.request_latency[Endpoint::Query as usize]),
            ("shale_write_request_seconds", "Write request latency, receipt to acknowledgement.", |m| &m.request_latency[Endpoint::Write as usize]),
            ("shale_flush_seconds", "Buffer flush latency: encode, publish, register.", |m| &m.flush_latency),
            ("shale_manifest_commit_seconds", "Manifest registration commit latency.", |m| &m.manifest_commit_latency),
            ("shale_other_request_seconds", "Latency of non-write requests.", |m| &m.request_latency[Endpoint::Other as usize]),
            ("shale_replication_wait_seconds", "Time a write waited for peer copies after its own fdatasync (ack majority or all).", |m| &m.replication_wait),
        ];
        for (name, help, pick) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (shard, metrics) in self.shards.iter().enumerate() {
                let histogram = pick(metrics);
                let mut cumulative = 0;
                for (bound, bucket) in BUCKETS_SECONDS.iter().zip(&histogram.buckets) {
                    cumulative += bucket.load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{shard=\"{shard}\",le=\"{bound}\"}} {cumulative}"
                    );
                }
                let count = histogram.count.load(Ordering::Relaxed);
                let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {count}"
                );
                let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
                let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {count}");
            }
        }

        for (name, help, value) in extra {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks that counters and histograms render as valid Prometheus samples with the values
    // recorded, including the cumulative bucket counts.
    #[test]
    fn renders_counters_and_histograms() {
        let metrics = NodeMetrics::new(2);
        metrics.shards[1].write_rows.add(42);
        metrics.shards[0]
            .flush_latency
            .observe(Duration::from_micros(700));
        metrics.shards[0]
            .flush_latency
            .observe(Duration::from_millis(3));
        metrics.shards[0].wal.syncs.set(2);
        metrics.shards[0].wal.sync_buckets[4].set(2);
        let text = metrics.render(&[("shale_manifest_applied_index", "Applied.", 7.0)]);
        assert!(
            text.contains("shale_write_rows_total{shard=\"1\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("shale_flush_seconds_bucket{shard=\"0\",le=\"0.001\"} 1\n"));
        assert!(text.contains("shale_flush_seconds_bucket{shard=\"0\",le=\"0.005\"} 2\n"));
        assert!(text.contains("shale_flush_seconds_count{shard=\"0\"} 2\n"));
        assert!(text.contains("shale_wal_sync_seconds_bucket{shard=\"0\",le=\"0.0005\"} 0\n"));
        assert!(text.contains("shale_wal_sync_seconds_bucket{shard=\"0\",le=\"0.001\"} 2\n"));
        assert!(text.contains("shale_wal_sync_seconds_count{shard=\"0\"} 2\n"));
        assert!(text.contains("shale_manifest_applied_index 7\n"));
    }
}
