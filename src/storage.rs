//! Parquet encoding of frozen buffers and the on-disk layout of data files.
//!
//! Pure CPU work: runs on a blocking thread, never on a shard's executor. A frozen buffer is
//! split by UTC hour, each part sorted by (tags, time) and encoded into one Parquet file.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, UInt32Array};
use arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn, SortOptions};
use arrow::datatypes::TimestampMicrosecondType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::buffer::{FrozenBuffer, MICROS_PER_HOUR};
use crate::config::{Compression, ParquetConfig};

/// A data page is cut when its encoded values pass this size.
const DATA_PAGE_BYTES_MAX: usize = 8 << 20;

/// Parquet key-value metadata key holding the tag column names, comma-separated.
pub const TAGS_METADATA_KEY: &str = "shale.tags";

/// One encoded file, ready to publish.
pub struct EncodedFile {
    /// Path relative to the data directory.
    pub relative_path: PathBuf,
    pub bytes: Vec<u8>,
    pub rows: u64,
    pub time_min_us: i64,
    pub time_max_us: i64,
    /// See `FileEntry::columns_fingerprint`.
    pub columns_fingerprint: u64,
}

/// Identifies where a frozen buffer came from, for file names.
pub struct FileOrigin<'a> {
    pub database: &'a str,
    pub measurement: &'a str,
    pub node: u64,
    pub shard: u32,
    /// The survivor writing a dead node's rows (a takeover), if it is not `node` itself.
    pub taker: Option<u64>,
}

/// `<database>/<measurement>/YYYY/MM/DD/HH/<node>-<shard>-<lsn_first>-<lsn_last>.parquet`,
/// with `-t<taker>` before `.parquet` for a file a survivor wrote from a dead node's rows.
/// The LSN range makes a name unique per flush and lets replay recognise its own output; the
/// taker suffix keeps a taker's file from ever colliding with one the origin wrote.
pub fn file_path(origin: &FileOrigin<'_>, hour: i64, lsn_first: u64, lsn_last: u64) -> PathBuf {
    let (year, month, day, hour_of_day) = civil_hour(hour);
    PathBuf::from(origin.database)
        .join(origin.measurement)
        .join(format!("{year:04}"))
        .join(format!("{month:02}"))
        .join(format!("{day:02}"))
        .join(format!("{hour_of_day:02}"))
        .join(match origin.taker {
            None => format!(
                "n{}-s{}-{lsn_first:020}-{lsn_last:020}.parquet",
                origin.node, origin.shard
            ),
            Some(taker) => format!(
                "n{}-s{}-{lsn_first:020}-{lsn_last:020}-t{taker}.parquet",
                origin.node, origin.shard
            ),
        })
}

/// Splits by hour, sorts and encodes. Returns one file per UTC hour present in the rows.
pub fn encode(
    frozen: &FrozenBuffer,
    origin: &FileOrigin<'_>,
    config: &ParquetConfig,
) -> Result<Vec<EncodedFile>, parquet::errors::ParquetError> {
    let batch = &frozen.batch()?;
    let time = batch.column(0).as_primitive::<TimestampMicrosecondType>();
    let hours: Vec<i64> = time
        .values()
        .iter()
        .map(|t| t.div_euclid(MICROS_PER_HOUR))
        .collect();
    let first_hour = hours[0];
    let mut parts = Vec::new();
    if hours.iter().all(|&h| h == first_hour) {
        parts.push((first_hour, batch.clone()));
    } else {
        // One stable sort of row indices by hour, then one take per run of equal hours:
        // O(rows log rows) whatever the number of hours.
        let mut order: Vec<u32> = (0..hours.len() as u32).collect();
        order.sort_by_key(|&i| hours[i as usize]);
        for run in order.chunk_by(|&a, &b| hours[a as usize] == hours[b as usize]) {
            let indices = UInt32Array::from(run.to_vec());
            parts.push((hours[run[0] as usize], take_record_batch(batch, &indices)?));
        }
    }
    drop(hours);

    let mut files = Vec::with_capacity(parts.len());
    for (hour, part) in parts {
        let tag_order = tags_by_cardinality(&part, &frozen.tag_columns);
        let sorted = sort_by_tags_then_time(&part, &tag_order)?;
        let time = sorted.column(0).as_primitive::<TimestampMicrosecondType>();
        let (time_min_us, time_max_us) = time
            .values()
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        let bytes = write_parquet(&sorted, &tag_order, config)?;
        files.push(EncodedFile {
            relative_path: file_path(origin, hour, frozen.lsn_first, frozen.lsn_last),
            bytes,
            rows: sorted.num_rows() as u64,
            time_min_us,
            time_max_us,
            columns_fingerprint: columns_fingerprint(&sorted.schema()),
        });
    }
    Ok(files)
}

