//! Unit and property tests for the line-protocol parser.

use proptest::prelude::*;

use super::*;

const DEFAULT_TIME_US: i64 = 1_700_000_000_000_000;

fn limits() -> ParseLimits {
    ParseLimits::default()
}

/// Parses with nanosecond precision and the default limits, panicking on error.
fn must_parse(body: &str) -> Batch<'_> {
    must_parse_with(body, Precision::Nanoseconds)
}

fn must_parse_with(body: &str, precision: Precision) -> Batch<'_> {
    match parse(body.as_bytes(), precision, DEFAULT_TIME_US, &limits()) {
        Ok(batch) => batch,
        Err(error) => panic!("parse failed for {body:?}: {error}"),
    }
}

/// Parses expecting an error, panicking if the body parses.
fn must_fail(body: &str) -> ParseError {
    must_fail_bytes(body.as_bytes())
}

fn must_fail_bytes(body: &[u8]) -> ParseError {
    match parse(body, Precision::Nanoseconds, DEFAULT_TIME_US, &limits()) {
        Ok(batch) => panic!(
            "parse succeeded for {:?}: {:?}",
            String::from_utf8_lossy(body),
            batch.lines().collect::<Vec<_>>()
        ),
        Err(error) => error,
    }
}

/// An owned copy of a point, for comparisons.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    measurement: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, OwnedValue)>,
    time_us: i64,
}

#[derive(Debug, Clone, PartialEq)]
enum OwnedValue {
    /// Compared by bits so that -0.0 and 0.0 differ.
    Float(u64),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool),
    String(String),
}

impl From<FieldValue<'_>> for OwnedValue {
    fn from(value: FieldValue<'_>) -> Self {
        match value {
            FieldValue::Float(value) => OwnedValue::Float(value.to_bits()),
            FieldValue::Integer(value) => OwnedValue::Integer(value),
            FieldValue::Unsigned(value) => OwnedValue::Unsigned(value),
            FieldValue::Boolean(value) => OwnedValue::Boolean(value),
            FieldValue::String(value) => OwnedValue::String(value.to_owned()),
        }
    }
}

fn points(batch: &Batch<'_>) -> Vec<Point> {
    batch
        .lines()
        .map(|line| Point {
            measurement: line.measurement().to_owned(),
            tags: line
                .tags()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
            fields: line
                .fields()
                .map(|(key, value)| (key.to_owned(), value.into()))
                .collect(),
            time_us: line.time_us(),
        })
        .collect()
}

/// The single point of a one-line body.
fn single(body: &str) -> Point {
    let batch = must_parse(body);
    let mut all = points(&batch);
    assert_eq!(all.len(), 1, "{body:?}");
    all.remove(0)
}

fn single_field(body: &str) -> OwnedValue {
    let point = single(body);
    assert_eq!(point.fields.len(), 1, "{body:?}");
    point.fields[0].1.clone()
}

fn float(value: f64) -> OwnedValue {
    OwnedValue::Float(value.to_bits())
}

fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Accepted syntax.

// The benchmark's narrow shape parses into the expected point, with ns converted to us.
#[test]
fn parses_a_typical_line() {
    let point =
        single("cpu,host=server042 value=12.5,cpu_idle=80.1,cpu_user=10.2 1700000000000000000");
    assert_eq!(
        point,
        Point {
            measurement: "cpu".into(),
            tags: tags(&[("host", "server042")]),
            fields: vec![
                ("value".into(), float(12.5)),
                ("cpu_idle".into(), float(80.1)),
                ("cpu_user".into(), float(10.2)),
            ],
            time_us: 1_700_000_000_000_000,
        }
    );
}

// Tags come out sorted by key whatever order they were written in; fields keep their order.
#[test]
fn sorts_tags_but_not_fields() {
    let batch =
        must_parse("m,z=1,a=2,m=3 y=1i,x=2i\nm,a=2,z=1,m=3 y=1i,x=2i\nm,z=1,a=2,m=3 y=1i,x=2i");
    for point in points(&batch) {
        assert_eq!(point.tags, tags(&[("a", "2"), ("m", "3"), ("z", "1")]));
        assert_eq!(point.fields[0].0, "y");
        assert_eq!(point.fields[1].0, "x");
    }
}

// A line without a timestamp gets the caller's receive time; a line without tags is fine.
#[test]
fn missing_timestamp_uses_default_time() {
    let point = single("m v=1");
    assert_eq!(point.time_us, DEFAULT_TIME_US);
    assert!(point.tags.is_empty());
}

// Measurement escapes are `\,` and `\ `; escaped names are still checked (and refused here,
// since measurement names may not hold commas or spaces), and the message shows them unescaped.
#[test]
fn measurement_escapes() {
    let error = must_fail("my\\ cpu,host=a v=1");
    assert_eq!(error.line, 1);
    assert_eq!(
        error.kind,
        ParseErrorKind::InvalidMeasurement {
            name: "my cpu".into(),
            error: NameError::InvalidCharacter(' ')
        }
    );
    let error = must_fail("my\\,cpu v=1");
    assert!(
        matches!(error.kind, ParseErrorKind::InvalidMeasurement { ref name, .. } if name == "my,cpu")
    );
    // `=` is not special in a measurement, so `\=` keeps its backslash.
    let error = must_fail("a\\=b v=1");
    assert!(
        matches!(error.kind, ParseErrorKind::InvalidMeasurement { ref name, .. } if name == "a\\=b")
    );
}

