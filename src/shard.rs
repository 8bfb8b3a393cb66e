//! A shard: one core's slice of the node. It owns a WAL, the Arrow buffers of every
//! (database, measurement) written through it, and the flushes of those buffers to Parquet.
//!
//! Thread: everything here lives on one glommio executor and is `!Send`. The only ways out are
//! the manifest client (a channel to the control thread) and blocking-pool jobs for Parquet
//! encoding. The write path takes no lock and never leaves the shard.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shale_io::publish::{self, PublishError};
use shale_io::runtime::{LocalNotify, LocalSignal};
use shale_io::wal::{Wal, WalConfig, WalError};
use shale_replication::manifest::{
    ColumnDeclaration, FileEntry, ManifestCommand, ManifestResponse,
};
use shale_replication::{ManifestClient, ManifestError, ManifestVersion};

use crate::buffer::{
    check_kind, ColumnKind, FrozenBuffer, MeasurementBuffer, SchemaConflict, Value, MICROS_PER_HOUR,
};
use crate::config::{AckLevel, Config};
use crate::ingest::{IngestPayload, RECORD_KIND_LINE_PROTOCOL};
use crate::line_protocol::{
    self, Batch, FieldValue, ParseBuffers, ParseError, ParseLimits, Precision,
};
use crate::metrics::ShardMetrics;
use crate::node::FatalReporter;
use crate::query::snapshot::{BufferPiece, ShardSnapshot, TableName};
use crate::replica_log::ReplicaLogs;
use crate::storage::{self, FileOrigin};
use crate::wal_replication::AckBoard;

/// Why a write was not acknowledged. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("node is starting: WAL recovery is not finished")]
    NotReady,
    /// A write with the same idempotency key is being stored on this node.
    #[error("{0}")]
    InProgress(String),
    #[error("write could not be made durable: {0}")]
    Durability(String),
    /// Durable in this node's WAL, but fewer copies than asked arrived in time.
    #[error("{reason}")]
    NotReplicated { reason: String, written: Written },
}

/// A (database, measurement) pair as owned keys.
type TableKey = (String, String);

/// Whose rows one flush holds: a table of an origin shard's WAL over an LSN range, and the
/// taker when a survivor writes a dead node's rows.
struct FlushSource<'a> {
    table: &'a TableKey,
    origin: u64,
    shard: u32,
    lsn_first: u64,
    lsn_last: u64,
    taken_by: Option<u64>,
}

/// Column kinds of one table.
type TableKinds = HashMap<String, ColumnKind>;

/// Columns a request uses that no one has declared yet, per measurement.
type Undeclared = Vec<(String, Vec<(String, ColumnKind)>)>;

/// The manifest refused a flush's registration for good (not a transient failure): retrying
/// the same entries cannot succeed.
#[derive(Debug, thiserror::Error)]
#[error("manifest rejected the registration: {0}")]
struct RegistrationRejected(String);

/// Everything one shard owns.
pub struct Shard {
    pub shard_id: u32,
    node_id: u64,
    config: Arc<Config>,
    data_dir: PathBuf,
    pending_dir: PathBuf,
    pub metrics: Arc<ShardMetrics>,
    manifest: ManifestClient,
    wal: RefCell<Option<Rc<Wal>>>,
    /// Unflushed rows by database, then measurement.
    buffers: RefCell<HashMap<String, HashMap<String, MeasurementBuffer>>>,
    /// Column kinds by database, measurement and column: a cache of the kinds declared in the
    /// manifest (plus those seen in WAL replay). A column missing here is looked up in the
    /// manifest, and declared through Raft if it is new, before any row using it is logged.
    kinds: RefCell<HashMap<String, HashMap<String, TableKinds>>>,
    /// Bytes in buffers plus bytes frozen and not yet flushed.
    buffered_bytes: Cell<usize>,
    /// First LSN of the flush in progress, if any: the WAL below it may go once it commits.
    flushing: RefCell<Option<(TableKey, Arc<FrozenBuffer>)>>,
    /// Every record below this LSN is in committed files (persisted as the release marker).
    released_below: Cell<u64>,
    /// Highest LSN known to be durable in the WAL.
    durable_lsn: Cell<u64>,
    durable_changed: LocalNotify,
    flush_wanted: LocalNotify,
    parse_buffers: RefCell<Option<ParseBuffers>>,
    ready: Cell<bool>,
    /// Tables whose registration the manifest refused for good, with the refused rows and the
    /// reason. Their rows stay in the WAL and in queries; writes to them are refused (a later
    /// flush of the table would commit past the refused rows and hide them from replay).
    rejected: RefCell<HashMap<TableKey, (Arc<FrozenBuffer>, String)>>,
    /// Tables to flush at the next check whatever their thresholds say (a write waits on it).
    flush_forced: RefCell<std::collections::HashSet<TableKey>>,
    fatal: FatalReporter,
    /// WAL replication: this shard's ties to the control thread.
    replication: ShardReplication,
    /// Replica logs of other nodes' shards that this shard keeps.
    pub replicas: ReplicaLogs,
    acks_changed: LocalNotify,
}

/// What a shard needs to replicate its WAL and keep its peers' (none for a standalone node).
#[derive(Clone)]
pub struct ShardReplication {
    /// Where durable groups go to be shipped; `None` when the node is not in a cluster.
    pub outbox: Option<shale_replication::wal_stream::WalOutbox>,
    /// Peers' acknowledged positions of this shard's WAL.
    pub acks: Arc<AckBoard>,
    /// Node-wide positions, for reads that wait on a write token.
    pub positions: Arc<Positions>,
}

impl ShardReplication {
    pub fn standalone() -> ShardReplication {
        ShardReplication {
            outbox: None,
            acks: AckBoard::new().0,
            positions: Arc::default(),
        }
    }
}

/// The highest LSN of each (origin, shard) whose rows this node's queries see: its own
/// shards' durable LSNs and its replica logs' applied LSNs. Shared by every shard, so a read
/// on any shard can wait on a write token.
#[derive(Default)]
pub struct Positions {
    held: std::sync::Mutex<HashMap<(u64, u32), u64>>,
    /// Durable LSN of each replica log (origin, shard) on this node: what a takeover can
    /// flush if the origin dies.
    replica_durable: std::sync::Mutex<HashMap<(u64, u32), u64>>,
    /// Idempotency keys of the writes this node holds (its own and replicated).
    pub keys: crate::idempotency::Keys,
}

impl Positions {
    pub fn advance_replica_durable(&self, origin: u64, shard: u32, lsn: u64) {
        let mut durable = self
            .replica_durable
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = durable.entry((origin, shard)).or_insert(0);
        *entry = (*entry).max(lsn);
    }

    /// (origin, shard, durable LSN) of every replica log, in order.
    pub fn replica_durable(&self) -> Vec<(u64, u32, u64)> {
        let durable = self
            .replica_durable
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = durable.iter().map(|(&(o, s), &l)| (o, s, l)).collect();
        all.sort_unstable();
        all
    }

    pub fn advance(&self, origin: u64, shard: u32, lsn: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let entry = held.entry((origin, shard)).or_insert(0);
        *entry = (*entry).max(lsn);
    }

    pub fn get(&self, origin: u64, shard: u32) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&(origin, shard)).copied().unwrap_or(0)
    }
}

/// A write acknowledged by a shard: its rows and where they are in the WAL.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub rows: u64,
    pub node: u64,
    pub shard: u32,
    pub lsn: u64,
    /// An earlier write with the same idempotency key: nothing new was stored.
    pub replayed: bool,
}

impl Written {
    /// The `X-Shale-Write-Token` value: `origin:shard:lsn`.
    pub fn token(&self) -> String {
        format!("{}:{}:{}", self.node, self.shard, self.lsn)
    }
}

