//! Sans-IO parser for the InfluxDB line protocol: one request body in, a validated [`Batch`] out.
//!
//! Grammar: `measurement[,tag=value...] field=value[,field=value...] [timestamp]`, one point a
//! line. The whole body is parsed before anything is returned, so a request is either accepted
//! whole or rejected with the first error, its 1-based line number and the reason (the durability
//! contract: nothing of a bad request is stored).
//!
//! What is accepted, and the choices made where InfluxDB is vague:
//!
//! - Lines end at `\n`; one `\r` before it is dropped (CRLF). Blank lines and lines whose first
//!   non-blank character is `#` are skipped but still counted for line numbers. Leading spaces and
//!   tabs are skipped; spaces and tabs after the field set and after the timestamp are allowed.
//! - Escapes: in the measurement `\,` and `\ `; in tag keys, tag values and field keys `\,`, `\=`
//!   and `\ `. A backslash before any other character is kept literally (as InfluxDB does); a
//!   backslash that ends the line in one of these places is a bad escape. A tag value may not hold
//!   an unescaped `=`, and tag values may not be empty.
//! - String field values are double-quoted; `\"` and `\\` are escapes, other backslashes are kept.
//!   A newline always ends the line, so a string cut by one is unterminated.
//! - Numbers: `-?digits[.digits][(e|E)[+-]digits]` is a float (also `-.5` and `1.`; a leading
//!   `+`, `inf` and `nan` are refused, and so is a float that overflows to infinity); `-?digitsi`
//!   is a 64-bit signed integer and `digitsu` a 64-bit unsigned integer, both range-checked.
//!   Booleans: `t T true True TRUE f F false False FALSE`.
//! - The timestamp is an optional signed 64-bit integer in the request's [`Precision`]. It is
//!   converted to microseconds since the epoch: nanoseconds are divided rounding towards negative
//!   infinity (floor), so the order of instants is kept for times before 1970 too; coarser
//!   precisions are multiplied, and an overflow is an error naming the line. A line without a
//!   timestamp gets the caller's `default_time_us` (the server's receive time).
//! - Names are checked with [`crate::names`]; within one request a (measurement, column) pair keeps
//!   one role (tag or field) and one field type, a line may not repeat a tag key or a field key,
//!   and a key may not be both a tag and a field.
//!
//! Performance: lines are found with a word-at-a-time newline search, each line is scanned once,
//! and nothing is allocated per line once the [`ParseBuffers`] have grown: names and values without
//! escapes are kept as offsets into the body, unescaped ones are copied into one arena string. A
//! line whose measurement, tag keys and field keys and types equal the previous line's (the normal
//! case for agents) skips name validation and the request-wide schema map entirely, and reuses the
//! previous line's tag sort order.

use std::collections::HashMap;
use std::fmt;

use crate::names::{self, NameError};

/// The largest body [`parse`] accepts, in bytes. Offsets are stored in 31 bits to keep the
/// per-line records small; the HTTP layer's body limit is far below this.
pub const BODY_BYTES_MAX: usize = (1 << 31) - 1;

/// How long names and values quoted in error messages may be, in characters.
const ERROR_EXCERPT_CHARS_MAX: usize = 64;

/// Above this many tags or fields, sorting uses `sort_unstable_by` instead of insertion sort.
const INSERTION_SORT_LEN_MAX: usize = 24;

/// Above this many fields, duplicate keys are found by sorting instead of comparing all pairs.
const PAIRWISE_DUPLICATE_CHECK_LEN_MAX: usize = 16;

// ------------------------------------------------------------------------------------------------
// Public types.

/// The unit of the timestamps in a request (`precision=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    #[default]
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

/// A `precision=` value that is none of the known spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?}: expected one of ns, n, us, u, ms, s, m (minutes), h (hours)")]
pub struct UnknownPrecision(pub String);

impl Precision {
    /// Parses the InfluxDB 2.x spellings `ns us ms s` and the 1.x spellings `n u ms s m h`, where
    /// `m` means minutes. Matching is exact (case-sensitive).
    pub fn parse(text: &str) -> Result<Precision, UnknownPrecision> {
        match text {
            "ns" | "n" => Ok(Precision::Nanoseconds),
            "us" | "u" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            "m" => Ok(Precision::Minutes),
            "h" => Ok(Precision::Hours),
            _ => Err(UnknownPrecision(excerpt(text))),
        }
    }

    /// Converts a timestamp in this precision to microseconds since the epoch, or `None` if the
    /// result does not fit an `i64`. Nanoseconds are divided with floor rounding.
    pub fn to_micros(self, timestamp: i64) -> Option<i64> {
        match self {
            Precision::Nanoseconds => Some(timestamp.div_euclid(1_000)),
            Precision::Microseconds => Some(timestamp),
            Precision::Milliseconds => timestamp.checked_mul(1_000),
            Precision::Seconds => timestamp.checked_mul(1_000_000),
            Precision::Minutes => timestamp.checked_mul(60_000_000),
            Precision::Hours => timestamp.checked_mul(3_600_000_000),
        }
    }

    /// The canonical short spelling (`ns us ms s m h`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Nanoseconds => "ns",
            Precision::Microseconds => "us",
            Precision::Milliseconds => "ms",
            Precision::Seconds => "s",
            Precision::Minutes => "m",
            Precision::Hours => "h",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Limits checked while parsing, set by the caller from the node configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// The longest line, in bytes, without its line ending. Longer lines fail with
    /// [`ParseErrorKind::LineTooLong`] (HTTP 413).
    pub line_bytes_max: usize,
    /// The most tags plus fields one line may have.
    pub columns_per_line_max: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            line_bytes_max: 1 << 20,
            columns_per_line_max: 1_024,
        }
    }
}

/// The type of a field value; also the type of its column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    Float,
    Integer,
    Unsigned,
    Boolean,
    String,
}

impl fmt::Display for FieldType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            FieldType::Float => "float",
            FieldType::Integer => "integer",
            FieldType::Unsigned => "unsigned",
            FieldType::Boolean => "boolean",
            FieldType::String => "string",
        })
    }
}