// Tag keys, tag values and field keys unescape `\,` `\=` `\ ` and keep other backslashes.
#[test]
fn key_and_value_escapes() {
    let point = single(r#"m,tag\ key\,x\=y=va\ l\,u\=e,path=C:\dir\file f\ 1\=\,=1i"#);
    assert_eq!(
        point.tags,
        tags(&[("path", "C:\\dir\\file"), ("tag key,x=y", "va l,u=e")])
    );
    assert_eq!(point.fields, vec![("f 1=,".into(), OwnedValue::Integer(1))]);
    // A backslash before a backslash is literal, and the second one still escapes: so a value
    // can hold backslashes anywhere but at its end.
    let point = single(r"m,k=a\\b,j=b\\\,c v=1");
    assert_eq!(point.tags, tags(&[("j", "b\\\\,c"), ("k", "a\\\\b")]));
    let error = must_fail(r"m,k=a\\,j=b v=1");
    assert_eq!(
        error.kind,
        ParseErrorKind::UnescapedEqualsInTagValue { key: "k".into() }
    );
}

// Keys and values without escapes borrow the body; only escaped ones use the arena.
#[test]
fn unescaped_strings_are_borrowed() {
    let body = "m,host=a\\ b,region=eu v=\"x\",w=\"y\\\"z\" 1";
    let batch = must_parse(body);
    assert_eq!(batch.buffers.arena, "a by\"z");
}

// String values: quotes, backslashes, spaces, commas and equals signs, and empty strings.
#[test]
fn string_values() {
    assert_eq!(
        single_field(r#"m s="a \"quoted\" \\ back\slash, x=y""#),
        OwnedValue::String(r#"a "quoted" \ back\slash, x=y"#.into())
    );
    assert_eq!(single_field(r#"m s="""#), OwnedValue::String(String::new()));
    let point = single(r#"m s="a b",t="c d" 5"#);
    assert_eq!(point.fields.len(), 2);
    assert_eq!(point.time_us, 0);
    assert_eq!(
        single_field("m s=\"tab\there\"\t"),
        OwnedValue::String("tab\there".into())
    );
    assert_eq!(
        single_field("m s=\"ünïcødé ✓\""),
        OwnedValue::String("ünïcødé ✓".into())
    );
}

// Every boolean spelling InfluxDB accepts, and nothing else.
#[test]
fn booleans() {
    for spelling in ["t", "T", "true", "True", "TRUE"] {
        assert_eq!(
            single_field(&format!("m b={spelling}")),
            OwnedValue::Boolean(true)
        );
    }
    for spelling in ["f", "F", "false", "False", "FALSE"] {
        assert_eq!(
            single_field(&format!("m b={spelling}")),
            OwnedValue::Boolean(false)
        );
    }
    for spelling in ["tRUE", "truee", "fals", "t1", "FALSe"] {
        let error = must_fail(&format!("m b={spelling}"));
        assert!(
            matches!(
                error.kind,
                ParseErrorKind::InvalidFieldValue {
                    reason: "not a valid boolean",
                    ..
                }
            ),
            "{spelling}: {error}"
        );
    }
}

// Floats in every accepted form, compared bit for bit with the standard library.
#[test]
fn floats() {
    for text in [
        "1",
        "-1.5",
        "1e3",
        "1.5E-7",
        "1E+5",
        "0",
        "-0",
        "-0.0",
        ".5",
        "-.5",
        "1.",
        "12.5",
        "80.1",
        "0.1",
        "123456789012345678901234567890",
        "1.7976931348623157e308",
        "2.2250738585072014e-308",
        "5e-324",
        "1e-400",
        "9007199254740993",
        "0.30000000000000004",
        "000001.000",
    ] {
        let expected: f64 = text.parse().expect("test input is a float");
        assert_eq!(
            single_field(&format!("m v={text}")),
            float(expected),
            "{text}"
        );
    }
}

// Non-numbers and values Rust's parser would accept but InfluxDB refuses.
#[test]
fn invalid_floats() {
    for text in [
        "+1", "inf", "-inf", "nan", "NaN", "infinity", "1e", "1e+", ".", "-", "1.2.3", "1-5",
        "0x10", "1_000", "e5",
    ] {
        let error = must_fail(&format!("m v={text}"));
        assert_eq!(error.line, 1);
        assert!(
            matches!(error.kind, ParseErrorKind::InvalidFieldValue { .. }),
            "{text}: {error}"
        );
    }
    let error = must_fail("m v=1e309");
    assert!(matches!(
        error.kind,
        ParseErrorKind::InvalidFieldValue {
            reason: "out of range for a 64-bit float",
            ..
        }
    ));
    assert_eq!(
        error.to_string(),
        r#"line 1: invalid field value for "v": out of range for a 64-bit float: "1e309""#
    );
}

// Signed integers use the full i64 range and nothing beyond it.
#[test]
fn integers() {
    assert_eq!(single_field("m v=123i"), OwnedValue::Integer(123));
    assert_eq!(single_field("m v=-5i"), OwnedValue::Integer(-5));
    assert_eq!(
        single_field("m v=9223372036854775807i"),
        OwnedValue::Integer(i64::MAX)
    );
    assert_eq!(
        single_field("m v=-9223372036854775808i"),
        OwnedValue::Integer(i64::MIN)
    );
    assert_eq!(single_field("m v=-0i"), OwnedValue::Integer(0));
    assert_eq!(
        single_field("m v=000000000000000000000042i"),
        OwnedValue::Integer(42)
    );
    assert_eq!(
        single_field("m v=-1000000000000000000i"),
        OwnedValue::Integer(-1_000_000_000_000_000_000)
    );
    for text in [
        "9223372036854775808i",
        "-9223372036854775809i",
        "9999999999999999999i",
        "-9999999999999999999i",
        "18446744073709551616i",
        "99999999999999999999999i",
    ] {
        let error = must_fail(&format!("m v={text}"));
        assert!(
            matches!(
                error.kind,
                ParseErrorKind::InvalidFieldValue {
                    reason: "out of range for a 64-bit signed integer",
                    ..
                }
            ),
            "{text}: {error}"
        );
    }
    for text in ["i", "-i", "+1i", "1.5i", "1e3i", "12ai"] {
        let error = must_fail(&format!("m v={text}"));
        assert!(
            matches!(
                error.kind,
                ParseErrorKind::InvalidFieldValue {
                    reason: "not a valid integer",
                    ..
                }
            ),
            "{text}: {error}"
        );
    }
}

// Unsigned integers use the full u64 range; negative ones are refused.
#[test]
fn unsigned_integers() {
    assert_eq!(single_field("m v=123u"), OwnedValue::Unsigned(123));
    assert_eq!(
        single_field("m v=18446744073709551615u"),
        OwnedValue::Unsigned(u64::MAX)
    );
    assert_eq!(
        single_field("m v=0000000000000000000000007u"),
        OwnedValue::Unsigned(7)
    );
    assert_eq!(
        single_field("m v=9999999999999999999u"),
        OwnedValue::Unsigned(9_999_999_999_999_999_999)
    );
    let error = must_fail("m v=18446744073709551616u");
    assert!(matches!(
        error.kind,
        ParseErrorKind::InvalidFieldValue {
            reason: "out of range for a 64-bit unsigned integer",
            ..
        }
    ));
    for text in ["-1u", "u", "+1u", "1.0u"] {
        let error = must_fail(&format!("m v={text}"));
        assert!(
            matches!(
                error.kind,
                ParseErrorKind::InvalidFieldValue {
                    reason: "not a valid unsigned integer",
                    ..
                }
            ),
            "{text}: {error}"
        );
    }
}

// CRLF endings, comments (also indented), blank lines, surrounding whitespace and a missing
// final newline are all accepted, and line numbers count every line.
#[test]
fn layout_and_line_numbers() {
    let body = "# header comment\r\n\r\n  \t# indented comment\n\ncpu v=1 10\r\n   cpu v=2 20   \t\ncpu v=3\t30\t\n\ncpu v=4";
    let batch = must_parse_with(body, Precision::Microseconds);
    assert_eq!(batch.len(), 4);
    let numbers: Vec<usize> = batch.lines().map(|line| line.line_number()).collect();
    assert_eq!(numbers, vec![5, 6, 7, 9]);
    let times: Vec<i64> = batch.lines().map(|line| line.time_us()).collect();
    assert_eq!(times, vec![10, 20, 30, DEFAULT_TIME_US]);
    // Several spaces between the sections are allowed.
    let point = single("cpu,host=a    v=1    7");
    assert_eq!(point.time_us, 0);
}

// An empty body, or one with only comments, is a valid empty batch.
#[test]
fn empty_bodies() {
    assert!(must_parse("").is_empty());
    assert!(must_parse("\n\r\n# only a comment\n   \n").is_empty());
}

// Every precision, including InfluxDB 1.x's minutes and hours, converts to microseconds.
#[test]
fn precisions() {
    let cases = [
        ("ns", Precision::Nanoseconds, 1_500_i64, 1_i64),
        ("n", Precision::Nanoseconds, -1, -1),
        ("us", Precision::Microseconds, 7, 7),
        ("u", Precision::Microseconds, -7, -7),
        ("ms", Precision::Milliseconds, 3, 3_000),
        ("s", Precision::Seconds, 2, 2_000_000),
        ("m", Precision::Minutes, 2, 120_000_000),
        ("h", Precision::Hours, -1, -3_600_000_000),
    ];
    for (text, precision, timestamp, micros) in cases {
        assert_eq!(Precision::parse(text), Ok(precision), "{text}");
        let point = match parse(
            format!("m v=1 {timestamp}").as_bytes(),
            precision,
            0,
            &limits(),
        ) {
            Ok(batch) => points(&batch).remove(0),
            Err(error) => panic!("{text}: {error}"),
        };
        assert_eq!(point.time_us, micros, "{text}");
    }
    // Floor division keeps pre-1970 nanosecond timestamps in order.
    assert_eq!(Precision::Nanoseconds.to_micros(-1_001), Some(-2));
    assert_eq!(
        Precision::Nanoseconds.to_micros(i64::MIN),
        Some(i64::MIN.div_euclid(1_000))
    );
    assert_eq!(
        Precision::Hours.to_micros(i64::MAX / 3_600_000_000),
        Some(i64::MAX / 3_600_000_000 * 3_600_000_000)
    );
}

// Unknown precision strings are refused before any line is looked at.
#[test]
fn unknown_precision() {
    for text in ["", "NS", "sec", "mn", "µs", "d"] {
        assert_eq!(
            Precision::parse(text),
            Err(UnknownPrecision(text.to_owned()))
        );
    }
    assert!(Precision::parse("xs")
        .unwrap_err()
        .to_string()
        .starts_with("unknown precision \"xs\""));
}

// A timestamp that does not fit in microseconds is an error naming its line.
#[test]
fn timestamp_overflow() {
    for (precision, timestamp) in [
        (Precision::Milliseconds, i64::MAX / 1_000 + 1),
        (Precision::Seconds, i64::MAX / 1_000_000 + 1),
        (Precision::Minutes, i64::MIN / 60_000_000 - 1),
        (Precision::Hours, i64::MAX / 3_600_000_000 + 1),
    ] {
        let body = format!("m v=1 1\nm v=1 {timestamp}");
        let error = match parse(body.as_bytes(), precision, 0, &limits()) {
            Ok(_) => panic!("{precision}: {timestamp} accepted"),
            Err(error) => error,
        };
        assert_eq!(error.line, 2);
        assert_eq!(
            error.kind,
            ParseErrorKind::TimestampOutOfRange {
                timestamp,
                precision
            }
        );
    }
}

// Timestamps must be plain signed 64-bit integers followed by nothing but blanks.
#[test]
fn invalid_timestamps() {
    for (text, reason) in [
        ("12a", "not an integer"),
        ("1.5", "not an integer"),
        ("+5", "not an integer"),
        ("-", "not an integer"),
        ("9223372036854775808", "out of range for a 64-bit integer"),
    ] {
        let error = must_fail(&format!("m v=1 {text}"));
        assert_eq!(error.line, 1);
        assert_eq!(
            error.kind,
            ParseErrorKind::InvalidTimestamp {
                text: text.into(),
                reason
            },
            "{text}"
        );
    }
    let error = must_fail("m v=1 1 2");
    assert_eq!(
        error.kind,
        ParseErrorKind::TextAfterTimestamp { text: "2".into() }
    );
    assert_eq!(
        single("m v=1 -9223372036854775808").time_us,
        i64::MIN.div_euclid(1_000)
    );
}

// ---------------------------------------------------------------------------------------------
// Refused syntax: each error names the right line and kind.

/// Asserts that `bad` placed as line 2 after a good line fails on line 2 with `kind`.
fn assert_fails_on_line_2(bad: &str, kind: ParseErrorKind) {
    let body = format!("ok v=1\n{bad}\nok v=2");
    let error = must_fail(&body);
    assert_eq!((error.line, &error.kind), (2, &kind), "{bad:?}: {error}");
}

// Lines without a field set, in every position where it can go missing.
#[test]
fn missing_fields() {
    for bad in ["cpu", "cpu ", "cpu,host=a", "cpu,host=a ", "cpu,host=a   "] {
        assert_fails_on_line_2(bad, ParseErrorKind::MissingFields);
    }
    assert_eq!(must_fail("x\ncpu").to_string(), "line 1: missing fields");
}

// Structural errors in the tag set and the field set.
#[test]
fn structural_errors() {
    assert_fails_on_line_2(",host=a v=1", ParseErrorKind::MissingMeasurement);
    assert_fails_on_line_2("cpu,=a v=1", ParseErrorKind::MissingTagKey);
    assert_fails_on_line_2("cpu, v=1", ParseErrorKind::MissingTagKey);
    assert_fails_on_line_2(
        "cpu,host v=1",
        ParseErrorKind::MissingTagValue { key: "host".into() },
    );
    assert_fails_on_line_2(
        "cpu,host= v=1",
        ParseErrorKind::MissingTagValue { key: "host".into() },
    );
    assert_fails_on_line_2(
        "cpu,host=,a=b v=1",
        ParseErrorKind::MissingTagValue { key: "host".into() },
    );
    assert_fails_on_line_2(
        "cpu,host=a=b v=1",
        ParseErrorKind::UnescapedEqualsInTagValue { key: "host".into() },
    );
    assert_fails_on_line_2("cpu =1", ParseErrorKind::MissingFieldKey);
    assert_fails_on_line_2("cpu v=1,", ParseErrorKind::MissingFieldKey);
    assert_fails_on_line_2("cpu v=1,,w=2", ParseErrorKind::MissingFieldKey);
    assert_fails_on_line_2(
        "cpu v",
        ParseErrorKind::MissingFieldValue { key: "v".into() },
    );
    assert_fails_on_line_2(
        "cpu v=",
        ParseErrorKind::MissingFieldValue { key: "v".into() },
    );
    assert_fails_on_line_2(
        "cpu v= 1",
        ParseErrorKind::MissingFieldValue { key: "v".into() },
    );
    assert_fails_on_line_2(
        "cpu v=1,w",
        ParseErrorKind::MissingFieldValue { key: "w".into() },
    );
    assert_fails_on_line_2(
        "cpu s=\"x\"y",
        ParseErrorKind::TextAfterString {
            key: "s".into(),
            found: 'y',
        },
    );
}

// A backslash at the end of the line, in any escapable element, is a bad escape.
#[test]
fn bad_escapes() {
    assert_fails_on_line_2("cpu\\", ParseErrorKind::BadEscape(Element::Measurement));
    assert_fails_on_line_2("cpu,host\\", ParseErrorKind::BadEscape(Element::TagKey));
    assert_fails_on_line_2("cpu,host=a\\", ParseErrorKind::BadEscape(Element::TagValue));
    assert_fails_on_line_2("cpu v\\", ParseErrorKind::BadEscape(Element::FieldKey));
    // With CRLF the backslash still ends the line.
    let error = must_fail("cpu,host=a\\\r\n");
    assert_eq!(
        (error.line, error.kind),
        (1, ParseErrorKind::BadEscape(Element::TagValue))
    );
    assert_eq!(
        must_fail("cpu v\\").to_string(),
        "line 1: bad escape: a backslash ends the line in the field key"
    );
}

// Strings must be closed on their own line; a newline does not continue them.
#[test]
fn unterminated_strings() {
    assert_fails_on_line_2(
        "cpu s=\"abc",
        ParseErrorKind::UnterminatedString { key: "s".into() },
    );
    assert_fails_on_line_2(
        "cpu s=\"abc\\\"",
        ParseErrorKind::UnterminatedString { key: "s".into() },
    );
    assert_fails_on_line_2(
        "cpu s=\"abc\\",
        ParseErrorKind::UnterminatedString { key: "s".into() },
    );
    let error = must_fail("cpu s=\"first\nsecond\"");
    assert_eq!(
        (error.line, error.kind),
        (1, ParseErrorKind::UnterminatedString { key: "s".into() })
    );
}

// Invalid UTF-8 is reported on its own line, after any earlier error.
#[test]
fn invalid_utf8() {
    let error = must_fail_bytes(b"cpu v=1\ncpu v=2\ncpu,host=\xff v=1\n");
    assert_eq!((error.line, error.kind), (3, ParseErrorKind::InvalidUtf8));
    // A truncated multi-byte sequence at the very end.
    let error = must_fail_bytes(b"cpu v=1\ncpu s=\"\xe2\x82");
    assert_eq!((error.line, error.kind), (2, ParseErrorKind::InvalidUtf8));
    // An earlier syntax error wins.
    let error = must_fail_bytes(b"cpu\ncpu,host=\xff v=1\n");
    assert_eq!((error.line, error.kind), (1, ParseErrorKind::MissingFields));
}

// A line longer than the limit is its own error kind, even if it is also malformed or a comment.
#[test]
fn line_too_long() {
    let limits = ParseLimits {
        line_bytes_max: 16,
        ..ParseLimits::default()
    };
    let ok = "m v=1 1234567890"; // exactly 16 bytes
    assert!(parse(
        format!("{ok}\r\n").as_bytes(),
        Precision::Nanoseconds,
        0,
        &limits
    )
    .is_ok());
    for bad in [
        "m v=1 12345678901",
        "# a long comment line",
        "garbage garbage garbage",
    ] {
        let error = match parse(
            format!("{ok}\n{bad}\n").as_bytes(),
            Precision::Nanoseconds,
            0,
            &limits,
        ) {
            Ok(_) => panic!("{bad:?} accepted"),
            Err(error) => error,
        };
        assert_eq!(error.line, 2);
        assert_eq!(
            error.kind,
            ParseErrorKind::LineTooLong {
                bytes: bad.len(),
                bytes_max: 16
            }
        );
    }
}

// The column limit counts tags and fields together.
#[test]
fn too_many_columns() {
    let limits = ParseLimits {
        columns_per_line_max: 3,
        ..ParseLimits::default()
    };
    assert!(parse(b"m,a=1,b=2 c=3", Precision::Nanoseconds, 0, &limits).is_ok());
    let error = match parse(b"m,a=1,b=2 c=3,d=4", Precision::Nanoseconds, 0, &limits) {
        Ok(_) => panic!("accepted"),
        Err(error) => error,
    };
    assert_eq!(
        (error.line, error.kind),
        (1, ParseErrorKind::TooManyColumns { columns_max: 3 })
    );
}

// Name rules from crate::names apply to measurements, tag keys and field keys.
#[test]
fn name_violations() {
    let error = must_fail("1cpu v=1");
    assert_eq!(
        error.to_string(),
        "line 1: invalid measurement name \"1cpu\": must start with an ASCII letter"
    );
    assert_fails_on_line_2(
        "cpu.load v=1",
        ParseErrorKind::InvalidMeasurement {
            name: "cpu.load".into(),
            error: NameError::InvalidCharacter('.'),
        },
    );
    assert_fails_on_line_2(
        "cpu,time=x v=1",
        ParseErrorKind::InvalidTagKey {
            name: "time".into(),
            error: NameError::Reserved,
        },
    );
    assert_fails_on_line_2(
        "cpu Time=1",
        ParseErrorKind::InvalidFieldKey {
            name: "Time".into(),
            error: NameError::Reserved,
        },
    );
    assert_fails_on_line_2(
        "cpu __x=1",
        ParseErrorKind::InvalidFieldKey {
            name: "__x".into(),
            error: NameError::ReservedPrefix,
        },
    );
    assert_fails_on_line_2(
        "cpu,a\u{7}b=x v=1",
        ParseErrorKind::InvalidTagKey {
            name: "a\u{7}b".into(),
            error: NameError::ControlCharacter('\u{7}'),
        },
    );
    let long_key = "k".repeat(129);
    let error = must_fail(&format!("cpu {long_key}=1"));
    assert!(matches!(
        error.kind,
        ParseErrorKind::InvalidFieldKey {
            error: NameError::TooLong {
                bytes: 129,
                bytes_max: 128
            },
            ..
        }
    ));
    // Error messages cut long names.
    assert!(error.to_string().contains(&format!("{}…", "k".repeat(64))));
    // The check also runs when only the measurement changes from one line to the next.
    let error = must_fail("o_k v=1\no_k v=2\nbad.name v=1");
    assert_eq!(
        (error.line, error.kind),
        (
            3,
            ParseErrorKind::InvalidMeasurement {
                name: "bad.name".into(),
                error: NameError::InvalidCharacter('.')
            }
        )
    );
}

// Duplicate keys within a line, and a key used as both tag and field.
#[test]
fn duplicate_keys() {
    assert_fails_on_line_2(
        "cpu,host=a,host=b v=1",
        ParseErrorKind::DuplicateTag { key: "host".into() },
    );
    assert_fails_on_line_2(
        "cpu,b=1,a=2,b=3 v=1",
        ParseErrorKind::DuplicateTag { key: "b".into() },
    );
    assert_fails_on_line_2(
        "cpu v=1,v=2",
        ParseErrorKind::DuplicateField { key: "v".into() },
    );
    assert_fails_on_line_2(
        "cpu v=1,w=2i,v=2i",
        ParseErrorKind::DuplicateField { key: "v".into() },
    );
    assert_fails_on_line_2(
        "cpu,host=a host=1",
        ParseErrorKind::TagAndField { key: "host".into() },
    );
    // Many fields take the sorting path of the duplicate check.
    let mut line = String::from("cpu ");
    for index in 0..40 {
        line.push_str(&format!("f{index}=1,"));
    }
    line.push_str("f17=2");
    assert_fails_on_line_2(&line, ParseErrorKind::DuplicateField { key: "f17".into() });
    // Many tags take the general sort.
    let mut line = String::from("cpu");
    for index in (0..40).rev() {
        line.push_str(&format!(",t{index}=x"));
    }
    line.push_str(",t3=y v=1");
    assert_fails_on_line_2(&line, ParseErrorKind::DuplicateTag { key: "t3".into() });
}

// A field keeps one type per measurement within a request; other measurements are independent.
#[test]
fn field_type_conflicts() {
    let error = must_fail("cpu x=1\ncpu y=2\nmem x=1i\ncpu y=3,z=1\ncpu x=1i");
    assert_eq!(error.line, 5);
    assert_eq!(
        error.kind,
        ParseErrorKind::FieldTypeConflict {
            measurement: "cpu".into(),
            key: "x".into(),
            here: FieldType::Integer,
            earlier: FieldType::Float,
        }
    );
    assert_eq!(
        error.to_string(),
        "line 5: field \"x\" is integer here but float earlier in this request"
    );
    for (first, second) in [("1u", "1i"), ("t", "\"t\""), ("\"1\"", "1"), ("1", "true")] {
        let error = must_fail(&format!("cpu v={first}\n\ncpu v={second}"));
        assert_eq!(error.line, 3, "{first} then {second}");
        assert!(matches!(
            error.kind,
            ParseErrorKind::FieldTypeConflict { .. }
        ));
    }
    // The same field with the same type on many lines is fine.
    assert_eq!(
        must_parse("cpu v=1\ncpu v=2,w=1i\ncpu w=3i,v=4\nmem v=1i").len(),
        4
    );
}

// A column is a tag or a field for the whole request, within one measurement.
#[test]
fn column_role_conflicts() {
    let error = must_fail("cpu,host=a v=1\ncpu host=\"a\"");
    assert_eq!(error.line, 2);
    assert_eq!(
        error.kind,
        ParseErrorKind::ColumnRoleConflict {
            measurement: "cpu".into(),
            key: "host".into(),
            here: ColumnRole::Field,
            earlier: ColumnRole::Tag,
        }
    );
    assert_eq!(
        error.to_string(),
        "line 2: \"host\" is a field here but a tag earlier in this request"
    );
    let error = must_fail("cpu v=1\ncpu,v=x w=1");
    assert_eq!(error.line, 2);
    assert!(matches!(
        error.kind,
        ParseErrorKind::ColumnRoleConflict {
            here: ColumnRole::Tag,
            earlier: ColumnRole::Field,
            ..
        }
    ));
    // Different measurements may use the same name differently.
    assert_eq!(must_parse("cpu,host=a v=1\nmem host=1").len(), 2);
}

// Bodies too large for the 31-bit offsets are refused up front, with line 0.
#[test]
fn body_too_large_is_refused_without_parsing() {
    assert_eq!(BODY_BYTES_MAX, i32::MAX as usize);
    assert_eq!(
        ParseError {
            line: 0,
            kind: ParseErrorKind::BodyTooLarge {
                bytes: 1 << 31,
                bytes_max: BODY_BYTES_MAX
            }
        }
        .to_string(),
        "line 0: body is 2147483648 bytes, the parser accepts at most 2147483647"
    );
}

// Buffers handed back by a batch parse the next body with the same results.
#[test]
fn buffers_are_reusable() {
    let first = must_parse("cpu,host=a\\ b v=1 1\ncpu,host=c v=2 2");
    let expected_first = points(&first);
    let buffers = first.into_buffers();
    let second = match parse_with(
        buffers,
        b"mem,z=1,a=2 x=1i 3",
        Precision::Nanoseconds,
        0,
        &limits(),
    ) {
        Ok(batch) => batch,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(
        points(&second),
        vec![Point {
            measurement: "mem".into(),
            tags: tags(&[("a", "2"), ("z", "1")]),
            fields: vec![("x".into(), OwnedValue::Integer(1))],
            time_us: 0,
        }]
    );
    assert_eq!(expected_first[0].tags, tags(&[("host", "a b")]));
    // The request-wide schema does not leak from one request into the next.
    let buffers = second.into_buffers();
    assert!(parse_with(buffers, b"mem x=1", Precision::Nanoseconds, 0, &limits()).is_ok());
}

// The newline search finds every newline whatever its position in an 8-byte word.
#[test]
fn newline_search() {
    for length in 0..40 {
        for newline_at in 0..=length {
            let mut bytes = vec![b'a'; length];
            if newline_at < length {
                bytes[newline_at] = b'\n';
            }
            let expected = bytes.iter().position(|&byte| byte == b'\n');
            for from in 0..=length {
                let expected = expected.filter(|&index| index >= from);
                assert_eq!(
                    find_newline(&bytes, from),
                    expected,
                    "{length} {newline_at} {from}"
                );
            }
        }
    }
    // Bytes just below and above '\n' must not match.
    assert_eq!(find_newline(b"\x09\x0b\x0a\x8a", 0), Some(2));
    assert_eq!(
        find_newline(&[0x0b, 0x09, 0x8a, 0x0b, 0x09, 0x8a, 0x00, 0x0a, 0x0a], 0),
        Some(7)
    );
}

// write_line produces canonical line protocol that parses back to the same point.
#[test]
fn write_line_round_trips() {
    let body = r#"cpu,z=a\ b,a=c\,d v=1.5,s="q\"\\x",b=t,i=-3i,u=7u 1500"#;
    let batch = must_parse(body);
    let mut out = String::new();
    for line in batch.lines() {
        write_line(&mut out, &line);
    }
    assert_eq!(
        out,
        "cpu,a=c\\,d,z=a\\ b v=1.5,s=\"q\\\"\\\\x\",b=true,i=-3i,u=7u 1\n"
    );
    let again = must_parse_with(&out, Precision::Microseconds);
    assert_eq!(points(&again), points(&batch));
}

// ---------------------------------------------------------------------------------------------
// Property tests.

/// A point as generated, before serialization.
#[derive(Debug, Clone)]
struct GeneratedLine {
    measurement: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, GeneratedValue)>,
    timestamp: Option<i64>,
}

#[derive(Debug, Clone)]
enum GeneratedValue {
    Float(f64, bool),
    Integer(i64),
    Unsigned(u64),
    Boolean(bool, usize),
    String(String),
}

const TRUE_SPELLINGS: [&str; 5] = ["t", "T", "true", "True", "TRUE"];
const FALSE_SPELLINGS: [&str; 5] = ["f", "F", "false", "False", "FALSE"];

/// Characters that exercise escaping and UTF-8, plus ordinary ones.
fn name_character() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => proptest::sample::select(vec![',', '=', ' ', '\\', '"', '#', 'é', '✓', '_', '-', '0', '\u{1F600}']),
    ]
}

/// A valid tag or field key: may contain anything needing an escape but cannot end in a
/// backslash (the one name line protocol cannot express).
fn column_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(name_character(), 1..8)
        .prop_map(|characters| characters.into_iter().collect::<String>())
        .prop_filter("representable valid column", |name| {
            !name.ends_with('\\') && names::validate_column(name).is_ok()
        })
}

fn tag_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![4 => name_character(), 1 => proptest::sample::select(vec!['\t', '\r'])],
        1..8,
    )
    .prop_map(|characters| characters.into_iter().collect::<String>())
    .prop_filter("representable", |value| !value.ends_with('\\'))
}

fn string_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![4 => name_character(), 1 => proptest::sample::select(vec!['\t', '\r'])],
        0..12,
    )
    .prop_map(|characters| characters.into_iter().collect::<String>())
}