/// A non-zero fingerprint of a schema's set of (name, type) pairs, independent of their order:
/// DuckDB matches columns of several files by name, so files with the same set can be read
/// as one (and a file with extra columns must not be, or they would be dropped).
pub fn columns_fingerprint(schema: &arrow::datatypes::Schema) -> u64 {
    let mut columns: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            // A dictionary's key width is an encoding detail; readers see its values.
            let data_type = match f.data_type() {
                arrow::datatypes::DataType::Dictionary(_, values) => values.as_ref(),
                other => other,
            };
            format!("{}\u{1f}{data_type}", f.name())
        })
        .collect();
    columns.sort();
    let hash = blake3::hash(columns.join("\u{1e}").as_bytes());
    let value = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    value.max(1)
}

/// The tag columns ordered by distinct values, most first (ties by name). Sorting by the most
/// selective tag first keeps each row group's range of that tag narrow, so a filter on one
/// series (one host, say) can skip row groups by their statistics; every order keeps a
/// series' rows together.
fn tags_by_cardinality(batch: &RecordBatch, tag_columns: &[String]) -> Vec<String> {
    let schema = batch.schema();
    let mut counted: Vec<(usize, &String)> = tag_columns
        .iter()
        .map(|tag| {
            let distinct = schema
                .index_of(tag)
                .ok()
                .and_then(|i| {
                    batch
                        .column(i)
                        .as_any_dictionary_opt()
                        .map(|d| d.values().len())
                })
                .unwrap_or(0);
            (distinct, tag)
        })
        .collect();
    counted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    counted.into_iter().map(|(_, tag)| tag.clone()).collect()
}

fn sort_by_tags_then_time(
    batch: &RecordBatch,
    tag_columns: &[String],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let indices = match tag_ranks(batch, tag_columns)? {
        Some(ranks) => UInt32Array::from(order_by_ranks_then_time(batch, &ranks)),
        None => lexsort_by_tags_then_time(batch, tag_columns)?,
    };
    take_record_batch(batch, &indices)
}

/// One tag column's rank per row, and the bits the largest rank needs.
type TagRanks = (Vec<u32>, u32);

/// Each tag column as one rank per row: 0 for null, then 1, 2, ... in the order of the tag's
/// string values (equal strings share a rank). Ranking a dictionary's values once makes a row
/// comparison a few integer comparisons instead of one string comparison per tag, which was
/// most of a flush's CPU. `None` if a tag column is not a string dictionary.
fn tag_ranks(
    batch: &RecordBatch,
    tag_columns: &[String],
) -> Result<Option<Vec<TagRanks>>, arrow::error::ArrowError> {
    use arrow::array::Array;
    use arrow::datatypes::Int32Type;
    let schema = batch.schema();
    let mut ranked = Vec::with_capacity(tag_columns.len());
    for tag in tag_columns {
        let column = batch.column(schema.index_of(tag)?);
        let Some(dictionary) = column.as_dictionary_opt::<Int32Type>() else {
            return Ok(None);
        };
        let Some(values) = dictionary.values().as_string_opt::<i32>() else {
            return Ok(None);
        };
        let value = |i: usize| (!values.is_null(i)).then(|| values.value(i));
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_unstable_by(|&a, &b| value(a).cmp(&value(b)));
        let mut value_rank = vec![0u32; values.len()];
        let mut rank = 0u32;
        let mut previous: Option<Option<&str>> = None;
        for index in order {
            let current = value(index);
            if current.is_some() && previous != Some(current) {
                rank += 1;
            }
            previous = Some(current);
            value_rank[index] = if current.is_some() { rank } else { 0 };
        }
        let keys = dictionary.keys();
        let rows: Vec<u32> = (0..keys.len())
            .map(|row| {
                if keys.is_null(row) {
                    0
                } else {
                    value_rank[keys.value(row) as usize]
                }
            })
            .collect();
        let bits = u32::BITS - rank.leading_zeros();
        ranked.push((rows, bits));
    }
    Ok(Some(ranked))
}

