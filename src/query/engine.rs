//! The query engine: a pool of DuckDB worker threads ("shale-query-<i>"), each with its own
//! sandboxed in-memory DuckDB, fed through a bounded job queue.
//!
//! Threads: shards submit jobs and await events over flume channels; they never block on
//! DuckDB. A worker blocks on DuckDB and on the shards' snapshot answers. Each worker has a
//! watchdog thread that interrupts its connection when a query passes its deadline.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

use super::encode::{ArrowEncoder, JsonEncoder};
use super::snapshot::{reconcile, BufferPiece, ShardSnapshot, SnapshotRequest, TableName};
use crate::config::QueryConfig;
use crate::sql_guard::{self, GuardLimits};
use shale_replication::files::holdings::Holdings;
use shale_replication::manifest::FileEntry;

/// The answer format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Arrow,
}

pub struct QueryRequest {
    pub sql: String,
    pub default_database: Option<String>,
    pub format: Format,
}

/// What a submitted query sends back, in order: `Head` then `Chunk`s then `End`, or `Failed`
/// at any point (after `Head`, the response is cut off).
pub enum QueryEvent {
    Head,
    Chunk(Bytes),
    End,
    Failed(QueryError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Sql(String),
    #[error("query queue is full ({0} waiting); retry later")]
    Busy(usize),
    #[error("query exceeded its time limit of {0} ms")]
    Timeout(u64),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Internal(String),
    /// A file the query needs is damaged on this node (being repaired, or lost everywhere).
    #[error("{0}")]
    Unavailable(String),
    /// A damaged file the query needed was repaired while it waited: plan the query again
    /// (the snapshot was taken without it). Never reaches a client.
    #[error("a file was repaired while the query waited; planning again")]
    Replan,
}

struct Job {
    request: QueryRequest,
    events: flume::Sender<QueryEvent>,
    submitted_at: Instant,
}

/// Owns the worker threads; stop them with [`QueryEngine::shutdown`].
pub struct QueryEngine {
    jobs: flume::Sender<Message>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// Submits queries; cheap to clone, usable from any thread (shards hold one each).
#[derive(Clone)]
pub struct QueryClient {
    jobs: flume::Sender<Message>,
    queue_depth_max: usize,
    pub metrics: Arc<EngineMetrics>,
}

/// Counters of the engine, written by the workers, read by `/metrics`.
#[derive(Default)]
pub struct EngineMetrics {
    pub queries: crate::metrics::Counter,
    pub query_errors: crate::metrics::Counter,
    pub query_timeouts: crate::metrics::Counter,
    pub files_read: crate::metrics::Counter,
    pub files_pruned: crate::metrics::Counter,
    /// Files of the pinned version not on this node's disk yet (still being fetched).
    pub files_absent: crate::metrics::Counter,
    /// Queries that failed because a file they needed was damaged here (lost, or not repaired
    /// before their deadline).
    pub files_unavailable: crate::metrics::Counter,
    pub buffer_pieces: crate::metrics::Counter,
}

enum Message {
    Query(Job),
    Stop,
}

impl QueryEngine {
    /// Opens one sandboxed DuckDB per worker and starts the workers.
    pub fn start(
        config: QueryConfig,
        data_dir: &Path,
        holdings: Holdings,
        shards: Vec<flume::Sender<SnapshotRequest>>,
    ) -> anyhow::Result<(QueryEngine, QueryClient)> {
        use anyhow::Context;
        quiet_stream_panics();
        let (jobs, receiver) = flume::bounded::<Message>(config.queue_depth_max.max(1));
        let shards = Arc::new(shards);
        let metrics = Arc::new(EngineMetrics::default());
        let mut workers = Vec::with_capacity(config.workers);
        for index in 0..config.workers.max(1) {
            let connection = open_sandboxed(&config, data_dir)
                .with_context(|| format!("open DuckDB for query worker {index}"))?;
            let (receiver, shards, config) = (receiver.clone(), shards.clone(), config.clone());
            let metrics = metrics.clone();
            let data_dir = data_dir.to_path_buf();
            let holdings = holdings.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("shale-query-{index}"))
                    .spawn(move || {
                        Worker::new(connection, config, data_dir, holdings, shards, metrics)
                            .run(receiver)
                    })
                    .context("start query worker")?,
            );
        }
        let client = QueryClient {
            jobs: jobs.clone(),
            queue_depth_max: config.queue_depth_max,
            metrics,
        };
        Ok((QueryEngine { jobs, workers }, client))
    }