impl Shard {
    pub fn new(
        shard_id: u32,
        config: Arc<Config>,
        metrics: Arc<ShardMetrics>,
        manifest: ManifestClient,
        fatal: FatalReporter,
        replication: ShardReplication,
    ) -> Rc<Shard> {
        let data_dir = config.node.data_dir.clone();
        let pending_dir = system_dir(&data_dir)
            .join("pending")
            .join(format!("shard-{shard_id}"));
        let replicas = ReplicaLogs::new(config.clone(), replication.positions.clone());
        Rc::new(Shard {
            shard_id,
            node_id: config.node.id,
            config,
            data_dir,
            pending_dir,
            metrics,
            manifest,
            wal: RefCell::new(None),
            buffers: RefCell::new(HashMap::new()),
            kinds: RefCell::new(HashMap::new()),
            buffered_bytes: Cell::new(0),
            flushing: RefCell::new(None),
            released_below: Cell::new(1),
            durable_lsn: Cell::new(0),
            durable_changed: LocalNotify::new(),
            flush_wanted: LocalNotify::new(),
            parse_buffers: RefCell::new(Some(ParseBuffers::new())),
            ready: Cell::new(false),
            rejected: RefCell::new(HashMap::new()),
            flush_forced: RefCell::new(Default::default()),
            fatal,
            replication,
            replicas,
            acks_changed: LocalNotify::new(),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get()
    }

    fn wal(&self) -> Option<Rc<Wal>> {
        self.wal.borrow().clone()
    }

    fn parse_limits(&self) -> ParseLimits {
        ParseLimits {
            line_bytes_max: self.config.ingest.line_bytes_max,
            ..ParseLimits::default()
        }
    }

    /// Start-up: registers flushes a crash interrupted, then replays the WAL into the buffers,
    /// skipping rows whose files the manifest already has. Not cancellation-safe.
    pub async fn recover(self: &Rc<Self>) -> anyhow::Result<()> {
        use anyhow::Context;
        let started = Instant::now();
        let registered = self
            .register_pending_journal()
            .await
            .context("register flushes interrupted by a crash")?;
        self.manifest_barrier().await;
        let version = self.manifest.current();
        let wal_config = WalConfig {
            dir: wal_dir(&self.data_dir, self.shard_id),
            origin_node: self.node_id,
            shard: self.shard_id,
            segment_bytes_max: self.config.wal.segment_bytes_max,
            record_bytes_max: self.config.wal.record_bytes_max,
            write_bytes_max: self.config.wal.write_bytes_max,
            queue_bytes_max: self.config.wal.queue_bytes_max,
            fsync: self.config.wal.fsync,
        };
        // Replay accepts what was accepted when it was written, even if limits shrank since.
        let limits = ParseLimits {
            line_bytes_max: usize::MAX,
            columns_per_line_max: usize::MAX,
        };
        let mut flushed: HashMap<TableKey, u64> = HashMap::new();
        let mut rows_replayed = 0u64;
        let mut rows_skipped = 0u64;
        let mut replay_from = self.read_release_marker()?;
        // LSNs of this shard must never be reused: file names and the exactly-once rule are
        // keyed by them. If the WAL directory lost its segments (deleted by hand, a new disk
        // under `_system/wal`), continue above everything the manifest has in files.
        // A takeover (a fence on this shard) flushed this shard's rows up to its LSN on a
        // survivor: those rows are in files now, and this shard replays only above it.
        let fenced_through = version
            .manifest
            .fence_of(self.node_id, self.shard_id)
            .map_or(0, |fence| fence.through_lsn);
        let floor = version
            .manifest
            .shard_flushed_through(self.node_id, self.shard_id)
            .map_or(1, |lsn| lsn + 1)
            .max(fenced_through + 1);
        if floor > replay_from && !wal_has_segments(&wal_config.dir)? {
            tracing::warn!(
                shard_id = self.shard_id,
                released_below = replay_from,
                lsn_next = floor,
                "wal directory has no segments; continuing above the manifest's files"
            );
            replay_from = floor;
        }
        let (wal, report) = Wal::open(wal_config, replay_from, |record| {
            if record.kind != RECORD_KIND_LINE_PROTOCOL {
                return Err(format!("unknown record kind {}", record.kind));
            }
            let payload = IngestPayload::decode(record.payload).map_err(|e| e.to_string())?;
            let batch = line_protocol::parse(
                payload.body,
                payload.precision,
                record.time_ns.div_euclid(1000),
                &limits,
            )
            .map_err(|e| format!("stored request no longer parses: {e}"))?;
            if let Some(key) = payload.key {
                let seen = crate::idempotency::Seen {
                    origin: self.node_id,
                    shard: self.shard_id,
                    lsn: record.lsn,
                    rows: batch.len() as u64,
                };
                self.replication.positions.keys.record(
                    key,
                    seen,
                    record.time_ns.div_euclid(1_000_000),
                );
            }
            let mut last: Option<(&str, u64)> = None;
            for line in batch.lines() {
                let measurement = line.measurement();
                let through = match last {
                    Some((name, through)) if name == measurement => through,
                    _ => {
                        let key = (payload.database.to_string(), measurement.to_string());
                        let through = *flushed.entry(key).or_insert_with_key(|(db, m)| {
                            version
                                .manifest
                                .flushed_through(self.node_id, self.shard_id, db, m)
                                .unwrap_or(0)
                                .max(fenced_through)
                        });
                        last = Some((measurement, through));
                        through
                    }
                };
                if record.lsn <= through {
                    rows_skipped += 1;
                    continue;
                }
                self.append_line(payload.database, &line, record.lsn);
                rows_replayed += 1;
            }
            Ok(())
        })
        .await
        .context("open and replay the WAL")?;
        let next_lsn = report.next_lsn;
        anyhow::ensure!(
            next_lsn >= floor,
            "the wal of shard {} ends before lsn {next_lsn} but the manifest has files of this \
             shard through lsn {}: wal segments are missing from {}; restore them, or move the \
             whole directory away to start this shard's wal above the manifest",
            self.shard_id,
            floor - 1,
            wal.config().dir.display()
        );
        self.durable_lsn.set(next_lsn.saturating_sub(1));
        self.replication
            .positions
            .advance(self.node_id, self.shard_id, next_lsn.saturating_sub(1));
        if let Some(outbox) = self.replication.outbox.clone() {
            let shard = self.shard_id;
            wal.set_durable_observer(Box::new(move |bytes, first_lsn, last_lsn| {
                outbox.offer(shale_replication::wal_stream::ShippedGroup {
                    shard,
                    first_lsn,
                    last_lsn,
                    bytes: bytes::Bytes::copy_from_slice(bytes),
                });
            }));
        }
        *self.wal.borrow_mut() = Some(Rc::new(wal));
        self.ready.set(true);
        tracing::info!(
            shard_id = self.shard_id,
            registered_after_crash = registered,
            rows_replayed,
            rows_skipped,
            next_lsn,
            truncated_bytes = report.truncated_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard recovered"
        );
        self.flush_wanted.notify();
        Ok(())
    }

    /// In a cluster, waits until this node's manifest holds everything committed before now
    /// (a committed no-op applied here), retrying while there is no leader: a fence committed
    /// while this node was down decides which of its WAL records it may replay.
    async fn manifest_barrier(&self) {
        if !self.config.cluster.enabled {
            return;
        }
        let mut attempt = 0u32;
        loop {
            let barrier = ManifestCommand::Barrier {
                node_id: self.node_id,
            };
            match self.manifest.propose(barrier).await {
                Ok(_) => return,
                Err(error) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::info!(
                            shard_id = self.shard_id,
                            attempt,
                            %error,
                            "waiting for the manifest to catch up before replaying the wal"
                        );
                    }
                    self.registration_pause(attempt).await;
                }
            }
        }
    }