/// Row indices ordered by the ranks (first column first), then time, then row index (so equal
/// rows keep their order). The ranks are packed into as few u64 words per row as they fit.
fn order_by_ranks_then_time(batch: &RecordBatch, ranks: &[TagRanks]) -> Vec<u32> {
    let time = batch
        .column(0)
        .as_primitive::<TimestampMicrosecondType>()
        .values();
    let rows = batch.num_rows();
    // Assign each column a word and a shift, most significant first.
    let mut layout = Vec::with_capacity(ranks.len());
    let (mut word, mut used) = (0usize, 0u32);
    for (_, bits) in ranks {
        if used + bits > 64 {
            word += 1;
            used = 0;
        }
        used += bits;
        layout.push((word, 64 - used));
    }
    let words = if ranks.is_empty() { 0 } else { word + 1 };
    let mut packed = vec![0u64; rows * words];
    for ((values, _), &(word, shift)) in ranks.iter().zip(&layout) {
        for (row, &rank) in values.iter().enumerate() {
            packed[row * words + word] |= u64::from(rank) << shift;
        }
    }
    let key_bits: u32 = ranks.iter().map(|(_, bits)| bits).sum();
    if words <= 1 && key_bits <= COUNTING_SORT_KEY_BITS_MAX {
        return counting_order(&packed, key_bits, time);
    }
    if words <= 1 {
        let mut keys: Vec<(u64, i64, u32)> = (0..rows)
            .map(|row| (packed[row], time[row], row as u32))
            .collect();
        keys.sort_unstable();
        keys.into_iter().map(|(_, _, row)| row).collect()
    } else {
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            packed[a * words..(a + 1) * words]
                .cmp(&packed[b * words..(b + 1) * words])
                .then(time[a].cmp(&time[b]))
                .then(a.cmp(&b))
        });
        order
    }
}

/// Up to this many bits of packed tag ranks (a million series), rows are ordered by a
/// counting sort on the key instead of a comparison sort.
const COUNTING_SORT_KEY_BITS_MAX: u32 = 20;

/// Row indices ordered by (key, time, row) where the key is the top `key_bits` of each row's
/// single packed word. A stable counting sort groups rows by key in arrival order; rows
/// usually arrive in time order, so a group is sorted by time only if it is not already.
fn counting_order(packed: &[u64], key_bits: u32, time: &[i64]) -> Vec<u32> {
    let rows = time.len();
    let key = |row: usize| -> usize {
        if key_bits == 0 {
            0
        } else {
            (packed[row] >> (64 - key_bits)) as usize
        }
    };
    let mut starts = vec![0u32; (1usize << key_bits) + 1];
    for row in 0..rows {
        starts[key(row) + 1] += 1;
    }
    for index in 1..starts.len() {
        starts[index] += starts[index - 1];
    }
    let mut order = vec![0u32; rows];
    let mut next = starts.clone();
    for row in 0..rows {
        let slot = &mut next[key(row)];
        order[*slot as usize] = row as u32;
        *slot += 1;
    }
    for group in starts.windows(2) {
        let group = &mut order[group[0] as usize..group[1] as usize];
        let in_order = group
            .windows(2)
            .all(|pair| time[pair[0] as usize] <= time[pair[1] as usize]);
        if !in_order {
            group.sort_unstable_by_key(|&row| (time[row as usize], row));
        }
    }
    order
}

