//! Unit and property tests for the MessagePack decoder. Bodies are built with rmp's encoder, so
//! the decoder is checked against an independent implementation of the format.

use proptest::prelude::*;

use super::*;
use crate::line_protocol::{self, FieldValue, ParseLimits, Precision};

const DEFAULT_TIME_US: i64 = 1_700_000_000_000_000;

/// A MessagePack value to encode into a test body.
#[derive(Debug, Clone)]
enum V {
    Nil,
    Bool(bool),
    /// Encoded in the smallest form (unsigned markers for non-negative values).
    Int(i64),
    Uint(u64),
    F32(f32),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Arr(Vec<V>),
    Map(Vec<(V, V)>),
    /// Bytes written as they are, for explicit markers and broken bodies.
    Raw(Vec<u8>),
}

fn encode(value: &V, out: &mut Vec<u8>) {
    use rmp::encode;
    match value {
        V::Nil => encode::write_nil(out).unwrap(),
        V::Bool(value) => encode::write_bool(out, *value).unwrap(),
        V::Int(value) => {
            encode::write_sint(out, *value).unwrap();
        }
        V::Uint(value) => {
            encode::write_uint(out, *value).unwrap();
        }
        V::F32(value) => encode::write_f32(out, *value).unwrap(),
        V::F64(value) => encode::write_f64(out, *value).unwrap(),
        V::Str(value) => encode::write_str(out, value).unwrap(),
        V::Bin(value) => encode::write_bin(out, value).unwrap(),
        V::Ext(kind, data) => {
            encode::write_ext_meta(out, data.len() as u32, *kind).unwrap();
            out.extend_from_slice(data);
        }
        V::Arr(values) => {
            encode::write_array_len(out, values.len() as u32).unwrap();
            for value in values {
                encode(value, out);
            }
        }
        V::Map(entries) => {
            encode::write_map_len(out, entries.len() as u32).unwrap();
            for (key, value) in entries {
                encode(key, out);
                encode(value, out);
            }
        }
        V::Raw(bytes) => out.extend_from_slice(bytes),
    }
}

fn body(value: &V) -> Vec<u8> {
    let mut out = Vec::new();
    encode(value, &mut out);
    out
}

fn s(text: &str) -> V {
    V::Str(text.to_owned())
}

fn map(entries: Vec<(&str, V)>) -> V {
    V::Map(
        entries
            .into_iter()
            .map(|(key, value)| (s(key), value))
            .collect(),
    )
}

fn arr(values: Vec<V>) -> V {
    V::Arr(values)
}

/// One value written with an explicit marker by `write`.
fn raw(write: impl FnOnce(&mut Vec<u8>)) -> V {
    let mut bytes = Vec::new();
    write(&mut bytes);
    V::Raw(bytes)
}

fn limits() -> MsgpackLimits {
    MsgpackLimits::default()
}

/// Decodes with the default limits, panicking on error. Every successful decode must also be
/// accepted by the line-protocol parser with the same row count, so this checks that too.
fn must_decode(value: &V) -> String {
    let mut out = String::new();
    let rows = match to_line_protocol(&body(value), DEFAULT_TIME_US, &limits(), &mut out) {
        Ok(rows) => rows,
        Err(error) => panic!("decode failed for {value:?}: {error}"),
    };
    let batch = line_protocol::parse(
        out.as_bytes(),
        Precision::Microseconds,
        0,
        &ParseLimits::default(),
    )
    .unwrap_or_else(|error| panic!("output does not parse: {error}\n{out}"));
    assert_eq!(batch.len(), rows, "row count for\n{out}");
    out
}

fn must_fail_with(value: &V, limits: &MsgpackLimits) -> MsgpackError {
    let mut out = String::new();
    match to_line_protocol(&body(value), DEFAULT_TIME_US, limits, &mut out) {
        Ok(_) => panic!("decode succeeded for {value:?}:\n{out}"),
        Err(error) => error,
    }
}

fn must_fail(value: &V) -> MsgpackError {
    must_fail_with(value, &limits())
}

fn at(record: usize, column: &str, row: usize) -> Location {
    Location {
        record,
        column: Some(column.to_owned()),
        row: Some(row),
    }
}

fn at_row_record(record: usize, column: &str) -> Location {
    Location {
        record,
        column: Some(column.to_owned()),
        row: None,
    }
}

/// A columnar record with the given columns (time first if given) and tag keys.
fn columnar(measurement: &str, columns: Vec<(&str, Vec<V>)>, tag_keys: &[&str]) -> V {
    let mut entries = vec![
        ("m", s(measurement)),
        (
            "columns",
            map(columns
                .into_iter()
                .map(|(name, values)| (name, arr(values)))
                .collect()),
        ),
    ];
    if !tag_keys.is_empty() {
        entries.push(("tag_keys", arr(tag_keys.iter().map(|key| s(key)).collect())));
    }
    map(entries)
}

// ------------------------------------------------------------------------------------------------
// Forms.

// The documented columnar example with `tag_keys`: tags become tags (sorted), the other columns
// fields in body order, and microsecond times pass through unchanged.
#[test]
fn columnar_record_with_tag_keys() {
    let record = columnar(
        "cpu",
        vec![
            (
                "time",
                vec![V::Int(1_788_973_200_000_000), V::Int(1_788_973_201_000_000)],
            ),
            ("region", vec![s("eu"), s("us")]),
            ("host", vec![s("server01"), s("server02")]),
            ("usage", vec![V::F64(45.2), V::F64(67.8)]),
            ("count", vec![V::Int(3), V::Int(-4)]),
        ],
        &["host", "region"],
    );
    assert_eq!(
        must_decode(&record),
        "cpu,host=server01,region=eu usage=45.2,count=3i 1788973200000000\n\
         cpu,host=server02,region=us usage=67.8,count=-4i 1788973201000000\n"
    );
}

// Without `tag_keys` Arc treats every column as a field (Telegraf sends its tags this way), so
// string columns are string fields, not tags.
#[test]
fn columnar_record_without_tag_keys_has_only_fields() {
    let record = columnar(
        "cpu",
        vec![
            ("host", vec![s("a")]),
            ("usage", vec![V::F64(1.5)]),
            ("time", vec![V::Int(1_700_000_000_000)]),
        ],
        &[],
    );
    assert_eq!(
        must_decode(&record),
        "cpu host=\"a\",usage=1.5 1700000000000000\n"
    );
}

// The row form: `h` becomes the tag host, `tags` values may be integers or booleans (written as
// text, as Arc does), fields keep their types, and `t` in milliseconds becomes microseconds.
#[test]
fn row_record() {
    let record = map(vec![
        ("m", s("mem")),
        ("t", V::Int(1_633_024_800_000)),
        ("h", s("server01")),
        (
            "fields",
            map(vec![
                ("used", V::Int(42)),
                ("ratio", V::F64(0.5)),
                ("ok", V::Bool(true)),
                ("note", s("hi")),
            ]),
        ),
        (
            "tags",
            map(vec![
                ("zone", V::Int(3)),
                ("dc", s("aws-1a")),
                ("hot", V::Bool(false)),
            ]),
        ),
    ]);
    assert_eq!(
        must_decode(&record),
        "mem,dc=aws-1a,host=server01,hot=false,zone=3 used=42i,ratio=0.5,ok=true,note=\"hi\" \
         1633024800000000\n"
    );
}

