//! Sans-IO decoder for Arc's MessagePack write format (`POST /api/v1/write/msgpack`): one
//! decompressed request body in, canonical line protocol out.
//!
//! The node's write path, WAL and replay all work on validated line protocol, so this module
//! only translates: [`to_line_protocol`] turns a body into lines that
//! [`crate::line_protocol::parse`] accepts with
//! [`crate::line_protocol::Precision::Microseconds`], keeping every type
//! (float, integer, unsigned, boolean, string), tags as tags, and times in microseconds. The whole
//! body is checked before anything is returned, and errors name the record, column and row the
//! client sent, never a line number of the translation.
//!
//! # The format, as Arc accepts it
//!
//! Learnt from Arc's source (github.com/Basekick-Labs/arc: `internal/ingest/msgpack.go`,
//! `internal/ingest/msgpack_typed.go`, `internal/api/msgpack.go`, `pkg/models/record.go`), its
//! documentation (docs.basekick.net, `guides/writing-data`) and Telegraf's Arc output
//! (`plugins/outputs/arc`):
//!
//! - **Body**: one record (a map), a batch `{"batch": [record, ...]}`, or an array of records.
//!   Telegraf sends one map for one measurement and an array of maps for several. A batch item
//!   may itself be a batch (Arc recurses); nesting is limited to [`BATCH_DEPTH_MAX`] here.
//! - **Columnar record** (the recommended form): `{"m": "cpu", "columns": {"time": [...],
//!   "host": [...], "usage": [...]}, "tag_keys": ["host"]}`. Every column is an array and all have
//!   the same length. `tag_keys` (newer Arc releases) names the columns that are tags; without it
//!   every column is a field, so string columns are string fields (Telegraf sends its tags as
//!   plain columns this way).
//! - **Row record** (legacy): `{"m": "cpu", "t": 1633024800000, "h": "server01",
//!   "fields": {...}, "tags": {...}}`. `h` becomes the tag `host` (an integer `h` becomes
//!   `host_<n>`, as in Arc); `f: [v0, v1]` is a compact alternative to `fields` with the names
//!   `field_0`, `field_1`, ... Tag values that are integers or booleans are written as text.
//! - **Measurement** `m`: a string, or an integer `n` meaning `measurement_<n>` (Arc's rule).
//!   Checked with [`names::validate_measurement`].
//! - **Time**: the column `time` (columnar) or the key `t` (row), an integer or float Unix time
//!   whose unit is guessed from its magnitude: below 1e10 seconds, below 1e13 milliseconds,
//!   below 1e16 microseconds, otherwise nanoseconds. A columnar record decides the unit from
//!   its first time value, as Arc does, and converts every row with it. A record without a time
//!   gets `default_time_us` (Arc uses the receive time too); a nil inside a time column is
//!   refused, as in Arc.
//! - **Value types**: a field column's type is set by its first non-nil value (Arc's rule);
//!   integers are then accepted into a float column and converted. Nil means "no value in this
//!   row" and is left out of the line. Binary, extension, nested arrays and maps are refused.
//! - **Compression** is gzip or zstd, recognised by Arc from the body's magic bytes even without
//!   `Content-Encoding` (Telegraf's Arc output gzips by default). Decompressing is the caller's
//!   job: [`crate::ingest::detect_encoding`] sniffs the same magic bytes. The sniffing is
//!   unambiguous, since a valid body starts with a map or array marker, never with 0x1f or 0x28.
//! - **Database**: never in the body; it comes from the `x-arc-database` header.
//!
//! # Where shale is stricter than Arc, and why
//!
//! Arc skips bad items of a batch with a log line and stores the rest; here any bad record
//! rejects the request, because the durability contract is all or nothing. Arc also truncates a
//! float written into an integer column (2.5 becomes 2), silently ignores non-array columns,
//! mixes such as `columns` with `fields`, repeated keys and bytes after the body's value,
//! replaces invalid UTF-8, and wraps unsigned times above `i64::MAX`; each of those is an error
//! here, since each silently changes what is stored. Unknown keys are skipped, as in Arc.
//! Arc adds the tag `host=unknown` to every row record without `h`; shale adds nothing. Arc
//! refuses integers above `i64::MAX`; shale stores a column holding one as unsigned (`u`), and a
//! float time keeps its fraction (rounded to the microsecond) where Arc truncates it.
//!
//! Line protocol cannot carry some text, so it is refused with a message saying so: a line break
//! in a tag value or string field, and a backslash at the end of a tag key, tag value or field
//! key. An empty tag value means "no tag", as in InfluxDB. NaN and infinite floats are refused.
//!
//! # Requests with several records
//!
//! Within one request a (measurement, column) pair keeps one role and one field type, as the
//! line-protocol parser requires. The first record that gives a column a type decides it; later
//! records are converted by the same rules as later rows of a column, or refused.
//!
//! Record indexes count records (not batch wrappers) from 0 in body order; row indexes count
//! from 0 within a columnar record's arrays, i.e. they are the array positions the client used.
//!
//! # Limits
//!
//! Every count in the body is checked against the bytes left before it drives a loop, so a
//! header claiming four billion elements is refused at once, and nothing is allocated from a
//! count. [`MsgpackLimits`] bounds the rows of a request, the columns of a record and the bytes
//! of output: names repeat on every line, so a few megabytes of columnar body can translate to
//! gigabytes, and the translation stops at the first line past the limit.
//!
//!
//! A columnar record is read twice and copied never: the first pass checks every column and
//! settles its type, the second walks one cursor per column in step and writes the rows. Strings
//! stay slices of the body, and nothing is allocated per value. Measured in release on the 2-core
//! VM, 10,000-row records: 13 columns (3 tags, 10 integers) about 1.7M rows/s, Arc's narrow
//! shape (1 tag, 3 floats) about 2.5M rows/s; the parser then reads the output at 4-7M rows/s.
//!
//! Threading: a pure function, run on the shard thread that received the request.

mod reader;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};

use crate::line_protocol::{self, FieldType};
use crate::names::{self, NameError, TIME_COLUMN};

use reader::{Reader, Value};

/// How deeply `{"batch": [...]}` wrappers may nest (a top-level array counts as one level).
pub const BATCH_DEPTH_MAX: usize = 4;

/// The "type" of a tag column in error messages: tags are text, but Arc clients also send
/// integers and booleans, which are written as text.
const TAG_TYPE: &str = "tag (string, integer or boolean)";

/// How long names quoted in error messages may be, in characters.
const ERROR_EXCERPT_CHARS_MAX: usize = 64;

/// Time values below this are seconds (Arc's magnitude rule, about the year 2286 in seconds).
const SECONDS_BELOW: i64 = 10_000_000_000;
/// Time values below this (and not seconds) are milliseconds.
const MILLISECONDS_BELOW: i64 = 10_000_000_000_000;
/// Time values below this (and not coarser) are microseconds; larger ones are nanoseconds.
const MICROSECONDS_BELOW: i64 = 10_000_000_000_000_000;

/// 2^63 and 2^64 as floats, the bounds of integral floats accepted into integer columns.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

// ------------------------------------------------------------------------------------------------
// Public types.

/// Limits checked while decoding, set by the caller from the node configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgpackLimits {
    /// The most rows one request may hold, over all its records.
    pub rows_max: usize,
    /// The most tags plus fields one record may have (the time column not counted).
    pub columns_max: usize,
    /// The most bytes of line protocol one request may translate to. The node passes
    /// `ingest.decompressed_bytes_max`: the translation is what the WAL stores, and names repeat
    /// on every line, so a body within the decompression limit can translate to far more.
    pub output_bytes_max: usize,
}