/// One parsed field value. Strings borrow from the body or from the batch's arena.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'b> {
    Float(f64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(&'b str),
}

impl FieldValue<'_> {
    pub fn field_type(&self) -> FieldType {
        match self {
            FieldValue::Float(_) => FieldType::Float,
            FieldValue::Integer(_) => FieldType::Integer,
            FieldValue::Unsigned(_) => FieldType::Unsigned,
            FieldValue::Boolean(_) => FieldType::Boolean,
            FieldValue::String(_) => FieldType::String,
        }
    }
}

/// Whether a column is a tag or a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnRole {
    Tag,
    Field,
}

impl fmt::Display for ColumnRole {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ColumnRole::Tag => "tag",
            ColumnRole::Field => "field",
        })
    }
}

/// The part of a line an escape error was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Measurement,
    TagKey,
    TagValue,
    FieldKey,
}

impl fmt::Display for Element {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Element::Measurement => "measurement",
            Element::TagKey => "tag key",
            Element::TagValue => "tag value",
            Element::FieldKey => "field key",
        })
    }
}

/// The first error in a request body. `line` is 1-based and counts every line of the body,
/// blank lines and comments included; it is 0 only for [`ParseErrorKind::BodyTooLarge`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    pub line: usize,
    pub kind: ParseErrorKind,
}

/// Why a request body was refused. Names and values quoted in these are cut to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("body is {bytes} bytes, the parser accepts at most {bytes_max}")]
    BodyTooLarge { bytes: usize, bytes_max: usize },
    #[error("invalid UTF-8")]
    InvalidUtf8,
    #[error("line is {bytes} bytes long, the limit is {bytes_max}")]
    LineTooLong { bytes: usize, bytes_max: usize },
    #[error("more than {columns_max} tags and fields")]
    TooManyColumns { columns_max: usize },
    #[error("bad escape: a backslash ends the line in the {0}")]
    BadEscape(Element),
    #[error("missing measurement")]
    MissingMeasurement,
    #[error("missing tag key")]
    MissingTagKey,
    #[error("missing value for tag {key:?}")]
    MissingTagValue { key: String },
    #[error("unescaped '=' in the value of tag {key:?}")]
    UnescapedEqualsInTagValue { key: String },
    #[error("missing fields")]
    MissingFields,
    #[error("missing field key")]
    MissingFieldKey,
    #[error("missing value for field {key:?}")]
    MissingFieldValue { key: String },
    #[error("invalid field value for {key:?}: {reason}: {value:?}")]
    InvalidFieldValue {
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("unterminated string value for field {key:?}")]
    UnterminatedString { key: String },
    #[error("unexpected {found:?} after the string value of field {key:?}")]
    TextAfterString { key: String, found: char },
    #[error("invalid timestamp {text:?}: {reason}")]
    InvalidTimestamp { text: String, reason: &'static str },
    #[error("timestamp {timestamp} (precision {precision}) is out of range in microseconds")]
    TimestampOutOfRange {
        timestamp: i64,
        precision: Precision,
    },
    #[error("unexpected text after the timestamp: {text:?}")]
    TextAfterTimestamp { text: String },
    #[error("invalid measurement name {name:?}: {error}")]
    InvalidMeasurement { name: String, error: NameError },
    #[error("invalid tag key {name:?}: {error}")]
    InvalidTagKey { name: String, error: NameError },
    #[error("invalid field key {name:?}: {error}")]
    InvalidFieldKey { name: String, error: NameError },
    #[error("duplicate tag key {key:?}")]
    DuplicateTag { key: String },
    #[error("duplicate field key {key:?}")]
    DuplicateField { key: String },
    #[error("{key:?} is both a tag and a field")]
    TagAndField { key: String },
    #[error("field {key:?} is {here} here but {earlier} earlier in this request")]
    FieldTypeConflict {
        measurement: String,
        key: String,
        here: FieldType,
        earlier: FieldType,
    },
    #[error("{key:?} is a {here} here but a {earlier} earlier in this request")]
    ColumnRoleConflict {
        measurement: String,
        key: String,
        here: ColumnRole,
        earlier: ColumnRole,
    },
}

// ------------------------------------------------------------------------------------------------
// Storage. Strings are (offset, length) pairs into the body or, with ARENA_FLAG set, into the arena.

const ARENA_FLAG: u32 = 1 << 31;

#[derive(Debug, Clone, Copy)]
struct Text {
    start: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy)]
enum StoredValue {
    Float(f64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(Text),
}

impl StoredValue {
    fn field_type(&self) -> FieldType {
        match self {
            StoredValue::Float(_) => FieldType::Float,
            StoredValue::Integer(_) => FieldType::Integer,
            StoredValue::Unsigned(_) => FieldType::Unsigned,
            StoredValue::Boolean(_) => FieldType::Boolean,
            StoredValue::String(_) => FieldType::String,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct StoredTag {
    key: Text,
    value: Text,
}

#[derive(Debug, Clone, Copy)]
struct StoredField {
    key: Text,
    value: StoredValue,
}

#[derive(Debug, Clone, Copy)]
struct LineRecord {
    measurement: Text,
    tags_start: u32,
    tags_end: u32,
    fields_start: u32,
    fields_end: u32,
    time_us: i64,
    line_number: u32,
}

/// What a column is within one request, for the request-wide consistency check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Tag,
    Field(FieldType),
}

impl ColumnKind {
    fn role(self) -> ColumnRole {
        match self {
            ColumnKind::Tag => ColumnRole::Tag,
            ColumnKind::Field(_) => ColumnRole::Field,
        }
    }
}

/// The allocations behind a [`Batch`], kept between requests so that a shard's steady state does
/// not allocate: get them back with [`Batch::into_buffers`] and pass them to [`parse_with`].
#[derive(Debug, Default)]
pub struct ParseBuffers {
    lines: Vec<LineRecord>,
    tags: Vec<StoredTag>,
    fields: Vec<StoredField>,
    /// Unescaped names and values.
    arena: String,
    /// Request-wide column kinds, keyed by `measurement \0 column` (a measurement name cannot
    /// contain NUL, so the key is unambiguous).
    columns: HashMap<Box<str>, ColumnKind>,
    column_key: String,
    /// The previous line's tag keys in the order written, and the order that sorts them.
    previous_tag_keys: Vec<Text>,
    previous_tag_order: Vec<u32>,
    current_tag_keys: Vec<Text>,
    current_tag_order: Vec<u32>,
    tag_scratch: Vec<StoredTag>,
    field_order: Vec<u32>,
}

impl ParseBuffers {
    pub fn new() -> Self {
        Self::default()
    }

    fn clear(&mut self) {
        self.lines.clear();
        self.tags.clear();
        self.fields.clear();
        self.arena.clear();
        self.columns.clear();
        self.previous_tag_keys.clear();
        self.previous_tag_order.clear();
    }
}

/// A parsed, validated request body. Borrows the body; unescaped strings live in its own arena.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The body as text (it was checked to be UTF-8).
    body: &'a str,
    buffers: ParseBuffers,
}

impl<'a> Batch<'a> {
    /// The number of points (comment and blank lines are not points).
    pub fn len(&self) -> usize {
        self.buffers.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffers.lines.is_empty()
    }