// Arc's other row details: an integer `m` is `measurement_<n>`, an integer `h` is `host_<n>`,
// the compact `f` array names its fields `field_<i>`, and a missing `t` means the receive time.
#[test]
fn row_record_compact_and_integer_names() {
    let record = map(vec![
        ("m", V::Int(7)),
        ("h", V::Int(12)),
        ("f", arr(vec![V::F64(95.0), V::Nil, V::Int(3)])),
    ]);
    assert_eq!(
        must_decode(&record),
        format!("measurement_7,host=host_12 field_0=95.0,field_2=3i {DEFAULT_TIME_US}\n")
    );
}

// `h` replaces a `host` in `tags`, as Arc's assignment does; a nil `h` adds nothing (Arc would
// add host=unknown, which invents data).
#[test]
fn row_record_host() {
    let with_both = map(vec![
        ("m", s("m")),
        ("h", s("from-h")),
        ("tags", map(vec![("host", s("from-tags"))])),
        ("fields", map(vec![("v", V::Int(1))])),
    ]);
    assert!(must_decode(&with_both).starts_with("m,host=from-h v=1i"));
    let nil_host = map(vec![
        ("m", s("m")),
        ("h", V::Nil),
        ("fields", map(vec![("v", V::Int(1))])),
    ]);
    assert!(must_decode(&nil_host).starts_with("m v=1i"));
}

// A batch wrapper and a top-level array both hold records of either form; records are counted
// across both levels, and the row count covers every record.
#[test]
fn batch_and_array_forms() {
    let columnar_record = columnar(
        "cpu",
        vec![
            ("time", vec![V::Int(1), V::Int(2)]),
            ("v", vec![V::Int(1), V::Int(2)]),
        ],
        &[],
    );
    let row_record = map(vec![
        ("m", s("mem")),
        ("t", V::Int(3)),
        ("fields", map(vec![("v", V::F64(1.0))])),
    ]);
    let expected = "cpu v=1i 1000000\ncpu v=2i 2000000\nmem v=1.0 3000000\n";
    let batch = map(vec![(
        "batch",
        arr(vec![columnar_record.clone(), row_record.clone()]),
    )]);
    assert_eq!(must_decode(&batch), expected);
    let array = arr(vec![columnar_record.clone(), row_record.clone()]);
    assert_eq!(must_decode(&array), expected);
    let nested = arr(vec![
        columnar_record.clone(),
        map(vec![("batch", arr(vec![row_record.clone()]))]),
    ]);
    assert_eq!(must_decode(&nested), expected);

    // An error in the third record of a nested body names record 2.
    let bad = arr(vec![
        columnar_record,
        map(vec![(
            "batch",
            arr(vec![row_record, map(vec![("t", V::Int(1))])]),
        )]),
    ]);
    assert_eq!(
        must_fail(&bad),
        MsgpackError::MissingMeasurement { record: 2 }
    );

    // Empty batches hold no rows and are fine.
    let mut out = String::new();
    assert_eq!(
        to_line_protocol(&body(&arr(vec![])), 0, &limits(), &mut out),
        Ok(0)
    );
    assert_eq!(
        to_line_protocol(
            &body(&map(vec![("batch", arr(vec![]))])),
            0,
            &limits(),
            &mut out
        ),
        Ok(0)
    );
    assert_eq!(out, "");
}

// Arc recurses into batches without a bound; nesting is capped so a hostile body cannot use
// the stack.
#[test]
fn batch_depth_is_limited() {
    let mut value = columnar("cpu", vec![("v", vec![V::Int(1)])], &[]);
    for _ in 0..BATCH_DEPTH_MAX {
        value = map(vec![("batch", arr(vec![value]))]);
    }
    must_decode(&value);
    let too_deep = map(vec![("batch", arr(vec![value]))]);
    assert_eq!(
        must_fail(&too_deep),
        MsgpackError::BatchTooDeep {
            record: 0,
            depth_max: BATCH_DEPTH_MAX
        }
    );
}

// ------------------------------------------------------------------------------------------------
// Value types.

// Every MessagePack number and string encoding decodes to the right line-protocol type,
// whatever marker the encoder chose (unsigned markers for positive numbers are normal).
#[test]
fn every_value_encoding() {
    use rmp::encode;
    let long = "x".repeat(300);
    let very_long = "y".repeat(70_000);
    let record = columnar(
        "types",
        vec![
            ("fixpos", vec![raw(|b| encode::write_pfix(b, 7).unwrap())]),
            ("fixneg", vec![raw(|b| encode::write_nfix(b, -5).unwrap())]),
            ("u8", vec![raw(|b| encode::write_u8(b, 200).unwrap())]),
            ("u16", vec![raw(|b| encode::write_u16(b, 60_000).unwrap())]),
            (
                "u32",
                vec![raw(|b| encode::write_u32(b, 4_000_000_000).unwrap())],
            ),
            ("u64", vec![raw(|b| encode::write_u64(b, 5).unwrap())]),
            ("i8", vec![raw(|b| encode::write_i8(b, -100).unwrap())]),
            ("i16", vec![raw(|b| encode::write_i16(b, -30_000).unwrap())]),
            (
                "i32",
                vec![raw(|b| encode::write_i32(b, -2_000_000_000).unwrap())],
            ),
            (
                "i64",
                vec![raw(|b| encode::write_i64(b, i64::MIN).unwrap())],
            ),
            ("f32", vec![V::F32(0.5)]),
            ("f64", vec![V::F64(-1e300)]),
            ("yes", vec![V::Bool(true)]),
            ("no", vec![V::Bool(false)]),
            ("fixstr", vec![s("short")]),
            ("str8", vec![V::Str(long.clone())]),
            ("str16", vec![V::Str(very_long.clone())]),
            (
                "str32",
                vec![raw(|b| {
                    b.push(0xdb);
                    b.extend_from_slice(&3u32.to_be_bytes());
                    b.extend_from_slice(b"abc");
                })],
            ),
        ],
        &[],
    );
    let expected = format!(
        "types fixpos=7i,fixneg=-5i,u8=200i,u16=60000i,u32=4000000000i,u64=5i,i8=-100i,\
         i16=-30000i,i32=-2000000000i,i64=-9223372036854775808i,f32=0.5,f64=-1e300,yes=true,\
         no=false,fixstr=\"short\",str8=\"{long}\",str16=\"{very_long}\",str32=\"abc\" \
         {DEFAULT_TIME_US}\n"
    );
    let limits = ParseLimits {
        line_bytes_max: 1 << 20,
        ..ParseLimits::default()
    };
    let mut out = String::new();
    to_line_protocol(
        &body(&record),
        DEFAULT_TIME_US,
        &MsgpackLimits::default(),
        &mut out,
    )
    .unwrap();
    line_protocol::parse(out.as_bytes(), Precision::Microseconds, 0, &limits).unwrap();
    assert_eq!(out, expected);
}

// A column's type is set by its first non-nil value (Arc's rule): integers widen into a float
// column, and integral floats narrow into an integer column, but a fraction is refused rather
// than truncated as Arc does.
#[test]
fn column_type_from_first_value() {
    let record = columnar(
        "m",
        vec![
            ("f", vec![V::Nil, V::F64(1.5), V::Int(2)]),
            ("i", vec![V::Int(1), V::F64(2.0), V::F64(-3.0)]),
        ],
        &[],
    );
    assert_eq!(
        must_decode(&record),
        format!(
            "m i=1i {t}\nm f=1.5,i=2i {t}\nm f=2.0,i=-3i {t}\n",
            t = DEFAULT_TIME_US
        )
    );
    let fraction = columnar("m", vec![("i", vec![V::Int(1), V::F64(2.5)])], &[]);
    assert_eq!(
        must_fail(&fraction),
        MsgpackError::InvalidValue {
            at: at(0, "i", 1),
            reason: "a float with a fractional part in an integer column",
        }
    );
}