impl Default for MsgpackLimits {
    /// One million rows; 1024 columns, the line-protocol parser's default per line; 100 MiB of
    /// output, the default of `ingest.decompressed_bytes_max`.
    fn default() -> Self {
        MsgpackLimits {
            rows_max: 1 << 20,
            columns_max: 1_024,
            output_bytes_max: 100 << 20,
        }
    }
}

/// Where in the body a value error was found. Displays as `record 2, column "usage", row 7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The record's index, from 0, in body order over all batches.
    pub record: usize,
    /// The column (or row-form key) the value belongs to, cut to 64 characters.
    pub column: Option<String>,
    /// The row within a columnar record, from 0; `None` for a row-form record.
    pub row: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "record {}", self.record)?;
        if let Some(column) = &self.column {
            write!(formatter, ", column {column:?}")?;
        }
        if let Some(row) = self.row {
            write!(formatter, ", row {row}")?;
        }
        Ok(())
    }
}

/// Why a MessagePack body was refused (HTTP 400, except [`MsgpackError::TooManyRows`],
/// [`MsgpackError::TooManyColumns`] and [`MsgpackError::TooLarge`], which are 413). Names quoted
/// in these are cut to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("the body is empty")]
    EmptyBody,
    #[error("invalid MessagePack at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
    #[error("unexpected bytes after the MessagePack value, from byte {offset}")]
    TrailingBytes { offset: usize },
    #[error(
        "the body is a MessagePack {found}; expected a map (a record or a batch) or an array \
         of maps"
    )]
    UnsupportedPayload { found: &'static str },
    #[error("record {record} is {found}, not a map")]
    RecordNotMap { record: usize, found: &'static str },
    #[error("record {record}: batches nest more than {depth_max} levels deep")]
    BatchTooDeep { record: usize, depth_max: usize },
    #[error("record {record}: a map key is {found}; keys must be UTF-8 strings")]
    KeyNotString { record: usize, found: &'static str },
    #[error("record {record}: key {key:?} appears more than once")]
    DuplicateKey { record: usize, key: String },
    #[error("record {record}: {key:?} cannot be combined with {other:?}")]
    MixedForms {
        record: usize,
        key: &'static str,
        other: &'static str,
    },
    #[error("record {record}: {key:?} is {found}; expected {expected}")]
    WrongType {
        record: usize,
        key: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("record {record}: missing measurement (key \"m\")")]
    MissingMeasurement { record: usize },
    #[error("record {record}: invalid measurement name {name:?}: {error}")]
    InvalidMeasurement {
        record: usize,
        name: String,
        error: NameError,
    },
    #[error("record {record}: invalid column name {name:?}: {error}")]
    InvalidColumnName {
        record: usize,
        name: String,
        error: NameError,
    },
    #[error(
        "record {record}: column name {name:?} ends with a backslash, which line protocol \
         cannot carry"
    )]
    TrailingBackslash { record: usize, name: String },
    #[error("record {record}: no fields (expected \"columns\", \"fields\" or \"f\")")]
    MissingFields { record: usize },
    #[error("record {record}: \"columns\" is empty")]
    EmptyColumns { record: usize },
    #[error("record {record}: column {column:?} is {found}, not an array")]
    ColumnNotArray {
        record: usize,
        column: String,
        found: &'static str,
    },
    #[error(
        "record {record}: column {column:?} has {length} values but column {first_column:?} \
         has {expected}"
    )]
    ColumnLengthMismatch {
        record: usize,
        column: String,
        length: usize,
        first_column: String,
        expected: usize,
    },
    #[error("record {record}: the request has more than {rows_max} rows")]
    TooManyRows { record: usize, rows_max: usize },
    #[error("record {record}: more than {columns_max} tags and fields")]
    TooManyColumns { record: usize, columns_max: usize },
    #[error(
        "record {record}: the request translates to more than {bytes_max} bytes of line \
         protocol (the limit is ingest.decompressed_bytes_max)"
    )]
    TooLarge { record: usize, bytes_max: usize },
    #[error("{at}: {found} in a column of type {expected}")]
    TypeMismatch {
        at: Location,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{at}: {reason}")]
    InvalidValue { at: Location, reason: &'static str },
    #[error("{at}: invalid time: {reason}")]
    InvalidTime { at: Location, reason: &'static str },
    #[error("{at}: no field has a value")]
    RowWithoutFields { at: Location },
    #[error("record {record}: {key:?} is both a tag and a field")]
    TagAndField { record: usize, key: String },
    #[error(
        "record {record}: column {column:?} of measurement {measurement:?} is {here} here \
         but {earlier} in an earlier record"
    )]
    ColumnConflict {
        record: usize,
        measurement: String,
        column: String,
        here: &'static str,
        earlier: &'static str,
    },
}

/// Decodes one request body (already decompressed) into canonical line protocol appended to
/// `out`: tags sorted by key, fields in body order, times in microseconds, one `\n`-terminated
/// line per row, so parse it with [`crate::line_protocol::Precision::Microseconds`]. Returns the
/// number of rows (0 for an empty batch). On error `out` is restored to its length before the
/// call.
///
/// The output is bounded while it is written: the call fails with [`MsgpackError::TooLarge`] as
/// soon as it has appended more than `limits.output_bytes_max` bytes, and `out` is never grown
/// by this call past its length at the call plus that limit plus one line (or its capacity at
/// the call, if larger).
pub fn to_line_protocol(
    body: &[u8],
    default_time_us: i64,
    limits: &MsgpackLimits,
    out: &mut String,
) -> Result<usize, MsgpackError> {
    let out_start = out.len();
    let result = decode(body, default_time_us, limits, out);
    if result.is_err() {
        out.truncate(out_start);
    }
    result
}

fn decode(
    body: &[u8],
    default_time_us: i64,
    limits: &MsgpackLimits,
    out: &mut String,
) -> Result<usize, MsgpackError> {
    if body.is_empty() {
        return Err(MsgpackError::EmptyBody);
    }
    let budget = OutputBudget {
        start: out.len(),
        bytes_max: limits.output_bytes_max,
    };
    let mut decoder = Decoder {
        default_time_us,
        limits,
        budget,
        out,
        rows: 0,
        records: 0,
        schema: HashMap::new(),
        schema_key: String::new(),
        tag_names: Vec::new(),
        names: Vec::new(),
        columns: Vec::new(),
        row_tags: Vec::new(),
        row_fields: Vec::new(),
    };
    let mut reader = Reader::new(body);
    match reader.read()? {
        Value::Map(count) => decoder.map(&mut reader, count, 0)?,
        Value::Array(count) => decoder.array_of_records(&mut reader, count, 1)?,
        other => {
            return Err(MsgpackError::UnsupportedPayload {
                found: other.described(),
            })
        }
    }
    if !reader.is_at_end() {
        return Err(MsgpackError::TrailingBytes {
            offset: reader.position(),
        });
    }
    Ok(decoder.rows)
}

// ------------------------------------------------------------------------------------------------
// The decoder.

/// What a column is within one request, for the request-wide consistency check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Tag,
    Field(FieldType),
}

fn kind_name(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Tag => "a tag",
        ColumnKind::Field(FieldType::Float) => "a float field",
        ColumnKind::Field(FieldType::Integer) => "an integer field",
        ColumnKind::Field(FieldType::Unsigned) => "an unsigned field",
        ColumnKind::Field(FieldType::Boolean) => "a boolean field",
        ColumnKind::Field(FieldType::String) => "a string field",
    }
}

