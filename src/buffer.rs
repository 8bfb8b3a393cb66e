//! In-memory Arrow buffers: the rows of one (database, measurement) on one shard that are in
//! the WAL but not yet in Parquet.
//!
//! Owned by one shard thread. The schema grows with the data: a new tag or field adds a column
//! (earlier rows read null); a value whose type differs from its column is refused before the
//! request reaches the WAL (see [`MeasurementBuffer::check_field`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, StringDictionaryBuilder,
    TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

/// The kind of a column as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnKind {
    Tag,
    Float,
    Integer,
    Unsigned,
    Boolean,
    String,
}

impl ColumnKind {
    pub fn name(self) -> &'static str {
        match self {
            ColumnKind::Tag => "tag",
            ColumnKind::Float => "float",
            ColumnKind::Integer => "integer",
            ColumnKind::Unsigned => "unsigned",
            ColumnKind::Boolean => "boolean",
            ColumnKind::String => "string",
        }
    }

    pub fn from_name(name: &str) -> Option<ColumnKind> {
        Some(match name {
            "tag" => ColumnKind::Tag,
            "float" => ColumnKind::Float,
            "integer" => ColumnKind::Integer,
            "unsigned" => ColumnKind::Unsigned,
            "boolean" => ColumnKind::Boolean,
            "string" => ColumnKind::String,
            _ => return None,
        })
    }

    pub fn data_type(self) -> DataType {
        match self {
            ColumnKind::Tag => {
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
            }
            ColumnKind::Float => DataType::Float64,
            ColumnKind::Integer => DataType::Int64,
            ColumnKind::Unsigned => DataType::UInt64,
            ColumnKind::Boolean => DataType::Boolean,
            ColumnKind::String => DataType::Utf8,
        }
    }
}

/// A field value borrowed from a parsed request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Float(f64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(&'a str),
}

impl Value<'_> {
    pub fn kind(&self) -> ColumnKind {
        match self {
            Value::Float(_) => ColumnKind::Float,
            Value::Integer(_) => ColumnKind::Integer,
            Value::Unsigned(_) => ColumnKind::Unsigned,
            Value::Boolean(_) => ColumnKind::Boolean,
            Value::String(_) => ColumnKind::String,
        }
    }
}

impl<'a> From<crate::line_protocol::FieldValue<'a>> for Value<'a> {
    fn from(value: crate::line_protocol::FieldValue<'a>) -> Value<'a> {
        use crate::line_protocol::FieldValue;
        match value {
            FieldValue::Float(v) => Value::Float(v),
            FieldValue::Integer(v) => Value::Integer(v),
            FieldValue::Unsigned(v) => Value::Unsigned(v),
            FieldValue::Boolean(v) => Value::Boolean(v),
            FieldValue::String(v) => Value::String(v),
        }
    }
}

/// Name of the timestamp column in every table.
pub const TIME_COLUMN: &str = "time";

enum Builder {
    Tag(StringDictionaryBuilder<Int32Type>),
    Float(Float64Builder),
    Integer(Int64Builder),
    Unsigned(UInt64Builder),
    Boolean(BooleanBuilder),
    String(StringBuilder),
}

impl Builder {
    fn new(kind: ColumnKind, nulls: usize) -> Builder {
        let mut builder = match kind {
            ColumnKind::Tag => Builder::Tag(StringDictionaryBuilder::new()),
            ColumnKind::Float => Builder::Float(Float64Builder::new()),
            ColumnKind::Integer => Builder::Integer(Int64Builder::new()),
            ColumnKind::Unsigned => Builder::Unsigned(UInt64Builder::new()),
            ColumnKind::Boolean => Builder::Boolean(BooleanBuilder::new()),
            ColumnKind::String => Builder::String(StringBuilder::new()),
        };
        builder.append_nulls(nulls);
        builder
    }

