//! Rows replicated from another node's WAL, buffered per (origin, shard, table) so queries on
//! this node see them before the origin's files arrive.
//!
//! Thread: a [`ReplicaBuffers`] belongs to the shard that owns the replica log of its
//! (origin, shard) and is `!Send` like the rest of the shard.
//!
//! # The exactly-once rule per row
//! A replica never registers replicated rows as files: only the origin (or, after a takeover,
//! the node the manifest names) does. The replica cannot know where the origin's flushes cut a
//! table's rows, so every buffered row keeps its LSN: a row with LSN `x` of table `t` is in
//! the files of the origin's stream `(origin, shard, t)` ending at the smallest `lsn_last >= x`,
//! if one is registered. A query keeps a buffered row iff those files are not all on this
//! node's disk (see `query::snapshot::reconcile`), and the shard drops rows only once they are.
//!
//! Rows go into parts of at most [`PART_ROWS`] rows; a part is dropped whole once all its
//! rows are in files held here, so memory is bounded by the unflushed rows plus one part.
//!
//! Records are parsed lazily: an arriving record is kept as it came (its payload, and the
//! tables its lines name, found by a scan of each line's measurement), and parsed into Arrow
//! parts only when a query or a takeover needs rows. A node nobody queries spends no CPU on
//! parsing its peers' rows; a raw record is dropped, like a part, once every table it names is
//! in files on this node through its LSN.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use shale_io::wal::RecordView;
use shale_replication::manifest::Manifest;

use crate::buffer::{FrozenBuffer, MeasurementBuffer, Value};
use crate::ingest::{IngestPayload, RECORD_KIND_LINE_PROTOCOL};
use crate::line_protocol::{self, ParseLimits};
use crate::query::snapshot::{BufferPiece, RowLsns, TableName};

/// Rows per part: a part is the unit in which replicated rows are released.
pub const PART_ROWS: usize = crate::buffer::CHUNK_ROWS;

/// (database, measurement).
type TableKey = (String, String);

/// One part of a table's replicated rows, and the LSN of each record's first row in it.
enum Part {
    Open {
        buffer: Box<MeasurementBuffer>,
        records: Vec<(u64, u32)>,
    },
    Sealed {
        frozen: Arc<FrozenBuffer>,
        records: Arc<Vec<(u64, u32)>>,
    },
}

impl Part {
    fn last_lsn(&self) -> Option<u64> {
        match self {
            Part::Open { records, .. } => records.last().map(|(lsn, _)| *lsn),
            Part::Sealed { records, .. } => records.last().map(|(lsn, _)| *lsn),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Part::Open { buffer, .. } => buffer.bytes_estimate(),
            Part::Sealed { frozen, .. } => frozen.bytes_estimate,
        }
    }
}

/// The replicated rows of one table.
#[derive(Default)]
struct ReplicaTable {
    parts: VecDeque<Part>,
}

/// A replicated record not parsed yet.
struct RawRecord {
    lsn: u64,
    time_ns: i64,
    /// The WAL payload as the origin wrote it (`ingest::IngestPayload`).
    payload: Vec<u8>,
    /// The tables its lines name.
    tables: Vec<TableKey>,
    /// Its lines (points), counted by the scan.
    rows: usize,
}

impl ReplicaTable {
    fn open_part(&mut self, part_rows: usize) -> (&mut MeasurementBuffer, &mut Vec<(u64, u32)>) {
        let full = match self.parts.back() {
            Some(Part::Open { buffer, .. }) => buffer.rows() >= part_rows,
            _ => true,
        };
        if full {
            if let Some(Part::Open { buffer, records }) = self.parts.back_mut() {
                let frozen = buffer.freeze().expect("a full part has rows");
                let records = Arc::new(std::mem::take(records));
                *self.parts.back_mut().expect("checked above") = Part::Sealed {
                    frozen: Arc::new(frozen),
                    records,
                };
            }
            self.parts.push_back(Part::Open {
                buffer: Box::default(),
                records: Vec::new(),
            });
        }
        match self.parts.back_mut() {
            Some(Part::Open { buffer, records }) => (buffer, records),
            _ => unreachable!("an open part was just ensured"),
        }
    }
}