fn field_type_name(kind: FieldType) -> &'static str {
    match kind {
        FieldType::Float => "float",
        FieldType::Integer => "integer",
        FieldType::Unsigned => "unsigned",
        FieldType::Boolean => "boolean",
        FieldType::String => "string",
    }
}

/// A field value converted to its column's type.
#[derive(Debug, Clone, Copy)]
enum Scalar<'b> {
    Float(f64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(&'b str),
}

/// A tag value as it will be written.
#[derive(Debug, Clone)]
enum TagText<'b> {
    Text(Cow<'b, str>),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
}

/// Why one value was refused, before its location is known.
enum ValueError {
    Mismatch { found: &'static str },
    Invalid(&'static str),
}

/// One column of a columnar record between the checking pass and the writing pass.
struct Column<'b> {
    name: &'b str,
    is_tag: bool,
    /// `None` for tags and for field columns holding only nils.
    kind: Option<FieldType>,
    /// At the column's next unread element.
    cursor: Reader<'b>,
    /// The escaped name with its separator: `,name=` for a tag, `name=` for a field.
    prefix: String,
    /// The most bytes any of its values is written as, from the checking pass.
    value_bytes_max: usize,
}

/// The values of the keys a record map may have, each a reader at the value.
#[derive(Default)]
struct RecordKeys<'b> {
    measurement: Option<Reader<'b>>,
    columns: Option<Reader<'b>>,
    tag_keys: Option<Reader<'b>>,
    batch: Option<Reader<'b>>,
    time: Option<Reader<'b>>,
    host: Option<Reader<'b>>,
    fields: Option<Reader<'b>>,
    tags: Option<Reader<'b>>,
    compact_fields: Option<Reader<'b>>,
}

impl<'b> RecordKeys<'b> {
    /// The first row-form key present, for [`MsgpackError::MixedForms`].
    fn row_key(&self) -> Option<&'static str> {
        [
            ("t", &self.time),
            ("h", &self.host),
            ("fields", &self.fields),
            ("tags", &self.tags),
            ("f", &self.compact_fields),
        ]
        .into_iter()
        .find_map(|(key, value)| value.is_some().then_some(key))
    }
}

struct Decoder<'b, 'o> {
    default_time_us: i64,
    limits: &'o MsgpackLimits,
    budget: OutputBudget,
    out: &'o mut String,
    /// Rows written so far, over all records.
    rows: usize,
    /// Records started so far; the next record's index.
    records: usize,
    /// Request-wide column kinds, keyed by `measurement \0 column` (a measurement name cannot
    /// contain NUL, so the key is unambiguous).
    schema: HashMap<Box<str>, ColumnKind>,
    schema_key: String,
    // Scratch space reused between records.
    tag_names: Vec<&'b str>,
    names: Vec<&'b str>,
    columns: Vec<Column<'b>>,
    row_tags: Vec<(&'b str, TagText<'b>)>,
    row_fields: Vec<(Cow<'b, str>, Scalar<'b>)>,
}