    fn append_nulls(&mut self, count: usize) {
        if count == 0 {
            return;
        }
        match self {
            Builder::Tag(b) => b.append_nulls(count),
            Builder::Float(b) => b.append_nulls(count),
            Builder::Integer(b) => b.append_nulls(count),
            Builder::Unsigned(b) => b.append_nulls(count),
            Builder::Boolean(b) => b.append_nulls(count),
            Builder::String(b) => b.append_nulls(count),
        }
    }

    /// The column so far; `take` empties the builder, otherwise its contents are copied.
    fn finish(&mut self, take: bool) -> ArrayRef {
        match (self, take) {
            (Builder::Tag(b), true) => Arc::new(b.finish()),
            (Builder::Tag(b), false) => Arc::new(b.finish_cloned()),
            (Builder::Float(b), true) => Arc::new(b.finish()),
            (Builder::Float(b), false) => Arc::new(b.finish_cloned()),
            (Builder::Integer(b), true) => Arc::new(b.finish()),
            (Builder::Integer(b), false) => Arc::new(b.finish_cloned()),
            (Builder::Unsigned(b), true) => Arc::new(b.finish()),
            (Builder::Unsigned(b), false) => Arc::new(b.finish_cloned()),
            (Builder::Boolean(b), true) => Arc::new(b.finish()),
            (Builder::Boolean(b), false) => Arc::new(b.finish_cloned()),
            (Builder::String(b), true) => Arc::new(b.finish()),
            (Builder::String(b), false) => Arc::new(b.finish_cloned()),
        }
    }
}

struct Column {
    name: String,
    kind: ColumnKind,
    builder: Builder,
    /// Rows this column holds a value or null for; behind `rows` while a row is being added.
    filled: usize,
    /// Distinct values in a tag column's dictionary builder (for the bytes estimate).
    dictionary_values: usize,
}

/// Rows of one (database, measurement), columnar.
pub struct MeasurementBuffer {
    columns: Vec<Column>,
    by_name: HashMap<String, usize>,
    /// The column of each key position (tags, then fields) of the last row: lines of one
    /// source usually repeat their keys in order, so a name comparison replaces a hash lookup.
    hints: Vec<usize>,
    time: TimestampMicrosecondBuilder,
    /// Full chunks of earlier rows, immutable, in the current column order (see `sealed_stale`).
    sealed: Vec<RecordBatch>,
    sealed_rows: usize,
    /// A column was added since the sealed chunks were last aligned to the columns.
    sealed_stale: bool,
    /// All rows: sealed plus those in the builders.
    rows: usize,
    bytes_estimate: usize,
    /// First and last WAL LSN with a row in this buffer.
    lsn_first: u64,
    lsn_last: u64,
    time_min_us: i64,
    time_max_us: i64,
    oldest_row_at: Option<Instant>,
    /// UTC hours (since the epoch) the rows fall in: a flush writes one file per hour.
    hours: std::collections::HashSet<i64>,
    /// The hour of the last row, so rows of one hour in a row skip the set.
    last_hour: Option<i64>,
}

/// Why a value cannot go into a buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaConflict {
    #[error("column \"{column}\" is {existing} in stored data, not {incoming}")]
    Type {
        column: String,
        existing: &'static str,
        incoming: &'static str,
    },
}

/// Rows accumulate in Arrow builders until this many, then the builders are finished into an
/// immutable chunk. Queries share the chunks (no copy) and copy only the rows still in the
/// builders, so a query costs the shard at most this many rows' copy, not the whole buffer.
pub const CHUNK_ROWS: usize = 65_536;

/// Microseconds in an hour: files hold the rows of one UTC hour.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// A buffer's rows handed to a flush: the arrays plus what the manifest needs to know.
pub struct FrozenBuffer {
    /// The rows in order, as chunks with one schema (ordered `time`, tags, fields).
    pub chunks: Vec<RecordBatch>,
    pub tag_columns: Vec<String>,
    pub lsn_first: u64,
    pub lsn_last: u64,
    pub time_min_us: i64,
    pub time_max_us: i64,
    pub bytes_estimate: usize,
}