// Values of another type than the column's are refused with the row and both types named.
#[test]
fn type_mismatches() {
    let cases = [
        (vec![V::F64(1.0), s("x")], "float", "a string"),
        (vec![V::Int(1), V::Bool(true)], "integer", "a boolean"),
        (vec![V::Bool(true), V::Int(1)], "boolean", "an integer"),
        (vec![s("x"), V::F64(1.0)], "string", "a float"),
    ];
    for (values, expected, found) in cases {
        let record = columnar("m", vec![("c", values)], &[]);
        assert_eq!(
            must_fail(&record),
            MsgpackError::TypeMismatch {
                at: at(0, "c", 1),
                expected,
                found
            }
        );
    }
}

// Tag columns hold text; integers and booleans are written as text (Arc's row form does the
// same with `%v`), while floats are refused because their text form is ambiguous. Tag keys
// naming no column are ignored, as Arc only records them as metadata.
#[test]
fn tag_column_values() {
    let record = columnar(
        "m",
        vec![
            ("rack", vec![V::Int(-3), V::Uint(u64::MAX)]),
            ("on", vec![V::Bool(true), V::Bool(false)]),
            ("v", vec![V::Int(1), V::Int(2)]),
        ],
        &["rack", "on", "absent"],
    );
    assert_eq!(
        must_decode(&record),
        format!(
            "m,on=true,rack=-3 v=1i {t}\nm,on=false,rack=18446744073709551615 v=2i {t}\n",
            t = DEFAULT_TIME_US
        )
    );
    let float_tag = columnar(
        "m",
        vec![("rack", vec![V::F64(1.5)]), ("v", vec![V::Int(1)])],
        &["rack"],
    );
    assert_eq!(
        must_fail(&float_tag),
        MsgpackError::TypeMismatch {
            at: at(0, "rack", 0),
            expected: TAG_TYPE,
            found: "a float",
        }
    );
    let not_array = map(vec![
        ("m", s("m")),
        ("columns", map(vec![("v", arr(vec![V::Int(1)]))])),
        ("tag_keys", s("v")),
    ]);
    assert_eq!(
        must_fail(&not_array),
        MsgpackError::WrongType {
            record: 0,
            key: "tag_keys",
            expected: "an array of strings",
            found: "a string",
        }
    );
}

// Binary, extension and nested values have no column type, in fields and in tags alike.
#[test]
fn unsupported_values() {
    let cases = [
        (
            V::Bin(vec![1, 2]),
            "binary values are not supported; send strings as MessagePack str",
        ),
        (
            V::Ext(-1, vec![0; 4]),
            "MessagePack extension values are not supported",
        ),
        (
            arr(vec![V::Int(1)]),
            "nested arrays and maps are not supported as values",
        ),
        (
            map(vec![("a", V::Int(1))]),
            "nested arrays and maps are not supported as values",
        ),
    ];
    for (value, reason) in cases {
        let field = columnar("m", vec![("c", vec![V::Int(1), value.clone()])], &[]);
        assert_eq!(
            must_fail(&field),
            MsgpackError::InvalidValue {
                at: at(0, "c", 1),
                reason
            }
        );
        let tag = columnar(
            "m",
            vec![
                ("t", vec![s("a"), value.clone()]),
                ("v", vec![V::Int(1), V::Int(2)]),
            ],
            &["t"],
        );
        assert_eq!(
            must_fail(&tag),
            MsgpackError::InvalidValue {
                at: at(0, "t", 1),
                reason
            }
        );
        let row = map(vec![("m", s("m")), ("fields", map(vec![("c", value)]))]);
        assert_eq!(
            must_fail(&row),
            MsgpackError::InvalidValue {
                at: at_row_record(0, "c"),
                reason
            }
        );
    }
}

// Line protocol has no NaN or infinity, so they are refused wherever they appear.
#[test]
fn nan_and_infinity_are_refused() {
    for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let record = columnar("m", vec![("c", vec![V::F64(1.0), V::F64(value)])], &[]);
        assert_eq!(
            must_fail(&record),
            MsgpackError::InvalidValue {
                at: at(0, "c", 1),
                reason: "NaN and infinite floats cannot be stored",
            }
        );
        let first = columnar("m", vec![("c", vec![V::F32(value as f32)])], &[]);
        assert!(matches!(
            must_fail(&first),
            MsgpackError::InvalidValue { .. }
        ));
    }
}

// Integers above i64::MAX make their column unsigned (Arc refuses them); a column cannot hold
// both those and negative numbers, and a column an earlier record made signed refuses them.
#[test]
fn large_unsigned_integers() {
    let record = columnar(
        "m",
        vec![
            ("c", vec![V::Int(1), V::Uint(u64::MAX), V::Nil, V::F64(2.0)]),
            ("d", vec![V::Bool(true); 4]),
        ],
        &[],
    );
    assert_eq!(
        must_decode(&record),
        format!(
            "m c=1u,d=true {t}\nm c=18446744073709551615u,d=true {t}\nm d=true {t}\n\
             m c=2u,d=true {t}\n",
            t = DEFAULT_TIME_US
        )
    );
    let row = map(vec![
        ("m", s("m")),
        ("fields", map(vec![("c", V::Uint(1 << 63))])),
    ]);
    assert!(must_decode(&row).starts_with("m c=9223372036854775808u "));

    let mixed = columnar(
        "m",
        vec![("c", vec![V::Uint(u64::MAX), V::Int(0), V::Int(-1)])],
        &[],
    );
    assert!(matches!(
        must_fail(&mixed),
        MsgpackError::InvalidValue { at, .. } if at == self::at(0, "c", 2)
    ));

    let signed_then_large = arr(vec![
        columnar("m", vec![("c", vec![V::Int(5)])], &[]),
        columnar("m", vec![("c", vec![V::Uint(u64::MAX)])], &[]),
    ]);
    assert_eq!(
        must_fail(&signed_then_large),
        MsgpackError::InvalidValue {
            at: at(1, "c", 0),
            reason: "above 9223372036854775807 in an integer column",
        }
    );
}

// ------------------------------------------------------------------------------------------------
// Time.

// Arc guesses the unit from the first time value's magnitude and applies it to the whole
// column; every unit ends up in microseconds.
#[test]
fn time_units() {
    let cases: [(Vec<V>, [i64; 2]); 6] = [
        // Seconds, including negative times, which are always below the seconds threshold.
        (
            vec![V::Int(1_700_000_000), V::Int(-1)],
            [1_700_000_000_000_000, -1_000_000],
        ),
        // Milliseconds (Telegraf's unit).
        (
            vec![V::Int(1_700_000_000_123), V::Int(1_700_000_000_124)],
            [1_700_000_000_123_000, 1_700_000_000_124_000],
        ),
        // Microseconds.
        (
            vec![V::Int(1_700_000_000_123_456), V::Int(5)],
            [1_700_000_000_123_456, 5],
        ),
        // Nanoseconds, divided with floor rounding.
        (
            vec![V::Int(1_700_000_000_123_456_789), V::Uint(u64::MAX)],
            [1_700_000_000_123_456, 18_446_744_073_709_551],
        ),
        // Float seconds keep their fraction, to the microsecond.
        (
            vec![V::F64(1_700_000_000.25), V::F64(1_700_000_001.0)],
            [1_700_000_000_250_000, 1_700_000_001_000_000],
        ),
        // The unit of the first value applies to all: 10 is read as 10 ms here.
        (
            vec![V::Int(1_700_000_000_000), V::Int(10)],
            [1_700_000_000_000_000, 10_000],
        ),
    ];
    for (times, expected) in cases {
        let record = columnar(
            "m",
            vec![("time", times), ("v", vec![V::Int(1), V::Int(2)])],
            &[],
        );
        assert_eq!(
            must_decode(&record),
            format!("m v=1i {}\nm v=2i {}\n", expected[0], expected[1])
        );
    }
    // Row form: each record guesses its own unit; a nil `t` means the receive time.
    let rows = arr(vec![
        map(vec![
            ("m", s("m")),
            ("t", V::Int(1)),
            ("fields", map(vec![("v", V::Int(1))])),
        ]),
        map(vec![
            ("m", s("m")),
            ("t", V::Int(1_700_000_000_000_000_000)),
            ("fields", map(vec![("v", V::Int(2))])),
        ]),
        map(vec![
            ("m", s("m")),
            ("t", V::Nil),
            ("fields", map(vec![("v", V::Int(3))])),
        ]),
    ]);
    assert_eq!(
        must_decode(&rows),
        format!("m v=1i 1000000\nm v=2i 1700000000000000\nm v=3i {DEFAULT_TIME_US}\n")
    );
}