/// The buffered rows of one (origin, shard) replica log.
pub struct ReplicaBuffers {
    pub origin: u64,
    pub shard: u32,
    tables: HashMap<TableKey, ReplicaTable>,
    /// Records not parsed yet, in LSN order, all above every parsed row.
    raw: VecDeque<RawRecord>,
    /// For each table, the LSN through which its rows are in files on this node's disk.
    held: HashMap<TableKey, u64>,
    /// Every record of the origin from this LSN on was (or will be) applied here; rows below
    /// it never reached this node's buffers (the log started, or was reset, above them).
    complete_from: u64,
    /// Highest LSN whose rows are in the buffers.
    applied_lsn: u64,
    rows: usize,
    bytes: usize,
    /// Rows per part ([`PART_ROWS`]; smaller in tests).
    part_rows: usize,
}

impl ReplicaBuffers {
    /// Buffers for a log whose next record will be `next_lsn`.
    pub fn new(origin: u64, shard: u32, next_lsn: u64) -> ReplicaBuffers {
        ReplicaBuffers {
            origin,
            shard,
            tables: HashMap::new(),
            raw: VecDeque::new(),
            held: HashMap::new(),
            complete_from: next_lsn,
            applied_lsn: next_lsn.saturating_sub(1),
            rows: 0,
            bytes: 0,
            part_rows: PART_ROWS,
        }
    }

    /// Buffers whose parts hold `part_rows` rows (tests use small parts).
    pub fn with_part_rows(origin: u64, shard: u32, next_lsn: u64, part_rows: usize) -> Self {
        ReplicaBuffers {
            part_rows: part_rows.max(1),
            ..ReplicaBuffers::new(origin, shard, next_lsn)
        }
    }

