//! The replica logs a shard keeps for other nodes' shards: each is a `Wal` in the origin's own
//! format and LSNs under `_system/wal/replica/<origin>/<shard>`, plus the rows of its records
//! in [`ReplicaBuffers`] for queries.
//!
//! Thread: owned by one shard's glommio executor (`!Send`). Requests come from the control
//! thread's WAL stream receiver over a channel (`crate::wal_replication`); their answers go
//! back over one-shot channels.
//!
//! Durability: a group is validated whole, appended (the origin's frames unchanged), its rows
//! buffered, and its LSN reported durable only once this node's fdatasync returned. A replica
//! never registers these rows as files. Segments are released once every row they hold is in
//! files present on this node; the `<shard>.start` marker, written before segments go, is the
//! LSN a reopen replays from (and the floor of a reset), as the origin's release marker is.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use shale_io::publish;
use shale_io::wal::{GroupView, Wal, WalConfig, WalError};
use shale_replication::ManifestVersion;

use crate::config::Config;
use crate::query::snapshot::{BufferPiece, TableName};
use crate::replica::{self, ReplicaBuffers};

/// Why a replicated group was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica log of node {origin} shard {shard} expects lsn {expected} next")]
    Gap {
        origin: u64,
        shard: u32,
        expected: u64,
    },
    #[error("{0}")]
    Failed(String),
}

/// A stored group, durable already or once its fdatasync returns.
pub enum Stored {
    Already(u64),
    Pending {
        append: shale_io::wal::Append,
        positions: std::sync::Arc<crate::shard::Positions>,
        origin: u64,
        shard: u32,
    },
}

impl Stored {
    pub async fn durable(self) -> Result<u64, ReplicaError> {
        match self {
            Stored::Already(lsn) => Ok(lsn),
            Stored::Pending {
                append,
                positions,
                origin,
                shard,
            } => {
                let lsn = append
                    .durable()
                    .await
                    .map_err(|e| ReplicaError::Failed(format!("replica log sync: {e}")))?;
                positions.advance_replica_durable(origin, shard, lsn);
                Ok(lsn)
            }
        }
    }
}

/// One replica log and its buffered rows.
pub struct ReplicaLog {
    pub origin: u64,
    pub shard: u32,
    wal: Rc<Wal>,
    buffers: RefCell<ReplicaBuffers>,
    marker: PathBuf,
    /// The LSN the marker holds: reopening replays from it.
    start: std::cell::Cell<u64>,
}

impl ReplicaLog {
    /// Highest LSN durable here.
    pub fn durable_lsn(&self) -> u64 {
        self.wal.durable_lsn()
    }

    /// Highest LSN whose rows queries on this node see.
    pub fn applied_lsn(&self) -> u64 {
        self.buffers.borrow().applied_lsn()
    }

    /// Tables with buffered rows.
    pub fn tables(&self) -> Vec<(String, String)> {
        self.buffers.borrow_mut().tables()
    }

    /// Buffered rows of `table` with an LSN in `(after, through]`, one frozen buffer per part.
    pub fn rows_between(
        &self,
        table: &(String, String),
        after: u64,
        through: u64,
    ) -> Vec<crate::buffer::FrozenBuffer> {
        self.buffers
            .borrow_mut()
            .rows_between(table, after, through)
    }

    pub fn buffered(&self) -> (usize, usize) {
        let buffers = self.buffers.borrow();
        (buffers.rows(), buffers.bytes())
    }
}

/// Every replica log of one shard, by (origin node, origin shard).
pub struct ReplicaLogs {
    config: std::sync::Arc<Config>,
    positions: std::sync::Arc<crate::shard::Positions>,
    data_dir: PathBuf,
    logs: RefCell<HashMap<(u64, u32), Rc<ReplicaLog>>>,
}

/// Where the replica logs of every origin live.
pub fn replica_root(data_dir: &Path) -> PathBuf {
    crate::shard::system_dir(data_dir)
        .join("wal")
        .join("replica")
}

impl ReplicaLogs {
    pub fn new(
        config: std::sync::Arc<Config>,
        positions: std::sync::Arc<crate::shard::Positions>,
    ) -> ReplicaLogs {
        ReplicaLogs {
            positions,
            data_dir: config.node.data_dir.clone(),
            config,
            logs: RefCell::new(HashMap::new()),
        }
    }