fn finite_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
        (-1_000_000i64..1_000_000, 0u32..6)
            .prop_map(|(mantissa, scale)| mantissa as f64 / 10f64.powi(scale as i32)),
    ]
}

fn field_value() -> impl Strategy<Value = GeneratedValue> {
    prop_oneof![
        (finite_float(), any::<bool>())
            .prop_map(|(value, debug)| GeneratedValue::Float(value, debug)),
        any::<i64>().prop_map(GeneratedValue::Integer),
        any::<u64>().prop_map(GeneratedValue::Unsigned),
        (any::<bool>(), 0usize..5)
            .prop_map(|(value, spelling)| GeneratedValue::Boolean(value, spelling)),
        string_value().prop_map(GeneratedValue::String),
    ]
}

fn measurement_name() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9_-]{0,15}"
}

fn generated_line() -> impl Strategy<Value = GeneratedLine> {
    (
        measurement_name(),
        proptest::collection::btree_map(column_name(), tag_value(), 0..5),
        proptest::collection::btree_map(column_name(), field_value(), 1..6),
        proptest::option::of(any::<i64>()),
        any::<u64>(),
    )
        .prop_map(|(measurement, tags, fields, timestamp, shuffle_seed)| {
            let mut tags: Vec<(String, String)> = tags.into_iter().collect();
            // Write the tags in a scrambled order; the parser must sort them.
            if !tags.is_empty() {
                let rotation = (shuffle_seed as usize) % tags.len();
                tags.rotate_left(rotation);
                if shuffle_seed & 1 == 1 {
                    tags.reverse();
                }
            }
            let fields = fields
                .into_iter()
                .filter(|(key, _)| !tags.iter().any(|(tag, _)| tag == key))
                .collect::<Vec<_>>();
            GeneratedLine {
                measurement,
                tags,
                fields,
                timestamp,
            }
        })
        .prop_filter("at least one field left", |line| !line.fields.is_empty())
}

