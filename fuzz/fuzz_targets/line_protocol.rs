//! Fuzz target: the line-protocol parser on arbitrary bytes.
//!
//! Checks that parsing never panics and that whatever it accepts keeps the parser's promises:
//! valid names, tags sorted by key without duplicates, at least one field per point, finite
//! floats, an error line number inside the body, the same result with reused buffers, and a
//! canonical rewrite (`write_line`) that parses back to exactly the same rewrite.

#![no_main]

use libfuzzer_sys::fuzz_target;

// Compile the parser's own source files into this crate, so the fuzzer does not build the whole
// node. `line_protocol.rs` refers to `crate::names`, which these declarations provide.
#[allow(dead_code)]
#[path = "../../src/names.rs"]
mod names;

#[allow(dead_code)]
#[path = "../../src/line_protocol.rs"]
mod line_protocol;

use line_protocol::{parse, parse_with, write_line, FieldValue, ParseBuffers, ParseLimits, Precision};

const PRECISIONS: [Precision; 6] = [
    Precision::Nanoseconds,
    Precision::Microseconds,
    Precision::Milliseconds,
    Precision::Seconds,
    Precision::Minutes,
    Precision::Hours,
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the precision and a small line limit now and then, so that the
    // LineTooLong and TooManyColumns paths are reached too.
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let precision = PRECISIONS[usize::from(selector % 6)];
    let limits = if selector & 0x80 != 0 {
        ParseLimits { line_bytes_max: 32, columns_per_line_max: 4 }
    } else {
        ParseLimits::default()
    };
    let default_time_us = 1_700_000_000_000_000;

    let fresh = parse(body, precision, default_time_us, &limits);
    // Reused buffers, dirty from another request, give the same outcome.
    let dirty = match parse(b"warm,up=yes value=1,other=\"x\\\"y\" 1\nwarm value=2", precision, 0, &limits) {
        Ok(batch) => batch.into_buffers(),
        Err(_) => ParseBuffers::new(),
    };
    let reused = parse_with(dirty, body, precision, default_time_us, &limits);

    let batch = match (fresh, reused) {
        (Err(fresh), Err(reused)) => {
            assert_eq!(fresh, reused);
            let line_count = body.iter().filter(|&&byte| byte == b'\n').count() + 1;
            assert!(fresh.line >= 1 && fresh.line <= line_count, "{fresh}");
            return;
        }
        (Ok(fresh), Ok(reused)) => {
            let mut fresh_text = String::new();
            let mut reused_text = String::new();
            fresh.lines().for_each(|line| write_line(&mut fresh_text, &line));
            reused.lines().for_each(|line| write_line(&mut reused_text, &line));
            assert_eq!(fresh_text, reused_text);
            fresh
        }
        (fresh, reused) => panic!("fresh {:?} but reused {:?}", fresh.err(), reused.err()),
    };

    let mut rewritten = String::new();
    for line in batch.lines() {
        assert!(names::validate_measurement(line.measurement()).is_ok());
        let tags: Vec<(&str, &str)> = line.tags().collect();
        assert!(tags.windows(2).all(|pair| pair[0].0 < pair[1].0), "{tags:?}");
        for (key, value) in &tags {
            assert!(names::validate_column(key).is_ok());
            assert!(!value.is_empty());
        }
        assert!(line.fields().len() > 0);
        for (key, value) in line.fields() {
            assert!(names::validate_column(key).is_ok());
            assert!(!tags.iter().any(|(tag, _)| *tag == key));
            if let FieldValue::Float(value) = value {
                assert!(value.is_finite());
            }
        }
        write_line(&mut rewritten, &line);
    }
    let again = parse(rewritten.as_bytes(), Precision::Microseconds, 0, &ParseLimits::default())
        .unwrap_or_else(|error| panic!("rewrite {rewritten:?} refused: {error}"));
    let mut rewritten_again = String::new();
    again.lines().for_each(|line| write_line(&mut rewritten_again, &line));
    assert_eq!(rewritten, rewritten_again);
});
