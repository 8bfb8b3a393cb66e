//! Result encoders: Arc's JSON shape and the Arrow IPC stream, both produced chunk by chunk so a
//! large result is never held whole.

use std::io::Write;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Schema};
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// `{"success":true,"columns":[..],"data":[ [..],.. ],"row_count":N,"execution_time_ms":F}`,
/// written head, rows, tail.
pub struct JsonEncoder {
    rows: u64,
}

impl JsonEncoder {
    pub fn head(schema: &Schema) -> (JsonEncoder, Vec<u8>) {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"success\":true,\"columns\":");
        serde_json::to_writer(&mut out, &columns).expect("strings serialise");
        out.extend_from_slice(b",\"data\":[");
        (JsonEncoder { rows: 0 }, out)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends the batch's rows to `out`.
    pub fn batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<u8>,
    ) -> Result<(), arrow::error::ArrowError> {
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                DataType::Dictionary(_, _) => arrow::compute::cast(c, &DataType::Utf8),
                _ => Ok(c.clone()),
            })
            .collect::<Result<_, _>>()?;
        let options = FormatOptions::default();
        let formatters: Vec<Option<ArrayFormatter<'_>>> = columns
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
            .collect();
        for row in 0..batch.num_rows() {
            if self.rows > 0 {
                out.push(b',');
            }
            out.push(b'[');
            for (index, column) in columns.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, column, row, formatters[index].as_ref());
            }
            out.push(b']');
            self.rows += 1;
        }
        Ok(())
    }

    pub fn tail(&self, execution_time_ms: f64) -> Vec<u8> {
        format!(
            "],\"row_count\":{},\"execution_time_ms\":{:.3}}}",
            self.rows, execution_time_ms
        )
        .into_bytes()
    }
}

fn write_value(
    out: &mut Vec<u8>,
    column: &ArrayRef,
    row: usize,
    formatter: Option<&ArrayFormatter<'_>>,
) {
    use arrow::datatypes::*;
    if column.is_null(row) {
        out.extend_from_slice(b"null");
        return;
    }
    macro_rules! number {
        ($t:ty) => {{
            let _ = write!(out, "{}", column.as_primitive::<$t>().value(row));
        }};
    }
    match column.data_type() {
        DataType::Boolean => out.extend_from_slice(if column.as_boolean().value(row) {
            b"true"
        } else {
            b"false"
        }),
        DataType::Int8 => number!(Int8Type),
        DataType::Int16 => number!(Int16Type),
        DataType::Int32 => number!(Int32Type),
        DataType::Int64 => number!(Int64Type),
        DataType::UInt8 => number!(UInt8Type),
        DataType::UInt16 => number!(UInt16Type),
        DataType::UInt32 => number!(UInt32Type),
        DataType::UInt64 => number!(UInt64Type),
        DataType::Float32 => {
            write_float(out, column.as_primitive::<Float32Type>().value(row) as f64)
        }
        DataType::Float64 => write_float(out, column.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => write_string(out, column.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => write_string(out, column.as_string::<i64>().value(row)),
        DataType::Utf8View => write_string(out, column.as_string_view().value(row)),
        DataType::Timestamp(unit, _) => {
            let value = match unit {
                TimeUnit::Second => column
                    .as_primitive::<TimestampSecondType>()
                    .value(row)
                    .saturating_mul(1_000_000),
                TimeUnit::Millisecond => column
                    .as_primitive::<TimestampMillisecondType>()
                    .value(row)
                    .saturating_mul(1000),
                TimeUnit::Microsecond => {
                    column.as_primitive::<TimestampMicrosecondType>().value(row)
                }
                TimeUnit::Nanosecond => column
                    .as_primitive::<TimestampNanosecondType>()
                    .value(row)
                    .div_euclid(1000),
            };
            out.push(b'"');
            out.extend_from_slice(format_timestamp_us(value).as_bytes());
            out.push(b'"');
        }
        // DuckDB returns HUGEINT (e.g. sum of BIGINT) and DECIMAL as Arrow decimals; their
        // text form is a valid JSON number.
        DataType::Decimal128(_, _) | DataType::Decimal256(_, _) => match formatter {
            Some(formatter) => {
                let _ = write!(out, "{}", formatter.value(row));
            }
            None => out.extend_from_slice(b"null"),
        },
        _ => match formatter {
            Some(formatter) => write_string(out, &formatter.value(row).to_string()),
            None => out.extend_from_slice(b"null"),
        },
    }
}

fn write_float(out: &mut Vec<u8>, value: f64) {
    if value.is_finite() {
        // Debug keeps a decimal point ("0.0"), so clients read a float back as a float.
        let _ = write!(out, "{value:?}");
    } else {
        // JSON has no NaN or infinity.
        out.extend_from_slice(b"null");
    }
}

fn write_string(out: &mut Vec<u8>, value: &str) {
    serde_json::to_writer(&mut *out, value).expect("strings serialise");
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for microseconds since the Unix epoch, UTC.
pub fn format_timestamp_us(micros: i64) -> String {
    let seconds = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = crate::storage::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:06}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// The Arrow IPC stream format, one chunk per batch.
pub struct ArrowEncoder {
    writer: StreamWriter<Vec<u8>>,
}

impl ArrowEncoder {
    /// The encoder and the schema message.
    pub fn head(schema: &Schema) -> Result<(ArrowEncoder, Vec<u8>), arrow::error::ArrowError> {
        let mut writer = StreamWriter::try_new(Vec::with_capacity(4096), schema)?;
        let head = std::mem::take(writer.get_mut());
        Ok((ArrowEncoder { writer }, head))
    }

    pub fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, arrow::error::ArrowError> {
        self.writer.write(batch)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }

    /// The end-of-stream marker.
    pub fn tail(mut self) -> Result<Vec<u8>, arrow::error::ArrowError> {
        self.writer.finish()?;
        Ok(std::mem::take(self.writer.get_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, TimeUnit};
    use std::sync::Arc;

    fn sample() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("host", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
            Field::new("n", DataType::Int64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_795_309_200_000_001, -1])
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec![Some("a\"b"), None])),
                Arc::new(Float64Array::from(vec![1.5, f64::NAN])),
                Arc::new(Int64Array::from(vec![Some(7), None])),
            ],
        )
        .unwrap()
    }

    // Checks the JSON shape Arc clients parse: columns, rows as arrays, nulls, escaped strings,
    // timestamps as UTC strings, NaN as null, and the row count in the tail.
    #[test]
    fn json_shape() {
        let batch = sample();
        let (mut encoder, mut out) = JsonEncoder::head(&batch.schema());
        encoder.batch(&batch, &mut out).unwrap();
        out.extend(encoder.tail(1.25));
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "success": true,
                "columns": ["time", "host", "v", "n"],
                "data": [
                    ["2026-11-22T01:00:00.000001Z", "a\"b", 1.5, 7],
                    ["1969-12-31T23:59:59.999999Z", null, null, null]
                ],
                "row_count": 2,
                "execution_time_ms": 1.25
            })
        );
    }

    // Checks that the chunked Arrow IPC stream reads back as the batch written.
    #[test]
    fn arrow_stream_round_trip() {
        let batch = sample();
        let (mut encoder, mut out) = ArrowEncoder::head(&batch.schema()).unwrap();
        out.extend(encoder.batch(&batch).unwrap());
        out.extend(encoder.tail().unwrap());
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(out), None).unwrap();
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
        assert_eq!(batches, vec![batch]);
    }
}