    /// The points in body order.
    pub fn lines(&self) -> Lines<'_> {
        Lines {
            storage: self.storage(),
            records: self.buffers.lines.iter(),
        }
    }

    /// The point at `index` (0-based, in body order).
    pub fn line(&self, index: usize) -> Option<LineView<'_>> {
        let record = self.buffers.lines.get(index)?;
        Some(LineView {
            storage: self.storage(),
            record,
        })
    }

    /// Gives the allocations back for the next [`parse_with`].
    pub fn into_buffers(self) -> ParseBuffers {
        self.buffers
    }

    fn storage(&self) -> Storage<'_> {
        Storage {
            body: self.body,
            arena: &self.buffers.arena,
            tags: &self.buffers.tags,
            fields: &self.buffers.fields,
        }
    }
}

#[derive(Clone, Copy)]
struct Storage<'b> {
    body: &'b str,
    arena: &'b str,
    tags: &'b [StoredTag],
    fields: &'b [StoredField],
}

impl<'b> Storage<'b> {
    #[inline]
    fn text(&self, text: Text) -> &'b str {
        resolve(self.body, self.arena, text)
    }

    #[inline]
    fn value(&self, value: StoredValue) -> FieldValue<'b> {
        match value {
            StoredValue::Float(value) => FieldValue::Float(value),
            StoredValue::Integer(value) => FieldValue::Integer(value),
            StoredValue::Unsigned(value) => FieldValue::Unsigned(value),
            StoredValue::Boolean(value) => FieldValue::Boolean(value),
            StoredValue::String(text) => FieldValue::String(self.text(text)),
        }
    }
}

#[inline]
fn resolve<'s>(body: &'s str, arena: &'s str, text: Text) -> &'s str {
    let start = (text.start & !ARENA_FLAG) as usize;
    let end = start + text.len as usize;
    if text.start & ARENA_FLAG == 0 {
        &body[start..end]
    } else {
        &arena[start..end]
    }
}

/// Iterator over the points of a [`Batch`].
pub struct Lines<'b> {
    storage: Storage<'b>,
    records: std::slice::Iter<'b, LineRecord>,
}

impl<'b> Iterator for Lines<'b> {
    type Item = LineView<'b>;

    #[inline]
    fn next(&mut self) -> Option<LineView<'b>> {
        let record = self.records.next()?;
        Some(LineView {
            storage: self.storage,
            record,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl ExactSizeIterator for Lines<'_> {}

/// One point of a [`Batch`].
#[derive(Clone, Copy)]
pub struct LineView<'b> {
    storage: Storage<'b>,
    record: &'b LineRecord,
}

impl<'b> LineView<'b> {
    pub fn measurement(&self) -> &'b str {
        self.storage.text(self.record.measurement)
    }

    /// The tags as (key, value), sorted by key (byte order), as InfluxDB orders a series key.
    pub fn tags(&self) -> Tags<'b> {
        let range = self.record.tags_start as usize..self.record.tags_end as usize;
        Tags {
            storage: self.storage,
            tags: self.storage.tags[range].iter(),
        }
    }

    /// The fields as (key, value), in the order written.
    pub fn fields(&self) -> Fields<'b> {
        let range = self.record.fields_start as usize..self.record.fields_end as usize;
        Fields {
            storage: self.storage,
            fields: self.storage.fields[range].iter(),
        }
    }

    /// Microseconds since the Unix epoch.
    pub fn time_us(&self) -> i64 {
        self.record.time_us
    }

    /// The 1-based line number in the body, for error messages from later stages.
    pub fn line_number(&self) -> usize {
        self.record.line_number as usize
    }
}

impl fmt::Debug for LineView<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("LineView")
            .field("line_number", &self.line_number())
            .field("measurement", &self.measurement())
            .field("tags", &self.tags().collect::<Vec<_>>())
            .field("fields", &self.fields().collect::<Vec<_>>())
            .field("time_us", &self.time_us())
            .finish()
    }
}

/// Iterator over a line's tags, sorted by key.
pub struct Tags<'b> {
    storage: Storage<'b>,
    tags: std::slice::Iter<'b, StoredTag>,
}

impl<'b> Iterator for Tags<'b> {
    type Item = (&'b str, &'b str);

    #[inline]
    fn next(&mut self) -> Option<(&'b str, &'b str)> {
        let tag = self.tags.next()?;
        Some((self.storage.text(tag.key), self.storage.text(tag.value)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.tags.size_hint()
    }
}

impl ExactSizeIterator for Tags<'_> {}

/// Iterator over a line's fields, in the order written.
pub struct Fields<'b> {
    storage: Storage<'b>,
    fields: std::slice::Iter<'b, StoredField>,
}

impl<'b> Iterator for Fields<'b> {
    type Item = (&'b str, FieldValue<'b>);