fn escape(out: &mut String, text: &str, special: &[char]) {
    for character in text.chars() {
        if special.contains(&character) {
            out.push('\\');
        }
        out.push(character);
    }
}

fn serialize(line: &GeneratedLine, out: &mut String) {
    escape(out, &line.measurement, &[',', ' ']);
    for (key, value) in &line.tags {
        out.push(',');
        escape(out, key, &[',', '=', ' ']);
        out.push('=');
        escape(out, value, &[',', '=', ' ']);
    }
    for (index, (key, value)) in line.fields.iter().enumerate() {
        out.push(if index == 0 { ' ' } else { ',' });
        escape(out, key, &[',', '=', ' ']);
        out.push('=');
        match value {
            GeneratedValue::Float(value, true) => out.push_str(&format!("{value:?}")),
            GeneratedValue::Float(value, false) => out.push_str(&format!("{value}")),
            GeneratedValue::Integer(value) => out.push_str(&format!("{value}i")),
            GeneratedValue::Unsigned(value) => out.push_str(&format!("{value}u")),
            GeneratedValue::Boolean(true, spelling) => out.push_str(TRUE_SPELLINGS[*spelling]),
            GeneratedValue::Boolean(false, spelling) => out.push_str(FALSE_SPELLINGS[*spelling]),
            GeneratedValue::String(value) => {
                out.push('"');
                escape(out, value, &['"', '\\']);
                out.push('"');
            }
        }
    }
    if let Some(timestamp) = line.timestamp {
        out.push_str(&format!(" {timestamp}"));
    }
}