    /// Lets the workers finish what is queued, then stops and joins them.
    pub fn shutdown(self) {
        for _ in &self.workers {
            let _ = self.jobs.send(Message::Stop);
        }
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

impl QueryClient {
    /// Queues a query; its events arrive on the returned channel. Never blocks.
    pub fn submit(&self, request: QueryRequest) -> Result<flume::Receiver<QueryEvent>, QueryError> {
        let (events, receiver) = flume::bounded(16);
        let job = Job {
            request,
            events,
            submitted_at: Instant::now(),
        };
        match self.jobs.try_send(Message::Query(job)) {
            Ok(()) => Ok(receiver),
            Err(flume::TrySendError::Full(_)) => Err(QueryError::Busy(self.queue_depth_max)),
            Err(flume::TrySendError::Disconnected(_)) => {
                Err(QueryError::Internal("query engine is shut down".into()))
            }
        }
    }
}

/// An in-memory DuckDB that can read nothing but the data directory, loads no extension, and
/// whose configuration is locked before any user SQL runs.
fn open_sandboxed(config: &QueryConfig, data_dir: &Path) -> duckdb::Result<duckdb::Connection> {
    let connection = duckdb::Connection::open_in_memory()?;
    let allowed = data_dir.display().to_string().replace('\'', "''");
    connection.execute_batch(&format!(
        "SET threads = {threads};
         SET memory_limit = '{memory}B';
         SET TimeZone = 'UTC';
         SET parquet_metadata_cache = true;
         SET autoinstall_known_extensions = false;
         SET autoload_known_extensions = false;
         SET allowed_directories = ['{allowed}/'];
         SET enable_external_access = false;
         SET lock_configuration = true;",
        threads = config.duckdb_threads.max(1),
        memory = config.duckdb_memory_bytes_max,
    ))?;
    Ok(connection)
}

/// DuckDB's streaming iterator panics when a fetch fails (an interrupted query, say); workers
/// catch that panic and report an error, so the default hook's message would only be noise.
fn quiet_stream_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let on_worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("shale-query-"));
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or("");
            if on_worker && message.starts_with("Failed to fetch Arrow record batch") {
                return;
            }
            previous(info);
        }));
    });
}

struct Worker {
    connection: duckdb::Connection,
    config: QueryConfig,
    data_dir: PathBuf,
    /// What this node holds and what is damaged (empty on a standalone node).
    holdings: Holdings,
    shards: Arc<Vec<flume::Sender<SnapshotRequest>>>,
    watchdog: flume::Sender<WatchdogMessage>,
    timed_out: Arc<AtomicBool>,
    metrics: Arc<EngineMetrics>,
    /// Copies of unflushed rows kept across queries (see `refresh_piece_cache`).
    piece_cache: std::cell::RefCell<HashMap<PieceKey, CachedPiece>>,
    cache_sequence: std::cell::Cell<u64>,
    /// Makes the next append fail before the batch at this index (after the earlier batches
    /// went in), so tests can check what a failure half-way leaves behind.
    #[cfg(test)]
    append_fault: std::cell::Cell<Option<usize>>,
}

enum WatchdogMessage {
    Start(Instant),
    Done,
}