impl<'b> Decoder<'b, '_> {
    /// A map: either a batch wrapper or one record. `reader` is just past the map header and is
    /// left just past the map.
    fn map(
        &mut self,
        reader: &mut Reader<'b>,
        count: u32,
        depth: usize,
    ) -> Result<(), MsgpackError> {
        let record = self.records;
        let keys = scan_keys(reader, count, record)?;
        if let Some(mut batch) = keys.batch {
            if depth >= BATCH_DEPTH_MAX {
                return Err(MsgpackError::BatchTooDeep {
                    record,
                    depth_max: BATCH_DEPTH_MAX,
                });
            }
            let other = if keys.measurement.is_some() {
                Some("m")
            } else if keys.columns.is_some() {
                Some("columns")
            } else {
                keys.row_key()
            };
            if let Some(other) = other {
                return Err(MsgpackError::MixedForms {
                    record,
                    key: "batch",
                    other,
                });
            }
            return match batch.read()? {
                Value::Array(count) => self.array_of_records(&mut batch, count, depth + 1),
                other => Err(MsgpackError::WrongType {
                    record,
                    key: "batch",
                    expected: "an array of records",
                    found: other.described(),
                }),
            };
        }

        self.records += 1;
        let measurement = measurement(keys.measurement, record)?;
        match keys.columns {
            Some(columns) => {
                if let Some(other) = keys.row_key() {
                    return Err(MsgpackError::MixedForms {
                        record,
                        key: "columns",
                        other,
                    });
                }
                self.columnar(record, &measurement, columns, keys.tag_keys)
            }
            None => {
                if let (Some(_), Some(other)) = (keys.tag_keys, keys.row_key()) {
                    return Err(MsgpackError::MixedForms {
                        record,
                        key: "tag_keys",
                        other,
                    });
                }
                self.row(record, &measurement, &keys)
            }
        }
    }

    /// The records of a batch or of a top-level array; each must be a map.
    fn array_of_records(
        &mut self,
        reader: &mut Reader<'b>,
        count: u32,
        depth: usize,
    ) -> Result<(), MsgpackError> {
        for _ in 0..count {
            match reader.read()? {
                Value::Map(count) => self.map(reader, count, depth)?,
                other => {
                    return Err(MsgpackError::RecordNotMap {
                        record: self.records,
                        found: other.described(),
                    })
                }
            }
        }
        Ok(())
    }

    fn add_rows(&mut self, record: usize, rows: usize) -> Result<(), MsgpackError> {
        self.rows = self.rows.saturating_add(rows);
        if self.rows > self.limits.rows_max {
            return Err(MsgpackError::TooManyRows {
                record,
                rows_max: self.limits.rows_max,
            });
        }
        Ok(())
    }

    // --------------------------------------------------------------------------------------------
    // Columnar records.

    /// Checks every column in a first pass (types, lengths, names, time), then writes the rows by
    /// walking one cursor per column in step. The body is read twice, but nothing is copied.
    fn columnar(
        &mut self,
        record: usize,
        measurement: &str,
        columns: Reader<'b>,
        tag_keys: Option<Reader<'b>>,
    ) -> Result<(), MsgpackError> {
        let columns_max = self.limits.columns_max;
        self.tag_names.clear();
        if let Some(mut reader) = tag_keys {
            let count = match reader.read()? {
                Value::Array(count) => count as usize,
                Value::Nil => 0,
                other => {
                    return Err(MsgpackError::WrongType {
                        record,
                        key: "tag_keys",
                        expected: "an array of strings",
                        found: other.described(),
                    })
                }
            };
            if count > columns_max {
                return Err(MsgpackError::TooManyColumns {
                    record,
                    columns_max,
                });
            }
            for _ in 0..count {
                let name = match reader.read()? {
                    Value::String(bytes) => std::str::from_utf8(bytes).ok(),
                    _ => None,
                };
                let Some(name) = name else {
                    return Err(MsgpackError::WrongType {
                        record,
                        key: "tag_keys",
                        expected: "an array of UTF-8 strings",
                        found: "an array holding something else",
                    });
                };
                check_column_name(name, record)?;
                self.tag_names.push(name);
            }
        }

        let mut reader = columns;
        let count = match reader.read()? {
            Value::Map(count) => count as usize,
            other => {
                return Err(MsgpackError::WrongType {
                    record,
                    key: "columns",
                    expected: "a map of column names to arrays",
                    found: other.described(),
                })
            }
        };
        if count == 0 {
            return Err(MsgpackError::EmptyColumns { record });
        }

        self.columns.clear();
        self.names.clear();
        let mut rows: Option<(usize, &'b str)> = None;
        let mut time: Option<(Reader<'b>, TimeUnit)> = None;
        for _ in 0..count {
            let name = read_key(&mut reader, record)?;
            let length = match reader.read()? {
                Value::Array(length) => length as usize,
                other => {
                    return Err(MsgpackError::ColumnNotArray {
                        record,
                        column: excerpt(name),
                        found: other.described(),
                    })
                }
            };
            match rows {
                None => {
                    rows = Some((length, name));
                    self.add_rows(record, length)?;
                }
                Some((expected, first_column)) if expected != length => {
                    return Err(MsgpackError::ColumnLengthMismatch {
                        record,
                        column: excerpt(name),
                        length,
                        first_column: excerpt(first_column),
                        expected,
                    });
                }
                Some(_) => {}
            }
            self.names.push(name);
            let start = reader;
            if name == TIME_COLUMN {
                let unit = scan_time(&mut reader, record, length)?;
                time = Some((start, unit));
                continue;
            }
            check_column_name(name, record)?;
            if self.columns.len() == columns_max {
                return Err(MsgpackError::TooManyColumns {
                    record,
                    columns_max,
                });
            }
            let is_tag = self.tag_names.contains(&name);
            let (kind, string_bytes_max) = if is_tag {
                self.check_role(record, measurement, name, ColumnKind::Tag)?;
                (None, scan_tags(&mut reader, record, name, length)?)
            } else {
                let fixed = self.field_kind(record, measurement, name)?;
                scan_field(&mut reader, record, name, length, fixed)?
            };
            self.columns.push(Column {
                name,
                is_tag,
                kind,
                cursor: start,
                prefix: String::new(),
                value_bytes_max: value_bytes_max(string_bytes_max),
            });
        }
        let rows = rows.map_or(0, |(rows, _)| rows);

        if let Some(key) = first_duplicate(&mut self.names) {
            return Err(MsgpackError::DuplicateKey {
                record,
                key: excerpt(key),
            });
        }

        // Checked: register the kinds, then write. Tags are written sorted by name, fields in
        // body order; all-nil field columns are never read again.
        let mut columns = std::mem::take(&mut self.columns);
        for column in &mut columns {
            let kind = match (column.is_tag, column.kind) {
                (true, _) => ColumnKind::Tag,
                (false, Some(kind)) => ColumnKind::Field(kind),
                (false, None) => continue,
            };
            self.register(measurement, column.name, kind);
            if column.is_tag {
                column.prefix.push(',');
            }
            line_protocol::escape_key(&mut column.prefix, column.name);
            column.prefix.push('=');
        }
        columns.sort_by(|left, right| {
            (!left.is_tag, left.is_tag.then_some(left.name))
                .cmp(&(!right.is_tag, right.is_tag.then_some(right.name)))
        });
        columns.retain(|column| column.is_tag || column.kind.is_some());
        let line_bytes_max = columns.iter().fold(
            measurement.len().saturating_add(LINE_END_BYTES_MAX),
            |bytes, column| {
                // One byte for the space or comma before a field; a tag's comma is in its prefix.
                bytes
                    .saturating_add(1 + column.prefix.len())
                    .saturating_add(column.value_bytes_max)
            },
        );
        let rows_out = RowsOut {
            out: &mut *self.out,
            budget: self.budget,
            line_bytes_max,
        };
        let result = write_columnar_rows(
            rows_out,
            record,
            measurement,
            &mut columns,
            time,
            rows,
            self.default_time_us,
        );
        self.columns = columns;
        result
    }

    /// The kind an earlier record gave this field, or an error if it was a tag.
    fn field_kind(
        &mut self,
        record: usize,
        measurement: &str,
        name: &str,
    ) -> Result<Option<FieldType>, MsgpackError> {
        match self.lookup(measurement, name) {
            None => Ok(None),
            Some(ColumnKind::Field(kind)) => Ok(Some(kind)),
            Some(earlier @ ColumnKind::Tag) => Err(MsgpackError::ColumnConflict {
                record,
                measurement: excerpt(measurement),
                column: excerpt(name),
                here: "a field",
                earlier: kind_name(earlier),
            }),
        }
    }

    /// Refuses a tag that an earlier record made a field.
    fn check_role(
        &mut self,
        record: usize,
        measurement: &str,
        name: &str,
        here: ColumnKind,
    ) -> Result<(), MsgpackError> {
        match self.lookup(measurement, name) {
            Some(earlier) if earlier != here => Err(MsgpackError::ColumnConflict {
                record,
                measurement: excerpt(measurement),
                column: excerpt(name),
                here: kind_name(here),
                earlier: kind_name(earlier),
            }),
            _ => Ok(()),
        }
    }

    fn lookup(&mut self, measurement: &str, column: &str) -> Option<ColumnKind> {
        self.set_schema_key(measurement, column);
        self.schema.get(self.schema_key.as_str()).copied()
    }

    /// Records a column's kind; callers have already checked it against any earlier one.
    fn register(&mut self, measurement: &str, column: &str, kind: ColumnKind) {
        self.set_schema_key(measurement, column);
        if !self.schema.contains_key(self.schema_key.as_str()) {
            self.schema.insert(self.schema_key.as_str().into(), kind);
        }
    }

    fn set_schema_key(&mut self, measurement: &str, column: &str) {
        self.schema_key.clear();
        self.schema_key.push_str(measurement);
        self.schema_key.push('\0');
        self.schema_key.push_str(column);
    }

    // --------------------------------------------------------------------------------------------
    // Row records.

    fn row(
        &mut self,
        record: usize,
        measurement: &str,
        keys: &RecordKeys<'b>,
    ) -> Result<(), MsgpackError> {
        self.add_rows(record, 1)?;
        let columns_max = self.limits.columns_max;
        let at = |column: &str| Location {
            record,
            column: Some(excerpt(column)),
            row: None,
        };

        // Tags: the `tags` map, then `h` as the tag `host` (replacing one from the map, as Arc's
        // assignment does).
        self.row_tags.clear();
        self.tag_names.clear();
        let mut tag_count = 0usize;
        if let Some(mut reader) = keys.tags {
            match reader.read()? {
                Value::Map(count) => {
                    tag_count = count as usize;
                    if tag_count > columns_max {
                        return Err(MsgpackError::TooManyColumns {
                            record,
                            columns_max,
                        });
                    }
                    for _ in 0..count {
                        let key = read_key(&mut reader, record)?;
                        check_column_name(key, record)?;
                        self.tag_names.push(key);
                        let value = reader.read()?;
                        match tag_text(value) {
                            Ok(Some(text)) => self.row_tags.push((key, text)),
                            Ok(None) => {}
                            Err(error) => return Err(value_error(error, at(key), TAG_TYPE)),
                        }
                    }
                }
                Value::Nil => {}
                other => {
                    return Err(MsgpackError::WrongType {
                        record,
                        key: "tags",
                        expected: "a map",
                        found: other.described(),
                    })
                }
            }
        }
        if let Some(mut reader) = keys.host {
            let host = match reader.read()? {
                Value::Nil => None,
                Value::Integer(number) => Some(TagText::Text(Cow::Owned(format!("host_{number}")))),
                Value::LargeUnsigned(number) => {
                    Some(TagText::Text(Cow::Owned(format!("host_{number}"))))
                }
                value @ Value::String(_) => {
                    tag_text(value).map_err(|error| value_error(error, at("h"), TAG_TYPE))?
                }
                other => {
                    return Err(MsgpackError::WrongType {
                        record,
                        key: "h",
                        expected: "a string or an integer",
                        found: other.described(),
                    })
                }
            };
            if let Some(host) = host {
                self.row_tags.retain(|(key, _)| *key != "host");
                self.row_tags.push(("host", host));
                tag_count += 1;
            }
        }
        self.row_tags.sort_by(|left, right| left.0.cmp(right.0));
        if let Some(key) = first_duplicate(&mut self.tag_names) {
            return Err(MsgpackError::DuplicateKey {
                record,
                key: excerpt(key),
            });
        }

        // Fields: the `fields` map or the compact `f` array.
        self.row_fields.clear();
        let (mut reader, compact) = match (keys.fields, keys.compact_fields) {
            (Some(_), Some(_)) => {
                return Err(MsgpackError::MixedForms {
                    record,
                    key: "fields",
                    other: "f",
                })
            }
            (Some(reader), None) => (reader, false),
            (None, Some(reader)) => (reader, true),
            (None, None) => return Err(MsgpackError::MissingFields { record }),
        };
        let count = match (reader.read()?, compact) {
            (Value::Map(count), false) | (Value::Array(count), true) => count as usize,
            (other, _) => {
                return Err(MsgpackError::WrongType {
                    record,
                    key: if compact { "f" } else { "fields" },
                    expected: if compact { "an array" } else { "a map" },
                    found: other.described(),
                })
            }
        };
        if tag_count.saturating_add(count) > columns_max {
            return Err(MsgpackError::TooManyColumns {
                record,
                columns_max,
            });
        }
        self.names.clear();
        for index in 0..count {
            let key: Cow<'b, str> = if compact {
                Cow::Owned(format!("field_{index}"))
            } else {
                let key = read_key(&mut reader, record)?;
                check_column_name(key, record)?;
                self.names.push(key);
                Cow::Borrowed(key)
            };
            let value = reader.read()?;
            if value == Value::Nil {
                continue;
            }
            if self
                .row_tags
                .binary_search_by(|(tag, _)| (*tag).cmp(&*key))
                .is_ok()
            {
                return Err(MsgpackError::TagAndField {
                    record,
                    key: excerpt(&key),
                });
            }
            let kind = match self.field_kind(record, measurement, &key)? {
                Some(kind) => kind,
                None => value_kind(value).map_err(|error| value_error(error, at(&key), ""))?,
            };
            let scalar = field_scalar(value, kind)
                .map_err(|error| value_error(error, at(&key), field_type_name(kind)))?;
            self.row_fields.push((key, scalar));
        }
        // Nil values count too: a repeated key is a malformed map whatever its values.
        if let Some(key) = first_duplicate(&mut self.names) {
            return Err(MsgpackError::DuplicateKey {
                record,
                key: excerpt(key),
            });
        }
        if self.row_fields.is_empty() {
            return Err(MsgpackError::RowWithoutFields {
                at: Location {
                    record,
                    column: None,
                    row: None,
                },
            });
        }

        let time_us = match keys.time {
            None => self.default_time_us,
            Some(mut reader) => match reader.read()? {
                Value::Nil => self.default_time_us,
                value => time_unit(value)
                    .and_then(|unit| to_micros(value, unit))
                    .map_err(|reason| MsgpackError::InvalidTime {
                        at: at("t"),
                        reason,
                    })?,
            },
        };

        // Tags may not repeat an earlier record's field and the reverse; fields were checked
        // against earlier kinds above.
        let row_tags = std::mem::take(&mut self.row_tags);
        for (key, _) in &row_tags {
            self.check_role(record, measurement, key, ColumnKind::Tag)?;
        }
        for (key, _) in &row_tags {
            self.register(measurement, key, ColumnKind::Tag);
        }
        let row_fields = std::mem::take(&mut self.row_fields);
        for (key, scalar) in &row_fields {
            self.register(measurement, key, ColumnKind::Field(scalar_type(scalar)));
        }

        let line_bytes_max = row_tags
            .iter()
            .map(|(key, value)| {
                let value_bytes = match value {
                    TagText::Text(text) => value_bytes_max(text.len()),
                    _ => SCALAR_BYTES_MAX,
                };
                (key.len(), value_bytes)
            })
            .chain(row_fields.iter().map(|(key, value)| {
                let value_bytes = match value {
                    Scalar::String(text) => value_bytes_max(text.len()),
                    _ => SCALAR_BYTES_MAX,
                };
                (key.len(), value_bytes)
            }))
            .fold(
                measurement.len().saturating_add(LINE_END_BYTES_MAX),
                |bytes, (key_bytes, value_bytes)| {
                    // A separator, the key escaped (at most twice its length), `=` and the value.
                    bytes
                        .saturating_add(2)
                        .saturating_add(key_bytes.saturating_mul(2))
                        .saturating_add(value_bytes)
                },
            );
        let out = &mut *self.out;
        self.budget.reserve_line(out, line_bytes_max);
        let line_start = out.len();
        out.push_str(measurement);
        for (key, value) in &row_tags {
            out.push(',');
            line_protocol::escape_key(out, key);
            out.push('=');
            push_tag_text(out, value);
        }
        for (index, (key, value)) in row_fields.iter().enumerate() {
            out.push(if index == 0 { ' ' } else { ',' });
            line_protocol::escape_key(out, key);
            out.push('=');
            push_scalar(out, *value);
        }
        out.push(' ');
        push_integer(out, time_us);
        out.push('\n');
        debug_assert!(out.len() - line_start <= line_bytes_max);
        self.row_tags = row_tags;
        self.row_fields = row_fields;
        self.budget.check(out, record)
    }
}