    /// Highest LSN whose rows are queryable here.
    pub fn applied_lsn(&self) -> u64 {
        self.applied_lsn
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets every row: the log restarts at `next_lsn` (the origin no longer has the records
    /// in between; they are in its files).
    pub fn reset(&mut self, next_lsn: u64) {
        *self = ReplicaBuffers::with_part_rows(self.origin, self.shard, next_lsn, self.part_rows);
    }

    /// Takes one replicated record. Records arrive in LSN order; one at or below `applied_lsn`
    /// is skipped (a resend). The record is kept raw until rows are needed (see the module
    /// documentation). Fails only on a record this build cannot read.
    pub fn apply(&mut self, record: &RecordView<'_>) -> Result<(), String> {
        if record.lsn <= self.applied_lsn {
            return Ok(());
        }
        if record.kind != RECORD_KIND_LINE_PROTOCOL {
            return Err(format!("unknown record kind {}", record.kind));
        }
        let payload = IngestPayload::decode(record.payload).map_err(|e| e.to_string())?;
        let (measurements, rows) = scan_measurements(payload.body);
        let tables = measurements
            .into_iter()
            .map(|measurement| (payload.database.to_string(), measurement))
            .collect();
        self.bytes += record.payload.len();
        self.rows += rows;
        self.raw.push_back(RawRecord {
            lsn: record.lsn,
            time_ns: record.time_ns,
            payload: record.payload.to_vec(),
            tables,
            rows,
        });
        self.applied_lsn = record.lsn;
        Ok(())
    }

    /// Parses every raw record into the tables' parts, in LSN order.
    fn materialize(&mut self) -> Result<(), String> {
        while let Some(raw) = self.raw.pop_front() {
            self.bytes = self.bytes.saturating_sub(raw.payload.len());
            self.rows = self.rows.saturating_sub(raw.rows);
            self.parse_into_parts(&raw)?;
        }
        Ok(())
    }

    fn parse_into_parts(&mut self, raw: &RawRecord) -> Result<(), String> {
        let payload = IngestPayload::decode(&raw.payload).map_err(|e| e.to_string())?;
        // The origin accepted these rows under its limits; replay them whatever ours are.
        let limits = ParseLimits {
            line_bytes_max: usize::MAX,
            columns_per_line_max: usize::MAX,
        };
        let batch = line_protocol::parse(
            payload.body,
            payload.precision,
            raw.time_ns.div_euclid(1000),
            &limits,
        )
        .map_err(|e| format!("replicated request no longer parses: {e}"))?;
        for line in batch.lines() {
            let measurement = line.measurement();
            let key = (payload.database.to_string(), measurement.to_string());
            let table = self.tables.entry(key).or_default();
            let (buffer, records) = table.open_part(self.part_rows);
            let row = buffer.rows() as u32;
            let starts_record = records.last().is_none_or(|(lsn, _)| *lsn != raw.lsn);
            if starts_record {
                records.push((raw.lsn, row));
            }
            let before = buffer.bytes_estimate();
            buffer.append_row(
                raw.lsn,
                line.time_us(),
                line.tags(),
                line.fields().map(|(key, value)| (key, Value::from(value))),
            );
            self.bytes += buffer.bytes_estimate() - before;
            self.rows += 1;
        }
        Ok(())
    }

    /// Parses what is still raw; a record that no longer parses is logged and its rows left
    /// out (the origin validated it, so this means a bug or damage the WAL checks missed).
    fn materialize_or_log(&mut self) {
        if let Err(error) = self.materialize() {
            tracing::error!(origin = self.origin, shard = self.shard, %error, "replicated record not parsed");
        }
    }

    /// Drops the parts and raw records whose rows are all in files of `manifest` that are on
    /// this node's disk (`present` says whether a path is). Returns the rows dropped.
    pub fn drop_held(&mut self, manifest: &Manifest, present: &dyn Fn(&str) -> bool) -> usize {
        let mut names: Vec<TableKey> = self.tables.keys().cloned().collect();
        for raw in &self.raw {
            for table in &raw.tables {
                if !names.contains(table) {
                    names.push(table.clone());
                }
            }
        }
        for table in names {
            let mark = self.held.get(&table).copied().unwrap_or(0);
            let held = held_through(
                manifest,
                (self.origin, self.shard, &table.0, &table.1),
                mark,
                present,
            );
            if held > mark {
                self.held.insert(table, held);
            }
        }
        let mut dropped_rows = 0;
        for (key, table) in self.tables.iter_mut() {
            let held = self.held.get(key).copied().unwrap_or(0);
            while table
                .parts
                .front()
                .and_then(Part::last_lsn)
                .is_some_and(|last| last <= held)
            {
                let part = table.parts.pop_front().expect("checked above");
                let rows = match &part {
                    Part::Open { buffer, .. } => buffer.rows(),
                    Part::Sealed { frozen, .. } => frozen.rows(),
                };
                self.bytes = self.bytes.saturating_sub(part.bytes());
                self.rows -= rows;
                dropped_rows += rows;
            }
        }
        self.tables.retain(|_, table| !table.parts.is_empty());
        while self.raw.front().is_some_and(|raw| {
            raw.tables
                .iter()
                .all(|table| self.held.get(table).is_some_and(|held| *held >= raw.lsn))
        }) {
            let raw = self.raw.pop_front().expect("checked above");
            self.bytes = self.bytes.saturating_sub(raw.payload.len());
            self.rows = self.rows.saturating_sub(raw.rows);
            dropped_rows += raw.rows;
        }
        dropped_rows
    }

    /// The tables with buffered rows (parsing what is still raw).
    pub fn tables(&mut self) -> Vec<(String, String)> {
        self.materialize_or_log();
        self.tables.keys().cloned().collect()
    }

    /// The buffered rows of `table` with an LSN in `(after, through]`, one frozen buffer per
    /// part (parts may differ in columns), for a takeover to flush into files.
    pub fn rows_between(
        &mut self,
        table: &(String, String),
        after: u64,
        through: u64,
    ) -> Vec<FrozenBuffer> {
        self.materialize_or_log();
        let Some(replica) = self.tables.get_mut(table) else {
            return Vec::new();
        };
        let mut frozen = Vec::new();
        for part in replica.parts.iter_mut() {
            let (chunks, records) = match part {
                Part::Open { buffer, records } => match buffer.snapshot() {
                    Some((chunks, _)) => (chunks, records.clone()),
                    None => continue,
                },
                Part::Sealed { frozen, records } => {
                    (frozen.chunks.clone(), records.as_ref().clone())
                }
            };
            let rows: usize = chunks.iter().map(|c| c.num_rows()).sum();
            let first = records.partition_point(|(lsn, _)| *lsn <= after);
            let end = records.partition_point(|(lsn, _)| *lsn <= through);
            if first >= end {
                continue;
            }
            let start_row = records[first].1 as usize;
            let end_row = records.get(end).map_or(rows, |(_, row)| *row as usize);
            let sliced = slice_rows(&chunks, start_row, end_row);
            if let Some(buffer) = frozen_from(sliced, records[first].0, records[end - 1].0) {
                frozen.push(buffer);
            }
        }
        frozen
    }

    /// The lowest LSN with a row still buffered, if any: the replica log must keep it.
    pub fn lsn_first(&self) -> Option<u64> {
        let parsed = self
            .tables
            .values()
            .filter_map(|t| match t.parts.front()? {
                Part::Open { records, .. } => records.first().map(|(lsn, _)| *lsn),
                Part::Sealed { records, .. } => records.first().map(|(lsn, _)| *lsn),
            })
            .min();
        let raw = self.raw.front().map(|raw| raw.lsn);
        parsed.into_iter().chain(raw).min()
    }

    /// The buffered rows of `table` as query pieces (sealed parts shared, the open part's
    /// builders copied), each with the LSN of every record's rows.
    pub fn snapshot(&mut self, table: &TableName) -> Vec<BufferPiece> {
        self.materialize_or_log();
        let key = (table.database.clone(), table.measurement.clone());
        let Some(replica) = self.tables.get_mut(&key) else {
            return Vec::new();
        };
        let mut pieces = Vec::with_capacity(replica.parts.len());
        for part in replica.parts.iter_mut() {
            let (chunks, records) = match part {
                Part::Open { buffer, records } => match buffer.snapshot() {
                    Some((chunks, _)) => (chunks, Arc::new(records.clone())),
                    None => continue,
                },
                Part::Sealed { frozen, records } => (frozen.chunks.clone(), records.clone()),
            };
            let Some(&(lsn_first, _)) = records.first() else {
                continue;
            };
            pieces.push(BufferPiece {
                table: table.clone(),
                origin_node: self.origin,
                shard: self.shard,
                lsn_first,
                chunks,
                replica: Some(RowLsns {
                    records,
                    complete_from: self.complete_from,
                }),
            });
        }
        pieces
    }
}

/// The measurements a line-protocol body names (each once, in first-seen order) and its number
/// of points, by a scan of each line's first element: much cheaper than parsing. Blank lines
/// and `#` comments are skipped as the parser skips them; `\,` and `\ ` are the measurement's
/// escapes.
fn scan_measurements(body: &[u8]) -> (Vec<String>, usize) {
    let mut measurements: Vec<String> = Vec::new();
    let mut rows = 0;
    for line in body.split(|b| *b == b'\n') {
        let start = line
            .iter()
            .position(|b| *b != b' ' && *b != b'\t')
            .unwrap_or(line.len());
        let line = &line[start..];
        if line.is_empty() || line[0] == b'#' || line == b"\r" {
            continue;
        }
        rows += 1;
        let mut name = Vec::new();
        let mut index = 0;
        while index < line.len() {
            match line[index] {
                b'\\' if matches!(line.get(index + 1), Some(b',') | Some(b' ')) => {
                    name.push(line[index + 1]);
                    index += 2;
                }
                b',' | b' ' => break,
                byte => {
                    name.push(byte);
                    index += 1;
                }
            }
        }
        let name = String::from_utf8_lossy(&name);
        if measurements.last().is_none_or(|last| **last != *name)
            && !measurements.iter().any(|m| **m == *name)
        {
            measurements.push(name.into_owned());
        }
    }
    (measurements, rows)
}

/// Rows `start..end` of `chunks`, as slices (no copy).
fn slice_rows(
    chunks: &[arrow::record_batch::RecordBatch],
    start: usize,
    end: usize,
) -> Vec<arrow::record_batch::RecordBatch> {
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        let (from, to) = (offset, offset + chunk.num_rows());
        offset = to;
        let (lo, hi) = (start.max(from), end.min(to));
        if lo < hi {
            out.push(chunk.slice(lo - from, hi - lo));
        }
    }
    out
}

/// A frozen buffer of replicated rows (one schema): tags are the dictionary columns.
fn frozen_from(
    chunks: Vec<arrow::record_batch::RecordBatch>,
    lsn_first: u64,
    lsn_last: u64,
) -> Option<FrozenBuffer> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, TimestampMicrosecondType};
    let schema = chunks.first()?.schema();
    let tag_columns = schema
        .fields()
        .iter()
        .filter(|f| matches!(f.data_type(), DataType::Dictionary(_, _)))
        .map(|f| f.name().clone())
        .collect();
    let (mut time_min_us, mut time_max_us) = (i64::MAX, i64::MIN);
    let mut bytes_estimate = 0;
    for chunk in &chunks {
        bytes_estimate += chunk.get_array_memory_size();
        let time = chunk
            .column_by_name(crate::buffer::TIME_COLUMN)?
            .as_primitive_opt::<TimestampMicrosecondType>()?;
        if let Some(min) = arrow::compute::min(time) {
            time_min_us = time_min_us.min(min);
        }
        if let Some(max) = arrow::compute::max(time) {
            time_max_us = time_max_us.max(max);
        }
        debug_assert_eq!(time.null_count(), 0);
    }
    Some(FrozenBuffer {
        chunks,
        tag_columns,
        lsn_first,
        lsn_last,
        time_min_us,
        time_max_us,
        bytes_estimate,
    })
}