impl Worker {
    fn new(
        connection: duckdb::Connection,
        config: QueryConfig,
        data_dir: PathBuf,
        holdings: Holdings,
        shards: Arc<Vec<flume::Sender<SnapshotRequest>>>,
        metrics: Arc<EngineMetrics>,
    ) -> Worker {
        let (watchdog, messages) = flume::unbounded::<WatchdogMessage>();
        let interrupt = connection.interrupt_handle();
        let timed_out = Arc::new(AtomicBool::new(false));
        let flag = timed_out.clone();
        let name = format!(
            "{}-watchdog",
            std::thread::current().name().unwrap_or("shale-query")
        );
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(message) = messages.recv() {
                let WatchdogMessage::Start(deadline) = message else {
                    continue;
                };
                match messages.recv_deadline(deadline) {
                    Ok(_) => {}
                    Err(flume::RecvTimeoutError::Timeout) => {
                        flag.store(true, Ordering::SeqCst);
                        interrupt.interrupt();
                        // Wait for the worker to acknowledge the end of this query.
                        while let Ok(message) = messages.recv() {
                            if matches!(message, WatchdogMessage::Done) {
                                break;
                            }
                        }
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Worker {
            connection,
            config,
            data_dir,
            holdings,
            shards,
            watchdog,
            timed_out,
            metrics,
            piece_cache: std::cell::RefCell::new(HashMap::new()),
            cache_sequence: std::cell::Cell::new(0),
            #[cfg(test)]
            append_fault: std::cell::Cell::new(None),
        }
    }

    fn run(self, jobs: flume::Receiver<Message>) {
        while let Ok(Message::Query(job)) = jobs.recv() {
            if job.events.is_disconnected() {
                continue;
            }
            let deadline = job.submitted_at + Duration::from_millis(self.config.timeout_ms);
            self.timed_out.store(false, Ordering::SeqCst);
            let _ = self.watchdog.send(WatchdogMessage::Start(deadline));
            let started = Instant::now();
            let mut created = Vec::new();
            let mut result = self.execute(&job, &mut created, started, deadline);
            while matches!(result, Err(QueryError::Replan)) {
                self.end_transaction(&mut created);
                result = self.execute(&job, &mut created, started, deadline);
            }
            let _ = self.watchdog.send(WatchdogMessage::Done);
            self.metrics.queries.increment();
            let event = match result {
                Ok(()) => QueryEvent::End,
                Err(error) => {
                    self.metrics.query_errors.increment();
                    // The watchdog flags a query it interrupted in DuckDB; a send to a client
                    // that stopped reading reports its own timeout.
                    let error = if self.timed_out.load(Ordering::SeqCst)
                        || matches!(error, QueryError::Timeout(_))
                    {
                        self.metrics.query_timeouts.increment();
                        QueryError::Timeout(self.config.timeout_ms)
                    } else {
                        error
                    };
                    QueryEvent::Failed(error)
                }
            };
            // The answer is complete: the client need not wait for the clean-up, and the next
            // job starts only after it. The last event waits for room no longer than the rest:
            // if the client has not made room by the deadline, dropping the channel ends the
            // response with an error, which is all a client that stopped reading can be told.
            let ended = matches!(event, QueryEvent::End);
            if let Err(flume::SendTimeoutError::Timeout(_)) =
                job.events.send_deadline(event, deadline)
            {
                if ended {
                    self.metrics.query_errors.increment();
                    self.metrics.query_timeouts.increment();
                }
                tracing::debug!(
                    timeout_ms = self.config.timeout_ms,
                    "client did not read the answer in time; abandoned"
                );
            }
            self.end_transaction(&mut created);
        }
    }

    /// Ends the query's transaction (begun in `execute`), dropping its views.
    fn end_transaction(&self, created: &mut Vec<String>) {
        if let Err(error) = self.connection.execute_batch("ROLLBACK") {
            tracing::debug!(%error, "end query transaction");
        }
        for object in created.drain(..).rev() {
            // Temporary objects of this query only; failure to drop is harmless (the next
            // query replaces them) but worth a log line.
            if let Err(error) = self.connection.execute_batch(&object) {
                tracing::debug!(%error, "drop temporary query object");
            }
        }
    }

    /// Checks, snapshots, builds the views and streams the result. `created` collects the
    /// statements that drop what this query created.
    fn execute(
        &self,
        job: &Job,
        created: &mut Vec<String>,
        started: Instant,
        deadline: Instant,
    ) -> Result<(), QueryError> {
        let checked = sql_guard::check(
            &job.request.sql,
            job.request.default_database.as_deref(),
            &GuardLimits {
                sql_bytes_max: self.config.sql_bytes_max,
            },
        )
        .map_err(|e| QueryError::Rejected(e.to_string()))?;

        let mut tables: Vec<TableName> = checked
            .tables
            .iter()
            .map(|(_, t)| TableName {
                database: t.database.clone(),
                measurement: t.measurement.clone(),
            })
            .collect();
        tables.sort();
        tables.dedup();
        let checked_at = started.elapsed();
        let (reconciled, current) = self.snapshot(tables)?;
        let (version, pieces, file_cuts) =
            (reconciled.version, reconciled.pieces, reconciled.file_cuts);
        let snapshot_at = started.elapsed();
        let cached = self.refresh_piece_cache(&pieces, &current)?;
        let cache_at = started.elapsed();
        // One transaction per query from here: `now()` in time bounds and in the query is the
        // same instant, and rolling back drops the views the query made.
        self.connection
            .execute_batch("BEGIN TRANSACTION")
            .map_err(|e| QueryError::Internal(format!("begin query transaction: {e}")))?;
        let ranges = self.time_ranges(&checked.sql);
        let ranges_at = started.elapsed();

        for (placeholder, table) in &checked.tables {
            let (lower, upper) = ranges
                .iter()
                .find(|(name, _, _)| name == placeholder)
                .map_or((i64::MIN, i64::MAX), |(_, lower, upper)| (*lower, *upper));
            let total = version
                .manifest
                .file_count_for(&table.database, &table.measurement);
            let mut entries =
                version
                    .manifest
                    .files_in(&table.database, &table.measurement, lower, upper);
            // In a cluster a file is registered before every node has fetched it. A file
            // reaches its final path only once verified (a flush publishes before it
            // registers; a fetch renames after checking size and blake3), so a query skips
            // the ones not there yet instead of failing: it reads that origin's data as of
            // what has arrived (eventual consistency; `shale_query_files_absent_total`).
            let present = |f: &&FileEntry| self.data_dir.join(&f.path).exists();
            // A file this node held and lost (damaged, set aside by anti-entropy, or gone from
            // disk behind its back) is not "not fetched yet": its rows left the replica buffers
            // when it arrived, so skipping it would be a silent partial answer. The query
            // waits for its repair within its deadline (then plans again, since the snapshot
            // was cut without it), and fails naming the file if it is lost or not back in time.
            let suspect: Vec<&str> = entries
                .iter()
                .filter(|f| !present(f) || self.holdings.damaged(&f.path).is_some())
                .map(|f| f.path.as_str())
                .collect();
            if !suspect.is_empty() {
                let on_disk = |path: &str| self.data_dir.join(path).exists();
                // Stop waiting a little before the deadline, so the answer names the file
                // rather than the watchdog's plain timeout.
                let margin = Duration::from_millis((self.config.timeout_ms / 10).min(500));
                let wait_until = deadline.checked_sub(margin).unwrap_or(deadline);
                match self.holdings.wait_usable(&suspect, &on_disk, wait_until) {
                    Ok(false) => {}
                    Ok(true) => return Err(QueryError::Replan),
                    Err(unusable) => {
                        self.metrics.files_unavailable.increment();
                        return Err(QueryError::Unavailable(unusable.to_string()));
                    }
                }
            }
            // Files of a stream above its cut hold rows this node answers from replicated
            // buffers (see `query::snapshot`): reading them too would count those rows twice.
            if !file_cuts.is_empty() {
                let table_name = TableName {
                    database: table.database.clone(),
                    measurement: table.measurement.clone(),
                };
                entries.retain(|f| {
                    file_cuts
                        .get(&(f.origin_node, f.shard, table_name.clone()))
                        .is_none_or(|cut| f.lsn_last <= *cut)
                });
            }
            let before = entries.len();
            entries.retain(present);
            if entries.len() < before {
                self.metrics
                    .files_absent
                    .add((before - entries.len()) as u64);
            }
            if entries.is_empty() && total > 0 {
                // Keep one file so the view has the table's columns; the query's own WHERE
                // filters its rows (every file it could take lies outside the query's time
                // range). Never one above a stream's cut: buffers answer those rows, so its
                // rows would count twice.
                let table_name = TableName {
                    database: table.database.clone(),
                    measurement: table.measurement.clone(),
                };
                let below_cut = |f: &&FileEntry| {
                    file_cuts
                        .get(&(f.origin_node, f.shard, table_name.clone()))
                        .is_none_or(|cut| f.lsn_last <= *cut)
                };
                entries.extend(
                    version
                        .manifest
                        .files_for(&table.database, &table.measurement)
                        .find(|f| below_cut(f) && present(f)),
                );
            }
            self.metrics.files_read.add(entries.len() as u64);
            self.metrics
                .files_pruned
                .add((total - entries.len()) as u64);
            self.metrics
                .buffer_pieces
                .add(table_pieces_count(&pieces, table) as u64);
            tracing::debug!(
                table = %format!("{}.{}", table.database, table.measurement),
                files = entries.len(),
                files_pruned = total - entries.len(),
                "query files"
            );
            let table_pieces: Vec<&BufferPiece> = pieces
                .iter()
                .filter(|p| {
                    p.table.database == table.database && p.table.measurement == table.measurement
                })
                .collect();
            if entries.is_empty() && table_pieces.is_empty() {
                return Err(QueryError::NotFound(format!(
                    "table {}.{} does not exist (no data has been written to it)",
                    table.database, table.measurement
                )));
            }
            let mut parts = file_scans(&self.data_dir, &entries);
            for piece in &table_pieces {
                let name = &cached[&piece_key(piece)];
                parts.push(format!("SELECT * FROM \"{name}\""));
            }
            let view = format!(
                "CREATE OR REPLACE TEMP VIEW \"{placeholder}\" AS {}",
                parts.join(" UNION ALL BY NAME ")
            );
            self.connection.execute_batch(&view).map_err(|e| {
                QueryError::Internal(format!(
                    "define table {}.{}: {e}",
                    table.database, table.measurement
                ))
            })?;
            created.push(format!("DROP VIEW IF EXISTS \"{placeholder}\""));
        }

        let views_at = started.elapsed();
        let mut statement = self
            .connection
            .prepare(&checked.sql)
            .map_err(|e| QueryError::Sql(e.to_string()))?;
        let prepared_at = started.elapsed();
        let mut stream = statement
            .stream_arrow([])
            .map_err(|e| QueryError::Sql(e.to_string()))?;
        let streaming_at = started.elapsed();
        tracing::debug!(
            ?checked_at,
            ?snapshot_at,
            ?cache_at,
            ?ranges_at,
            ?views_at,
            ?prepared_at,
            ?streaming_at,
            "query phases"
        );
        let schema = stream.get_schema();
        let mut sink = Sink::new(&job.events, job.request.format, &self.config, deadline);
        sink.start(&schema)?;
        loop {
            let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stream.next()));
            match next {
                Ok(Some(batch)) => sink.batch(&batch)?,
                Ok(None) => break,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "result fetch failed".into());
                    return Err(QueryError::Sql(message));
                }
            }
        }
        sink.finish(started.elapsed().as_secs_f64() * 1000.0)
    }

    /// The time range each placeholder's rows are provably in, evaluated in this transaction;
    /// a bound that is not a constant timestamp is ignored (the range stays open there).
    fn time_ranges(&self, sql: &str) -> Vec<(String, i64, i64)> {
        use crate::sql_guard::time_bounds::{time_bounds, Bound};
        let tables = time_bounds(sql);
        let expressions: Vec<&str> = tables
            .iter()
            .flat_map(|table| table.bounds.iter())
            .map(|bound| match bound {
                Bound::Lower(e) | Bound::Upper(e) => e.as_str(),
            })
            .collect();
        let values = self.evaluate_times(&expressions);
        let mut values = values.into_iter();
        tables
            .into_iter()
            .map(|table| {
                let (mut lower, mut upper) = (i64::MIN, i64::MAX);
                for bound in &table.bounds {
                    match (bound, values.next().flatten()) {
                        (Bound::Lower(_), Some(value)) => lower = lower.max(value),
                        (Bound::Upper(_), Some(value)) => upper = upper.min(value),
                        (_, None) => {}
                    }
                }
                (table.placeholder, lower, upper)
            })
            .collect()
    }

    /// Each expression as microseconds since the epoch, `None` where it is not a constant
    /// timestamp. One statement for all of them (each statement costs DuckDB a parse, bind
    /// and plan); one each only if that fails, so one bad expression spoils no other.
    fn evaluate_times(&self, expressions: &[&str]) -> Vec<Option<i64>> {
        let single = |expression: &str| -> Option<i64> {
            self.connection
                .query_row(
                    &format!("SELECT epoch_us(CAST(({expression}) AS TIMESTAMPTZ))"),
                    [],
                    |row| row.get::<_, Option<i64>>(0),
                )
                .ok()
                .flatten()
        };
        match expressions {
            [] => Vec::new(),
            [one] => vec![single(one)],
            many => {
                let columns: Vec<String> = many
                    .iter()
                    .map(|e| format!("epoch_us(CAST(({e}) AS TIMESTAMPTZ))"))
                    .collect();
                let together = self.connection.query_row(
                    &format!("SELECT {}", columns.join(", ")),
                    [],
                    |row| {
                        (0..many.len())
                            .map(|i| row.get::<_, Option<i64>>(i))
                            .collect::<Result<Vec<_>, _>>()
                    },
                );
                match together {
                    Ok(values) => values,
                    Err(_) => many.iter().map(|e| single(e)).collect(),
                }
            }
        }
    }

    /// Asks every shard for its unflushed rows of `tables` and reconciles the answers.
    /// Also returns the keys of every piece the shards still hold for these tables, kept or
    /// not, so the cache can drop the rest.
    fn snapshot(&self, tables: Vec<TableName>) -> Result<Snapshot, QueryError> {
        let (reply, answers) = flume::bounded::<ShardSnapshot>(self.shards.len());
        for shard in self.shards.iter() {
            shard
                .send(SnapshotRequest {
                    tables: tables.clone(),
                    reply: reply.clone(),
                })
                .map_err(|_| QueryError::Internal("a shard stopped".into()))?;
        }
        drop(reply);
        let deadline = Instant::now() + Duration::from_millis(self.config.snapshot_timeout_ms);
        let mut snapshots = Vec::with_capacity(self.shards.len());
        for _ in 0..self.shards.len() {
            match answers.recv_deadline(deadline) {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(_) => {
                    return Err(QueryError::Internal(
                        "a shard did not answer for its unflushed rows in time".into(),
                    ))
                }
            }
        }
        let current: HashSet<PieceKey> = snapshots
            .iter()
            .flat_map(|s| s.pieces.iter().map(piece_key))
            .collect();
        let present = crate::replica::on_disk(&self.data_dir);
        let reconciled = reconcile(snapshots, &present)
            .ok_or_else(|| QueryError::Internal("no shard answered".into()))?;
        Ok((reconciled, current))
    }

    /// Brings the cached copy of every kept piece up to date and returns each piece's table.
    ///
    /// A shard's buffer only grows until it is frozen, and a new buffer starts at a new first
    /// LSN, so a piece (node, shard, table, first LSN) extends its earlier copies: only the rows
    /// past the cached count are appended. A piece the shards no longer hold for a table this
    /// query asked about is dropped. Runs outside the query's transaction so copies persist.
    fn refresh_piece_cache(
        &self,
        pieces: &[BufferPiece],
        current: &HashSet<PieceKey>,
    ) -> Result<HashMap<PieceKey, String>, QueryError> {
        let internal =
            |e: &dyn std::fmt::Display| QueryError::Internal(format!("load unflushed rows: {e}"));
        let mut cache = self.piece_cache.borrow_mut();
        let asked: HashSet<&TableName> = pieces.iter().map(|p| &p.table).collect();
        let stale: Vec<PieceKey> = cache
            .keys()
            .filter(|key| asked.contains(&key.table) && !current.contains(*key))
            .cloned()
            .collect();
        for key in stale {
            if let Some(entry) = cache.remove(&key) {
                self.drop_cached(&entry.name);
            }
        }
        let mut names = HashMap::with_capacity(pieces.len());
        for piece in pieces {
            let key = piece_key(piece);
            let schema = normalized_schema(&piece.schema());
            let rows = piece.num_rows();
            let reusable = cache
                .get(&key)
                .is_some_and(|entry| entry.schema == schema && entry.rows <= rows);
            if !reusable {
                if let Some(entry) = cache.remove(&key) {
                    self.drop_cached(&entry.name);
                }
                let name = format!("__shale_c{}", self.cache_sequence.get());
                self.cache_sequence.set(self.cache_sequence.get() + 1);
                let definitions: Vec<String> = schema
                    .fields()
                    .iter()
                    .map(|f| {
                        format!(
                            "\"{}\" {}",
                            f.name().replace('"', "\"\""),
                            sql_type(f.data_type())
                        )
                    })
                    .collect();
                self.connection
                    .execute_batch(&format!(
                        "CREATE TEMP TABLE \"{name}\" ({})",
                        definitions.join(", ")
                    ))
                    .map_err(|e| internal(&e))?;
                cache.insert(
                    key.clone(),
                    CachedPiece {
                        name,
                        schema: schema.clone(),
                        rows: 0,
                    },
                );
            }
            let entry = cache.get_mut(&key).expect("inserted above");
            if entry.rows < rows {
                if let Err(error) = self.append_rows(&entry.name, &schema, piece, entry.rows) {
                    // Some of the new rows may be in the table already (an appender flushes
                    // what it holds when dropped), so the cached count no longer describes
                    // it: forget the copy, and the next query loads the piece from scratch.
                    if let Some(entry) = cache.remove(&key) {
                        self.drop_cached(&entry.name);
                    }
                    return Err(internal(&error));
                }
                entry.rows = rows;
            }
            names.insert(key, entry.name.clone());
        }
        // Copies of tables no query asks for again are never dropped by the rule above; keep
        // memory bounded by dropping every copy this query does not use once over the limit.
        let cached_rows: usize = cache.values().map(|entry| entry.rows).sum();
        if cached_rows > self.config.buffer_cache_rows_max {
            let unused: Vec<PieceKey> = cache
                .keys()
                .filter(|key| !names.contains_key(*key))
                .cloned()
                .collect();
            for key in unused {
                if let Some(entry) = cache.remove(&key) {
                    self.drop_cached(&entry.name);
                }
            }
        }
        Ok(names)
    }

    /// Appends the piece's rows from `offset` on to the cached table `name`. On an error the
    /// table holds an unknown number of those rows; the caller must not keep using it.
    fn append_rows(
        &self,
        name: &str,
        schema: &Arc<Schema>,
        piece: &BufferPiece,
        offset: usize,
    ) -> Result<(), AppendError> {
        let mut appender = self.connection.appender(name)?;
        for fresh in piece.rows_from(offset) {
            #[cfg(test)]
            self.inject_append_fault()?;
            let arrays: Vec<ArrayRef> = fresh
                .columns()
                .iter()
                .zip(schema.fields())
                .map(
                    |(array, field)| match array.data_type() == field.data_type() {
                        true => Ok(array.clone()),
                        false => arrow::compute::cast(array, field.data_type()),
                    },
                )
                .collect::<Result<_, _>>()?;
            appender.append_record_batch(RecordBatch::try_new(schema.clone(), arrays)?)?;
        }
        appender.flush()?;
        Ok(())
    }

    /// Counts down `append_fault` and fails when it reaches zero.
    #[cfg(test)]
    fn inject_append_fault(&self) -> Result<(), AppendError> {
        match self.append_fault.get() {
            Some(0) => {
                self.append_fault.set(None);
                Err(AppendError::Injected)
            }
            Some(batches) => {
                self.append_fault.set(Some(batches - 1));
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn drop_cached(&self, name: &str) {
        if let Err(error) = self
            .connection
            .execute_batch(&format!("DROP TABLE IF EXISTS \"{name}\""))
        {
            tracing::debug!(%error, "drop cached unflushed rows");
        }
    }
}

/// Why bringing a cached piece up to date failed.
#[derive(Debug, thiserror::Error)]
enum AppendError {
    #[error("append to cached table: {0}")]
    DuckDb(#[from] duckdb::Error),
    #[error("convert unflushed rows: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A failure a unit test asked for (`Worker::append_fault`).
    #[cfg(test)]
    #[error("injected append failure")]
    Injected,
}

/// Identifies one shard buffer generation of one table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PieceKey {
    origin_node: u64,
    shard: u32,
    table: TableName,
    lsn_first: u64,
}

/// One `SELECT` per set of files with the same columns (`FileEntry::columns_fingerprint`):
/// DuckDB scans a list of files with one schema fastest, and `union_by_name` (which reads
/// every file's schema) is needed only for files whose columns are unknown. The caller
/// combines the parts by name.
fn file_scans(data_dir: &Path, entries: &[&FileEntry]) -> Vec<String> {
    let mut groups: Vec<(u64, Vec<String>)> = Vec::new();
    for entry in entries {
        let path = format!(
            "'{}'",
            data_dir
                .join(&entry.path)
                .display()
                .to_string()
                .replace('\'', "''")
        );
        match groups
            .iter_mut()
            .find(|(fingerprint, _)| *fingerprint == entry.columns_fingerprint)
        {
            Some((_, paths)) => paths.push(path),
            None => groups.push((entry.columns_fingerprint, vec![path])),
        }
    }
    groups
        .into_iter()
        .map(|(fingerprint, paths)| {
            let union = if fingerprint == 0 && paths.len() > 1 {
                ", union_by_name = true"
            } else {
                ""
            };
            format!("SELECT * FROM read_parquet([{}]{union})", paths.join(", "))
        })
        .collect()
}

/// What `Worker::snapshot` returns: the pinned version with the pieces it keeps and the file
/// cuts, and the keys of every piece the shards hold for the tables asked about.
type Snapshot = (super::snapshot::Reconciled, HashSet<PieceKey>);

fn piece_key(piece: &BufferPiece) -> PieceKey {
    PieceKey {
        origin_node: piece.origin_node,
        shard: piece.shard,
        table: piece.table.clone(),
        lsn_first: piece.lsn_first,
    }
}

/// A piece's rows already loaded into a DuckDB temp table of this worker.
struct CachedPiece {
    name: String,
    schema: Arc<Schema>,
    rows: usize,
}

/// The schema DuckDB tables get: dictionary columns become their value type.
fn normalized_schema(schema: &Schema) -> Arc<Schema> {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                let data_type = match f.data_type() {
                    DataType::Dictionary(_, value) => value.as_ref().clone(),
                    other => other.clone(),
                };
                Field::new(f.name(), data_type, true)
            })
            .collect::<Vec<_>>(),
    ))
}