    /// Validates, logs and buffers one line-protocol request; resolves once it is durable here
    /// and, for `ack` above `local`, on as many peers as the level asks.
    pub async fn write(
        self: &Rc<Self>,
        database: &str,
        precision: Precision,
        body: bytes::Bytes,
        ack: AckLevel,
        key: Option<&str>,
    ) -> Result<Written, WriteError> {
        let Some(wal) = self.wal() else {
            return Err(WriteError::NotReady);
        };
        let Some(key) = key else {
            return self
                .write_logged(&wal, database, precision, body, ack, None)
                .await;
        };
        let keys = &self.replication.positions.keys;
        match keys.get(key) {
            Some(crate::idempotency::Known::Done(seen)) => {
                // A retry: answer the original outcome, store nothing.
                let written = Written {
                    rows: seen.rows,
                    node: seen.origin,
                    shard: seen.shard,
                    lsn: seen.lsn,
                    replayed: true,
                };
                if seen.origin == self.node_id && seen.shard == self.shard_id {
                    self.wait_copies(written, ack).await?;
                }
                return Ok(written);
            }
            Some(crate::idempotency::Known::Pending) => {
                return Err(WriteError::InProgress(format!(
                    "a write with Idempotency-Key {key:?} is being stored on this node; retry"
                )))
            }
            None => {}
        }
        if !keys.begin(key) {
            return Err(WriteError::InProgress(format!(
                "a write with Idempotency-Key {key:?} is being stored on this node; retry"
            )));
        }
        let result = self
            .write_logged(&wal, database, precision, body, ack, Some(key))
            .await;
        match &result {
            Ok(written) | Err(WriteError::NotReplicated { written, .. }) => {
                let seen = crate::idempotency::Seen {
                    origin: written.node,
                    shard: written.shard,
                    lsn: written.lsn,
                    rows: written.rows,
                };
                keys.record(key, seen, now_ms());
            }
            // Refused before anything was logged (or the node is failing): nothing stored.
            Err(_) => keys.abort(key),
        }
        result
    }

    /// The write itself: parse, check, log (with the idempotency key, if any), buffer, wait.
    async fn write_logged(
        self: &Rc<Self>,
        wal: &Rc<Wal>,
        database: &str,
        precision: Precision,
        body: bytes::Bytes,
        ack: AckLevel,
        key: Option<&str>,
    ) -> Result<Written, WriteError> {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let limits = self.parse_limits();
        let buffers = self.parse_buffers.borrow_mut().take().unwrap_or_default();
        let batch =
            line_protocol::parse_with(buffers, &body, precision, now_ns.div_euclid(1000), &limits);
        // On error the parse buffers are dropped; the next request allocates fresh ones.
        let batch = batch?;
        if batch.is_empty() {
            return Err(WriteError::BadRequest(
                "request body has no points (only blank lines or comments)".into(),
            ));
        }
        crate::names::validate_database(database)
            .map_err(|e| WriteError::BadRequest(format!("database {database:?}: {e}")))?;
        self.check_rejected_tables(database, &batch)?;
        let undeclared = self.check_kinds(database, &batch)?;
        self.check_hours(database, &batch)?;
        if !undeclared.is_empty() {
            self.declare_columns(database, undeclared).await?;
        }
        let payload = IngestPayload {
            database,
            precision,
            body: &body,
            key,
        };
        let result = self.log_and_buffer(wal, payload, &batch, now_ns);
        let rows = batch.len() as u64;
        *self.parse_buffers.borrow_mut() = Some(batch.into_buffers());
        let append = result?;
        let lsn = append.lsn;
        match append.durable().await {
            Ok(_) => {
                self.note_durable(lsn);
                self.refresh_wal_metrics();
                self.metrics.write_rows.add(rows);
                self.metrics.write_bytes.add(body.len() as u64);
                let written = Written {
                    rows,
                    node: self.node_id,
                    shard: self.shard_id,
                    lsn,
                    replayed: false,
                };
                self.wait_copies(written, ack).await?;
                Ok(written)
            }
            Err(error) => {
                // The WAL refuses everything after a failed write or sync; rows buffered past
                // the last durable LSN can never be flushed. Stop the node: a restart replays
                // exactly what is durable.
                self.fatal.report(
                    format!("shard {}", self.shard_id),
                    format!("wal write or sync failed at lsn {lsn}: {error}"),
                );
                Err(WriteError::Durability(error.to_string()))
            }
        }
    }

    /// Refuses a request that writes to a table whose registration the manifest refused.
    fn check_rejected_tables(&self, database: &str, batch: &Batch<'_>) -> Result<(), WriteError> {
        let rejected = self.rejected.borrow();
        if rejected.is_empty() {
            return Ok(());
        }
        let mut previous: Option<&str> = None;
        for line in batch.lines() {
            let measurement = line.measurement();
            if previous == Some(measurement) {
                continue;
            }
            previous = Some(measurement);
            let key = (database.to_string(), measurement.to_string());
            if let Some((_, reason)) = rejected.get(&key) {
                return Err(WriteError::Durability(format!(
                    "{database}.{measurement} on shard {} cannot store new rows: the manifest \
                     refused its files ({reason}); its earlier rows are kept in the WAL; \
                     see the node log",
                    self.shard_id
                )));
            }
        }
        Ok(())
    }

    /// Bounds the files one flush can write: a flush writes one file per UTC hour of its rows,
    /// and one registration must stay small enough for one manifest command. A request whose
    /// rows of one table span more than `buffer.flush_hours_max` hours is refused whole (413);
    /// a request that would push a buffer past it waits for that buffer's flush (503).
    fn check_hours(&self, database: &str, batch: &Batch<'_>) -> Result<(), WriteError> {
        let hours_max = self.config.buffer.flush_hours_max;
        let buffers = self.buffers.borrow();
        let tables = buffers.get(database);
        // New hours per measurement, in request order; consecutive lines mostly share both.
        let mut new_hours: Vec<(&str, std::collections::HashSet<i64>)> = Vec::new();
        let mut previous: Option<(&str, i64)> = None;
        for line in batch.lines() {
            let measurement = line.measurement();
            let hour = line.time_us().div_euclid(MICROS_PER_HOUR);
            if previous == Some((measurement, hour)) {
                continue;
            }
            previous = Some((measurement, hour));
            let buffer = tables.and_then(|t| t.get(measurement));
            if buffer.is_some_and(|b| b.has_hour(hour)) {
                continue;
            }
            let index = match new_hours.iter().position(|(m, _)| *m == measurement) {
                Some(index) => index,
                None => {
                    new_hours.push((measurement, Default::default()));
                    new_hours.len() - 1
                }
            };
            new_hours[index].1.insert(hour);
        }
        for (measurement, hours) in &new_hours {
            let buffered = tables
                .and_then(|t| t.get(*measurement))
                .map_or(0, |b| b.hours());
            if buffered + hours.len() <= hours_max {
                continue;
            }
            if hours.len() > hours_max {
                return Err(WriteError::TooLarge(format!(
                    "rows of {database}.{measurement} span {} distinct hours; a request may \
                     span at most buffer.flush_hours_max ({hours_max}): split it by time",
                    hours.len()
                )));
            }
            self.metrics.write_rejected_overload.increment();
            self.flush_forced
                .borrow_mut()
                .insert((database.to_string(), measurement.to_string()));
            self.flush_wanted.notify();
            return Err(WriteError::Overloaded(format!(
                "the buffer of {database}.{measurement} on shard {} spans {buffered} hours and \
                 this request adds {} (limit buffer.flush_hours_max {hours_max}); it is being \
                 flushed, retry",
                self.shard_id,
                hours.len()
            )));
        }
        Ok(())
    }

    /// The synchronous middle of a write: checks, WAL append, buffering. Between the append
    /// and the buffer insert there is no await, so buffers receive rows in LSN order.
    fn log_and_buffer(
        &self,
        wal: &Wal,
        payload: IngestPayload<'_>,
        batch: &Batch<'_>,
        now_ns: i64,
    ) -> Result<shale_io::wal::Append, WriteError> {
        let database = payload.database;
        if self.buffered_bytes.get() > self.config.buffer.shard_bytes_max {
            self.metrics.write_rejected_overload.increment();
            self.flush_wanted.notify();
            return Err(WriteError::Overloaded(format!(
                "shard {} holds {} buffered bytes (limit {}); flushes are catching up",
                self.shard_id,
                self.buffered_bytes.get(),
                self.config.buffer.shard_bytes_max
            )));
        }
        let append = wal
            .append_with(
                RECORD_KIND_LINE_PROTOCOL,
                now_ns,
                payload.encoded_len(),
                |out| payload.encode_into(out),
            )
            .map_err(|error| match error {
                WalError::Full { .. } => {
                    self.metrics.write_rejected_overload.increment();
                    WriteError::Overloaded(error.to_string())
                }
                WalError::TooLarge { .. } => WriteError::TooLarge(error.to_string()),
                other => {
                    self.fatal.report(
                        format!("shard {}", self.shard_id),
                        format!("wal append failed: {other}"),
                    );
                    WriteError::Durability(other.to_string())
                }
            })?;
        self.metrics.wal_appends.increment();
        self.metrics.wal_bytes.add(payload.encoded_len() as u64);
        let mut over_threshold = false;
        for line in batch.lines() {
            over_threshold |= self.append_line(database, &line, append.lsn);
        }
        if over_threshold {
            self.flush_wanted.notify();
        }
        Ok(append)
    }