impl FrozenBuffer {
    pub fn rows(&self) -> usize {
        self.chunks.iter().map(RecordBatch::num_rows).sum()
    }

    /// The rows as one batch (a copy unless there is one chunk).
    pub fn batch(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        match self.chunks.as_slice() {
            [one] => Ok(one.clone()),
            chunks => arrow::compute::concat_batches(&chunks[0].schema(), chunks),
        }
    }
}

impl Default for MeasurementBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl MeasurementBuffer {
    pub fn new() -> Self {
        MeasurementBuffer {
            columns: Vec::new(),
            by_name: HashMap::new(),
            hints: Vec::new(),
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            sealed: Vec::new(),
            sealed_rows: 0,
            sealed_stale: false,
            rows: 0,
            bytes_estimate: 0,
            lsn_first: 0,
            lsn_last: 0,
            time_min_us: i64::MAX,
            time_max_us: i64::MIN,
            oldest_row_at: None,
            hours: Default::default(),
            last_hour: None,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes_estimate(&self) -> usize {
        self.bytes_estimate
    }

    /// Distinct UTC hours the buffered rows fall in (the files a flush would write).
    pub fn hours(&self) -> usize {
        self.hours.len()
    }

    /// Whether a buffered row falls in `hour` (hours since the epoch, UTC).
    pub fn has_hour(&self, hour: i64) -> bool {
        self.hours.contains(&hour)
    }

    pub fn lsn_first(&self) -> Option<u64> {
        (self.rows > 0).then_some(self.lsn_first)
    }

    pub fn oldest_row_at(&self) -> Option<Instant> {
        self.oldest_row_at
    }

    /// Adds one row; returns whether it added a column. The caller has checked kinds with
    /// [`check_kind`] (a mismatch here is a programmer error). Rows must arrive in LSN order.
    pub fn append_row<'a>(
        &mut self,
        lsn: u64,
        time_us: i64,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
        fields: impl IntoIterator<Item = (&'a str, Value<'a>)>,
    ) -> bool {
        let columns_before = self.columns.len();
        debug_assert!(lsn >= self.lsn_last, "rows arrive in lsn order");
        // The row's index in the builders.
        let row = self.rows - self.sealed_rows;
        let mut bytes = 8usize;
        let mut position = 0;
        for (key, value) in tags {
            let column = self.column_mut(position, key, ColumnKind::Tag, row);
            position += 1;
            if column.filled > row {
                // A repeated key within one line; the parser rejects these, keep the first.
                continue;
            }
            if let Builder::Tag(b) = &mut column.builder {
                // Builders are finished every CHUNK_ROWS rows, so keys stay far below i32::MAX.
                let key = b.append(value).expect("dictionary key fits i32") as usize;
                // A dictionary stores each distinct value once: count its bytes when it is new.
                if key >= column.dictionary_values {
                    column.dictionary_values = key + 1;
                    bytes += value.len();
                }
            } else {
                unreachable!("tag column {key} has builder of another kind");
            }
            column.filled = row + 1;
            bytes += 4;
        }
        for (key, value) in fields {
            let column = self.column_mut(position, key, value.kind(), row);
            position += 1;
            if column.filled > row {
                continue;
            }
            match (&mut column.builder, value) {
                (Builder::Float(b), Value::Float(v)) => b.append_value(v),
                (Builder::Integer(b), Value::Integer(v)) => b.append_value(v),
                (Builder::Unsigned(b), Value::Unsigned(v)) => b.append_value(v),
                (Builder::Boolean(b), Value::Boolean(v)) => b.append_value(v),
                (Builder::String(b), Value::String(v)) => {
                    bytes += v.len();
                    b.append_value(v)
                }
                _ => panic!("field {key} appended with a kind its column does not have"),
            }
            column.filled = row + 1;
            bytes += 8;
        }
        for column in &mut self.columns {
            if column.filled <= row {
                column.builder.append_nulls(row + 1 - column.filled);
                column.filled = row + 1;
            }
        }
        self.time.append_value(time_us);
        let hour = time_us.div_euclid(MICROS_PER_HOUR);
        if self.last_hour != Some(hour) {
            self.hours.insert(hour);
            self.last_hour = Some(hour);
        }
        self.time_min_us = self.time_min_us.min(time_us);
        self.time_max_us = self.time_max_us.max(time_us);
        if self.rows == 0 {
            self.lsn_first = lsn;
            self.oldest_row_at = Some(Instant::now());
        }
        self.lsn_last = lsn;
        self.rows += 1;
        self.bytes_estimate += bytes;
        let added = self.columns.len() > columns_before;
        if added && !self.sealed.is_empty() {
            self.sealed_stale = true;
        }
        if self.rows - self.sealed_rows >= CHUNK_ROWS {
            self.seal();
        }
        added
    }

    /// Finishes the builders into an immutable chunk.
    fn seal(&mut self) {
        let (chunk, _) = self.active_batch(true);
        self.align_sealed(&chunk.schema());
        self.sealed_rows += chunk.num_rows();
        self.sealed.push(chunk);
    }

    /// Gives every sealed chunk the columns of `schema` (the builders' current order): a column
    /// added after a chunk was sealed reads null there.
    fn align_sealed(&mut self, schema: &Arc<Schema>) {
        if !self.sealed_stale {
            return;
        }
        for chunk in &mut self.sealed {
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|field| match chunk.schema().index_of(field.name()) {
                    Ok(index) => chunk.column(index).clone(),
                    Err(_) => arrow::array::new_null_array(field.data_type(), chunk.num_rows()),
                })
                .collect();
            *chunk = RecordBatch::try_new(schema.clone(), columns)
                .expect("aligned chunk has the buffer's columns and lengths");
        }
        self.sealed_stale = false;
    }