fn table_pieces_count(pieces: &[BufferPiece], table: &sql_guard::TableRef) -> usize {
    pieces
        .iter()
        .filter(|p| p.table.database == table.database && p.table.measurement == table.measurement)
        .count()
}

fn sql_type(data_type: &DataType) -> &'static str {
    match data_type {
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "TIMESTAMPTZ",
        DataType::Timestamp(_, _) => "TIMESTAMP",
        DataType::Float64 => "DOUBLE",
        DataType::Int64 => "BIGINT",
        DataType::UInt64 => "UBIGINT",
        DataType::Boolean => "BOOLEAN",
        _ => "VARCHAR",
    }
}

/// Turns batches into response chunks, holding JSON back until it is large enough to stream.
///
/// Sends wait for room in the response channel only until the query's deadline: a client that
/// stops reading fills the channel, and a send without a deadline would hold the worker (which
/// the watchdog cannot interrupt outside DuckDB) for as long as the client keeps its socket.
struct Sink<'a> {
    events: &'a flume::Sender<QueryEvent>,
    config: &'a QueryConfig,
    deadline: Instant,
    json: Option<JsonEncoder>,
    arrow: Option<ArrowEncoder>,
    format: Format,
    pending: Vec<u8>,
    head_sent: bool,
    bytes: usize,
}