// A nil, a string or a float that is not a number cannot be a time, and a seconds column whose
// later value overflows microseconds is refused rather than wrapped.
#[test]
fn time_errors() {
    let cases = [
        (
            vec![V::Int(1), V::Nil],
            1,
            "nil; every row of a time column needs a time",
        ),
        (
            vec![s("2024-01-01")],
            0,
            "not a number; times are integers or floats",
        ),
        (
            vec![V::F64(f64::NAN)],
            0,
            "NaN and infinite floats are not times",
        ),
        (
            vec![V::Int(1), V::Int(i64::MAX / 10)],
            1,
            "out of range for microseconds in a 64-bit integer",
        ),
        (
            vec![V::Int(1), V::Uint(u64::MAX)],
            1,
            "out of range for microseconds in a 64-bit integer",
        ),
    ];
    for (times, row, reason) in cases {
        let values = times.iter().map(|_| V::Int(1)).collect();
        let record = columnar("m", vec![("time", times), ("v", values)], &[]);
        assert_eq!(
            must_fail(&record),
            MsgpackError::InvalidTime {
                at: at(0, "time", row),
                reason
            }
        );
    }
    let row = map(vec![
        ("m", s("m")),
        ("t", s("now")),
        ("fields", map(vec![("v", V::Int(1))])),
    ]);
    assert_eq!(
        must_fail(&row),
        MsgpackError::InvalidTime {
            at: at_row_record(0, "t"),
            reason: "not a number; times are integers or floats"
        }
    );
}

// ------------------------------------------------------------------------------------------------
// Nil, tags, rows.

// Nil means "no value in this row": the field or tag is left out of that line. An empty tag
// value means no tag too, and a column of nils adds nothing.
#[test]
fn nil_and_empty_values() {
    let record = columnar(
        "m",
        vec![
            ("host", vec![s("a"), V::Nil, s("")]),
            ("x", vec![V::Int(1), V::Nil, V::Int(3)]),
            ("y", vec![V::Nil, V::F64(2.0), V::Nil]),
            ("z", vec![V::Nil, V::Nil, V::Nil]),
        ],
        &["host"],
    );
    assert_eq!(
        must_decode(&record),
        format!(
            "m,host=a x=1i {t}\nm y=2.0 {t}\nm x=3i {t}\n",
            t = DEFAULT_TIME_US
        )
    );
}

// A row whose every field is nil would be a line without fields, so it is refused by row.
#[test]
fn row_without_fields() {
    let record = columnar(
        "m",
        vec![
            ("host", vec![s("a"), s("b")]),
            ("x", vec![V::Int(1), V::Nil]),
        ],
        &["host"],
    );
    assert_eq!(
        must_fail(&record),
        MsgpackError::RowWithoutFields {
            at: Location {
                record: 0,
                column: None,
                row: Some(1)
            }
        }
    );
    let only_time = columnar("m", vec![("time", vec![V::Int(1)])], &[]);
    assert!(matches!(
        must_fail(&only_time),
        MsgpackError::RowWithoutFields { .. }
    ));
    let row = map(vec![("m", s("m")), ("fields", map(vec![("x", V::Nil)]))]);
    assert!(matches!(
        must_fail(&row),
        MsgpackError::RowWithoutFields { .. }
    ));
}

// Columns of different lengths cannot be rows.
#[test]
fn unequal_column_lengths() {
    let record = columnar(
        "m",
        vec![
            ("time", vec![V::Int(1), V::Int(2)]),
            ("x", vec![V::Int(1), V::Int(2)]),
            ("y", vec![V::Int(1)]),
        ],
        &[],
    );
    assert_eq!(
        must_fail(&record),
        MsgpackError::ColumnLengthMismatch {
            record: 0,
            column: "y".into(),
            length: 1,
            first_column: "time".into(),
            expected: 2,
        }
    );
}

// A missing time column means the receive time for every row (Arc does the same).
#[test]
fn missing_time_column_uses_default() {
    let record = columnar("m", vec![("x", vec![V::Int(1), V::Int(2)])], &[]);
    let mut out = String::new();
    to_line_protocol(&body(&record), 42, &limits(), &mut out).unwrap();
    assert_eq!(out, "m x=1i 42\nm x=2i 42\n");
}

// ------------------------------------------------------------------------------------------------
// Names and escaping.

// Characters that are syntax in line protocol are escaped in names and values, and come back
// unchanged from the parser (checked by must_decode and the round-trip property).
#[test]
fn escaping() {
    let record = columnar(
        "m",
        vec![
            ("tag key,=", vec![s("va lue,=\"\\x")]),
            ("field, =\"key\\x", vec![s("say \"hi\" \\ ,= \t\r")]),
        ],
        &["tag key,="],
    );
    let out = must_decode(&record);
    let expected = concat!(
        r#"m,tag\ key\,\==va\ lue\,\="\x "#,
        r#"field\,\ \="key\x="say \"hi\" \\ ,= "#,
        "\t\r\" ",
    );
    assert_eq!(out, format!("{expected}{DEFAULT_TIME_US}\n"));
    let batch = parse_micros(&out).unwrap();
    let line = batch.line(0).unwrap();
    assert_eq!(
        line.tags().collect::<Vec<_>>(),
        [("tag key,=", "va lue,=\"\\x")]
    );
    assert_eq!(
        line.fields().collect::<Vec<_>>(),
        [(
            "field, =\"key\\x",
            FieldValue::String("say \"hi\" \\ ,= \t\r")
        )]
    );
}

// Text line protocol cannot carry is refused with a reason instead of being corrupted: a line
// break anywhere, or a backslash that would escape the separator after a name or tag value.
#[test]
fn unrepresentable_text() {
    let newline_field = columnar("m", vec![("c", vec![s("a\nb")])], &[]);
    assert_eq!(
        must_fail(&newline_field),
        MsgpackError::InvalidValue {
            at: at(0, "c", 0),
            reason: "a line break in a string or tag value (line protocol cannot carry it)",
        }
    );
    let newline_tag = columnar(
        "m",
        vec![("t", vec![s("a\n")]), ("v", vec![V::Int(1)])],
        &["t"],
    );
    assert!(matches!(
        must_fail(&newline_tag),
        MsgpackError::InvalidValue { .. }
    ));
    let backslash_tag = columnar(
        "m",
        vec![("t", vec![s("a\\")]), ("v", vec![V::Int(1)])],
        &["t"],
    );
    assert_eq!(
        must_fail(&backslash_tag),
        MsgpackError::InvalidValue {
            at: at(0, "t", 0),
            reason: "a tag value may not end with a backslash (line protocol cannot carry it)",
        }
    );
    let backslash_name = columnar("m", vec![("c\\", vec![V::Int(1)])], &[]);
    assert_eq!(
        must_fail(&backslash_name),
        MsgpackError::TrailingBackslash {
            record: 0,
            name: "c\\".into()
        }
    );
    // A backslash anywhere else is fine, also at the end of a string field.
    must_decode(&columnar("m", vec![("c\\d", vec![s("x\\")])], &[]));

    let bad_utf8 = columnar("m", vec![("c", vec![V::Raw(vec![0xa2, 0xff, 0xfe])])], &[]);
    assert_eq!(
        must_fail(&bad_utf8),
        MsgpackError::InvalidValue {
            at: at(0, "c", 0),
            reason: "a string that is not valid UTF-8",
        }
    );
}