    /// The rows as chunks with one schema; `take` empties the buffer's builders and chunks.
    fn chunks(&mut self, take: bool) -> (Vec<RecordBatch>, Vec<String>) {
        let (active, tag_columns) = self.active_batch(take);
        self.align_sealed(&active.schema());
        let mut chunks = if take {
            self.sealed_rows = 0;
            std::mem::take(&mut self.sealed)
        } else {
            self.sealed.clone()
        };
        if active.num_rows() > 0 || chunks.is_empty() {
            chunks.push(active);
        }
        (chunks, tag_columns)
    }

    /// The column for the key at `position` of the row being added, created if new.
    fn column_mut(
        &mut self,
        position: usize,
        name: &str,
        kind: ColumnKind,
        row: usize,
    ) -> &mut Column {
        let hinted = self
            .hints
            .get(position)
            .copied()
            .filter(|&index| self.columns[index].name == name);
        let index = match hinted.or_else(|| self.by_name.get(name).copied()) {
            Some(index) => index,
            None => {
                self.columns.push(Column {
                    name: name.to_string(),
                    kind,
                    builder: Builder::new(kind, row),
                    filled: row,
                    dictionary_values: 0,
                });
                self.by_name
                    .insert(name.to_string(), self.columns.len() - 1);
                self.columns.len() - 1
            }
        };
        match self.hints.get_mut(position) {
            Some(hint) => *hint = index,
            None => self.hints.push(index),
        }
        let column = &mut self.columns[index];
        assert_eq!(
            column.kind, kind,
            "column {name} kind checked before append"
        );
        column
    }