impl<'a> Sink<'a> {
    fn new(
        events: &'a flume::Sender<QueryEvent>,
        format: Format,
        config: &'a QueryConfig,
        deadline: Instant,
    ) -> Sink<'a> {
        Sink {
            events,
            config,
            deadline,
            format,
            json: None,
            arrow: None,
            pending: Vec::new(),
            head_sent: false,
            bytes: 0,
        }
    }

    fn start(&mut self, schema: &Schema) -> Result<(), QueryError> {
        match self.format {
            Format::Json => {
                let (encoder, head) = JsonEncoder::head(schema);
                self.json = Some(encoder);
                self.pending = head;
            }
            Format::Arrow => {
                let (encoder, head) =
                    ArrowEncoder::head(schema).map_err(|e| QueryError::Internal(e.to_string()))?;
                self.arrow = Some(encoder);
                self.pending = head;
            }
        }
        Ok(())
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        if let Some(encoder) = self.json.as_mut() {
            encoder
                .batch(batch, &mut self.pending)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            if encoder.rows() > self.config.json_rows_max {
                return Err(QueryError::TooLarge(format!(
                    "result has more than {} rows (query.json_rows_max); add a LIMIT or use /api/v1/query/arrow",
                    self.config.json_rows_max
                )));
            }
            if self.bytes + self.pending.len() > self.config.json_bytes_max {
                return Err(QueryError::TooLarge(format!(
                    "result is larger than {} bytes of JSON (query.json_bytes_max); add a LIMIT or use /api/v1/query/arrow",
                    self.config.json_bytes_max
                )));
            }
            if self.pending.len() >= self.config.json_stream_after_bytes {
                self.flush()?;
            }
        } else if let Some(encoder) = self.arrow.as_mut() {
            let chunk = encoder
                .batch(batch)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            self.pending.extend_from_slice(&chunk);
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), QueryError> {
        if !self.head_sent {
            self.send(QueryEvent::Head)?;
            self.head_sent = true;
        }
        if !self.pending.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut self.pending));
            self.bytes += chunk.len();
            self.send(QueryEvent::Chunk(chunk))?;
        }
        Ok(())
    }

    fn finish(&mut self, execution_time_ms: f64) -> Result<(), QueryError> {
        if let Some(encoder) = self.json.as_ref() {
            let tail = encoder.tail(execution_time_ms);
            self.pending.extend_from_slice(&tail);
        } else if let Some(encoder) = self.arrow.take() {
            let tail = encoder
                .tail()
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            self.pending.extend_from_slice(&tail);
        }
        self.flush()
    }

    fn send(&self, event: QueryEvent) -> Result<(), QueryError> {
        self.events
            .send_deadline(event, self.deadline)
            .map_err(|error| match error {
                flume::SendTimeoutError::Timeout(_) => QueryError::Timeout(self.config.timeout_ms),
                flume::SendTimeoutError::Disconnected(_) => {
                    QueryError::Internal("client went away".into())
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, columns_fingerprint: u64) -> FileEntry {
        FileEntry {
            path: path.to_owned(),
            size_bytes: 1,
            blake3_hex: "0".repeat(64),
            rows: 1,
            time_min_us: 0,
            time_max_us: 0,
            database: "db".to_owned(),
            measurement: "m".to_owned(),
            origin_node: 1,
            shard: 0,
            lsn_first: 1,
            lsn_last: 1,
            created_at_ms: 0,
            columns_fingerprint,
            taken_by: None,
        }
    }

    /// A worker with no shards, over a sandboxed DuckDB like the node's.
    fn worker() -> Worker {
        let config = crate::config::Config::default().query;
        let data_dir = std::env::temp_dir();
        let connection = open_sandboxed(&config, &data_dir).unwrap();
        Worker::new(
            connection,
            config,
            data_dir,
            Holdings::default(),
            Arc::new(Vec::new()),
            Arc::default(),
        )
    }

    /// One buffer generation of `cache.m` with `chunks` chunks of 100 rows, v = 0, 1, 2, ...
    fn piece(chunks: i64) -> BufferPiece {
        use arrow::array::{DictionaryArray, Int64Array};
        use arrow::datatypes::Int32Type;
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "host",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
            Field::new("v", DataType::Int64, true),
        ]));
        let chunk = |index: i64| {
            let values = index * 100..(index + 1) * 100;
            let hosts: DictionaryArray<Int32Type> = values
                .clone()
                .map(|v| ["h0", "h1", "h2"][v as usize % 3])
                .collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(hosts),
                    Arc::new(Int64Array::from_iter_values(values)),
                ],
            )
            .unwrap()
        };
        BufferPiece {
            table: TableName {
                database: "cache".into(),
                measurement: "m".into(),
            },
            origin_node: 1,
            shard: 0,
            lsn_first: 7,
            chunks: (0..chunks).map(chunk).collect(),
            replica: None,
        }
    }

    /// Brings the worker's copy of `piece` up to date and returns (rows, distinct v) in it.
    fn refresh(worker: &Worker, piece: &BufferPiece) -> Result<(i64, i64), QueryError> {
        let current = HashSet::from([piece_key(piece)]);
        let names = worker.refresh_piece_cache(std::slice::from_ref(piece), &current)?;
        let name = &names[&piece_key(piece)];
        Ok(worker
            .connection
            .query_row(
                &format!("SELECT count(*), count(DISTINCT v) FROM \"{name}\""),
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap())
    }

    // An append that fails half-way (here after its first batch went in, when the appender
    // flushes that batch on the way out) leaves the cached copy with rows its count does not
    // include. The next query must still see every row exactly once, both when the copy was
    // new and when it was being extended; otherwise the rows before the failure are appended
    // a second time.
    #[test]
    fn failed_append_never_duplicates_rows() {
        let worker = worker();
        worker.append_fault.set(Some(1));
        assert!(refresh(&worker, &piece(3)).is_err());
        assert_eq!(refresh(&worker, &piece(3)).unwrap(), (300, 300));

        assert_eq!(refresh(&worker, &piece(4)).unwrap(), (400, 400));
        worker.append_fault.set(Some(1));
        assert!(refresh(&worker, &piece(7)).is_err());
        assert_eq!(refresh(&worker, &piece(7)).unwrap(), (700, 700));
        assert_eq!(refresh(&worker, &piece(8)).unwrap(), (800, 800));
    }

    // Files with one fingerprint share a scan; files without one (older entries) are read by
    // name, and a lone file never needs union_by_name; quotes in paths are escaped.
    #[test]
    fn file_scans_group_by_columns() {
        let entries = [
            entry("a.parquet", 5),
            entry("b.parquet", 9),
            entry("c.parquet", 5),
            entry("o'1.parquet", 0),
            entry("o2.parquet", 0),
        ];
        let references: Vec<&FileEntry> = entries.iter().collect();
        assert_eq!(
            file_scans(Path::new("/d"), &references),
            [
                "SELECT * FROM read_parquet(['/d/a.parquet', '/d/c.parquet'])",
                "SELECT * FROM read_parquet(['/d/b.parquet'])",
                "SELECT * FROM read_parquet(['/d/o''1.parquet', '/d/o2.parquet'], union_by_name = true)",
            ]
        );
        assert_eq!(
            file_scans(Path::new("/d"), &references[3..4]),
            ["SELECT * FROM read_parquet(['/d/o''1.parquet'])"]
        );
    }
}