    #[inline]
    fn next(&mut self) -> Option<(&'b str, FieldValue<'b>)> {
        let field = self.fields.next()?;
        Some((
            self.storage.text(field.key),
            self.storage.value(field.value),
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.fields.size_hint()
    }
}

impl ExactSizeIterator for Fields<'_> {}

// ------------------------------------------------------------------------------------------------
// Entry points.

/// Parses and validates a whole request body with fresh buffers. See [`parse_with`].
pub fn parse<'a>(
    body: &'a [u8],
    precision: Precision,
    default_time_us: i64,
    limits: &ParseLimits,
) -> Result<Batch<'a>, ParseError> {
    parse_with(
        ParseBuffers::new(),
        body,
        precision,
        default_time_us,
        limits,
    )
}

/// Parses and validates a whole request body, reusing `buffers` (which are dropped on error).
/// Either every line is valid and the batch holds every point, or the first error is returned.
pub fn parse_with<'a>(
    mut buffers: ParseBuffers,
    body: &'a [u8],
    precision: Precision,
    default_time_us: i64,
    limits: &ParseLimits,
) -> Result<Batch<'a>, ParseError> {
    if body.len() > BODY_BYTES_MAX {
        return Err(ParseError {
            line: 0,
            kind: ParseErrorKind::BodyTooLarge {
                bytes: body.len(),
                bytes_max: BODY_BYTES_MAX,
            },
        });
    }
    buffers.clear();

    // Validate UTF-8 once for the whole body (fast for ASCII). If it fails, the lines before the
    // bad byte are still parsed first, so that an earlier syntax error is the one reported.
    let (text, valid_bytes) = match std::str::from_utf8(body) {
        Ok(text) => (text, body.len()),
        Err(error) => {
            let valid_bytes = error.valid_up_to();
            (
                std::str::from_utf8(&body[..valid_bytes]).unwrap_or_default(),
                valid_bytes,
            )
        }
    };

    let mut parser = Parser {
        body: text,
        buffers: &mut buffers,
        precision,
        default_time_us,
        limits,
    };
    let mut line_start = 0;
    let mut line_number: u32 = 1;
    loop {
        let newline = find_newline(body, line_start);
        let raw_end = newline.unwrap_or(body.len());
        let end = if raw_end > line_start && body[raw_end - 1] == b'\r' {
            raw_end - 1
        } else {
            raw_end
        };
        let result = if end - line_start > limits.line_bytes_max {
            Err(ParseErrorKind::LineTooLong {
                bytes: end - line_start,
                bytes_max: limits.line_bytes_max,
            })
        } else if raw_end > valid_bytes {
            Err(ParseErrorKind::InvalidUtf8)
        } else {
            parser.parse_line(line_start, end, line_number)
        };
        if let Err(kind) = result {
            return Err(ParseError {
                line: line_number as usize,
                kind,
            });
        }
        match newline {
            Some(index) => {
                line_start = index + 1;
                line_number += 1;
            }
            None => break,
        }
    }
    Ok(Batch {
        body: text,
        buffers,
    })
}

/// Writes one point as canonical line protocol (tags sorted, minimal escaping, timestamp in
/// microseconds, so parse it back with [`Precision::Microseconds`]), followed by `\n`.
pub fn write_line(out: &mut String, line: &LineView<'_>) {
    use std::fmt::Write as _;

    write_escaped(out, line.measurement(), &MEASUREMENT_ESCAPES);
    for (key, value) in line.tags() {
        out.push(',');
        write_escaped(out, key, &KEY_ESCAPES);
        out.push('=');
        write_escaped(out, value, &KEY_ESCAPES);
    }
    for (index, (key, value)) in line.fields().enumerate() {
        out.push(if index == 0 { ' ' } else { ',' });
        write_escaped(out, key, &KEY_ESCAPES);
        out.push('=');
        // Writing to a String cannot fail.
        let _ = match value {
            FieldValue::Float(value) => write!(out, "{value:?}"),
            FieldValue::Integer(value) => write!(out, "{value}i"),
            FieldValue::Unsigned(value) => write!(out, "{value}u"),
            FieldValue::Boolean(value) => write!(out, "{value}"),
            FieldValue::String(value) => {
                out.push('"');
                write_escaped(out, value, &STRING_ESCAPES);
                out.push('"');
                Ok(())
            }
        };
    }
    let _ = writeln!(out, " {}", line.time_us());
}

/// Appends a tag key, tag value or field key with line protocol's escapes (`,` `=` space).
pub fn escape_key(out: &mut String, text: &str) {
    write_escaped(out, text, &KEY_ESCAPES);
}

/// Appends the inside of a string field value with its escapes (`"` and `\`).
pub fn escape_string(out: &mut String, text: &str) {
    write_escaped(out, text, &STRING_ESCAPES);
}

fn write_escaped(out: &mut String, text: &str, escapes: &ByteTable) {
    let mut run_start = 0;
    for (index, byte) in text.bytes().enumerate() {
        if escapes[byte as usize] {
            out.push_str(&text[run_start..index]);
            out.push('\\');
            run_start = index;
        }
    }
    out.push_str(&text[run_start..]);
}

// ------------------------------------------------------------------------------------------------
// The parser.

type ByteTable = [bool; 256];

const fn byte_table(bytes: &[u8]) -> ByteTable {
    let mut table = [false; 256];
    let mut index = 0;
    while index < bytes.len() {
        table[bytes[index] as usize] = true;
        index += 1;
    }
    table
}

/// Bytes that end a run of plain measurement bytes.
static MEASUREMENT_STOPS: ByteTable = byte_table(b", \\");
/// Bytes a backslash escapes in a measurement.
static MEASUREMENT_ESCAPES: ByteTable = byte_table(b", ");
/// Bytes that end a run of plain tag key, tag value or field key bytes.
static KEY_STOPS: ByteTable = byte_table(b",= \\");
/// Bytes a backslash escapes in tag keys, tag values and field keys.
static KEY_ESCAPES: ByteTable = byte_table(b",= ");
/// Bytes that end a run of plain string bytes.
static STRING_STOPS: ByteTable = byte_table(b"\"\\");
/// Bytes a backslash escapes in a string field value.
static STRING_ESCAPES: ByteTable = byte_table(b"\"\\");
/// Bytes that end an unquoted field value.
static VALUE_ENDS: ByteTable = byte_table(b", \t");

/// The exactly representable powers of ten, for the fast float path.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

struct Parser<'t, 'p> {
    /// The valid UTF-8 prefix of the body; every line handed to `parse_line` lies inside it.
    body: &'t str,
    buffers: &'p mut ParseBuffers,
    precision: Precision,
    default_time_us: i64,
    limits: &'p ParseLimits,
}