// ------------------------------------------------------------------------------------------------
// Record parts.

/// Reads a record map's keys, remembering where the known ones' values are. Unknown keys are
/// skipped, as Arc does.
fn scan_keys<'b>(
    reader: &mut Reader<'b>,
    count: u32,
    record: usize,
) -> Result<RecordKeys<'b>, MsgpackError> {
    let mut keys = RecordKeys::default();
    for _ in 0..count {
        let key = read_key(reader, record)?;
        let slot = match key {
            "m" => &mut keys.measurement,
            "columns" => &mut keys.columns,
            "tag_keys" => &mut keys.tag_keys,
            "batch" => &mut keys.batch,
            "t" => &mut keys.time,
            "h" => &mut keys.host,
            "fields" => &mut keys.fields,
            "tags" => &mut keys.tags,
            "f" => &mut keys.compact_fields,
            _ => {
                reader.skip()?;
                continue;
            }
        };
        if slot.is_some() {
            return Err(MsgpackError::DuplicateKey {
                record,
                key: key.to_owned(),
            });
        }
        *slot = Some(*reader);
        reader.skip()?;
    }
    Ok(keys)
}

/// Sorts `names` and returns a name that occurs twice, if any.
fn first_duplicate<'b>(names: &mut [&'b str]) -> Option<&'b str> {
    names.sort_unstable();
    names
        .windows(2)
        .find(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
}

fn read_key<'b>(reader: &mut Reader<'b>, record: usize) -> Result<&'b str, MsgpackError> {
    match reader.read()? {
        Value::String(bytes) => {
            std::str::from_utf8(bytes).map_err(|_| MsgpackError::KeyNotString {
                record,
                found: "a string that is not UTF-8",
            })
        }
        other => Err(MsgpackError::KeyNotString {
            record,
            found: other.described(),
        }),
    }
}