// Names are held to crate::names, and the error names the record and the bad name.
#[test]
fn invalid_names() {
    let measurement = columnar("cpu load", vec![("v", vec![V::Int(1)])], &[]);
    assert_eq!(
        must_fail(&measurement),
        MsgpackError::InvalidMeasurement {
            record: 0,
            name: "cpu load".into(),
            error: NameError::InvalidCharacter(' '),
        }
    );
    let column = arr(vec![
        columnar("cpu", vec![("v", vec![V::Int(1)])], &[]),
        columnar("cpu", vec![("__id", vec![V::Int(1)])], &[]),
    ]);
    assert_eq!(
        must_fail(&column),
        MsgpackError::InvalidColumnName {
            record: 1,
            name: "__id".into(),
            error: NameError::ReservedPrefix,
        }
    );
    // Only the exact name `time` is the time column; `Time` is a reserved column name.
    let time_case = columnar("cpu", vec![("Time", vec![V::Int(1)])], &[]);
    assert!(matches!(
        must_fail(&time_case),
        MsgpackError::InvalidColumnName {
            error: NameError::Reserved,
            ..
        }
    ));
    let time_tag = columnar("cpu", vec![("v", vec![V::Int(1)])], &["time"]);
    assert!(matches!(
        must_fail(&time_tag),
        MsgpackError::InvalidColumnName {
            error: NameError::Reserved,
            ..
        }
    ));
    let row_tag = map(vec![
        ("m", s("cpu")),
        ("tags", map(vec![("", s("x"))])),
        ("fields", map(vec![("v", V::Int(1))])),
    ]);
    assert!(matches!(
        must_fail(&row_tag),
        MsgpackError::InvalidColumnName {
            error: NameError::Empty,
            ..
        }
    ));
}

// ------------------------------------------------------------------------------------------------
// Structure.

// Bodies that are not the format at all are refused before any record is looked at.
#[test]
fn malformed_bodies() {
    let mut out = String::new();
    assert_eq!(
        to_line_protocol(b"", 0, &limits(), &mut out),
        Err(MsgpackError::EmptyBody)
    );
    let good = body(&columnar("m", vec![("v", vec![V::Int(1)])], &[]));
    for cut in 1..good.len() {
        assert!(
            matches!(
                to_line_protocol(&good[..cut], 0, &limits(), &mut out),
                Err(MsgpackError::Malformed { .. })
            ),
            "cut at {cut}"
        );
    }
    let mut trailing = good.clone();
    trailing.push(0xc0);
    assert_eq!(
        to_line_protocol(&trailing, 0, &limits(), &mut out),
        Err(MsgpackError::TrailingBytes { offset: good.len() })
    );
    assert_eq!(
        must_fail(&V::Int(5)),
        MsgpackError::UnsupportedPayload {
            found: "an integer"
        }
    );
    assert_eq!(
        must_fail(&V::Raw(vec![0xc1])),
        MsgpackError::Malformed {
            offset: 0,
            reason: "the byte 0xc1 is not a MessagePack marker"
        }
    );
    // An array32 header claiming four billion elements is refused without reading them.
    assert_eq!(
        must_fail(&V::Raw(vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0])),
        MsgpackError::Malformed {
            offset: 0,
            reason: "an array claims more elements than the body holds"
        }
    );
    assert_eq!(
        must_fail(&arr(vec![V::Int(1)])),
        MsgpackError::RecordNotMap {
            record: 0,
            found: "an integer"
        }
    );
    assert_eq!(out, "");
}

// Record-level mistakes are named with the record and key.
#[test]
fn record_errors() {
    let v = || arr(vec![V::Int(1)]);
    let cases: Vec<(V, MsgpackError)> = vec![
        (
            map(vec![("columns", map(vec![("v", v())]))]),
            MsgpackError::MissingMeasurement { record: 0 },
        ),
        (
            map(vec![("m", V::F64(1.0)), ("columns", map(vec![("v", v())]))]),
            MsgpackError::WrongType {
                record: 0,
                key: "m",
                expected: "a string or an integer",
                found: "a float",
            },
        ),
        (
            map(vec![("m", s("m"))]),
            MsgpackError::MissingFields { record: 0 },
        ),
        (
            map(vec![("m", s("m")), ("columns", map(vec![]))]),
            MsgpackError::EmptyColumns { record: 0 },
        ),
        (
            map(vec![("m", s("m")), ("columns", arr(vec![]))]),
            MsgpackError::WrongType {
                record: 0,
                key: "columns",
                expected: "a map of column names to arrays",
                found: "an array",
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("columns", map(vec![("v", V::Int(1))])),
            ]),
            MsgpackError::ColumnNotArray {
                record: 0,
                column: "v".into(),
                found: "an integer",
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("m", s("n")),
                ("columns", map(vec![("v", v())])),
            ]),
            MsgpackError::DuplicateKey {
                record: 0,
                key: "m".into(),
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("columns", map(vec![("v", v()), ("v", v())])),
            ]),
            MsgpackError::DuplicateKey {
                record: 0,
                key: "v".into(),
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("fields", map(vec![("v", V::Int(1)), ("v", V::Nil)])),
            ]),
            MsgpackError::DuplicateKey {
                record: 0,
                key: "v".into(),
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("columns", map(vec![("v", v())])),
                ("fields", map(vec![("w", V::Int(1))])),
            ]),
            MsgpackError::MixedForms {
                record: 0,
                key: "columns",
                other: "fields",
            },
        ),
        (
            map(vec![("m", s("m")), ("batch", arr(vec![]))]),
            MsgpackError::MixedForms {
                record: 0,
                key: "batch",
                other: "m",
            },
        ),
        (
            map(vec![("batch", map(vec![]))]),
            MsgpackError::WrongType {
                record: 0,
                key: "batch",
                expected: "an array of records",
                found: "a map",
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("fields", map(vec![("v", V::Int(1))])),
                ("f", arr(vec![V::Int(1)])),
            ]),
            MsgpackError::MixedForms {
                record: 0,
                key: "fields",
                other: "f",
            },
        ),
        (
            map(vec![
                ("m", s("m")),
                ("tags", map(vec![("v", s("a"))])),
                ("fields", map(vec![("v", V::Int(1))])),
            ]),
            MsgpackError::TagAndField {
                record: 0,
                key: "v".into(),
            },
        ),
        (
            V::Map(vec![(V::Int(1), s("x"))]),
            MsgpackError::KeyNotString {
                record: 0,
                found: "an integer",
            },
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(must_fail(&value), expected, "{value:?}");
    }
    // Unknown keys are skipped, as Arc does.
    must_decode(&map(vec![
        ("m", s("m")),
        ("version", map(vec![("x", arr(vec![V::Nil]))])),
        ("columns", map(vec![("v", v())])),
    ]));
}