impl Parser<'_, '_> {
    /// Parses the line `body[start..end]` (line ending removed) and appends its point.
    // `ok_or(error)` would build the error, and run its drop glue, on every success: measured at
    // 7% of the parse time, so errors are built lazily even where clippy prefers `ok_or`.
    #[allow(clippy::unnecessary_lazy_evaluations)]
    fn parse_line(
        &mut self,
        start: usize,
        end: usize,
        line_number: u32,
    ) -> Result<(), ParseErrorKind> {
        let body = self.body;
        let line = &body.as_bytes()[start..end];
        let length = line.len();

        let mut position = 0;
        while position < length && matches!(line[position], b' ' | b'\t') {
            position += 1;
        }
        if position == length || line[position] == b'#' {
            return Ok(());
        }

        let tags_start = self.buffers.tags.len();
        let fields_start = self.buffers.fields.len();
        let mut columns = 0usize;

        // The measurement.
        let (measurement_end, escaped) =
            scan_escaped(line, position, &MEASUREMENT_STOPS, &MEASUREMENT_ESCAPES)
                .ok_or_else(|| ParseErrorKind::BadEscape(Element::Measurement))?;
        if measurement_end == position {
            return Err(ParseErrorKind::MissingMeasurement);
        }
        let measurement = self.text(
            start + position,
            start + measurement_end,
            escaped,
            &MEASUREMENT_ESCAPES,
        );
        position = measurement_end;

        // The tag set: stops at the space before the fields, or at the end of the line.
        while position < length && line[position] == b',' {
            position += 1;
            let (key_end, escaped) = scan_escaped(line, position, &KEY_STOPS, &KEY_ESCAPES)
                .ok_or_else(|| ParseErrorKind::BadEscape(Element::TagKey))?;
            if key_end == position {
                return Err(ParseErrorKind::MissingTagKey);
            }
            let key = self.text(start + position, start + key_end, escaped, &KEY_ESCAPES);
            if key_end == length || line[key_end] != b'=' {
                return Err(ParseErrorKind::MissingTagValue {
                    key: self.excerpt(key),
                });
            }
            let value_start = key_end + 1;
            let (value_end, escaped) = scan_escaped(line, value_start, &KEY_STOPS, &KEY_ESCAPES)
                .ok_or_else(|| ParseErrorKind::BadEscape(Element::TagValue))?;
            if value_end == value_start {
                return Err(ParseErrorKind::MissingTagValue {
                    key: self.excerpt(key),
                });
            }
            if value_end < length && line[value_end] == b'=' {
                return Err(ParseErrorKind::UnescapedEqualsInTagValue {
                    key: self.excerpt(key),
                });
            }
            let value = self.text(
                start + value_start,
                start + value_end,
                escaped,
                &KEY_ESCAPES,
            );
            columns += 1;
            if columns > self.limits.columns_per_line_max {
                return Err(ParseErrorKind::TooManyColumns {
                    columns_max: self.limits.columns_per_line_max,
                });
            }
            self.buffers.tags.push(StoredTag { key, value });
            position = value_end;
        }
        while position < length && line[position] == b' ' {
            position += 1;
        }
        if position == length {
            return Err(ParseErrorKind::MissingFields);
        }

        // The field set: stops at a space or tab before the timestamp, or at the end of the line.
        loop {
            let (key_end, escaped) = scan_escaped(line, position, &KEY_STOPS, &KEY_ESCAPES)
                .ok_or_else(|| ParseErrorKind::BadEscape(Element::FieldKey))?;
            if key_end == position {
                return Err(ParseErrorKind::MissingFieldKey);
            }
            let key = self.text(start + position, start + key_end, escaped, &KEY_ESCAPES);
            if key_end == length || line[key_end] != b'=' {
                return Err(ParseErrorKind::MissingFieldValue {
                    key: self.excerpt(key),
                });
            }
            position = key_end + 1;
            let value = if position < length && line[position] == b'"' {
                let content_start = position + 1;
                let (close, escaped) = scan_string(line, content_start).ok_or_else(|| {
                    ParseErrorKind::UnterminatedString {
                        key: self.excerpt(key),
                    }
                })?;
                position = close + 1;
                if position < length && !VALUE_ENDS[line[position] as usize] {
                    let found = body[start + position..]
                        .chars()
                        .next()
                        .unwrap_or('\u{fffd}');
                    return Err(ParseErrorKind::TextAfterString {
                        key: self.excerpt(key),
                        found,
                    });
                }
                StoredValue::String(self.text(
                    start + content_start,
                    start + close,
                    escaped,
                    &STRING_ESCAPES,
                ))
            } else {
                let value_start = position;
                while position < length && !VALUE_ENDS[line[position] as usize] {
                    position += 1;
                }
                if position == value_start {
                    return Err(ParseErrorKind::MissingFieldValue {
                        key: self.excerpt(key),
                    });
                }
                parse_scalar(&line[value_start..position]).map_err(|reason| {
                    ParseErrorKind::InvalidFieldValue {
                        key: self.excerpt(key),
                        value: excerpt(&body[start + value_start..start + position]),
                        reason,
                    }
                })?
            };
            columns += 1;
            if columns > self.limits.columns_per_line_max {
                return Err(ParseErrorKind::TooManyColumns {
                    columns_max: self.limits.columns_per_line_max,
                });
            }
            self.buffers.fields.push(StoredField { key, value });
            if position < length && line[position] == b',' {
                position += 1;
                continue;
            }
            break;
        }

        // The optional timestamp, then only blanks.
        while position < length && matches!(line[position], b' ' | b'\t') {
            position += 1;
        }
        let time_us = if position == length {
            self.default_time_us
        } else {
            let timestamp_start = position;
            while position < length && !matches!(line[position], b' ' | b'\t') {
                position += 1;
            }
            let token = &line[timestamp_start..position];
            let timestamp = parse_i64(token).map_err(|error| ParseErrorKind::InvalidTimestamp {
                text: excerpt(&body[start + timestamp_start..start + position]),
                reason: match error {
                    IntegerError::Syntax => "not an integer",
                    IntegerError::Range => "out of range for a 64-bit integer",
                },
            })?;
            while position < length && matches!(line[position], b' ' | b'\t') {
                position += 1;
            }
            if position < length {
                return Err(ParseErrorKind::TextAfterTimestamp {
                    text: excerpt(&body[start + position..end]),
                });
            }
            self.precision.to_micros(timestamp).ok_or_else(|| {
                ParseErrorKind::TimestampOutOfRange {
                    timestamp,
                    precision: self.precision,
                }
            })?
        };

        let tags_end = self.buffers.tags.len();
        let fields_end = self.buffers.fields.len();
        let same_tag_keys = self.sort_tags(tags_start, tags_end);
        let (same_measurement, same_fields) =
            self.compare_with_previous(measurement, fields_start, fields_end);
        if !(same_measurement && same_tag_keys && same_fields) {
            self.check_schema(
                measurement,
                same_measurement,
                tags_start..tags_end,
                fields_start..fields_end,
            )?;
        }
        if !same_tag_keys {
            let buffers = &mut *self.buffers;
            std::mem::swap(
                &mut buffers.previous_tag_keys,
                &mut buffers.current_tag_keys,
            );
            std::mem::swap(
                &mut buffers.previous_tag_order,
                &mut buffers.current_tag_order,
            );
        }
        self.buffers.lines.push(LineRecord {
            measurement,
            tags_start: tags_start as u32,
            tags_end: tags_end as u32,
            fields_start: fields_start as u32,
            fields_end: fields_end as u32,
            time_us,
            line_number,
        });
        Ok(())
    }