    /// The (origin, shard) pairs with a replica log on disk, for start-up.
    pub fn on_disk(data_dir: &Path) -> anyhow::Result<Vec<(u64, u32)>> {
        use anyhow::Context;
        let root = replica_root(data_dir);
        let mut found = Vec::new();
        let origins = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("list {}", root.display())),
        };
        for origin in origins {
            let origin = origin.with_context(|| format!("list {}", root.display()))?;
            let Some(origin_id) = origin.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            for shard in std::fs::read_dir(origin.path())
                .with_context(|| format!("list {}", origin.path().display()))?
            {
                let shard = shard.with_context(|| format!("list {}", origin.path().display()))?;
                if !shard.path().is_dir() {
                    continue;
                }
                if let Some(shard_id) = shard.file_name().to_str().and_then(|n| n.parse().ok()) {
                    found.push((origin_id, shard_id));
                }
            }
        }
        found.sort_unstable();
        Ok(found)
    }

    /// The log of (origin, shard), opened (and its records replayed into buffers) on first
    /// use. Not cancellation-safe while opening.
    pub async fn open(&self, origin: u64, shard: u32) -> Result<Rc<ReplicaLog>, ReplicaError> {
        if let Some(log) = self.logs.borrow().get(&(origin, shard)) {
            return Ok(log.clone());
        }
        let dir = replica_root(&self.data_dir)
            .join(origin.to_string())
            .join(shard.to_string());
        let marker = dir.with_extension("start");
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            ReplicaError::Failed(format!(
                "replica log of node {origin} shard {shard}: {what}: {e}"
            ))
        };
        let start = match std::fs::read_to_string(&marker) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| failed("parse start marker", &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(failed("read start marker", &e)),
        };
        let wal_config = WalConfig {
            dir,
            origin_node: origin,
            shard,
            segment_bytes_max: self.config.wal.segment_bytes_max,
            // The origin accepted records under its own limit; a replica takes any record
            // its frame format allows.
            record_bytes_max: self.config.wal.record_bytes_max.max(64 << 20),
            write_bytes_max: self.config.wal.write_bytes_max,
            queue_bytes_max: self.config.wal.queue_bytes_max,
            fsync: self.config.wal.fsync,
        };
        let mut buffers = ReplicaBuffers::new(origin, shard, start);
        let keys = &self.positions.keys;
        let (wal, report) = Wal::open(wal_config, start, |record| {
            buffers.apply(&record)?;
            record_key(keys, &record);
            Ok(())
        })
        .await
        .map_err(|e| failed("open", &e))?;
        if buffers.applied_lsn() + 1 < report.next_lsn {
            // Nothing was replayed (an empty log that continues above its start).
            buffers.reset(report.next_lsn);
        }
        tracing::info!(
            origin,
            shard,
            next_lsn = report.next_lsn,
            rows = buffers.rows(),
            "replica log opened"
        );
        self.positions.advance(origin, shard, buffers.applied_lsn());
        self.positions
            .advance_replica_durable(origin, shard, report.next_lsn.saturating_sub(1));
        let log = Rc::new(ReplicaLog {
            origin,
            shard,
            wal: Rc::new(wal),
            buffers: RefCell::new(buffers),
            marker,
            start: std::cell::Cell::new(start),
        });
        self.logs
            .borrow_mut()
            .entry((origin, shard))
            .or_insert(log.clone());
        Ok(log)
    }

    /// Stores one group of the origin's log and buffers its rows; the returned [`Stored`]
    /// resolves with the durable LSN once this node's fdatasync returned. A group wholly
    /// stored already is success. Run these one at a time per shard (the request loop does):
    /// the part before `Stored` is what orders groups.
    pub async fn append(&self, origin: u64, bytes: bytes::Bytes) -> Result<Stored, ReplicaError> {
        let positions = self.positions.clone();
        let view = GroupView::parse(&bytes, u32::MAX >> 2)
            .map_err(|e| ReplicaError::Failed(format!("group from node {origin}: {e}")))?;
        if view.origin_node() != origin {
            return Err(ReplicaError::Failed(format!(
                "node {origin} sent a group of node {}",
                view.origin_node()
            )));
        }
        let shard = view.shard();
        let log = self.open(origin, shard).await?;
        let next = log.wal.next_lsn();
        let append = match log.wal.append_group_view(&view) {
            Ok(append) => append,
            Err(WalError::Duplicate { .. }) => return Ok(Stored::Already(log.wal.durable_lsn())),
            Err(WalError::Gap { expected, .. }) => {
                return Err(ReplicaError::Gap {
                    origin,
                    shard,
                    expected,
                })
            }
            Err(e) => {
                return Err(ReplicaError::Failed(format!(
                    "replica log of node {origin} shard {shard}: {e}"
                )))
            }
        };
        {
            let mut buffers = log.buffers.borrow_mut();
            view.for_each_record(|record| {
                if record.lsn < next {
                    return Ok(());
                }
                buffers.apply(&record)?;
                record_key(&self.positions.keys, &record);
                Ok(())
            })
            .map_err(|e| ReplicaError::Failed(format!("rows of node {origin}: {e}")))?;
            self.positions.advance(origin, shard, buffers.applied_lsn());
        }
        Ok(Stored::Pending {
            append,
            positions,
            origin,
            shard,
        })
    }

    /// Highest durable LSN of (origin, shard) here; 0 when there is none.
    pub async fn position(&self, origin: u64, shard: u32) -> Result<u64, ReplicaError> {
        Ok(self.open(origin, shard).await?.durable_lsn())
    }

    /// The origin no longer has the records below `lsn` (they are in its files): continue the
    /// replica log there.
    pub async fn reset(&self, origin: u64, shard: u32, lsn: u64) -> Result<(), ReplicaError> {
        let log = self.open(origin, shard).await?;
        if lsn <= log.wal.next_lsn() {
            return Ok(());
        }
        let failed = |e: &dyn std::fmt::Display| {
            ReplicaError::Failed(format!(
                "reset replica log of node {origin} shard {shard}: {e}"
            ))
        };
        // The marker first: a reopen after a crash in the reset must replay from `lsn`.
        publish::replace(&log.marker, lsn.to_string().as_bytes())
            .await
            .map_err(|e| failed(&e))?;
        log.start.set(lsn);
        log.wal.reset_to(lsn).await.map_err(|e| failed(&e))?;
        log.buffers.borrow_mut().reset(lsn);
        self.positions.advance(origin, shard, lsn - 1);
        self.positions
            .advance_replica_durable(origin, shard, lsn - 1);
        tracing::info!(
            origin,
            shard,
            lsn,
            "replica log reset: the origin released the records below"
        );
        Ok(())
    }

    /// Drops buffered rows that are in files on this node's disk and the log segments only
    /// they needed.
    pub async fn release(&self, version: &ManifestVersion) {
        let logs: Vec<Rc<ReplicaLog>> = self.logs.borrow().values().cloned().collect();
        let present = replica::on_disk(&self.data_dir);
        for log in logs {
            let keep_from = {
                let mut buffers = log.buffers.borrow_mut();
                buffers.drop_held(&version.manifest, &present);
                buffers
                    .lsn_first()
                    .unwrap_or(buffers.applied_lsn() + 1)
                    .min(log.wal.durable_lsn() + 1)
            };
            if keep_from <= log.start.get() {
                continue;
            }
            if let Err(error) =
                publish::replace(&log.marker, keep_from.to_string().as_bytes()).await
            {
                tracing::warn!(origin = log.origin, shard = log.shard, %error, "replica start marker not written");
                continue;
            }
            log.start.set(keep_from);
            if let Err(error) = log.wal.release_below(keep_from).await {
                tracing::warn!(origin = log.origin, shard = log.shard, %error, "replica log release failed");
            }
        }
    }

    /// Every open replica log.
    pub fn logs(&self) -> Vec<Rc<ReplicaLog>> {
        self.logs.borrow().values().cloned().collect()
    }

    /// Query pieces of `table` from every replica log.
    pub fn snapshot(&self, table: &TableName, pieces: &mut Vec<BufferPiece>) {
        for log in self.logs.borrow().values() {
            pieces.extend(log.buffers.borrow_mut().snapshot(table));
        }
    }

    /// (origin, shard, applied LSN, durable LSN, rows, bytes) of every log, for status.
    pub fn status(&self) -> Vec<(u64, u32, u64, u64, usize, usize)> {
        self.logs
            .borrow()
            .values()
            .map(|log| {
                let (rows, bytes) = log.buffered();
                (
                    log.origin,
                    log.shard,
                    log.applied_lsn(),
                    log.durable_lsn(),
                    rows,
                    bytes,
                )
            })
            .collect()
    }

    /// Closes every log (shutdown).
    pub async fn close(&self) {
        let logs: Vec<Rc<ReplicaLog>> = self.logs.borrow_mut().drain().map(|(_, l)| l).collect();
        for log in logs {
            if let Err(error) = log.wal.close().await {
                tracing::warn!(origin = log.origin, shard = log.shard, %error, "replica log close failed");
            }
        }
    }
}

/// Remembers the idempotency key of a replicated record, if it carries one, so a retry of that
/// write on this node answers its original outcome.
fn record_key(keys: &crate::idempotency::Keys, record: &shale_io::wal::RecordView<'_>) {
    let Ok(payload) = crate::ingest::IngestPayload::decode(record.payload) else {
        return;
    };
    let Some(key) = payload.key else { return };
    let rows = payload.body.iter().filter(|b| **b == b'\n').count() as u64
        + u64::from(!payload.body.ends_with(b"\n") && !payload.body.is_empty());
    keys.record(
        key,
        crate::idempotency::Seen {
            origin: record.origin_node,
            shard: record.shard,
            lsn: record.lsn,
            rows,
        },
        record.time_ns.div_euclid(1_000_000),
    );
}