/// The general path: Arrow's lexicographic sort over the tag columns themselves.
fn lexsort_by_tags_then_time(
    batch: &RecordBatch,
    tag_columns: &[String],
) -> Result<UInt32Array, arrow::error::ArrowError> {
    let schema = batch.schema();
    let mut keys: Vec<SortColumn> = Vec::with_capacity(tag_columns.len() + 1);
    for tag in tag_columns {
        let index = schema.index_of(tag)?;
        keys.push(SortColumn {
            values: batch.column(index).clone(),
            options: Some(SortOptions {
                descending: false,
                nulls_first: true,
            }),
        });
    }
    keys.push(SortColumn {
        values: batch.column(0).clone() as ArrayRef,
        options: None,
    });
    lexsort_to_indices(&keys, None)
}

fn write_parquet(
    batch: &RecordBatch,
    tag_columns: &[String],
    config: &ParquetConfig,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let compression = match config.compression {
        Compression::Snappy => ParquetCompression::SNAPPY,
        Compression::Zstd => ParquetCompression::ZSTD(ZstdLevel::try_new(config.zstd_level)?),
    };
    // One data page per column chunk (up to DATA_PAGE_BYTES_MAX) and statistics per chunk,
    // not per page: DuckDB reads whole chunks and skips by chunk statistics, and on TSBS data
    // the default 20k-row pages plus a page index made full scans 10-20% slower.
    let properties = WriterProperties::builder()
        .set_compression(compression)
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_data_page_row_count_limit(usize::MAX)
        .set_data_page_size_limit(DATA_PAGE_BYTES_MAX)
        .set_max_row_group_row_count(Some(config.row_group_rows_max))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            TAGS_METADATA_KEY.to_string(),
            tag_columns.join(","),
        )]))
        .build();
    let mut bytes = Vec::with_capacity(batch.get_array_memory_size() / 4 + 4096);
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(bytes)
}

/// (year, month, day, hour) of an hour counted from the Unix epoch, in UTC.
fn civil_hour(hours_since_epoch: i64) -> (i64, u32, u32, u32) {
    let (year, month, day) = civil_from_days(hours_since_epoch.div_euclid(24));
    (year, month, day, hours_since_epoch.rem_euclid(24) as u32)
}