    /// Rejects a request whose values disagree with a declared column kind or that would give
    /// a table more than `ingest.columns_per_table_max` columns, and returns the columns it
    /// uses that are not declared yet. Linear in the request's keys.
    fn check_kinds(&self, database: &str, batch: &Batch<'_>) -> Result<Undeclared, WriteError> {
        let schema = |e: SchemaConflict| WriteError::Schema(e.to_string());
        let mut kinds = self.kinds.borrow_mut();
        let tables = match kinds.get_mut(database) {
            Some(tables) => tables,
            None => kinds.entry(database.to_string()).or_default(),
        };
        let mut undeclared: Undeclared = Vec::new();
        // (measurement, column) pairs already noted, so a repeated new key costs one lookup.
        let mut noted: std::collections::HashSet<(&str, &str)> = Default::default();
        let mut note = |measurement, column, kind: ColumnKind| {
            if !noted.insert((measurement, column)) {
                return;
            }
            match undeclared
                .iter_mut()
                .rev()
                .find(|(m, _)| m.as_str() == measurement)
            {
                Some((_, columns)) => columns.push((column.to_string(), kind)),
                None => {
                    undeclared.push((measurement.to_string(), vec![(column.to_string(), kind)]))
                }
            }
        };
        // Lines of one request usually share their measurement and keys: a line whose keys and
        // kinds equal the previous line's (in order) needs no lookups.
        let mut previous: Option<&str> = None;
        let mut previous_keys: Vec<(&str, ColumnKind)> = Vec::new();
        for line in batch.lines() {
            let measurement = line.measurement();
            if previous == Some(measurement) {
                let mut keys = line
                    .tags()
                    .map(|(key, _)| (key, ColumnKind::Tag))
                    .chain(line.fields().map(|(key, value)| (key, field_kind(&value))));
                let same = previous_keys
                    .iter()
                    .all(|&expected| keys.next() == Some(expected))
                    && keys.next().is_none();
                if same {
                    continue;
                }
            }
            previous = Some(measurement);
            previous_keys.clear();
            previous_keys.extend(line.tags().map(|(key, _)| (key, ColumnKind::Tag)));
            previous_keys.extend(line.fields().map(|(key, value)| (key, field_kind(&value))));
            if !tables.contains_key(measurement) {
                let declared = self.declared_kinds(database, measurement);
                tables.insert(measurement.to_string(), declared);
            }
            let table = &tables[measurement];
            for (key, _) in line.tags() {
                match table.get(key) {
                    Some(&existing) => {
                        check_kind(key, Some(existing), ColumnKind::Tag).map_err(schema)?
                    }
                    None => note(measurement, key, ColumnKind::Tag),
                }
            }
            for (key, value) in line.fields() {
                match table.get(key) {
                    Some(&existing) => {
                        check_kind(key, Some(existing), field_kind(&value)).map_err(schema)?
                    }
                    None => note(measurement, key, field_kind(&value)),
                }
            }
        }
        let columns_max = self.config.ingest.columns_per_table_max;
        for (measurement, columns) in &undeclared {
            let known = tables.get(measurement).map_or(0, HashMap::len);
            if known + columns.len() > columns_max {
                return Err(WriteError::BadRequest(format!(
                    "{database}.{measurement} would have {} columns (tags and fields); at most \
                     ingest.columns_per_table_max ({columns_max}) are allowed",
                    known + columns.len()
                )));
            }
        }
        Ok(undeclared)
    }