/// The highest LSN through which every file of the stream above `after` is present here:
/// walking the stream's files in LSN order, the end of the last run of ends whose files are all
/// present. Rows of the table at or below it are in files this node holds.
pub fn held_through(
    manifest: &Manifest,
    (origin, shard, database, measurement): (u64, u32, &str, &str),
    after: u64,
    present: &dyn Fn(&str) -> bool,
) -> u64 {
    let mut held = after;
    let mut end: Option<(u64, bool)> = None;
    for (lsn_last, path) in manifest.stream_files_after(origin, shard, database, measurement, after)
    {
        match end {
            Some((lsn, complete)) if lsn != lsn_last => {
                if !complete {
                    return held;
                }
                held = lsn;
                end = Some((lsn_last, present(path)));
            }
            Some((lsn, complete)) => end = Some((lsn, complete && present(path))),
            None => end = Some((lsn_last, present(path))),
        }
    }
    match end {
        Some((lsn, true)) => lsn,
        _ => held,
    }
}

/// Whether the file at `path` (relative to `data_dir`) is on disk: files reach their final
/// name only once verified, so existence means usable.
pub fn on_disk(data_dir: &Path) -> impl Fn(&str) -> bool + '_ {
    move |path| data_dir.join(path).exists()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::line_protocol::Precision;
    use shale_replication::manifest::{FileEntry, ManifestCommand};

    /// A record of node 2 shard 0 holding one row `cpu v=<lsn>` of database `db`.
    pub(crate) fn record_payload(lsn: u64) -> Vec<u8> {
        let body = format!("cpu v={lsn}i {}\n", 1_767_225_600 + lsn);
        let payload = IngestPayload {
            database: "db",
            precision: Precision::Seconds,
            body: body.as_bytes(),
            key: None,
        };
        let mut out = vec![0u8; payload.encoded_len()];
        payload.encode_into(&mut out);
        out
    }

    pub(crate) fn apply(buffers: &mut ReplicaBuffers, lsns: std::ops::RangeInclusive<u64>) {
        for lsn in lsns {
            let payload = record_payload(lsn);
            let record = RecordView {
                origin_node: 2,
                shard: 0,
                lsn,
                kind: RECORD_KIND_LINE_PROTOCOL,
                time_ns: 0,
                payload: &payload,
            };
            buffers.apply(&record).unwrap();
        }
    }

    /// A registered file of node 2 shard 0's `db.cpu` covering `first..=last`.
    pub(crate) fn file(path: &str, first: u64, last: u64) -> FileEntry {
        FileEntry {
            path: path.to_owned(),
            size_bytes: 4096,
            blake3_hex: "ab".repeat(32),
            rows: last - first + 1,
            time_min_us: 1_000,
            time_max_us: 2_000,
            database: "db".to_owned(),
            measurement: "cpu".to_owned(),
            origin_node: 2,
            shard: 0,
            lsn_first: first,
            lsn_last: last,
            created_at_ms: 1_700_000_000_000,
            columns_fingerprint: 7,
            taken_by: None,
        }
    }

    pub(crate) fn manifest(files: Vec<FileEntry>) -> Manifest {
        let mut manifest = Manifest::default();
        manifest.apply(1, &ManifestCommand::Register { files });
        manifest
    }

    fn table() -> TableName {
        TableName {
            database: "db".into(),
            measurement: "cpu".into(),
        }
    }

    // A replica drops rows only once every file that holds them is on its disk: a part goes
    // once the run of present files covers its last row, never on a file that is registered
    // but absent (queries would lose those rows until the fetch), and a resend of an applied
    // record adds nothing.
    #[test]
    fn rows_are_dropped_only_once_their_files_are_on_disk() {
        let mut buffers = ReplicaBuffers::with_part_rows(2, 0, 1, 3);
        apply(&mut buffers, 1..=8);
        apply(&mut buffers, 5..=8);
        assert_eq!((buffers.rows(), buffers.applied_lsn()), (8, 8));
        // Parts: [1,2,3] [4,5,6] [7,8]; files: a = 1..3, b1 + b2 = 4..6 (two hours).
        let manifest = manifest(vec![file("a", 1, 3), file("b1", 4, 6), file("b2", 4, 6)]);
        let absent_b2 = |path: &str| path != "b2";
        assert_eq!(buffers.drop_held(&manifest, &absent_b2), 3);
        assert_eq!(buffers.lsn_first(), Some(4));
        assert_eq!(buffers.drop_held(&manifest, &|_| true), 3);
        assert_eq!(buffers.lsn_first(), Some(7));
        assert_eq!(buffers.rows(), 2);
        let pieces = buffers.snapshot(&table());
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].num_rows(), 2);
        assert_eq!(pieces[0].lsn_first, 7);

        // The same once parsed into parts (a query came first): parts go whole.
        let mut parsed = ReplicaBuffers::with_part_rows(2, 0, 1, 3);
        apply(&mut parsed, 1..=8);
        assert_eq!(parsed.snapshot(&table()).len(), 3);
        assert_eq!(parsed.drop_held(&manifest, &absent_b2), 3);
        assert_eq!(parsed.lsn_first(), Some(4));
        assert_eq!(parsed.drop_held(&manifest, &|_| true), 3);
        assert_eq!((parsed.rows(), parsed.lsn_first()), (2, Some(7)));
    }

    // The scan that finds a raw record's tables agrees with the parser on what a measurement
    // is: blank lines, comments, leading blanks, CRLF, repeated names (names with escaped
    // characters are refused by the name rules before they reach a WAL).
    #[test]
    fn the_measurement_scan_finds_every_table_of_a_body() {
        let body = b"cpu,host=a v=1 1\n\n# note\n  mem v=2 2\r\ndisk v=3\ncpu v=4\n\r\n";
        let (names, rows) = scan_measurements(body);
        assert_eq!(names, vec!["cpu", "mem", "disk"]);
        assert_eq!(rows, 4);
        let batch = line_protocol::parse(
            body,
            crate::line_protocol::Precision::Seconds,
            0,
            &ParseLimits::default(),
        )
        .unwrap();
        let mut parsed: Vec<String> = Vec::new();
        for line in batch.lines() {
            if !parsed.iter().any(|m| m == line.measurement()) {
                parsed.push(line.measurement().to_owned());
            }
        }
        assert_eq!(parsed, names);
    }

    // held_through walks a stream's ends in order and stops before the first end with any file
    // missing; several files per end (one per hour) must all be present.
    #[test]
    fn held_through_stops_at_the_first_incomplete_end() {
        let manifest = manifest(vec![
            file("a", 1, 3),
            file("b1", 4, 6),
            file("b2", 4, 6),
            file("c", 7, 9),
        ]);
        let stream = (2, 0, "db", "cpu");
        assert_eq!(held_through(&manifest, stream, 0, &|_| true), 9);
        assert_eq!(held_through(&manifest, stream, 0, &|p| p != "b2"), 3);
        assert_eq!(held_through(&manifest, stream, 0, &|p| p != "a"), 0);
        assert_eq!(held_through(&manifest, stream, 3, &|p| p != "a"), 9);
        assert_eq!(held_through(&manifest, stream, 0, &|p| p != "c"), 6);
        assert_eq!(
            held_through(&manifest, (3, 0, "db", "cpu"), 5, &|_| true),
            5
        );
    }
}