    /// Takes every row out, leaving the buffer empty with the same columns. Columns are ordered
    /// `time`, then tags by name, then fields by name.
    pub fn freeze(&mut self) -> Option<FrozenBuffer> {
        if self.rows == 0 {
            return None;
        }
        let (chunks, tag_columns) = self.chunks(true);
        let frozen = FrozenBuffer {
            chunks,
            tag_columns,
            lsn_first: self.lsn_first,
            lsn_last: self.lsn_last,
            time_min_us: self.time_min_us,
            time_max_us: self.time_max_us,
            bytes_estimate: self.bytes_estimate,
        };
        // Columns that saw no value are dropped so the next file's schema is what it holds.
        self.columns.clear();
        self.by_name.clear();
        self.hints.clear();
        self.rows = 0;
        self.bytes_estimate = 0;
        self.time_min_us = i64::MAX;
        self.time_max_us = i64::MIN;
        self.oldest_row_at = None;
        self.hours.clear();
        self.last_hour = None;
        Some(frozen)
    }

    /// The rows for a query, leaving the buffer as it is: (chunks with one schema, first
    /// LSN). Sealed chunks are shared; only the rows still in the builders are copied.
    pub fn snapshot(&mut self) -> Option<(Vec<RecordBatch>, u64)> {
        if self.rows == 0 {
            return None;
        }
        Some((self.chunks(false).0, self.lsn_first))
    }

    /// The builders' rows as a batch ordered `time`, tags by name, fields by name, and the tag
    /// names. `take` empties the builders; otherwise their contents are copied.
    fn active_batch(&mut self, take: bool) -> (RecordBatch, Vec<String>) {
        let mut order: Vec<usize> = (0..self.columns.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&self.columns[a], &self.columns[b]);
            (a.kind != ColumnKind::Tag, &a.name).cmp(&(b.kind != ColumnKind::Tag, &b.name))
        });
        let mut fields = vec![Field::new(
            TIME_COLUMN,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        )];
        let time = if take {
            self.time.finish()
        } else {
            self.time.finish_cloned()
        };
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(time)];
        let mut tag_columns = Vec::new();
        for index in order {
            let column = &mut self.columns[index];
            fields.push(Field::new(&column.name, column.kind.data_type(), true));
            arrays.push(column.builder.finish(take));
            if take {
                column.filled = 0;
                column.dictionary_values = 0;
            }
            if column.kind == ColumnKind::Tag {
                tag_columns.push(column.name.clone());
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .expect("buffer columns have equal lengths and declared types");
        (batch, tag_columns)
    }
}