    /// The column kinds the manifest has for a table.
    fn declared_kinds(&self, database: &str, measurement: &str) -> TableKinds {
        let version = self.manifest.current();
        version
            .manifest
            .table_columns(database, measurement)
            .map(|columns| {
                columns
                    .iter()
                    .filter_map(|(name, kind)| Some((name.clone(), ColumnKind::from_name(kind)?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Declares new columns through Raft, so their kinds hold for every shard and node, before
    /// any row using them is logged. A conflicting declaration that won the race is a 400.
    async fn declare_columns(
        &self,
        database: &str,
        undeclared: Undeclared,
    ) -> Result<(), WriteError> {
        for (measurement, columns) in undeclared {
            let command = ManifestCommand::DeclareColumns {
                database: database.to_string(),
                measurement: measurement.clone(),
                columns: columns
                    .iter()
                    .map(|(name, kind)| ColumnDeclaration {
                        name: name.clone(),
                        kind: kind.name().to_string(),
                    })
                    .collect(),
            };
            match self.manifest.propose(command).await {
                Ok(_) => {
                    let mut kinds = self.kinds.borrow_mut();
                    let table = kinds
                        .entry(database.to_string())
                        .or_default()
                        .entry(measurement)
                        .or_default();
                    for (name, kind) in columns {
                        table.insert(name, kind);
                    }
                }
                Err(ManifestError::Rejected(rejection)) => {
                    // Another request declared a different kind first; learn it for next time.
                    let declared = self.declared_kinds(database, &measurement);
                    self.kinds
                        .borrow_mut()
                        .entry(database.to_string())
                        .or_default()
                        .insert(measurement, declared);
                    return Err(WriteError::Schema(rejection.to_string()));
                }
                Err(error) => {
                    return Err(WriteError::Overloaded(format!(
                        "new columns could not be declared in the manifest: {error}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Appends one parsed line to its buffer; returns whether that buffer should flush now.
    fn append_line(&self, database: &str, line: &line_protocol::LineView<'_>, lsn: u64) -> bool {
        let measurement = line.measurement();
        let mut buffers = self.buffers.borrow_mut();
        let tables = match buffers.get_mut(database) {
            Some(tables) => tables,
            None => buffers.entry(database.to_string()).or_default(),
        };
        let buffer = match tables.get_mut(measurement) {
            Some(buffer) => buffer,
            None => tables.entry(measurement.to_string()).or_default(),
        };
        let before = buffer.bytes_estimate();
        let new_columns = buffer.append_row(
            lsn,
            line.time_us(),
            line.tags(),
            line.fields().map(|(key, value)| (key, Value::from(value))),
        );
        if new_columns {
            let mut kinds = self.kinds.borrow_mut();
            let table = kinds
                .entry(database.to_string())
                .or_default()
                .entry(measurement.to_string())
                .or_default();
            for (key, _) in line.tags() {
                table.entry(key.to_string()).or_insert(ColumnKind::Tag);
            }
            for (key, value) in line.fields() {
                table.entry(key.to_string()).or_insert(field_kind(&value));
            }
        }
        let added = buffer.bytes_estimate() - before;
        self.buffered_bytes.set(self.buffered_bytes.get() + added);
        self.metrics.buffer_rows.add(1);
        self.metrics.buffer_bytes.add(added as u64);
        buffer.rows() >= self.config.buffer.flush_rows_max
            || buffer.bytes_estimate() >= self.config.buffer.flush_bytes_max
    }

    fn note_durable(&self, lsn: u64) {
        if lsn > self.durable_lsn.get() {
            self.durable_lsn.set(lsn);
            self.replication
                .positions
                .advance(self.node_id, self.shard_id, lsn);
            self.durable_changed.notify();
        }
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Shards of this node (the replica log of an origin shard belongs to one of them).
    pub fn shard_count(&self) -> usize {
        self.config.shard_count()
    }

    /// Stops the node: a failure this shard cannot recover from by itself.
    pub fn report_fatal(&self, message: String) {
        self.fatal
            .report(format!("shard {}", self.shard_id), message);
    }

    /// Node-wide positions of the rows queries see, for reads waiting on write tokens.
    pub fn positions(&self) -> Arc<Positions> {
        self.replication.positions.clone()
    }

    /// Called by the ack task when peers acknowledged more of this shard's WAL.
    pub fn note_acks(&self) {
        self.acks_changed.notify();
    }

    /// Waits until `ack` copies of the write hold it durably: `majority` counts the voters
    /// (this node among them if it votes), `all` every member. Fails after
    /// `cluster.ack_timeout_ms` saying the rows are durable here and keep replicating.
    async fn wait_copies(&self, written: Written, ack: AckLevel) -> Result<(), WriteError> {
        if ack == AckLevel::Local || !self.config.cluster.enabled {
            return Ok(());
        }
        let Some(metrics) = self.manifest.raft_metrics() else {
            return Err(WriteError::NotReplicated {
                reason: "the cluster membership is not known yet".into(),
                written,
            });
        };
        let membership = metrics.membership_config.membership();
        let me = self.node_id;
        let (peers, needed): (Vec<u64>, usize) = match ack {
            AckLevel::Local => unreachable!("returned above"),
            AckLevel::Majority => {
                let voters: Vec<u64> = membership.voter_ids().collect();
                let majority = voters.len() / 2 + 1;
                let mine = usize::from(voters.contains(&me));
                (
                    voters.into_iter().filter(|id| *id != me).collect(),
                    majority.saturating_sub(mine),
                )
            }
            AckLevel::All => {
                let peers: Vec<u64> = membership
                    .nodes()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != me)
                    .collect();
                let needed = peers.len();
                (peers, needed)
            }
        };
        drop(metrics);
        if needed == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.cluster.ack_timeout_ms);
        loop {
            let changed = self.acks_changed.notified();
            let copies = self
                .replication
                .acks
                .copies(peers.iter().copied(), written.lsn);
            if copies >= needed {
                self.metrics.replication_wait.observe(started.elapsed());
                return Ok(());
            }
            let elapsed = started.elapsed();
            if elapsed >= timeout {
                self.metrics.write_not_replicated.increment();
                return Err(WriteError::NotReplicated {
                    reason: format!(
                        "ack={} wanted {needed} peer copies of lsn {} of node {} shard {} within \
                         cluster.ack_timeout_ms ({} ms) and {copies} arrived; the rows are \
                         durable on this node and keep replicating",
                        ack.name(),
                        written.lsn,
                        written.node,
                        written.shard,
                        timeout.as_millis()
                    ),
                    written,
                });
            }
            futures_lite::future::or(changed, glommio::timer::sleep(timeout - elapsed)).await;
        }
    }

    /// Waits until every record up to `lsn` is durable in the WAL: a flush must never publish
    /// rows that a failed sync could still take back.
    async fn wait_durable(&self, lsn: u64) -> anyhow::Result<()> {
        while self.durable_lsn.get() < lsn {
            let changed = self.durable_changed.notified();
            if let Some(wal) = self.wal() {
                let durable = wal.durable_lsn();
                if durable >= lsn {
                    self.note_durable(durable);
                    break;
                }
            }
            anyhow::ensure!(
                !self.wal_failed(),
                "rows up to lsn {lsn} can never become durable: the wal failed"
            );
            futures_lite::future::or(changed, glommio::timer::sleep(Duration::from_millis(5)))
                .await;
        }
        Ok(())
    }

    /// Pause before registration attempt `attempt + 1`: doubling from
    /// `manifest.registration_retry_ms`, capped at `manifest.registration_retry_ms_max` so a
    /// flush that failed during an election registers soon after the new leader is there.
    fn registration_backoff_ms(&self, attempt: u32) -> u64 {
        let manifest = &self.config.manifest;
        manifest
            .registration_retry_ms
            .saturating_mul(1 << attempt.min(16))
            .min(manifest.registration_retry_ms_max)
    }

    /// Waits before registration attempt `attempt + 1`, but no longer than until a new leader
    /// is known: a registration that failed because the old leader died is sent again at once
    /// to its successor instead of sleeping out the back-off.
    async fn registration_pause(&self, attempt: u32) {
        let leader_before = self.manifest.leader();
        let pause = Duration::from_millis(self.registration_backoff_ms(attempt));
        let until = std::time::Instant::now() + pause;
        loop {
            let now = std::time::Instant::now();
            if now >= until {
                return;
            }
            glommio::timer::sleep((until - now).min(Duration::from_millis(50))).await;
            let leader = self.manifest.leader();
            if leader.is_some() && leader != leader_before {
                return;
            }
        }
    }

    /// Whether this shard's WAL refused further writes after an I/O error.
    fn wal_failed(&self) -> bool {
        self.wal().is_some_and(|wal| wal.stats().failed)
    }

    /// Flushes buffers that are due until `shutdown`; then flushes everything and returns.
    pub async fn flush_loop(self: Rc<Self>, shutdown: LocalSignal) {
        let interval = Duration::from_millis(self.config.buffer.flush_check_interval_ms.max(1));
        loop {
            self.refresh_wal_metrics();
            let stopping = shutdown.is_raised();
            // A draining or leaving node must end up holding no unflushed rows.
            let everything = stopping || self.draining();
            for key in self.due_tables(everything) {
                if !self.flush_table(&key, stopping).await {
                    // Shutting down with the manifest unreachable: the rows stay in the WAL
                    // and are replayed at the next start.
                    return;
                }
            }
            if let Some(reason) = self.fenced_rows() {
                // Survivors flushed rows this shard still holds (it was declared dead while it
                // ran, e.g. behind a partition). Keeping them would count them twice, and a
                // buffer cannot give up a prefix: stop, and the restart replays only above
                // the fence.
                self.fatal
                    .report(format!("shard {}", self.shard_id), reason);
                return;
            }
            self.take_over().await;
            self.replicas.release(&self.manifest.current()).await;
            let (rows, bytes) = self
                .replicas
                .status()
                .iter()
                .fold((0, 0), |(r, b), s| (r + s.4, b + s.5));
            self.metrics.replica_buffer_rows.set(rows as u64);
            self.metrics.replica_buffer_bytes.set(bytes as u64);
            if stopping {
                break;
            }
            let wanted = self.flush_wanted.notified();
            futures_lite::future::or(
                futures_lite::future::or(wanted, shutdown.wait()),
                glommio::timer::sleep(interval),
            )
            .await;
        }
    }

    /// Whether this node's committed cluster state is draining or leaving.
    fn draining(&self) -> bool {
        self.config.cluster.enabled
            && self
                .manifest
                .current()
                .manifest
                .node_state(self.manifest.node_id())
                .is_some_and(|state| state.is_draining())
    }

    /// Tables whose buffer is over a threshold (or non-empty at all, when `everything`).
    fn due_tables(&self, everything: bool) -> Vec<TableKey> {
        let age_max = Duration::from_millis(self.config.buffer.flush_age_ms_max);
        let rows_max = self.config.buffer.flush_rows_max;
        let bytes_max = self.config.buffer.flush_bytes_max;
        let pressure = self.buffered_bytes.get() > self.config.buffer.shard_bytes_max / 2;
        let forced = std::mem::take(&mut *self.flush_forced.borrow_mut());
        let rejected = self.rejected.borrow();
        let mut due = Vec::new();
        for (database, tables) in self.buffers.borrow().iter() {
            for (measurement, buffer) in tables {
                if buffer.rows() == 0 {
                    continue;
                }
                let key = (database.clone(), measurement.clone());
                if rejected.contains_key(&key) {
                    continue;
                }
                if forced.contains(&key) {
                    due.push(key);
                    continue;
                }
                let old = buffer
                    .oldest_row_at()
                    .is_some_and(|at| at.elapsed() >= age_max);
                if everything
                    || pressure
                    || old
                    || buffer.rows() >= rows_max
                    || buffer.bytes_estimate() >= bytes_max
                {
                    due.push(key);
                }
            }
        }
        due
    }

    /// Freezes one buffer and makes its rows durable in the manifest, retrying until it does.
    /// Only one flush runs per shard at a time, so a table's files commit in LSN order (replay
    /// relies on that: everything at or below a committed file's last LSN is in files).
    ///
    /// Returns false only when `stopping` and the flush kept failing: shutdown must not hang on
    /// an unreachable manifest, and the WAL still holds the rows.
    async fn flush_table(self: &Rc<Self>, key: &TableKey, stopping: bool) -> bool {
        let frozen = {
            let mut buffers = self.buffers.borrow_mut();
            let Some(buffer) = buffers.get_mut(&key.0).and_then(|t| t.get_mut(&key.1)) else {
                return true;
            };
            match buffer.freeze() {
                Some(frozen) => frozen,
                None => return true,
            }
        };
        let started = Instant::now();
        let frozen = Arc::new(frozen);
        *self.flushing.borrow_mut() = Some((key.clone(), frozen.clone()));
        let mut attempt = 0u32;
        loop {
            match self.flush_frozen(key, &frozen).await {
                Ok(files) => {
                    self.metrics.flushes.increment();
                    self.metrics.flush_latency.observe(started.elapsed());
                    tracing::debug!(
                        shard_id = self.shard_id,
                        database = %key.0,
                        measurement = %key.1,
                        files,
                        rows = frozen.rows(),
                        lsn_last = frozen.lsn_last,
                        "flushed"
                    );
                    break;
                }
                Err(error) if error.downcast_ref::<RegistrationRejected>().is_some() => {
                    // Final: the same entries would be refused again. The rows stay in the WAL
                    // and in queries; the table takes no new rows, every other table goes on.
                    self.metrics.registrations_rejected.increment();
                    tracing::error!(
                        shard_id = self.shard_id,
                        database = %key.0,
                        measurement = %key.1,
                        lsn_first = frozen.lsn_first,
                        lsn_last = frozen.lsn_last,
                        error = %format!("{error:#}"),
                        "flush refused by the manifest; the table stops taking writes on this shard"
                    );
                    self.flushing.borrow_mut().take();
                    self.rejected
                        .borrow_mut()
                        .insert(key.clone(), (frozen.clone(), format!("{error:#}")));
                    self.release_wal().await;
                    return true;
                }
                Err(error) if self.wal_failed() => {
                    // Rows past the last durable LSN can never be published; the node is
                    // stopping (fail-stop) and replay will bring back what is durable.
                    tracing::warn!(
                        shard_id = self.shard_id,
                        error = %format!("{error:#}"),
                        "flush abandoned: the wal failed"
                    );
                    return false;
                }
                Err(error) => {
                    attempt += 1;
                    self.metrics.flush_errors.increment();
                    tracing::warn!(
                        shard_id = self.shard_id,
                        database = %key.0,
                        measurement = %key.1,
                        attempt,
                        error = %format!("{error:#}"),
                        "flush failed; retrying"
                    );
                    if stopping && attempt >= 3 {
                        tracing::warn!(
                            shard_id = self.shard_id,
                            "giving up the flush at shutdown; the WAL keeps its rows for replay"
                        );
                        return false;
                    }
                    self.registration_pause(attempt).await;
                }
            }
        }
        self.flushing.borrow_mut().take();
        let bytes = frozen.bytes_estimate;
        self.buffered_bytes
            .set(self.buffered_bytes.get().saturating_sub(bytes));
        self.metrics
            .buffer_bytes
            .set(self.buffered_bytes.get() as u64);
        let rows_left: usize = self
            .buffers
            .borrow()
            .values()
            .flat_map(|t| t.values())
            .map(|b| b.rows())
            .sum();
        self.metrics.buffer_rows.set(rows_left as u64);
        self.release_wal().await;
        true
    }

    /// Why this shard must restart: a committed fence on it covers rows it still holds.
    fn fenced_rows(&self) -> Option<String> {
        let version = self.manifest.current();
        let fence = version.manifest.fence_of(self.node_id, self.shard_id)?;
        let mut lowest: Option<u64> = None;
        let mut note = |lsn: u64| lowest = Some(lowest.map_or(lsn, |l| l.min(lsn)));
        if let Some((_, frozen)) = self.flushing.borrow().as_ref() {
            note(frozen.lsn_first);
        }
        for (frozen, _) in self.rejected.borrow().values() {
            note(frozen.lsn_first);
        }
        for tables in self.buffers.borrow().values() {
            for buffer in tables.values() {
                if let Some(lsn) = buffer.lsn_first() {
                    note(lsn);
                }
            }
        }
        let lowest = lowest?;
        (lowest <= fence.through_lsn).then(|| {
            format!(
                "node {} took over this shard's rows through lsn {} (this node was declared \
                 dead) and this shard still holds rows from lsn {lowest}; restarting replays \
                 only the rows above the fence",
                fence.taker, fence.through_lsn
            )
        })
    }

    /// Flushes the replicated rows of every origin shard the manifest fenced for this node
    /// (a takeover of a dead node) into files registered under the origin's LSN ranges,
    /// named and marked as this node's. Table by table in LSN order; a failure stops that
    /// table until the next check, so files still commit in LSN order. Idempotent: a retry
    /// after a crash publishes the same names and re-registers identical entries.
    async fn take_over(self: &Rc<Self>) {
        let version = self.manifest.current();
        for log in self.replicas.logs() {
            let Some(fence) = version.manifest.fence_of(log.origin, log.shard) else {
                continue;
            };
            if fence.taker != self.node_id {
                continue;
            }
            for table in log.tables() {
                let after = version
                    .manifest
                    .flushed_through(log.origin, log.shard, &table.0, &table.1)
                    .unwrap_or(0);
                if after >= fence.through_lsn {
                    continue;
                }
                for frozen in log.rows_between(&table, after, fence.through_lsn) {
                    if let Err(error) = self
                        .flush_taken(log.origin, log.shard, &table, &frozen)
                        .await
                    {
                        self.metrics.flush_errors.increment();
                        tracing::warn!(
                            origin = log.origin,
                            origin_shard = log.shard,
                            database = %table.0,
                            measurement = %table.1,
                            lsn_first = frozen.lsn_first,
                            error = %format!("{error:#}"),
                            "takeover flush failed; retrying at the next check"
                        );
                        break;
                    }
                    tracing::info!(
                        origin = log.origin,
                        origin_shard = log.shard,
                        database = %table.0,
                        measurement = %table.1,
                        lsn_first = frozen.lsn_first,
                        lsn_last = frozen.lsn_last,
                        rows = frozen.rows(),
                        "took over a dead node's rows into files"
                    );
                }
            }
        }
    }

    /// Encodes, publishes and registers one part of a dead origin's rows as this node's
    /// takeover files.
    async fn flush_taken(
        &self,
        origin: u64,
        origin_shard: u32,
        table: &TableKey,
        frozen: &crate::buffer::FrozenBuffer,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let parquet = Arc::new(self.config.parquet.clone());
        let (database, measurement) = table.clone();
        let taker = self.node_id;
        let encode_input = crate::buffer::FrozenBuffer {
            chunks: frozen.chunks.clone(),
            tag_columns: frozen.tag_columns.clone(),
            ..*frozen
        };
        let encoded = glommio::executor()
            .spawn_blocking(move || {
                let file_origin = FileOrigin {
                    database: &database,
                    measurement: &measurement,
                    node: origin,
                    shard: origin_shard,
                    taker: Some(taker),
                };
                storage::encode(&encode_input, &file_origin, &parquet)
            })
            .await
            .context("encode parquet")?;
        let entries = self
            .publish_files(
                &encoded,
                FlushSource {
                    table,
                    origin,
                    shard: origin_shard,
                    lsn_first: frozen.lsn_first,
                    lsn_last: frozen.lsn_last,
                    taken_by: Some(taker),
                },
            )
            .await?;
        self.register(entries).await
    }

    /// Publishes the encoded files of one flush durably and returns their manifest entries.
    /// Idempotent: a file already at its path is reused if the manifest registers it with
    /// exactly these bytes (a retry after the registration committed but before it was seen),
    /// refused if it registers other content, and replaced if unregistered (left by a crash
    /// before its registration: nothing reads it, and the WAL still holds its rows).
    async fn publish_files(
        &self,
        encoded: &[storage::EncodedFile],
        source: FlushSource<'_>,
    ) -> anyhow::Result<Vec<FileEntry>> {
        use anyhow::Context;
        let version = self.manifest.current();
        let created_at_ms = now_ms();
        let mut entries = Vec::with_capacity(encoded.len());
        for file in encoded {
            let relative = file.relative_path.to_string_lossy().into_owned();
            let absolute = self.data_dir.join(&file.relative_path);
            let published = match publish::publish(&absolute, &file.bytes).await {
                Ok(published) => published,
                Err(PublishError::Exists { .. }) => {
                    if let Some(entry) = version.manifest.file(&relative) {
                        let hash = blake3::hash(&file.bytes);
                        if entry.size_bytes != file.bytes.len() as u64
                            || entry.blake3_hex != hash.to_hex().as_str()
                        {
                            return Err(RegistrationRejected(format!(
                                "{relative} is registered with other content (blake3 {}, \
                                 this flush {})",
                                entry.blake3_hex,
                                hash.to_hex()
                            ))
                            .into());
                        }
                        entries.push(entry.clone());
                        continue;
                    }
                    std::fs::remove_file(&absolute)
                        .with_context(|| format!("remove unregistered {}", absolute.display()))?;
                    publish::publish(&absolute, &file.bytes)
                        .await
                        .context("publish parquet")?
                }
                Err(error) => return Err(error).context("publish parquet"),
            };
            self.metrics.files_written.increment();
            self.metrics.file_bytes_written.add(published.size_bytes);
            entries.push(FileEntry {
                path: relative,
                size_bytes: published.size_bytes,
                blake3_hex: published.blake3_hex(),
                rows: file.rows,
                time_min_us: file.time_min_us,
                time_max_us: file.time_max_us,
                database: source.table.0.clone(),
                measurement: source.table.1.clone(),
                origin_node: source.origin,
                shard: source.shard,
                lsn_first: source.lsn_first,
                lsn_last: source.lsn_last,
                created_at_ms,
                columns_fingerprint: file.columns_fingerprint,
                taken_by: source.taken_by,
            });
        }
        Ok(entries)
    }

    /// Encode, publish, journal, register. Idempotent: a retry after any failure converges.
    async fn flush_frozen(
        &self,
        key: &TableKey,
        frozen: &Arc<FrozenBuffer>,
    ) -> anyhow::Result<usize> {
        use anyhow::Context;
        self.wait_durable(frozen.lsn_last).await?;
        let parquet = Arc::new(self.config.parquet.clone());
        let (database, measurement) = (key.0.clone(), key.1.clone());
        let (node, shard) = (self.node_id, self.shard_id);
        let encode_input = frozen.clone();
        let encoded = glommio::executor()
            .spawn_blocking(move || {
                let origin = FileOrigin {
                    database: &database,
                    measurement: &measurement,
                    node,
                    shard,
                    taker: None,
                };
                storage::encode(&encode_input, &origin, &parquet)
            })
            .await
            .context("encode parquet")?;

        self.refresh_wal_metrics();
        let entries = self
            .publish_files(
                &encoded,
                FlushSource {
                    table: key,
                    origin: self.node_id,
                    shard: self.shard_id,
                    lsn_first: frozen.lsn_first,
                    lsn_last: frozen.lsn_last,
                    taken_by: None,
                },
            )
            .await?;
        let journal = self.pending_dir.join(format!(
            "{}-{}-{:020}-{:020}.json",
            sanitize(&key.0),
            sanitize(&key.1),
            frozen.lsn_first,
            frozen.lsn_last
        ));
        let journal_bytes = serde_json::to_vec(&entries).context("serialise pending journal")?;
        if journal.exists() {
            std::fs::remove_file(&journal).context("replace pending journal")?;
        }
        crate::failpoint::crash_if_armed("crash-after-publish");
        publish::publish(&journal, &journal_bytes)
            .await
            .context("write pending journal")?;
        crate::failpoint::crash_if_armed("crash-after-journal");
        if let Err(error) = self.register(entries).await {
            if error.downcast_ref::<RegistrationRejected>().is_some() {
                // Nothing will register these entries: keep the journal for the operator
                // under another name, out of start-up's way.
                set_journal_aside(&journal, "rejected");
            }
            return Err(error);
        }
        crate::failpoint::crash_if_armed("crash-after-register");
        std::fs::remove_file(&journal).context("remove pending journal")?;
        Ok(encoded.len())
    }

    /// Proposes a registration through the control thread and waits for its commit.
    async fn register(&self, files: Vec<FileEntry>) -> anyhow::Result<()> {
        if let Some(measurement) = crate::failpoint::value("reject-registration") {
            if files.iter().any(|f| f.measurement == measurement) {
                return Err(RegistrationRejected("failpoint reject-registration".into()).into());
            }
        }
        let started = Instant::now();
        let count = files.len() as u64;
        match self
            .manifest
            .propose(ManifestCommand::Register { files })
            .await
        {
            Ok(receipt) => match receipt.response {
                ManifestResponse::Applied { .. } => {
                    self.metrics.manifest_commits.add(count);
                    self.metrics
                        .manifest_commit_latency
                        .observe(started.elapsed());
                    Ok(())
                }
                ManifestResponse::Rejected(rejection) => {
                    Err(RegistrationRejected(rejection.to_string()).into())
                }
            },
            Err(ManifestError::Rejected(rejection)) => {
                Err(RegistrationRejected(rejection.to_string()).into())
            }
            Err(error) => {
                self.metrics.manifest_commit_errors.increment();
                anyhow::bail!("manifest registration failed: {error}")
            }
        }
    }

    /// Registers flushes whose files were published but whose registration a crash cut off.
    ///
    /// A journal never stops start-up: its rows are still in the WAL (the WAL is released only
    /// after a registration commits), so a journal that cannot be used (unreadable, files
    /// missing or changed, refused by the manifest) is logged, counted and set aside, and WAL
    /// replay brings its rows back. A manifest that cannot be reached is waited for: the
    /// shard stays not ready and retries until it commits or the node stops.
    async fn register_pending_journal(&self) -> anyhow::Result<usize> {
        use anyhow::Context;
        let mut journals = BTreeSet::new();
        match std::fs::read_dir(&self.pending_dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry.context("list pending journal")?.path();
                    if path.extension().is_some_and(|e| e == "json") {
                        journals.insert(path);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).context("list pending journal"),
        }
        let mut registered = 0;
        for path in journals {
            let entries = match self.check_journal(&path) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::error!(
                        shard_id = self.shard_id,
                        journal = %path.display(),
                        error = %format!("{error:#}"),
                        "pending journal unusable; set aside, its rows replay from the wal"
                    );
                    set_journal_aside(&path, "invalid");
                    continue;
                }
            };
            let version = self.manifest.current();
            let already = entries
                .iter()
                .all(|entry| version.manifest.file(&entry.path) == Some(entry));
            let mut attempt = 0u32;
            if !already {
                loop {
                    match self.register(entries.clone()).await {
                        Ok(()) => break,
                        Err(error) if error.downcast_ref::<RegistrationRejected>().is_some() => {
                            self.metrics.registrations_rejected.increment();
                            tracing::error!(
                                shard_id = self.shard_id,
                                journal = %path.display(),
                                error = %format!("{error:#}"),
                                "journaled flush refused by the manifest; set aside, its rows replay from the wal"
                            );
                            set_journal_aside(&path, "rejected");
                            // Its files were never registered and never will be (a takeover
                            // fenced them, or the manifest holds other content at the path);
                            // its rows replay from the WAL if they are still this shard's.
                            let version = self.manifest.current();
                            for entry in &entries {
                                if version.manifest.file(&entry.path).is_none() {
                                    let _ = std::fs::remove_file(self.data_dir.join(&entry.path));
                                }
                            }
                            break;
                        }
                        Err(error) => {
                            attempt += 1;
                            tracing::warn!(
                                shard_id = self.shard_id,
                                attempt,
                                error = %format!("{error:#}"),
                                "journal registration failed; retrying"
                            );
                            self.registration_pause(attempt).await;
                        }
                    }
                }
            }
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("remove pending journal {}", path.display()))?;
                registered += entries.len();
            }
        }
        Ok(registered)
    }

    /// Reads a pending journal and checks each journaled file's size and blake3 on disk.
    fn check_journal(&self, path: &std::path::Path) -> anyhow::Result<Vec<FileEntry>> {
        use anyhow::Context;
        let bytes = std::fs::read(path).context("read pending journal")?;
        let entries: Vec<FileEntry> =
            serde_json::from_slice(&bytes).context("parse pending journal")?;
        for entry in &entries {
            let file = self.data_dir.join(&entry.path);
            let (hash, size) = publish::hash_file(&file)
                .with_context(|| format!("check journaled file {}", file.display()))?;
            anyhow::ensure!(
                size == entry.size_bytes
                    && blake3::Hash::from(hash).to_hex().as_str() == entry.blake3_hex,
                "journaled file {} does not match its journal entry",
                file.display()
            );
        }
        Ok(entries)
    }

    /// Recovers the WAL and journals of a shard id at or above the configured shard count
    /// (left by a run with more shards) and flushes all of its rows into files registered
    /// under its own id and LSNs, so replay stays idempotent. The WAL directory stays, with
    /// its release marker, so the id's LSNs never go backwards if the shard count grows again.
    pub async fn drain_retired(self: &Rc<Self>) -> anyhow::Result<()> {
        self.recover().await?;
        for key in self.due_tables(true) {
            anyhow::ensure!(
                self.flush_table(&key, true).await,
                "could not flush {}.{} of retired shard {}",
                key.0,
                key.1,
                self.shard_id
            );
        }
        if let Some((key, (_, reason))) = self.rejected.borrow().iter().next() {
            anyhow::bail!(
                "retired shard {}: {}.{} was refused by the manifest: {reason}",
                self.shard_id,
                key.0,
                key.1
            );
        }
        self.close().await;
        tracing::info!(shard_id = self.shard_id, "retired shard drained into files");
        Ok(())
    }

    /// Deletes WAL segments whose every record is in committed files.
    async fn release_wal(&self) {
        let Some(wal) = self.wal() else { return };
        let mut keep_from = wal.next_lsn();
        if let Some((_, frozen)) = self.flushing.borrow().as_ref() {
            keep_from = keep_from.min(frozen.lsn_first);
        }
        for (frozen, _) in self.rejected.borrow().values() {
            keep_from = keep_from.min(frozen.lsn_first);
        }
        for tables in self.buffers.borrow().values() {
            for buffer in tables.values() {
                if let Some(lsn) = buffer.lsn_first() {
                    keep_from = keep_from.min(lsn);
                }
            }
        }
        if keep_from > self.released_below.get() {
            // The marker goes first: after a crash, replay starts at it, whether or not the
            // segments below it were deleted yet.
            let marker = self.release_marker_path();
            if let Err(error) = publish::replace(&marker, keep_from.to_string().as_bytes()).await {
                tracing::warn!(shard_id = self.shard_id, %error, "wal release marker not written");
                return;
            }
            self.released_below.set(keep_from);
        }
        // Segments a live peer has not stored yet stay (within cluster.wal_peer_retention_bytes),
        // so it resumes from this WAL instead of restarting its replica log at a gap.
        let delete_below = keep_from.min(self.peer_retention_floor(&wal).unwrap_or(u64::MAX));
        match wal.release_below(delete_below).await {
            Ok(0) => {}
            Ok(_) => self.refresh_wal_metrics(),
            Err(error) => {
                tracing::warn!(shard_id = self.shard_id, %error, "wal release failed");
            }
        }
    }

    /// The lowest LSN a member of the cluster (not committed dead) still lacks of this shard's
    /// WAL, if keeping it costs at most `cluster.wal_peer_retention_bytes` of segments.
    fn peer_retention_floor(&self, wal: &Wal) -> Option<u64> {
        if !self.config.cluster.enabled {
            return None;
        }
        let metrics = self.manifest.raft_metrics()?;
        let version = self.manifest.current();
        let floor = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.node_id)
            .filter(|id| {
                version.manifest.node_state(*id)
                    != Some(shale_replication::manifest::NodeState::Dead)
            })
            .map(|peer| self.replication.acks.acked(peer) + 1)
            .min()?;
        let held_bytes = wal.stats().segments as u64 * self.config.wal.segment_bytes_max;
        if held_bytes > self.config.cluster.wal_peer_retention_bytes {
            tracing::debug!(
                shard_id = self.shard_id,
                peer_floor = floor,
                held_bytes,
                "wal kept for peers is over cluster.wal_peer_retention_bytes; releasing"
            );
            return None;
        }
        Some(floor)
    }

    fn release_marker_path(&self) -> PathBuf {
        system_dir(&self.data_dir)
            .join("wal")
            .join(format!("shard-{}.released-below", self.shard_id))
    }

    /// The LSN below which every record is in committed files (1 if nothing was released).
    fn read_release_marker(&self) -> anyhow::Result<u64> {
        use anyhow::Context;
        let path = self.release_marker_path();
        let lsn = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .with_context(|| format!("parse wal release marker {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        self.released_below.set(lsn);
        Ok(lsn)
    }

    /// Flushes everything and closes the WAL. Called once at shutdown after HTTP stopped.
    pub async fn close(self: &Rc<Self>) {
        let wal = self.wal.borrow_mut().take();
        if let Some(wal) = wal {
            if let Err(error) = wal.close().await {
                tracing::error!(shard_id = self.shard_id, %error, "wal close failed");
            }
        }
    }

    /// Copies of the unflushed rows of `tables` (buffers and a flush in progress), with the
    /// manifest version read in the same instant. See `query::snapshot` for why that pairing
    /// gives every row exactly once.
    pub fn snapshot(&self, tables: &[TableName]) -> ShardSnapshot {
        let version = self.manifest.current();
        let mut pieces = Vec::new();
        let mut buffers = self.buffers.borrow_mut();
        let flushing = self.flushing.borrow();
        for table in tables {
            let piece = |lsn_first, chunks| BufferPiece {
                table: table.clone(),
                origin_node: self.node_id,
                shard: self.shard_id,
                lsn_first,
                chunks,
                replica: None,
            };
            if let Some((key, frozen)) = flushing.as_ref() {
                if key.0 == table.database && key.1 == table.measurement {
                    pieces.push(piece(frozen.lsn_first, frozen.chunks.clone()));
                }
            }
            let key = (table.database.clone(), table.measurement.clone());
            if let Some((frozen, _)) = self.rejected.borrow().get(&key) {
                pieces.push(piece(frozen.lsn_first, frozen.chunks.clone()));
            }
            let buffer = buffers
                .get_mut(&table.database)
                .and_then(|tables| tables.get_mut(&table.measurement));
            if let Some((chunks, lsn_first)) = buffer.and_then(|b| b.snapshot()) {
                pieces.push(piece(lsn_first, chunks));
            }
            self.replicas.snapshot(table, &mut pieces);
        }
        ShardSnapshot { version, pieces }
    }

    /// The manifest as this shard sees it now.
    pub fn manifest_version(&self) -> Arc<ManifestVersion> {
        self.manifest.current()
    }

    /// Copies the WAL's statistics into this shard's metrics for `/metrics`.
    pub fn refresh_wal_metrics(&self) {
        if let Some(wal) = self.wal() {
            self.metrics.wal.update(&wal.stats());
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn field_kind(value: &FieldValue<'_>) -> ColumnKind {
    match value {
        FieldValue::Float(_) => ColumnKind::Float,
        FieldValue::Integer(_) => ColumnKind::Integer,
        FieldValue::Unsigned(_) => ColumnKind::Unsigned,
        FieldValue::Boolean(_) => ColumnKind::Boolean,
        FieldValue::String(_) => ColumnKind::String,
    }
}

/// Whether a WAL directory holds any segment file (a missing directory holds none).
fn wal_has_segments(dir: &std::path::Path) -> anyhow::Result<bool> {
    use anyhow::Context;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.with_context(|| format!("list {}", dir.display()))?;
                if entry.path().extension().is_some_and(|e| e == "wal") {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error).with_context(|| format!("list {}", dir.display())),
    }
}

/// Renames an unusable pending journal to `<name>.<reason>` so start-up skips it and an
/// operator can still read it. Failing that, it is left in place (and retried next start).
fn set_journal_aside(path: &std::path::Path, reason: &str) {
    let aside = path.with_extension(format!("json.{reason}"));
    if let Err(error) = std::fs::rename(path, &aside) {
        tracing::error!(journal = %path.display(), %error, "pending journal not set aside");
    }
}

/// Names are validated before they get here; this only keeps journal names filesystem-safe.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The WAL directory of this node's shard `shard`.
pub fn wal_dir(data_dir: &std::path::Path, shard: u32) -> PathBuf {
    system_dir(data_dir)
        .join("wal")
        .join(format!("shard-{shard}"))
}

/// Where the node keeps its own state (WAL, Raft, journals). Database names must start with a
/// letter, so `_system` can never collide with a database directory.
pub fn system_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("_system")
}