/// The measurement from `m`: a valid name, or an integer `n` meaning `measurement_<n>`.
fn measurement<'b>(value: Option<Reader<'b>>, record: usize) -> Result<Cow<'b, str>, MsgpackError> {
    let Some(mut reader) = value else {
        return Err(MsgpackError::MissingMeasurement { record });
    };
    let name = match reader.read()? {
        Value::Nil => return Err(MsgpackError::MissingMeasurement { record }),
        Value::String(bytes) => match std::str::from_utf8(bytes) {
            Ok(name) => Cow::Borrowed(name),
            Err(_) => {
                return Err(MsgpackError::WrongType {
                    record,
                    key: "m",
                    expected: "a UTF-8 string",
                    found: "a string that is not UTF-8",
                })
            }
        },
        Value::Integer(number) => Cow::Owned(format!("measurement_{number}")),
        Value::LargeUnsigned(number) => Cow::Owned(format!("measurement_{number}")),
        other => {
            return Err(MsgpackError::WrongType {
                record,
                key: "m",
                expected: "a string or an integer",
                found: other.described(),
            })
        }
    };
    names::validate_measurement(&name).map_err(|error| MsgpackError::InvalidMeasurement {
        record,
        name: excerpt(&name),
        error,
    })?;
    Ok(name)
}

/// Checks a tag or field key: a valid column name that line protocol can carry.
fn check_column_name(name: &str, record: usize) -> Result<(), MsgpackError> {
    names::validate_column(name).map_err(|error| MsgpackError::InvalidColumnName {
        record,
        name: excerpt(name),
        error,
    })?;
    // A final backslash would escape the `=` or `,` written after the name.
    if name.ends_with('\\') {
        return Err(MsgpackError::TrailingBackslash {
            record,
            name: excerpt(name),
        });
    }
    Ok(())
}

/// Turns a [`ValueError`] into an error at `at`; `expected` names the column type.
fn value_error(error: ValueError, at: Location, expected: &'static str) -> MsgpackError {
    match error {
        ValueError::Mismatch { found } => MsgpackError::TypeMismatch {
            at,
            expected,
            found,
        },
        ValueError::Invalid(reason) => MsgpackError::InvalidValue { at, reason },
    }
}

// ------------------------------------------------------------------------------------------------
// Columns: the checking pass.

/// Checks a time column and returns the unit its first value implies.
fn scan_time(
    reader: &mut Reader<'_>,
    record: usize,
    rows: usize,
) -> Result<TimeUnit, MsgpackError> {
    let mut unit = TimeUnit::Microseconds;
    for row in 0..rows {
        let value = reader.read()?;
        let error = |reason| MsgpackError::InvalidTime {
            at: column_location(record, TIME_COLUMN, row),
            reason,
        };
        if row == 0 {
            // Arc decides the unit of the whole column from its first value.
            unit = time_unit(value).map_err(error)?;
        }
        to_micros(value, unit).map_err(error)?;
    }
    Ok(unit)
}

/// Checks a tag column's values and returns the length in bytes of its longest string.
fn scan_tags(
    reader: &mut Reader<'_>,
    record: usize,
    name: &str,
    rows: usize,
) -> Result<usize, MsgpackError> {
    let mut string_bytes_max = 0;
    for row in 0..rows {
        let value = reader.read()?;
        if let Value::String(bytes) = value {
            string_bytes_max = string_bytes_max.max(bytes.len());
        }
        tag_text(value)
            .map_err(|error| value_error(error, column_location(record, name, row), TAG_TYPE))?;
    }
    Ok(string_bytes_max)
}

/// Checks a field column's values and returns its type: `fixed` if an earlier record set it,
/// else the type of the first non-nil value (an integer column holding a value above `i64::MAX`
/// is unsigned). `None` if every value is nil. Also returns the length in bytes of the column's
/// longest string.
fn scan_field(
    reader: &mut Reader<'_>,
    record: usize,
    name: &str,
    rows: usize,
    fixed: Option<FieldType>,
) -> Result<(Option<FieldType>, usize), MsgpackError> {
    let mut string_bytes_max = 0;
    if let Some(kind) = fixed {
        for row in 0..rows {
            let value = reader.read()?;
            if let Value::String(bytes) = value {
                string_bytes_max = string_bytes_max.max(bytes.len());
            }
            if value != Value::Nil {
                field_scalar(value, kind).map_err(|error| {
                    value_error(
                        error,
                        column_location(record, name, row),
                        field_type_name(kind),
                    )
                })?;
            }
        }
        return Ok((Some(kind), string_bytes_max));
    }

    /// The first non-nil value decides; integers stay undecided between signed and unsigned
    /// until the column is read.
    enum Class {
        Float,
        Boolean,
        String,
        Integer { negative: bool, large: bool },
    }
    let mut class: Option<Class> = None;
    for row in 0..rows {
        let value = reader.read()?;
        if value == Value::Nil {
            continue;
        }
        if let Value::String(bytes) = value {
            string_bytes_max = string_bytes_max.max(bytes.len());
        }
        let at = || column_location(record, name, row);
        let class = match &mut class {
            Some(class) => class,
            None => class.insert(
                match value_kind(value).map_err(|error| value_error(error, at(), ""))? {
                    FieldType::Float => Class::Float,
                    FieldType::Boolean => Class::Boolean,
                    FieldType::String => Class::String,
                    FieldType::Integer | FieldType::Unsigned => Class::Integer {
                        negative: false,
                        large: false,
                    },
                },
            ),
        };
        let (kind, negative, large) = match class {
            Class::Float => (FieldType::Float, None, None),
            Class::Boolean => (FieldType::Boolean, None, None),
            Class::String => (FieldType::String, None, None),
            Class::Integer { negative, large } => {
                // Check as unsigned if the value is above i64::MAX, else as signed; the column's
                // final type is settled once both kinds of value have been seen or not.
                let is_large = match value {
                    Value::LargeUnsigned(_) => true,
                    Value::Float(float) => float >= TWO_POW_63,
                    _ => false,
                };
                let kind = if is_large {
                    FieldType::Unsigned
                } else {
                    FieldType::Integer
                };
                (kind, Some(negative), Some((large, is_large)))
            }
        };
        let scalar = field_scalar(value, kind).map_err(|error| {
            let expected = match kind {
                FieldType::Unsigned => "integer",
                other => field_type_name(other),
            };
            value_error(error, at(), expected)
        })?;
        if let (Some(negative), Some((large, is_large))) = (negative, large) {
            let is_negative = match scalar {
                Scalar::Integer(value) => value < 0,
                _ => false,
            };
            *negative |= is_negative;
            *large |= is_large;
            if *negative && *large {
                return Err(MsgpackError::InvalidValue {
                    at: at(),
                    reason: "the column mixes negative integers with integers above \
                             9223372036854775807; no 64-bit integer type holds both",
                });
            }
        }
    }
    let kind = class.map(|class| match class {
        Class::Float => FieldType::Float,
        Class::Boolean => FieldType::Boolean,
        Class::String => FieldType::String,
        Class::Integer { large: true, .. } => FieldType::Unsigned,
        Class::Integer { large: false, .. } => FieldType::Integer,
    });
    Ok((kind, string_bytes_max))
}

fn column_location(record: usize, name: &str, row: usize) -> Location {
    Location {
        record,
        column: Some(excerpt(name)),
        row: Some(row),
    }
}

// ------------------------------------------------------------------------------------------------
// Columns: the writing pass.