    /// Makes a [`Text`] for `body[start..end]`, unescaping it into the arena if it has escapes.
    #[inline(always)]
    fn text(&mut self, start: usize, end: usize, escaped: bool, escapes: &ByteTable) -> Text {
        if escaped {
            return self.unescape(start, end, escapes);
        }
        Text {
            start: start as u32,
            len: (end - start) as u32,
        }
    }

    /// Copies `body[start..end]` into the arena without its escapes.
    #[cold]
    #[inline(never)]
    fn unescape(&mut self, start: usize, end: usize, escapes: &ByteTable) -> Text {
        let arena = &mut self.buffers.arena;
        let arena_start = arena.len();
        let raw = &self.body[start..end];
        let bytes = raw.as_bytes();
        let mut run_start = 0;
        let mut index = 0;
        while index < bytes.len() {
            if bytes[index] == b'\\'
                && index + 1 < bytes.len()
                && escapes[bytes[index + 1] as usize]
            {
                arena.push_str(&raw[run_start..index]);
                // The escaped byte starts the next run.
                run_start = index + 1;
                index += 2;
            } else {
                index += 1;
            }
        }
        arena.push_str(&raw[run_start..]);
        // The arena only ever holds unescaped copies of body bytes, so it is never longer than
        // the body and fits the 31-bit offsets.
        debug_assert!(arena.len() <= BODY_BYTES_MAX);
        Text {
            start: arena_start as u32 | ARENA_FLAG,
            len: (arena.len() - arena_start) as u32,
        }
    }

    #[inline]
    fn resolve(&self, text: Text) -> &str {
        resolve(self.body, &self.buffers.arena, text)
    }

    fn excerpt(&self, text: Text) -> String {
        excerpt(self.resolve(text))
    }

    /// Sorts the tags of the current line by key. Returns true if the keys, in the order written,
    /// equal the previous line's: then the previous order is reused and the schema is unchanged.
    fn sort_tags(&mut self, tags_start: usize, tags_end: usize) -> bool {
        let ParseBuffers {
            tags,
            arena,
            previous_tag_keys,
            previous_tag_order,
            current_tag_keys,
            current_tag_order,
            tag_scratch,
            ..
        } = &mut *self.buffers;
        let body = self.body;
        let arena: &str = arena;
        let tags = &mut tags[tags_start..tags_end];
        let key = |text: Text| resolve(body, arena, text);

        let same = tags.len() == previous_tag_keys.len()
            && tags
                .iter()
                .zip(previous_tag_keys.iter())
                .all(|(tag, &previous)| same_text(key(tag.key), key(previous)));
        let order = if same {
            &*previous_tag_order
        } else {
            current_tag_keys.clear();
            current_tag_keys.extend(tags.iter().map(|tag| tag.key));
            current_tag_order.clear();
            current_tag_order.extend(0..tags.len() as u32);
            let by_key = |left: &u32, right: &u32| {
                key(tags[*left as usize].key).cmp(key(tags[*right as usize].key))
            };
            if tags.len() <= INSERTION_SORT_LEN_MAX {
                insertion_sort_by(current_tag_order, by_key);
            } else {
                current_tag_order.sort_unstable_by(by_key);
            }
            &*current_tag_order
        };
        let is_identity = order
            .iter()
            .enumerate()
            .all(|(index, &from)| index == from as usize);
        if !is_identity {
            tag_scratch.clear();
            tag_scratch.extend_from_slice(tags);
            for (slot, &from) in tags.iter_mut().zip(order.iter()) {
                *slot = tag_scratch[from as usize];
            }
        }
        same
    }

    /// Compares the current line's measurement and field keys and types with the previous line's.
    fn compare_with_previous(
        &self,
        measurement: Text,
        fields_start: usize,
        fields_end: usize,
    ) -> (bool, bool) {
        let Some(previous) = self.buffers.lines.last() else {
            return (false, false);
        };
        let same_measurement = same_text(
            self.resolve(measurement),
            self.resolve(previous.measurement),
        );
        let fields = &self.buffers.fields[fields_start..fields_end];
        let previous_fields =
            &self.buffers.fields[previous.fields_start as usize..previous.fields_end as usize];
        let same_fields = fields.len() == previous_fields.len()
            && fields.iter().zip(previous_fields).all(|(field, previous)| {
                field.value.field_type() == previous.value.field_type()
                    && same_text(self.resolve(field.key), self.resolve(previous.key))
            });
        (same_measurement, same_fields)
    }