/// (year, month, day) of a day counted from the Unix epoch, in the proleptic Gregorian
/// calendar (Howard Hinnant's civil-from-days algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Reads back the tag columns recorded in a Parquet file's metadata.
pub fn tags_from_metadata(metadata: Option<&Vec<KeyValue>>) -> Vec<String> {
    metadata
        .into_iter()
        .flatten()
        .find(|kv| kv.key == TAGS_METADATA_KEY)
        .and_then(|kv| kv.value.as_ref())
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Shared reference for encoders running on blocking threads.
pub type SharedParquetConfig = Arc<ParquetConfig>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{MeasurementBuffer, Value};
    use arrow::array::AsArray;
    use arrow::datatypes::Float64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    // The fingerprint names the set of columns with their value types: order and dictionary
    // key width do not matter, a missing or extra column or another type does.
    #[test]
    fn columns_fingerprint_names_the_column_set() {
        use arrow::datatypes::{DataType, Field, Schema};
        let field = |name: &str, data_type: DataType| Field::new(name, data_type, true);
        let tag = |name: &str, key: DataType| {
            field(
                name,
                DataType::Dictionary(Box::new(key), Box::new(DataType::Utf8)),
            )
        };
        let base = Schema::new(vec![
            field("time", DataType::Int64),
            tag("host", DataType::Int32),
            field("a", DataType::Float64),
        ]);
        let reordered = Schema::new(vec![
            field("a", DataType::Float64),
            tag("host", DataType::Int16),
            field("time", DataType::Int64),
        ]);
        let wider = Schema::new(vec![
            field("time", DataType::Int64),
            tag("host", DataType::Int32),
            field("a", DataType::Float64),
            field("b", DataType::Int64),
        ]);
        let retyped = Schema::new(vec![
            field("time", DataType::Int64),
            tag("host", DataType::Int32),
            field("a", DataType::Int64),
        ]);
        let fingerprint = columns_fingerprint(&base);
        assert_ne!(fingerprint, 0);
        assert_eq!(fingerprint, columns_fingerprint(&reordered));
        assert_ne!(fingerprint, columns_fingerprint(&wider));
        assert_ne!(fingerprint, columns_fingerprint(&retyped));
    }

    /// A tag column as dictionary keys and dictionary values.
    type TagColumn = (Vec<Option<i32>>, Vec<Option<String>>);

    /// A batch of `time` plus string-dictionary tags built from (keys, dictionary values).
    fn tag_batch(times: Vec<i64>, tags: Vec<TagColumn>) -> RecordBatch {
        use arrow::array::{DictionaryArray, Int32Array, StringArray, TimestampMicrosecondArray};
        use arrow::datatypes::{Field, Int32Type, Schema};
        let mut fields = vec![Field::new(
            "time",
            arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
            false,
        )];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(TimestampMicrosecondArray::from(times))];
        for (index, (keys, values)) in tags.into_iter().enumerate() {
            let array = DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys),
                Arc::new(StringArray::from(values)),
            )
            .unwrap();
            fields.push(Field::new(
                format!("t{index}"),
                arrow::array::Array::data_type(&array).clone(),
                true,
            ));
            columns.push(Arc::new(array));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        // The rank sort orders rows exactly as Arrow's lexicographic sort of the strings does
        // (nulls first, then time), with null keys, null and repeated dictionary values, and
        // dictionaries large enough that the ranks need more than one 64-bit word.
        #[test]
        fn rank_sort_matches_lexsort(
            rows in 1usize..300,
            seed in 0u64..u64::MAX,
            dictionary_sizes in proptest::collection::vec(1usize..20_000, 1..6),
        ) {
            let mut random = crate::workload::Random::new(seed);
            let times: Vec<i64> = (0..rows).map(|_| (random.next_u64() % 5) as i64).collect();
            let tags: Vec<_> = dictionary_sizes
                .iter()
                .map(|&size| {
                    // About size/2 distinct strings (five big dictionaries need more than 64
                    // bits of ranks), so values also repeat inside a dictionary.
                    let values: Vec<Option<String>> = (0..size)
                        .map(|i| {
                            let distinct = size as u64 / 2 + 1;
                            (i % 17 != 3).then(|| format!("v{}", random.next_u64() % distinct))
                        })
                        .collect();
                    // Mostly one of three keys, so rows tie on early tags and later words of
                    // the packed ranks decide.
                    let keys: Vec<Option<i32>> = (0..rows)
                        .map(|_| {
                            let key = match random.next_u64() % 8 {
                                0 => random.next_u64() % size as u64,
                                pick => (pick % 3) * (size as u64 / 3),
                            };
                            (!random.next_u64().is_multiple_of(9)).then_some(key as i32)
                        })
                        .collect();
                    (keys, values)
                })
                .collect();
            let batch = tag_batch(times, tags);
            let names: Vec<String> = (0..dictionary_sizes.len()).map(|i| format!("t{i}")).collect();
            let by_ranks = take_record_batch(
                &batch,
                &UInt32Array::from(order_by_ranks_then_time(
                    &batch,
                    &tag_ranks(&batch, &names).unwrap().unwrap(),
                )),
            )
            .unwrap();
            let by_lexsort =
                take_record_batch(&batch, &lexsort_by_tags_then_time(&batch, &names).unwrap())
                    .unwrap();
            // Compare the logical values (dictionary keys may differ for equal strings).
            for column in 0..batch.num_columns() {
                let cast = |b: &RecordBatch| {
                    arrow::compute::cast(b.column(column), &arrow::datatypes::DataType::Utf8)
                        .unwrap()
                };
                let (left, right) = (cast(&by_ranks), cast(&by_lexsort));
                proptest::prop_assert_eq!(
                    left.as_string::<i32>().iter().collect::<Vec<_>>(),
                    right.as_string::<i32>().iter().collect::<Vec<_>>()
                );
            }
        }
    }

    // Checks the calendar arithmetic behind directory names on known instants, including a
    // leap day and times before the epoch.
    #[test]
    fn civil_hours() {
        assert_eq!(civil_hour(0), (1970, 1, 1, 0));
        // 2024-02-29T13:00:00Z = 1709211600 s.
        assert_eq!(civil_hour(1_709_211_600 / 3600), (2024, 2, 29, 13));
        assert_eq!(civil_hour(-1), (1969, 12, 31, 23));
    }

    // Checks that the most selective tag leads the sort (and the recorded tag order), so that
    // one host's rows form a narrow range for row-group statistics.
    #[test]
    fn most_distinct_tag_sorts_first() {
        let mut buffer = MeasurementBuffer::new();
        for (i, host) in ["c", "a", "b", "a"].iter().enumerate() {
            buffer.append_row(
                1,
                i as i64,
                [("host", *host), ("az", "z")],
                [("v", Value::Float(i as f64))],
            );
        }
        let frozen = buffer.freeze().unwrap();
        assert_eq!(frozen.tag_columns, ["az", "host"]);
        assert_eq!(
            tags_by_cardinality(&frozen.batch().unwrap(), &frozen.tag_columns),
            ["host", "az"]
        );
        let origin = FileOrigin {
            database: "db",
            measurement: "m",
            node: 1,
            shard: 0,
            taker: None,
        };
        let files = encode(&frozen, &origin, &crate::config::Config::default().parquet).unwrap();
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(files[0].bytes.clone()))
                .unwrap();
        let tags = tags_from_metadata(reader.metadata().file_metadata().key_value_metadata());
        assert_eq!(tags, ["host", "az"]);
    }

    // Checks that a buffer spanning two hours becomes two files in the right hour folders,
    // each sorted by tags then time, with the tag list in the key-value metadata.
    #[test]
    fn encodes_sorted_files_per_hour() {
        let hour = MICROS_PER_HOUR;
        let mut buffer = MeasurementBuffer::new();
        buffer.append_row(1, hour + 5, [("host", "b")], [("v", Value::Float(1.0))]);
        buffer.append_row(1, hour + 1, [("host", "a")], [("v", Value::Float(2.0))]);
        buffer.append_row(2, 2 * hour + 7, [("host", "a")], [("v", Value::Float(3.0))]);
        buffer.append_row(2, hour + 3, [("host", "a")], [("v", Value::Float(4.0))]);
        let frozen = buffer.freeze().unwrap();
        let origin = FileOrigin {
            database: "db",
            measurement: "m",
            node: 1,
            shard: 0,
            taker: None,
        };
        let config = crate::config::Config::default().parquet;
        let files = encode(&frozen, &origin, &config).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0].relative_path,
            PathBuf::from(
                "db/m/1970/01/01/01/n1-s0-00000000000000000001-00000000000000000002.parquet"
            )
        );
        assert_eq!((files[0].rows, files[0].time_min_us), (3, hour + 1));
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(files[0].bytes.clone()))
                .unwrap();
        let tags = tags_from_metadata(reader.metadata().file_metadata().key_value_metadata());
        assert_eq!(tags, ["host"]);
        let batch = reader.build().unwrap().next().unwrap().unwrap();
        let values = batch.column(2).as_primitive::<Float64Type>();
        assert_eq!(values.values(), &[2.0, 4.0, 1.0]);
    }
}