// Within one request a column keeps one role and type per measurement (the parser's rule),
// checked here so the error names the record; compatible types are converted instead.
#[test]
fn request_wide_column_kinds() {
    let type_conflict = arr(vec![
        columnar("m", vec![("c", vec![s("a")])], &[]),
        columnar("m", vec![("c", vec![V::Int(1)])], &[]),
    ]);
    assert_eq!(
        must_fail(&type_conflict),
        MsgpackError::TypeMismatch {
            at: at(1, "c", 0),
            expected: "string",
            found: "an integer",
        }
    );
    let role_conflict = arr(vec![
        columnar(
            "m",
            vec![("c", vec![s("a")]), ("v", vec![V::Int(1)])],
            &["c"],
        ),
        map(vec![("m", s("m")), ("fields", map(vec![("c", s("b"))]))]),
    ]);
    assert_eq!(
        must_fail(&role_conflict),
        MsgpackError::ColumnConflict {
            record: 1,
            measurement: "m".into(),
            column: "c".into(),
            here: "a field",
            earlier: "a tag",
        }
    );
    let field_then_tag = arr(vec![
        map(vec![("m", s("m")), ("fields", map(vec![("c", s("b"))]))]),
        map(vec![
            ("m", s("m")),
            ("tags", map(vec![("c", s("b"))])),
            ("fields", map(vec![("v", V::Int(1))])),
        ]),
    ]);
    assert_eq!(
        must_fail(&field_then_tag),
        MsgpackError::ColumnConflict {
            record: 1,
            measurement: "m".into(),
            column: "c".into(),
            here: "a tag",
            earlier: "a string field",
        }
    );
    // The first record made `c` a float, so the second record's integers become floats; other
    // measurements are independent.
    let widened = arr(vec![
        map(vec![
            ("m", s("m")),
            ("t", V::Int(1)),
            ("fields", map(vec![("c", V::F64(0.5))])),
        ]),
        map(vec![
            ("m", s("m")),
            ("t", V::Int(1)),
            ("fields", map(vec![("c", V::Int(2))])),
        ]),
        map(vec![
            ("m", s("n")),
            ("t", V::Int(1)),
            ("fields", map(vec![("c", V::Int(2))])),
        ]),
    ]);
    assert_eq!(
        must_decode(&widened),
        "m c=0.5 1000000\nm c=2.0 1000000\nn c=2i 1000000\n"
    );
}

// Limits bound the rows of the whole request and the columns of each record, checked before
// the values are read.
#[test]
fn limits_are_enforced() {
    let small = MsgpackLimits {
        rows_max: 3,
        columns_max: 2,
        ..limits()
    };
    let two_rows = || columnar("m", vec![("v", vec![V::Int(1), V::Int(2)])], &[]);
    let mut out = String::new();
    assert_eq!(
        to_line_protocol(&body(&two_rows()), 0, &small, &mut out),
        Ok(2)
    );
    assert_eq!(
        must_fail_with(&arr(vec![two_rows(), two_rows()]), &small),
        MsgpackError::TooManyRows {
            record: 1,
            rows_max: 3
        }
    );
    let three_columns = columnar(
        "m",
        vec![
            ("time", vec![V::Int(1)]),
            ("a", vec![V::Int(1)]),
            ("b", vec![V::Int(1)]),
            ("c", vec![V::Int(1)]),
        ],
        &[],
    );
    assert_eq!(
        must_fail_with(&three_columns, &small),
        MsgpackError::TooManyColumns {
            record: 0,
            columns_max: 2
        }
    );
    let row = map(vec![
        ("m", s("m")),
        ("tags", map(vec![("a", s("x")), ("b", s("y"))])),
        ("fields", map(vec![("v", V::Int(1))])),
    ]);
    assert_eq!(
        must_fail_with(&row, &small),
        MsgpackError::TooManyColumns {
            record: 0,
            columns_max: 2
        }
    );
}

/// A columnar record without a time column whose `columns` names are 120 characters long and
/// whose values are all the one-byte integer 1: about 8 body bytes per row become about 1000
/// bytes of line protocol, as names repeat on every line.
fn long_names_body(rows: usize) -> Vec<u8> {
    use rmp::encode;
    let mut out = Vec::new();
    encode::write_map_len(&mut out, 2).unwrap();
    encode::write_str(&mut out, "m").unwrap();
    encode::write_str(&mut out, "m").unwrap();
    encode::write_str(&mut out, "columns").unwrap();
    encode::write_map_len(&mut out, 8).unwrap();
    for column in 0..8 {
        let name = format!("c{column}{}", "x".repeat(118));
        encode::write_str(&mut out, &name).unwrap();
        encode::write_array_len(&mut out, rows as u32).unwrap();
        out.extend(std::iter::repeat_n(1u8, rows));
    }
    out
}

// A columnar body whose translation would be about 100 MB (100,000 rows of eight 120-character
// column names, from an 800 KB body) is refused with TooLarge once the output passes a 1 MiB
// limit, and the output String never reserved more than the limit plus one line. Before, the
// translation had no bound: this body was written out in full (about 100 MB, the String's
// doubling reserving up to twice that) and only then measured by the caller.
#[test]
fn columnar_output_stops_at_the_limit() {
    let bytes_max = 1 << 20;
    let bounded = MsgpackLimits {
        output_bytes_max: bytes_max,
        ..limits()
    };
    let mut one = String::new();
    to_line_protocol(&long_names_body(1), 7, &limits(), &mut one).unwrap();
    let line_bytes = one.len();
    assert!((900..1100).contains(&line_bytes), "{one}");

    let body = long_names_body(100_000);
    assert!(body.len() < 1_000_000);
    let mut out = String::new();
    assert_eq!(
        to_line_protocol(&body, 7, &bounded, &mut out),
        Err(MsgpackError::TooLarge {
            record: 0,
            bytes_max
        })
    );
    assert_eq!(out, "");
    // Room for each line is reserved by a bound on its size (24 bytes per number, 20 for the
    // time) rather than its real size (`1i`, `7`), here under twice the real line.
    assert!(
        out.capacity() <= bytes_max + 2 * line_bytes,
        "capacity {} for a limit of {bytes_max} and lines of {line_bytes} bytes",
        out.capacity()
    );
}

// The same bound holds for row records, where the compact `f` array turns one byte per value
// into `field_<n>=1i`: 2,000 records of 1,000 values (2 MB) would translate to 24 MB.
#[test]
fn row_output_stops_at_the_limit() {
    use rmp::encode;
    let bytes_max = 1 << 20;
    let bounded = MsgpackLimits {
        output_bytes_max: bytes_max,
        ..limits()
    };
    let mut record = Vec::new();
    encode::write_map_len(&mut record, 2).unwrap();
    encode::write_str(&mut record, "m").unwrap();
    encode::write_str(&mut record, "m").unwrap();
    encode::write_str(&mut record, "f").unwrap();
    encode::write_array_len(&mut record, 1_000).unwrap();
    record.extend(std::iter::repeat_n(1u8, 1_000));
    let mut body = Vec::new();
    encode::write_array_len(&mut body, 2_000).unwrap();
    for _ in 0..2_000 {
        body.extend_from_slice(&record);
    }

    let mut line = String::new();
    to_line_protocol(&record, 7, &limits(), &mut line).unwrap();
    let line_bytes = line.len();
    let mut out = String::new();
    let error = to_line_protocol(&body, 7, &bounded, &mut out).unwrap_err();
    assert_eq!(
        error,
        MsgpackError::TooLarge {
            record: bytes_max / line_bytes,
            bytes_max
        }
    );
    assert_eq!(out, "");
    // Room for each line is reserved by a bound on its size that counts keys as if every byte
    // were escaped and every number as 24 bytes, here under four times the real line.
    assert!(
        out.capacity() <= bytes_max + 4 * line_bytes,
        "capacity {} for a limit of {bytes_max} and lines of {line_bytes} bytes",
        out.capacity()
    );
}