/// Checks that `incoming` may be stored in a column that is `existing` (if known).
pub fn check_kind(
    column: &str,
    existing: Option<ColumnKind>,
    incoming: ColumnKind,
) -> Result<(), SchemaConflict> {
    match existing {
        Some(existing) if existing != incoming => Err(SchemaConflict::Type {
            column: column.to_string(),
            existing: existing.name(),
            incoming: incoming.name(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMicrosecondType};

    // Key positions are only hints: rows whose keys come in another order, skip a key, or add
    // one in the middle still land in the right columns, also after a freeze empties the
    // buffer; append_row reports exactly the rows that added a column.
    #[test]
    fn rows_with_shifting_key_orders_fill_the_right_columns() {
        use arrow::datatypes::Int64Type;
        let mut buffer = MeasurementBuffer::new();
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a [(&'a str, i64)], bool);
        let rows: [Row; 5] = [
            (&[("a", "1"), ("b", "1")], &[("x", 1), ("y", 1)], true),
            (&[("b", "2"), ("a", "2")], &[("y", 2), ("x", 2)], false),
            (&[("a", "3")], &[("z", 3), ("x", 3)], true),
            (&[("a", "4"), ("c", "4"), ("b", "4")], &[("x", 4)], true),
            (&[("a", "5"), ("b", "5")], &[("x", 5), ("y", 5)], false),
        ];
        for round in 0..2 {
            for (index, (tags, fields, adds)) in rows.iter().enumerate() {
                let added = buffer.append_row(
                    round * 10 + index as u64 + 1,
                    index as i64,
                    tags.iter().copied(),
                    fields.iter().map(|&(k, v)| (k, Value::Integer(v))),
                );
                assert_eq!(added, *adds, "round {round} row {index}");
            }
            let frozen = buffer.freeze().unwrap();
            let batch = &frozen.batch().unwrap();
            let column = |name: &str| batch.column(batch.schema().index_of(name).unwrap()).clone();
            for (index, (tags, fields, _)) in rows.iter().enumerate() {
                for tag in ["a", "b", "c"] {
                    let array = arrow::compute::cast(&column(tag), &DataType::Utf8).unwrap();
                    let expected = tags.iter().find(|(k, _)| *k == tag).map(|(_, v)| *v);
                    let actual = array.as_string::<i32>();
                    let actual = (!actual.is_null(index)).then(|| actual.value(index));
                    assert_eq!(actual, expected, "tag {tag} row {index}");
                }
                for field in ["x", "y", "z"] {
                    let array = column(field);
                    let array = array.as_primitive::<Int64Type>();
                    let expected = fields.iter().find(|(k, _)| *k == field).map(|(_, v)| *v);
                    let actual = (!array.is_null(index)).then(|| array.value(index));
                    assert_eq!(actual, expected, "field {field} row {index}");
                }
            }
        }
    }

    // Checks that a column first seen mid-buffer reads null for earlier rows, a column missing
    // from a later row reads null there, and the frozen schema is time, tags, fields.
    #[test]
    fn schema_widens_with_nulls() {
        let mut buffer = MeasurementBuffer::new();
        buffer.append_row(1, 10, [("host", "a")], [("usage", Value::Float(1.0))]);
        buffer.append_row(
            2,
            20,
            [("host", "b"), ("dc", "x")],
            [("free", Value::Integer(5))],
        );
        let frozen = buffer.freeze().unwrap();
        let batch = frozen.batch().unwrap();
        let schema = batch.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["time", "dc", "host", "free", "usage"]);
        assert_eq!((frozen.lsn_first, frozen.lsn_last), (1, 2));
        assert_eq!((frozen.time_min_us, frozen.time_max_us), (10, 20));
        let usage = batch.column(4).as_primitive::<Float64Type>();
        assert_eq!(usage.value(0), 1.0);
        assert!(usage.is_null(1));
        assert!(batch.column(1).is_null(0));
        let time = batch.column(0).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(time.values(), &[10, 20]);
        assert_eq!(buffer.rows(), 0);
        assert!(buffer.freeze().is_none());
    }

    // Checks that a snapshot copies the rows without disturbing the buffer: later rows append
    // after the copied ones and a freeze still returns everything.
    #[test]
    fn snapshot_leaves_the_buffer_intact() {
        let mut buffer = MeasurementBuffer::new();
        buffer.append_row(3, 10, [("host", "a")], [("v", Value::Float(1.0))]);
        let (copy, lsn_first) = buffer.snapshot().unwrap();
        assert_eq!((copy.len(), copy[0].num_rows(), lsn_first), (1, 1, 3));
        buffer.append_row(4, 20, [("host", "b")], [("v", Value::Float(2.0))]);
        let frozen = buffer.freeze().unwrap();
        assert_eq!(frozen.rows(), 2);
        assert_eq!(copy[0].schema(), frozen.batch().unwrap().schema());
    }

    // Past CHUNK_ROWS the builders are sealed into chunks that snapshots share instead of
    // copying; a column first seen after a seal reads null in the earlier chunk, and every
    // snapshot and the frozen rows have one schema and every row in order.
    #[test]
    fn sealed_chunks_are_shared_and_aligned() {
        use arrow::datatypes::Int64Type;
        let mut buffer = MeasurementBuffer::new();
        let total = CHUNK_ROWS + 10;
        for row in 0..total {
            let late = (row >= CHUNK_ROWS + 5).then_some(("late", Value::Integer(row as i64)));
            buffer.append_row(
                row as u64 + 1,
                row as i64,
                [("host", "a")],
                [("v", Value::Integer(row as i64))].into_iter().chain(late),
            );
            if row == CHUNK_ROWS + 2 {
                let (first, _) = buffer.snapshot().unwrap();
                let (second, _) = buffer.snapshot().unwrap();
                assert_eq!(first.len(), 2);
                assert!(Arc::ptr_eq(first[0].column(1), second[0].column(1)));
                assert_eq!(first[0].num_rows(), CHUNK_ROWS);
                assert_eq!(first[1].num_rows(), 3);
            }
        }
        let (chunks, _) = buffer.snapshot().unwrap();
        assert!(chunks.iter().all(|c| c.schema() == chunks[0].schema()));
        let frozen = buffer.freeze().unwrap();
        assert_eq!(frozen.rows(), total);
        let batch = frozen.batch().unwrap();
        let column = |name: &str| batch.column(batch.schema().index_of(name).unwrap()).clone();
        let time = column("time");
        let time = time.as_primitive::<TimestampMicrosecondType>();
        let v = column("v");
        let v = v.as_primitive::<Int64Type>();
        let late = column("late");
        let late = late.as_primitive::<Int64Type>();
        for row in 0..total {
            assert_eq!(time.value(row), row as i64);
            assert_eq!(v.value(row), row as i64);
            assert_eq!(late.is_null(row), row < CHUNK_ROWS + 5, "row {row}");
        }
    }

    // Checks that kind conflicts are named precisely.
    #[test]
    fn kind_conflicts_are_reported() {
        let error = check_kind("usage", Some(ColumnKind::Float), ColumnKind::Integer).unwrap_err();
        assert_eq!(
            error.to_string(),
            "column \"usage\" is float in stored data, not integer"
        );
        assert!(check_kind("usage", None, ColumnKind::Integer).is_ok());
    }

    // Checks that tag bytes count in full against the memory limits: each distinct value once
    // per chunk (a dictionary stores it once), 4 bytes per row for the key. Before, a tag
    // counted an eighth of its length per row, so unique 1 KiB tags used 8x their estimate.
    #[test]
    fn tag_bytes_count_once_per_distinct_value() {
        let mut buffer = MeasurementBuffer::default();
        let long: Vec<String> = (0..100).map(|i| format!("{i:0>1024}")).collect();
        for (row, value) in long.iter().enumerate() {
            buffer.append_row(
                1,
                row as i64,
                [("t", value.as_str())],
                [("v", Value::Float(1.0))],
            );
        }
        let unique = buffer.bytes_estimate();
        assert!(
            unique >= 100 * 1024,
            "estimate {unique} for 100 KiB of distinct tags"
        );
        let mut repeated = MeasurementBuffer::default();
        for row in 0..100 {
            repeated.append_row(
                1,
                row,
                [("t", long[0].as_str())],
                [("v", Value::Float(1.0))],
            );
        }
        let repeated = repeated.bytes_estimate();
        assert!(
            repeated < 1024 + 100 * 32,
            "estimate {repeated} for one repeated tag"
        );
    }

    // Checks the hour bookkeeping the write path uses to bound a flush's file count.
    #[test]
    fn buffers_count_distinct_hours() {
        let mut buffer = MeasurementBuffer::default();
        for (row, hour) in [0i64, 0, 5, 0, -1, 5].into_iter().enumerate() {
            let time_us = hour * MICROS_PER_HOUR + row as i64;
            buffer.append_row(1, time_us, [("t", "a")], [("v", Value::Float(1.0))]);
        }
        assert_eq!(buffer.hours(), 3);
        assert!(buffer.has_hour(-1) && buffer.has_hour(5) && !buffer.has_hour(1));
        buffer.freeze();
        assert_eq!(buffer.hours(), 0);
    }
}