/// Writes the rows of a checked columnar record. `columns` holds the tags (sorted by name), then
/// the fields in body order; each cursor is at the column's first element. Stops with
/// [`MsgpackError::TooLarge`] after the first line that takes the output past its budget.
fn write_columnar_rows(
    rows_out: RowsOut<'_>,
    record: usize,
    measurement: &str,
    columns: &mut [Column<'_>],
    time: Option<(Reader<'_>, TimeUnit)>,
    rows: usize,
    default_time_us: i64,
) -> Result<(), MsgpackError> {
    let RowsOut {
        out,
        budget,
        line_bytes_max,
    } = rows_out;
    let mut time = time;
    for row in 0..rows {
        budget.reserve_line(out, line_bytes_max);
        let line_start = out.len();
        out.push_str(measurement);
        let mut fields_written = 0usize;
        for column in columns.iter_mut() {
            let value = column.cursor.read()?;
            if matches!(value, Value::Nil) {
                continue;
            }
            match column.kind {
                None => {
                    // A tag (all-nil field columns were removed).
                    let Some(text) = tag_text(value).map_err(|error| {
                        value_error(error, column_location(record, column.name, row), TAG_TYPE)
                    })?
                    else {
                        continue;
                    };
                    out.push_str(&column.prefix);
                    push_tag_text(out, &text);
                }
                Some(kind) => {
                    let scalar = field_scalar(value, kind).map_err(|error| {
                        value_error(
                            error,
                            column_location(record, column.name, row),
                            field_type_name(kind),
                        )
                    })?;
                    out.push(if fields_written == 0 { ' ' } else { ',' });
                    out.push_str(&column.prefix);
                    push_scalar(out, scalar);
                    fields_written += 1;
                }
            }
        }
        if fields_written == 0 {
            return Err(MsgpackError::RowWithoutFields {
                at: Location {
                    record,
                    column: None,
                    row: Some(row),
                },
            });
        }
        let time_us = match &mut time {
            None => default_time_us,
            Some((cursor, unit)) => {
                to_micros(cursor.read()?, *unit).map_err(|reason| MsgpackError::InvalidTime {
                    at: column_location(record, TIME_COLUMN, row),
                    reason,
                })?
            }
        };
        out.push(' ');
        push_integer(out, time_us);
        out.push('\n');
        debug_assert!(out.len() - line_start <= line_bytes_max);
        budget.check(out, record)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The output budget.

/// The most bytes a number or boolean is written as: a float's shortest form takes at most 24
/// (`-2.2250738585072014e-308`), an integer with its type suffix 21.
const SCALAR_BYTES_MAX: usize = 24;

/// The most bytes a line ends with: the space, the time (at most 19 digits and a sign) and `\n`.
const LINE_END_BYTES_MAX: usize = 22;

/// The most bytes a value is written as, if its longest string is `string_bytes_max` bytes:
/// escaping at most doubles a string, and a string field adds two quotes.
fn value_bytes_max(string_bytes_max: usize) -> usize {
    string_bytes_max
        .saturating_mul(2)
        .saturating_add(2)
        .max(SCALAR_BYTES_MAX)
}

/// How much line protocol one call may append: the output's length at the call and the limit.
///
/// The size is checked after every line, so the output never holds more than the limit plus one
/// line; and the space for each line is reserved here, capped at that same bound, so the String's
/// own doubling cannot allocate twice the limit either.
#[derive(Debug, Clone, Copy)]
struct OutputBudget {
    start: usize,
    bytes_max: usize,
}

impl OutputBudget {
    /// Makes room for a line of at most `line_bytes_max` bytes, doubling the capacity as a String
    /// would, but never past `start + bytes_max + line_bytes_max`.
    #[inline]
    fn reserve_line(&self, out: &mut String, line_bytes_max: usize) {
        if out.capacity() - out.len() >= line_bytes_max {
            return;
        }
        let needed = out.len().saturating_add(line_bytes_max);
        let ceiling = self
            .start
            .saturating_add(self.bytes_max)
            .saturating_add(line_bytes_max);
        let target = out.capacity().saturating_mul(2).min(ceiling).max(needed);
        out.reserve_exact(target - out.len());
    }

    /// Refuses the output once this call has appended more than the limit.
    #[inline]
    fn check(&self, out: &str, record: usize) -> Result<(), MsgpackError> {
        if out.len() - self.start > self.bytes_max {
            return Err(MsgpackError::TooLarge {
                record,
                bytes_max: self.bytes_max,
            });
        }
        Ok(())
    }
}

/// Where a columnar record's rows go: the output, its budget, and the most bytes one of the
/// record's lines can take.
struct RowsOut<'o> {
    out: &'o mut String,
    budget: OutputBudget,
    line_bytes_max: usize,
}

// ------------------------------------------------------------------------------------------------
// Values.

/// Refuses the types no column can hold.
#[inline]
fn unsupported(value: Value<'_>) -> Option<ValueError> {
    let reason = match value {
        Value::Array(_) | Value::Map(_) => "nested arrays and maps are not supported as values",
        Value::Binary(_) => "binary values are not supported; send strings as MessagePack str",
        Value::Extension => "MessagePack extension values are not supported",
        _ => return None,
    };
    Some(ValueError::Invalid(reason))
}

/// The field type a first value gives its column (never called with nil).
fn value_kind(value: Value<'_>) -> Result<FieldType, ValueError> {
    if let Some(error) = unsupported(value) {
        return Err(error);
    }
    Ok(match value {
        Value::Float(_) => FieldType::Float,
        Value::LargeUnsigned(_) => FieldType::Unsigned,
        Value::Boolean(_) => FieldType::Boolean,
        Value::String(_) => FieldType::String,
        _ => FieldType::Integer,
    })
}

/// Converts a non-nil value to a field of type `kind`, with Arc's widening (integers into float
/// columns) and without its lossy narrowing (only integral floats go into integer columns).
#[inline]
fn field_scalar(value: Value<'_>, kind: FieldType) -> Result<Scalar<'_>, ValueError> {
    if let Some(error) = unsupported(value) {
        return Err(error);
    }
    let mismatch = || ValueError::Mismatch {
        found: value.described(),
    };
    let scalar = match kind {
        FieldType::Float => match value {
            Value::Float(float) if float.is_finite() => Scalar::Float(float),
            Value::Float(_) => {
                return Err(ValueError::Invalid(
                    "NaN and infinite floats cannot be stored",
                ))
            }
            // Exact up to 2^53, rounded to the nearest float beyond (as in Arc).
            Value::Integer(integer) => Scalar::Float(integer as f64),
            Value::LargeUnsigned(integer) => Scalar::Float(integer as f64),
            _ => return Err(mismatch()),
        },
        FieldType::Integer => match value {
            Value::Integer(integer) => Scalar::Integer(integer),
            Value::LargeUnsigned(_) => {
                return Err(ValueError::Invalid(
                    "above 9223372036854775807 in an integer column",
                ))
            }
            Value::Float(float) => {
                let float = integral(float)?;
                if !(-TWO_POW_63..TWO_POW_63).contains(&float) {
                    return Err(ValueError::Invalid(
                        "float out of range for an integer column",
                    ));
                }
                Scalar::Integer(float as i64)
            }
            _ => return Err(mismatch()),
        },
        FieldType::Unsigned => match value {
            Value::Integer(integer) => match u64::try_from(integer) {
                Ok(integer) => Scalar::Unsigned(integer),
                Err(_) => {
                    return Err(ValueError::Invalid(
                        "a negative integer in an unsigned column",
                    ))
                }
            },
            Value::LargeUnsigned(integer) => Scalar::Unsigned(integer),
            Value::Float(float) => {
                let float = integral(float)?;
                if !(0.0..TWO_POW_64).contains(&float) {
                    return Err(ValueError::Invalid(
                        "float out of range for an unsigned column",
                    ));
                }
                Scalar::Unsigned(float as u64)
            }
            _ => return Err(mismatch()),
        },
        FieldType::Boolean => match value {
            Value::Boolean(boolean) => Scalar::Boolean(boolean),
            _ => return Err(mismatch()),
        },
        FieldType::String => match value {
            Value::String(bytes) => Scalar::String(line_text(bytes)?),
            _ => return Err(mismatch()),
        },
    };
    Ok(scalar)
}

/// A float that may go into an integer column: finite and without a fractional part.
fn integral(float: f64) -> Result<f64, ValueError> {
    if !float.is_finite() {
        return Err(ValueError::Invalid(
            "NaN and infinite floats cannot be stored",
        ));
    }
    if float.fract() != 0.0 {
        return Err(ValueError::Invalid(
            "a float with a fractional part in an integer column",
        ));
    }
    Ok(float)
}

/// A tag value: text, or an integer or boolean written as text. `None` for nil and for the empty
/// string, which both mean "no tag" (line protocol has no empty tag values).
#[inline]
fn tag_text(value: Value<'_>) -> Result<Option<TagText<'_>>, ValueError> {
    if let Some(error) = unsupported(value) {
        return Err(error);
    }
    let text = match value {
        Value::Nil => return Ok(None),
        Value::String(bytes) => {
            let text = line_text(bytes)?;
            if text.is_empty() {
                return Ok(None);
            }
            if text.ends_with('\\') {
                return Err(ValueError::Invalid(
                    "a tag value may not end with a backslash (line protocol cannot carry it)",
                ));
            }
            TagText::Text(Cow::Borrowed(text))
        }
        Value::Integer(integer) => TagText::Integer(integer),
        Value::LargeUnsigned(integer) => TagText::Unsigned(integer),
        Value::Boolean(boolean) => TagText::Boolean(boolean),
        _ => {
            return Err(ValueError::Mismatch {
                found: value.described(),
            })
        }
    };
    Ok(Some(text))
}

/// Text for a tag value or string field: UTF-8 without line breaks.
#[inline]
fn line_text(bytes: &[u8]) -> Result<&str, ValueError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ValueError::Invalid("a string that is not valid UTF-8"))?;
    if bytes.contains(&b'\n') {
        return Err(ValueError::Invalid(
            "a line break in a string or tag value (line protocol cannot carry it)",
        ));
    }
    Ok(text)
}

fn scalar_type(scalar: &Scalar<'_>) -> FieldType {
    match scalar {
        Scalar::Float(_) => FieldType::Float,
        Scalar::Integer(_) => FieldType::Integer,
        Scalar::Unsigned(_) => FieldType::Unsigned,
        Scalar::Boolean(_) => FieldType::Boolean,
        Scalar::String(_) => FieldType::String,
    }
}

// ------------------------------------------------------------------------------------------------
// Time.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeUnit {
    Seconds,
    Milliseconds,
    Microseconds,
    Nanoseconds,
}

/// The unit Arc infers from a time value's magnitude.
fn time_unit(value: Value<'_>) -> Result<TimeUnit, &'static str> {
    let magnitude = match value {
        Value::Integer(integer) => integer as f64,
        Value::LargeUnsigned(_) => return Ok(TimeUnit::Nanoseconds),
        Value::Float(float) if float.is_finite() => float,
        Value::Float(_) => return Err("NaN and infinite floats are not times"),
        Value::Nil => return Err("nil; every row of a time column needs a time"),
        _ => return Err("not a number; times are integers or floats"),
    };
    // Comparing as floats is exact here: the thresholds are powers of ten below 2^53.
    Ok(if magnitude < SECONDS_BELOW as f64 {
        TimeUnit::Seconds
    } else if magnitude < MILLISECONDS_BELOW as f64 {
        TimeUnit::Milliseconds
    } else if magnitude < MICROSECONDS_BELOW as f64 {
        TimeUnit::Microseconds
    } else {
        TimeUnit::Nanoseconds
    })
}

/// Converts a time value in `unit` to microseconds. Nanoseconds are divided rounding towards
/// negative infinity, as the line-protocol parser does; floats are rounded to the nearest
/// microsecond.
fn to_micros(value: Value<'_>, unit: TimeUnit) -> Result<i64, &'static str> {
    const OUT_OF_RANGE: &str = "out of range for microseconds in a 64-bit integer";
    match value {
        Value::Integer(integer) => match unit {
            TimeUnit::Seconds => integer.checked_mul(1_000_000).ok_or(OUT_OF_RANGE),
            TimeUnit::Milliseconds => integer.checked_mul(1_000).ok_or(OUT_OF_RANGE),
            TimeUnit::Microseconds => Ok(integer),
            TimeUnit::Nanoseconds => Ok(integer.div_euclid(1_000)),
        },
        Value::LargeUnsigned(integer) => match unit {
            // u64::MAX / 1000 fits an i64.
            TimeUnit::Nanoseconds => Ok((integer / 1_000) as i64),
            _ => Err(OUT_OF_RANGE),
        },
        Value::Float(float) if float.is_finite() => {
            let micros = match unit {
                TimeUnit::Seconds => float * 1e6,
                TimeUnit::Milliseconds => float * 1e3,
                TimeUnit::Microseconds => float,
                TimeUnit::Nanoseconds => float / 1e3,
            }
            .round();
            if (-TWO_POW_63..TWO_POW_63).contains(&micros) {
                Ok(micros as i64)
            } else {
                Err(OUT_OF_RANGE)
            }
        }
        other => match time_unit(other) {
            Err(reason) => Err(reason),
            Ok(_) => Err("not a number; times are integers or floats"),
        },
    }
}

// ------------------------------------------------------------------------------------------------
// Writing line protocol.

fn push_tag_text(out: &mut String, text: &TagText<'_>) {
    match text {
        TagText::Text(text) => line_protocol::escape_key(out, text),
        TagText::Integer(integer) => push_integer(out, *integer),
        TagText::Unsigned(integer) => push_unsigned(out, *integer),
        TagText::Boolean(boolean) => out.push_str(if *boolean { "true" } else { "false" }),
    }
}

#[inline]
fn push_scalar(out: &mut String, scalar: Scalar<'_>) {
    match scalar {
        // `{:?}` prints the shortest text that parses back to the same f64, always with a `.` or
        // an exponent, which the parser reads as a float. Writing to a String cannot fail.
        Scalar::Float(float) => {
            let _ = write!(out, "{float:?}");
        }
        Scalar::Integer(integer) => {
            push_integer(out, integer);
            out.push('i');
        }
        Scalar::Unsigned(integer) => {
            push_unsigned(out, integer);
            out.push('u');
        }
        Scalar::Boolean(boolean) => out.push_str(if boolean { "true" } else { "false" }),
        Scalar::String(text) => {
            out.push('"');
            line_protocol::escape_string(out, text);
            out.push('"');
        }
    }
}

/// Appends a signed integer in decimal. Hand-rolled because `write!` costs more than the rest of
/// a typical row together (measured: integers and times are most of the output).
fn push_integer(out: &mut String, integer: i64) {
    if integer < 0 {
        out.push('-');
    }
    push_unsigned(out, integer.unsigned_abs());
}

/// Appends an unsigned integer in decimal.
#[inline]
fn push_unsigned(out: &mut String, mut integer: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (integer % 10) as u8;
        integer /= 10;
        if integer == 0 {
            break;
        }
    }
    // Only ASCII digits were written, so this cannot fail.
    out.push_str(std::str::from_utf8(&digits[start..]).unwrap_or_default());
}

/// Cuts text quoted in an error message to a readable length.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(ERROR_EXCERPT_CHARS_MAX) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests;