// The limit counts the bytes this call appends, not what the caller's buffer held before, and an
// output of exactly the limit is accepted; one byte less is refused, naming the setting.
#[test]
fn output_limit_is_exact() {
    let record = columnar(
        "cpu",
        vec![
            ("host", vec![s("a"), s("b")]),
            ("usage", vec![V::F64(0.5), V::Int(2)]),
        ],
        &["host"],
    );
    let expected = must_decode(&record);
    let with_limit = |output_bytes_max| MsgpackLimits {
        output_bytes_max,
        ..limits()
    };
    let mut out = String::from("earlier\n");
    assert_eq!(
        to_line_protocol(
            &body(&record),
            DEFAULT_TIME_US,
            &with_limit(expected.len()),
            &mut out
        ),
        Ok(2)
    );
    assert_eq!(out, format!("earlier\n{expected}"));
    let error = must_fail_with(&record, &with_limit(expected.len() - 1));
    assert_eq!(
        error,
        MsgpackError::TooLarge {
            record: 0,
            bytes_max: expected.len() - 1
        }
    );
    assert!(error.to_string().contains("ingest.decompressed_bytes_max"));
}

// Lengths read from headers are checked against the bytes left in the body before anything is
// read or reserved, wherever the header sits: an array, map, string or binary claiming 2^32 - 1
// elements or bytes in a body of a few bytes is refused at once as malformed. (The reader already
// did this; the test guards it, since such a count must never size an allocation.)
#[test]
fn huge_declared_lengths_fail_fast() {
    let claims = |marker: u8| V::Raw(vec![marker, 0xff, 0xff, 0xff, 0xff, 0x01]);
    const ARRAY: &str = "an array claims more elements than the body holds";
    const MAP: &str = "a map claims more entries than the body holds";
    const ENDS: &str = "the body ends inside a value";
    let cases = vec![
        // map32, str32, bin32 and array32 at the top.
        (claims(0xdf), MAP),
        (claims(0xdb), ENDS),
        (claims(0xc6), ENDS),
        (claims(0xdd), ARRAY),
        // A column, `tag_keys`, the compact `f` array and a batch claiming four billion values.
        (
            map(vec![
                ("m", s("m")),
                ("columns", map(vec![("v", claims(0xdd))])),
            ]),
            ARRAY,
        ),
        (
            map(vec![
                ("m", s("m")),
                ("columns", map(vec![("v", arr(vec![V::Int(1)]))])),
                ("tag_keys", claims(0xdd)),
            ]),
            ARRAY,
        ),
        (map(vec![("m", s("m")), ("f", claims(0xdd))]), ARRAY),
        (map(vec![("m", s("m")), ("tags", claims(0xdf))]), MAP),
        (map(vec![("batch", claims(0xdd))]), ARRAY),
    ];
    for (value, reason) in cases {
        let mut out = String::new();
        let error = to_line_protocol(&body(&value), 0, &limits(), &mut out).unwrap_err();
        assert!(
            matches!(error, MsgpackError::Malformed { reason: found, .. } if found == reason),
            "{value:?}: {error}"
        );
        assert_eq!(out.capacity(), 0, "{value:?}");
    }
}

// A failed decode leaves the caller's buffer as it was, so a reused buffer never carries half a
// request into the next one.
#[test]
fn failure_restores_output() {
    let mut out = String::from("kept\n");
    let bad = arr(vec![
        columnar("m", vec![("v", vec![V::Int(1)])], &[]),
        columnar("m", vec![("v", vec![s("x")])], &[]),
    ]);
    assert!(to_line_protocol(&body(&bad), 0, &limits(), &mut out).is_err());
    assert_eq!(out, "kept\n");
}

// Error messages say where and what, in the client's terms.
#[test]
fn error_messages() {
    assert_eq!(
        MsgpackError::TypeMismatch {
            at: at(2, "usage", 7),
            expected: "float",
            found: "a string"
        }
        .to_string(),
        "record 2, column \"usage\", row 7: a string in a column of type float"
    );
    assert_eq!(
        MsgpackError::RowWithoutFields {
            at: Location {
                record: 0,
                column: None,
                row: None
            }
        }
        .to_string(),
        "record 0: no field has a value"
    );
    assert_eq!(
        MsgpackError::ColumnLengthMismatch {
            record: 1,
            column: "y".into(),
            length: 1,
            first_column: "time".into(),
            expected: 2
        }
        .to_string(),
        "record 1: column \"y\" has 1 values but column \"time\" has 2"
    );
}

// ------------------------------------------------------------------------------------------------
// Round trip.

/// A field column's values as generated, before encoding.
#[derive(Debug, Clone)]
enum Generated {
    Float(Vec<Option<f64>>),
    Integer(Vec<Option<i64>>),
    /// Holds at least one value above i64::MAX, so the column is unsigned.
    Unsigned(Vec<Option<u64>>),
    Boolean(Vec<Option<bool>>),
    String(Vec<Option<String>>),
}

/// A field value as the parser returns it, owned.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    /// Compared by bits, so -0.0 and 0.0 differ.
    Float(u64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(String),
}

fn expected_value(value: FieldValue<'_>) -> Expected {
    match value {
        FieldValue::Float(value) => Expected::Float(value.to_bits()),
        FieldValue::Integer(value) => Expected::Integer(value),
        FieldValue::Unsigned(value) => Expected::Unsigned(value),
        FieldValue::Boolean(value) => Expected::Boolean(value),
        FieldValue::String(value) => Expected::String(value.to_owned()),
    }
}

fn nullable<T: std::fmt::Debug + Clone>(
    values: impl Strategy<Value = T> + Clone,
    rows: usize,
) -> impl Strategy<Value = Vec<Option<T>>> {
    proptest::collection::vec(proptest::option::weighted(0.8, values), rows)
}

fn generated_column(rows: usize) -> impl Strategy<Value = Generated> {
    let finite = any::<f64>().prop_filter("finite", |value| value.is_finite());
    prop_oneof![
        nullable(finite, rows).prop_map(Generated::Float),
        nullable(any::<i64>(), rows).prop_map(Generated::Integer),
        (
            nullable(any::<u64>(), rows),
            0..rows,
            (1u64 << 63)..=u64::MAX
        )
            .prop_map(|(mut values, index, large)| {
                values[index] = Some(large);
                Generated::Unsigned(values)
            }),
        nullable(any::<bool>(), rows).prop_map(Generated::Boolean),
        nullable("[^\n]{0,12}", rows).prop_map(Generated::String),
    ]
}

fn column_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ,=\"\\\\_é✓-]{1,10}"
}

/// A random columnar record: (measurement, times, tag columns, field columns). The first field
/// column has no nils, so every row has a field.
#[allow(clippy::type_complexity)]
fn columnar_record() -> impl Strategy<
    Value = (
        String,
        Vec<i64>,
        Vec<(String, Vec<Option<String>>)>,
        Vec<(String, Generated)>,
    ),