    /// Validates names, duplicate keys and the request-wide column kinds of one line whose tags
    /// are already sorted.
    fn check_schema(
        &mut self,
        measurement: Text,
        same_measurement: bool,
        tags: std::ops::Range<usize>,
        fields: std::ops::Range<usize>,
    ) -> Result<(), ParseErrorKind> {
        let ParseBuffers {
            tags: all_tags,
            fields: all_fields,
            arena,
            columns,
            column_key,
            field_order,
            ..
        } = &mut *self.buffers;
        let body = self.body;
        let arena: &str = arena;
        let text = |text: Text| resolve(body, arena, text);
        let tags = &all_tags[tags];
        let fields = &all_fields[fields];

        let measurement = text(measurement);
        if !same_measurement {
            names::validate_measurement(measurement).map_err(|error| {
                ParseErrorKind::InvalidMeasurement {
                    name: excerpt(measurement),
                    error,
                }
            })?;
        }

        for (index, tag) in tags.iter().enumerate() {
            let key = text(tag.key);
            names::validate_column(key).map_err(|error| ParseErrorKind::InvalidTagKey {
                name: excerpt(key),
                error,
            })?;
            // Sorted, so equal keys are neighbours.
            if index > 0 && text(tags[index - 1].key) == key {
                return Err(ParseErrorKind::DuplicateTag { key: excerpt(key) });
            }
        }

        for field in fields {
            let key = text(field.key);
            names::validate_column(key).map_err(|error| ParseErrorKind::InvalidFieldKey {
                name: excerpt(key),
                error,
            })?;
            if tags.binary_search_by(|tag| text(tag.key).cmp(key)).is_ok() {
                return Err(ParseErrorKind::TagAndField { key: excerpt(key) });
            }
        }
        if fields.len() <= PAIRWISE_DUPLICATE_CHECK_LEN_MAX {
            for (index, field) in fields.iter().enumerate() {
                let key = text(field.key);
                if fields[..index]
                    .iter()
                    .any(|earlier| text(earlier.key) == key)
                {
                    return Err(ParseErrorKind::DuplicateField { key: excerpt(key) });
                }
            }
        } else {
            field_order.clear();
            field_order.extend(0..fields.len() as u32);
            field_order.sort_unstable_by(|left, right| {
                text(fields[*left as usize].key).cmp(text(fields[*right as usize].key))
            });
            for pair in field_order.windows(2) {
                let key = text(fields[pair[1] as usize].key);
                if text(fields[pair[0] as usize].key) == key {
                    return Err(ParseErrorKind::DuplicateField { key: excerpt(key) });
                }
            }
        }

        let columns_to_check = tags.iter().map(|tag| (tag.key, ColumnKind::Tag)).chain(
            fields
                .iter()
                .map(|field| (field.key, ColumnKind::Field(field.value.field_type()))),
        );
        for (key, kind) in columns_to_check {
            let key = text(key);
            column_key.clear();
            column_key.push_str(measurement);
            column_key.push('\0');
            column_key.push_str(key);
            match (columns.get(column_key.as_str()).copied(), kind) {
                (None, _) => {
                    columns.insert(column_key.as_str().into(), kind);
                }
                (Some(earlier), _) if earlier == kind => {}
                (Some(ColumnKind::Field(earlier)), ColumnKind::Field(here)) => {
                    return Err(ParseErrorKind::FieldTypeConflict {
                        measurement: excerpt(measurement),
                        key: excerpt(key),
                        here,
                        earlier,
                    });
                }
                (Some(earlier), _) => {
                    return Err(ParseErrorKind::ColumnRoleConflict {
                        measurement: excerpt(measurement),
                        key: excerpt(key),
                        here: kind.role(),
                        earlier: earlier.role(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Sorts a short slice in place; fewer comparisons than the general sort for a handful of tags,
/// and no allocation.
fn insertion_sort_by<T: Copy>(
    items: &mut [T],
    mut compare: impl FnMut(&T, &T) -> std::cmp::Ordering,
) {
    for index in 1..items.len() {
        let item = items[index];
        let mut slot = index;
        while slot > 0 && compare(&item, &items[slot - 1]) == std::cmp::Ordering::Less {
            items[slot] = items[slot - 1];
            slot -= 1;
        }
        items[slot] = item;
    }
}

/// String equality for the short names compared on every line: eight bytes at a time, inlined,
/// instead of a call to `memcmp`.
#[inline(always)]
fn same_text(left: &str, right: &str) -> bool {
    let (mut left, mut right) = (left.as_bytes(), right.as_bytes());
    if left.len() != right.len() {
        return false;
    }
    while let (Some(left_chunk), Some(right_chunk)) =
        (left.first_chunk::<8>(), right.first_chunk::<8>())
    {
        if u64::from_ne_bytes(*left_chunk) != u64::from_ne_bytes(*right_chunk) {
            return false;
        }
        left = &left[8..];
        right = &right[8..];
    }
    left.iter().zip(right).all(|(left, right)| left == right)
}

/// Returns the index of the first `\n` at or after `from`, scanning eight bytes at a time.
fn find_newline(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const NEWLINES: u64 = ONES * b'\n' as u64;
    let mut index = from;
    while let Some(chunk) = bytes.get(index..).and_then(|rest| rest.first_chunk::<8>()) {
        // A byte of `word ^ NEWLINES` is zero where the chunk holds '\n'. The classic zero-byte
        // test below can flag a byte above a zero byte, never one below it, so its lowest flag
        // (the first byte, little-endian) is exact.
        let word = u64::from_le_bytes(*chunk) ^ NEWLINES;
        let found = word.wrapping_sub(ONES) & !word & HIGHS;
        if found != 0 {
            return Some(index + (found.trailing_zeros() / 8) as usize);
        }
        index += 8;
    }
    bytes
        .get(index..)?
        .iter()
        .position(|&byte| byte == b'\n')
        .map(|offset| index + offset)
}

/// Scans an escapable element from `position` to its first unescaped stop byte (or the end of the
/// line). Returns the end and whether an escape was seen, or `None` if a backslash ends the line.
#[inline(always)]
fn scan_escaped(
    line: &[u8],
    mut position: usize,
    stops: &ByteTable,
    escapes: &ByteTable,
) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        while position < line.len() && !stops[line[position] as usize] {
            position += 1;
        }
        if position == line.len() || line[position] != b'\\' {
            return Some((position, escaped));
        }
        let next = *line.get(position + 1)?;
        if escapes[next as usize] {
            escaped = true;
            position += 2;
        } else {
            // A backslash before anything else is an ordinary character.
            position += 1;
        }
    }
}

/// Scans a string value from just after its opening quote. Returns the index of the closing
/// quote and whether an escape was seen, or `None` if the line ends first.
#[inline]
fn scan_string(line: &[u8], mut position: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        while position < line.len() && !STRING_STOPS[line[position] as usize] {
            position += 1;
        }
        match *line.get(position)? {
            b'"' => return Some((position, escaped)),
            _ => {
                let next = *line.get(position + 1)?;
                if STRING_ESCAPES[next as usize] {
                    escaped = true;
                    position += 2;
                } else {
                    position += 1;
                }
            }
        }
    }
}

enum IntegerError {
    Syntax,
    Range,
}

/// Parses `-?[0-9]+` into an i64, distinguishing bad syntax from overflow.
#[inline]
fn parse_i64(text: &[u8]) -> Result<i64, IntegerError> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let magnitude = parse_u64(digits)?;
    if negative {
        // -2^63 is the one magnitude that does not fit a positive i64.
        if magnitude > i64::MIN.unsigned_abs() {
            return Err(IntegerError::Range);
        }
        Ok((magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(magnitude).map_err(|_| IntegerError::Range)
    }
}

/// Parses `[0-9]+` into a u64, distinguishing bad syntax from overflow.
#[inline]
fn parse_u64(digits: &[u8]) -> Result<u64, IntegerError> {
    /// Any 19 decimal digits fit a u64 (10^19 - 1 < 2^64), so the common case (nanosecond
    /// timestamps have 19 digits) needs no overflow check per digit.
    const UNCHECKED_DIGITS_MAX: usize = 19;
    if digits.is_empty() {
        return Err(IntegerError::Syntax);
    }
    let mut value: u64 = 0;
    if digits.len() <= UNCHECKED_DIGITS_MAX {
        for &byte in digits {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                return Err(IntegerError::Syntax);
            }
            value = value * 10 + u64::from(digit);
        }
        return Ok(value);
    }
    let mut overflowed = false;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return Err(IntegerError::Syntax);
        }
        match value
            .checked_mul(10)
            .and_then(|value| value.checked_add(u64::from(digit)))
        {
            Some(next) => value = next,
            None => overflowed = true,
        }
    }
    if overflowed {
        return Err(IntegerError::Range);
    }
    Ok(value)
}

/// Parses an unquoted field value: a boolean, an `i` or `u` suffixed integer, or a float.
#[inline]
fn parse_scalar(token: &[u8]) -> Result<StoredValue, &'static str> {
    let (Some(&first), Some(&last)) = (token.first(), token.last()) else {
        return Err("empty value");
    };
    match first {
        b't' | b'T' | b'f' | b'F' => match token {
            b"t" | b"T" | b"true" | b"True" | b"TRUE" => Ok(StoredValue::Boolean(true)),
            b"f" | b"F" | b"false" | b"False" | b"FALSE" => Ok(StoredValue::Boolean(false)),
            _ => Err("not a valid boolean"),
        },
        _ => match last {
            b'i' => match parse_i64(&token[..token.len() - 1]) {
                Ok(value) => Ok(StoredValue::Integer(value)),
                Err(IntegerError::Syntax) => Err("not a valid integer"),
                Err(IntegerError::Range) => Err("out of range for a 64-bit signed integer"),
            },
            b'u' => match parse_u64(&token[..token.len() - 1]) {
                Ok(value) => Ok(StoredValue::Unsigned(value)),
                Err(IntegerError::Syntax) => Err("not a valid unsigned integer"),
                Err(IntegerError::Range) => Err("out of range for a 64-bit unsigned integer"),
            },
            _ => parse_float(token).map(StoredValue::Float),
        },
    }
}

/// Parses `-?(digits[.digits*] | .digits)([eE][+-]?digits)?` into a finite f64.
///
/// Values whose decimal mantissa fits 2^53 and whose power of ten is within ±22 are computed with
/// one exact multiplication or division (Clinger's fast path), which rounds correctly because
/// both operands are exact. Everything else goes to the standard library's correctly rounded
/// parser, so every input gets the same, correctly rounded result either way.
#[inline]
fn parse_float(token: &[u8]) -> Result<f64, &'static str> {
    const NOT_A_NUMBER: &str = "not a valid number";
    const MANTISSA_MAX: u64 = 1 << 53;
    let (negative, digits) = match token.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, token),
    };
    let length = digits.len();
    let mut index = 0;
    let mut mantissa: u64 = 0;
    let mut mantissa_exact = true;
    let mut digit_count = 0usize;
    let mut fraction_digits: i64 = 0;

    while index < length && digits[index].is_ascii_digit() {
        let digit = u64::from(digits[index] - b'0');
        mantissa = mantissa.wrapping_mul(10).wrapping_add(digit);
        mantissa_exact &= mantissa <= MANTISSA_MAX && digit_count < 17;
        digit_count += 1;
        index += 1;
    }
    if index < length && digits[index] == b'.' {
        index += 1;
        while index < length && digits[index].is_ascii_digit() {
            let digit = u64::from(digits[index] - b'0');
            mantissa = mantissa.wrapping_mul(10).wrapping_add(digit);
            mantissa_exact &= mantissa <= MANTISSA_MAX && digit_count < 17;
            digit_count += 1;
            fraction_digits += 1;
            index += 1;
        }
    }
    if digit_count == 0 {
        return Err(NOT_A_NUMBER);
    }
    let mut exponent: i64 = 0;
    if index < length && matches!(digits[index], b'e' | b'E') {
        index += 1;
        let exponent_negative = match digits.get(index) {
            Some(b'-') => {
                index += 1;
                true
            }
            Some(b'+') => {
                index += 1;
                false
            }
            _ => false,
        };
        let exponent_start = index;
        while index < length && digits[index].is_ascii_digit() {
            // Saturate: anything this large is out of range (or zero) regardless.
            exponent = (exponent * 10 + i64::from(digits[index] - b'0')).min(1_000_000);
            index += 1;
        }
        if index == exponent_start {
            return Err(NOT_A_NUMBER);
        }
        if exponent_negative {
            exponent = -exponent;
        }
    }
    if index != length {
        return Err(NOT_A_NUMBER);
    }

    let power = exponent - fraction_digits;
    let magnitude = if mantissa_exact && (-22..=22).contains(&power) {
        let mantissa = mantissa as f64;
        if power >= 0 {
            mantissa * POWERS_OF_TEN[power as usize]
        } else {
            mantissa / POWERS_OF_TEN[(-power) as usize]
        }
    } else {
        // The grammar was checked above, so the standard parser sees only ASCII digits, '.', 'e'
        // and signs, and cannot fail.
        let text = std::str::from_utf8(digits).map_err(|_| NOT_A_NUMBER)?;
        text.parse::<f64>().map_err(|_| NOT_A_NUMBER)?
    };
    if !magnitude.is_finite() {
        return Err("out of range for a 64-bit float");
    }
    Ok(if negative { -magnitude } else { magnitude })
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