fn expected_point(line: &GeneratedLine, precision: Precision) -> Option<Point> {
    let mut tags = line.tags.clone();
    tags.sort();
    let time_us = match line.timestamp {
        None => DEFAULT_TIME_US,
        Some(timestamp) => precision.to_micros(timestamp)?,
    };
    Some(Point {
        measurement: line.measurement.clone(),
        tags,
        fields: line
            .fields
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    GeneratedValue::Float(value, _) => OwnedValue::Float(value.to_bits()),
                    GeneratedValue::Integer(value) => OwnedValue::Integer(*value),
                    GeneratedValue::Unsigned(value) => OwnedValue::Unsigned(*value),
                    GeneratedValue::Boolean(value, _) => OwnedValue::Boolean(*value),
                    GeneratedValue::String(value) => OwnedValue::String(value.clone()),
                };
                (key.clone(), value)
            })
            .collect(),
        time_us,
    })
}

fn precision() -> impl Strategy<Value = Precision> {
    proptest::sample::select(vec![
        Precision::Nanoseconds,
        Precision::Microseconds,
        Precision::Milliseconds,
        Precision::Seconds,
        Precision::Minutes,
        Precision::Hours,
    ])
}

/// Parses arbitrary input and, if it is accepted, checks that the batch upholds the parser's
/// promises: valid names, sorted tags, and a canonical rewrite that parses back identically.
fn check_arbitrary(body: &[u8]) {
    let Ok(batch) = parse(body, Precision::Nanoseconds, DEFAULT_TIME_US, &limits()) else {
        return;
    };
    let mut rewritten = String::new();
    for line in batch.lines() {
        assert!(names::validate_measurement(line.measurement()).is_ok());
        let tags: Vec<_> = line.tags().collect();
        assert!(tags.windows(2).all(|pair| pair[0].0 < pair[1].0));
        for (key, value) in &tags {
            assert!(names::validate_column(key).is_ok());
            assert!(!value.is_empty());
        }
        assert!(line.fields().len() > 0);
        for (key, value) in line.fields() {
            assert!(names::validate_column(key).is_ok());
            if let FieldValue::Float(value) = value {
                assert!(value.is_finite());
            }
        }
        write_line(&mut rewritten, &line);
    }
    let again = match parse(rewritten.as_bytes(), Precision::Microseconds, 0, &limits()) {
        Ok(batch) => batch,
        Err(error) => panic!("rewrite {rewritten:?} failed: {error}"),
    };
    assert_eq!(points(&again), points(&batch));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    // One generated line, serialized with correct escaping, parses back to exactly what was
    // generated (tags sorted), or fails only because its timestamp overflows.
    #[test]
    fn generated_line_round_trips(line in generated_line(), precision in precision()) {
        let mut body = String::new();
        serialize(&line, &mut body);
        let result = parse(body.as_bytes(), precision, DEFAULT_TIME_US, &limits());
        match (expected_point(&line, precision), result) {
            (Some(expected), Ok(batch)) => prop_assert_eq!(points(&batch), vec![expected]),
            (None, Err(error)) => {
                prop_assert_eq!(error.line, 1);
                let is_range_error = matches!(error.kind, ParseErrorKind::TimestampOutOfRange { .. });
                prop_assert!(is_range_error);
            }
            (Some(_), Err(error)) => prop_assert!(false, "{:?} failed: {}", body, error),
            (None, Ok(_)) => prop_assert!(false, "{:?} accepted an overflowing timestamp", body),
        }
    }

    // Many lines sharing one schema (the agent case that takes the schema cache), mixed with
    // blank lines, comments and CRLF, parse back in order.
    #[test]
    fn generated_batches_round_trip(
        template in generated_line(),
        rows in proptest::collection::vec((proptest::collection::vec(tag_value(), 5), any::<i64>(), any::<u64>(), 0u8..4), 1..20),
    ) {
        let mut body = String::new();
        let mut expected = Vec::new();
        for (line_index, (tag_values, integer, seed, separator)) in rows.iter().enumerate() {
            let mut line = template.clone();
            for ((_, value), new_value) in line.tags.iter_mut().zip(tag_values) {
                *value = new_value.clone();
            }
            // Change the values but not the types, so the request stays consistent.
            for (_, value) in line.fields.iter_mut() {
                *value = match value {
                    GeneratedValue::Float(_, debug) => GeneratedValue::Float(*integer as f64 / 7.0, *debug),
                    GeneratedValue::Integer(_) => GeneratedValue::Integer(*integer),
                    GeneratedValue::Unsigned(_) => GeneratedValue::Unsigned(*seed),
                    GeneratedValue::Boolean(_, spelling) => GeneratedValue::Boolean(seed & 1 == 1, *spelling),
                    GeneratedValue::String(_) => GeneratedValue::String(format!("v{seed}")),
                };
            }
            if line.tags.len() > 1 && seed & 2 == 2 {
                line.tags.swap(0, 1);
            }
            line.timestamp = Some(line_index as i64 * 1_000);
            serialize(&line, &mut body);
            body.push_str(match separator {
                0 => "\n",
                1 => "\r\n",
                2 => "\n\n",
                _ => "\n# comment\n",
            });
            if let Some(point) = expected_point(&line, Precision::Nanoseconds) {
                expected.push(point);
            }
        }
        let batch = match parse(body.as_bytes(), Precision::Nanoseconds, DEFAULT_TIME_US, &limits()) {
            Ok(batch) => batch,
            Err(error) => return Err(TestCaseError::fail(format!("{body:?}: {error}"))),
        };
        prop_assert_eq!(points(&batch), expected);
    }

    // Arbitrary bytes never panic, and whatever is accepted is consistent.
    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_arbitrary(&body);
    }

    // Text biased towards line-protocol syntax reaches deeper into the parser.
    #[test]
    fn arbitrary_syntax_never_panics(
        body in proptest::collection::vec(
            proptest::sample::select(vec![
                "cpu", "m", "1", "-", ".", "e", "i", "u", "t", "f", "true", ",", "=", " ", "\t", "\\",
                "\"", "\n", "\r", "#", "host", "v", "é", "\u{85}", "time", "__", "9999999999999999999",
            ]),
            0..40,
        )
    ) {
        check_arbitrary(body.concat().as_bytes());
    }
}