> {
    (1usize..10).prop_flat_map(|rows| {
        (
            "[a-zA-Z][a-zA-Z0-9_-]{0,10}",
            proptest::collection::vec(10_000_000_000_000i64..10_000_000_000_000_000, rows),
            proptest::collection::vec(nullable("[^\n]{0,8}", rows), 0..3),
            proptest::collection::vec(generated_column(rows), 1..5),
            proptest::collection::vec(column_name(), 8),
        )
            .prop_map(|(measurement, times, tags, mut fields, names)| {
                // The first field column must hold a value in every row.
                match &mut fields[0] {
                    Generated::Float(values) => values.iter_mut().for_each(|v| {
                        v.get_or_insert(0.0);
                    }),
                    Generated::Integer(values) => values.iter_mut().for_each(|v| {
                        v.get_or_insert(0);
                    }),
                    Generated::Unsigned(values) => values.iter_mut().for_each(|v| {
                        v.get_or_insert(0);
                    }),
                    Generated::Boolean(values) => values.iter_mut().for_each(|v| {
                        v.get_or_insert(false);
                    }),
                    Generated::String(values) => values.iter_mut().for_each(|v| {
                        v.get_or_insert_with(String::new);
                    }),
                }
                // Names: the generated ones where valid and unique, else plain fallbacks.
                let mut used: Vec<String> = Vec::new();
                let mut name = |index: usize| {
                    let candidate = names[index % names.len()].clone();
                    let valid = names::validate_column(&candidate).is_ok()
                        && !candidate.ends_with('\\')
                        && !used.contains(&candidate);
                    // '#' is outside the generated alphabet, so a fallback never collides.
                    let chosen = if valid {
                        candidate
                    } else {
                        format!("c{index}#")
                    };
                    used.push(chosen.clone());
                    chosen
                };
                let tags: Vec<(String, Vec<Option<String>>)> = tags
                    .into_iter()
                    .enumerate()
                    .map(|(index, values)| {
                        let values = values
                            .into_iter()
                            .map(|value| {
                                value.map(|mut text| {
                                    if text.ends_with('\\') {
                                        text.push('x');
                                    }
                                    text
                                })
                            })
                            .collect();
                        (name(index), values)
                    })
                    .collect();
                let fields = fields
                    .into_iter()
                    .enumerate()
                    .map(|(index, column)| (name(index + 3), column))
                    .collect();
                (measurement, times, tags, fields)
            })
    })
}

/// The columnar record the round-trip property sends.
fn encode_record(
    measurement: &str,
    times: &[i64],
    tags: &[(String, Vec<Option<String>>)],
    fields: &[(String, Generated)],
) -> V {
    let text = |value: &Option<String>| value.as_ref().map_or(V::Nil, |text| V::Str(text.clone()));
    let mut columns = vec![(
        s("time"),
        arr(times.iter().map(|time| V::Int(*time)).collect()),
    )];
    for (name, values) in tags {
        columns.push((V::Str(name.clone()), arr(values.iter().map(text).collect())));
    }
    for (name, column) in fields {
        let values: Vec<V> = match column {
            Generated::Float(values) => values.iter().map(|v| v.map_or(V::Nil, V::F64)).collect(),
            Generated::Integer(values) => values.iter().map(|v| v.map_or(V::Nil, V::Int)).collect(),
            Generated::Unsigned(values) => {
                values.iter().map(|v| v.map_or(V::Nil, V::Uint)).collect()
            }
            Generated::Boolean(values) => {
                values.iter().map(|v| v.map_or(V::Nil, V::Bool)).collect()
            }
            Generated::String(values) => values.iter().map(text).collect(),
        };
        columns.push((V::Str(name.clone()), arr(values)));
    }
    let tag_keys = tags.iter().map(|(name, _)| V::Str(name.clone())).collect();
    V::Map(vec![
        (s("m"), V::Str(measurement.to_owned())),
        (s("columns"), V::Map(columns)),
        (s("tag_keys"), arr(tag_keys)),
    ])
}

/// The field value a generated column holds in `row`, as the parser should return it.
fn generated_value(column: &Generated, row: usize) -> Option<Expected> {
    match column {
        Generated::Float(values) => values[row].map(|value| Expected::Float(value.to_bits())),
        Generated::Integer(values) => values[row].map(Expected::Integer),
        Generated::Unsigned(values) => values[row].map(Expected::Unsigned),
        Generated::Boolean(values) => values[row].map(Expected::Boolean),
        Generated::String(values) => values[row].clone().map(Expected::String),
    }
}

/// Parses decoder output the way the write path does.
fn parse_micros(text: &str) -> Result<line_protocol::Batch<'_>, line_protocol::ParseError> {
    line_protocol::parse(
        text.as_bytes(),
        Precision::Microseconds,
        0,
        &ParseLimits::default(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Any columnar record decodes to lines the parser reads back as exactly the values sent:
    // same tags (empty and nil ones absent), same fields with the same types and bits, same
    // times; and the text is canonical (write_line reproduces it byte for byte).
    #[test]
    fn columnar_round_trip((measurement, times, tags, fields) in columnar_record()) {
        let rows = times.len();
        let record = encode_record(&measurement, &times, &tags, &fields);
        let mut out = String::new();
        prop_assert_eq!(to_line_protocol(&body(&record), 0, &limits(), &mut out), Ok(rows));
        let batch = parse_micros(&out)
            .map_err(|error| TestCaseError::fail(format!("{error}\n{out}")))?;
        prop_assert_eq!(batch.len(), rows);

        let mut rewritten = String::new();
        for (row, line) in batch.lines().enumerate() {
            line_protocol::write_line(&mut rewritten, &line);
            prop_assert_eq!(line.measurement(), measurement.as_str());
            prop_assert_eq!(line.time_us(), times[row]);

            let mut expected_tags: Vec<(&str, &str)> = tags
                .iter()
                .filter_map(|(name, values)| match &values[row] {
                    Some(value) if !value.is_empty() => Some((name.as_str(), value.as_str())),
                    _ => None,
                })
                .collect();
            expected_tags.sort();
            prop_assert_eq!(line.tags().collect::<Vec<_>>(), expected_tags);

            let expected_fields: Vec<(String, Expected)> = fields
                .iter()
                .filter_map(|(name, column)| {
                    generated_value(column, row).map(|value| (name.clone(), value))
                })
                .collect();
            let parsed_fields: Vec<(String, Expected)> = line
                .fields()
                .map(|(key, value)| (key.to_owned(), expected_value(value)))
                .collect();
            prop_assert_eq!(parsed_fields, expected_fields);
        }
        prop_assert_eq!(rewritten, out);
    }

    // A valid body with one byte changed never panics the decoder, and whatever the decoder
    // still accepts, the parser accepts with the same row count.
    #[test]
    fn mutated_bodies_never_panic(
        (measurement, times, tags, fields) in columnar_record(),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = body(&encode_record(&measurement, &times, &tags, &fields));
        let index = position.index(bytes.len());
        bytes[index] = byte;
        let mut out = String::new();
        if let Ok(rows) = to_line_protocol(&bytes, 0, &limits(), &mut out) {
            let batch = parse_micros(&out);
            prop_assert!(batch.is_ok(), "{:?}\n{}", batch.err(), out);
            prop_assert_eq!(batch.map(|batch| batch.len()).ok(), Some(rows));
        }
    }

    // Arbitrary bytes never panic the decoder either.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut out = String::new();
        if let Ok(rows) = to_line_protocol(&bytes, 0, &limits(), &mut out) {
            let batch = parse_micros(&out);
            prop_assert!(batch.is_ok(), "{:?}\n{}", batch.err(), out);
            prop_assert_eq!(batch.map(|batch| batch.len()).ok(), Some(rows));
        }
    }
}
