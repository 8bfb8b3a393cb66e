//! Query tests through the real HTTP API: golden results over a known dataset that is partly in
//! Parquet and partly unflushed, fresh reads, Arrow IPC, the sandbox, and queries racing
//! flushes.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use harness::{Client, Node, NodeOptions};
use serde_json::{json, Value};

/// Runs `sql` and returns the JSON answer, failing the test on anything but 200.
fn must_query(node: &Node, sql: &str, headers: &[(&str, &str)]) -> Value {
    let body = json!({ "sql": sql }).to_string();
    let response = node.post("/api/v1/query", headers, body.as_bytes());
    assert_eq!(response.status, 200, "{sql}: {}", response.text());
    let value = harness::json(&response);
    assert_eq!(value["success"], true, "{sql}: {value}");
    value
}

fn data(value: &Value) -> Vec<Vec<Value>> {
    value["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().clone())
        .collect()
}

/// 2026-11-22T00:00:00Z in microseconds.
const BASE_US: i64 = 1_795_305_600_000_000;
const HOSTS: [(&str, &str); 3] = [("a", "eu"), ("b", "eu"), ("c", "us")];

fn usage(host: usize, minute: i64) -> f64 {
    ((host as i64 * 31 + minute * 7) % 100) as f64 + 0.5
}

/// Line protocol for minutes `range` of every host: `cpu,host=,region= usage=..,n=..i`.
fn dataset(range: std::ops::Range<i64>) -> String {
    let mut body = String::new();
    for minute in range {
        for (index, (host, region)) in HOSTS.iter().enumerate() {
            body.push_str(&format!(
                "cpu,host={host},region={region} usage={},n={minute}i {}\n",
                usage(index, minute),
                BASE_US + minute * 60_000_000
            ));
        }
    }
    body
}

// The golden set: minutes 0..30 are flushed to Parquet (a graceful restart flushes), minutes
// 30..60 are only in the buffers. Every query must see each of the 180 rows exactly once, and
// its answer must equal what the test computes from the dataset itself.
#[test]
fn golden_queries_over_flushed_and_unflushed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let response = node.post(
        "/write?db=golden&precision=us",
        &[],
        dataset(0..30).as_bytes(),
    );
    assert_eq!(response.status, 204, "{}", response.text());
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("golden"), 90);
    let response = node.post(
        "/write?db=golden&precision=us",
        &[],
        dataset(30..60).as_bytes(),
    );
    assert_eq!(response.status, 204, "{}", response.text());

    let answer = must_query(
        &node,
        "SELECT count(*) AS rows, count(DISTINCT (host, time)) FROM golden.cpu",
        &[],
    );
    assert_eq!(answer["columns"][0], "rows");
    assert_eq!(data(&answer), vec![vec![json!(180), json!(180)]]);
    assert_eq!(answer["row_count"], 1);

    // Group by tag with aggregates.
    let answer = must_query(
        &node,
        "SELECT host, count(*), min(usage), max(usage), sum(n) FROM golden.cpu GROUP BY host ORDER BY host",
        &[],
    );
    let expected: Vec<Vec<Value>> = HOSTS
        .iter()
        .enumerate()
        .map(|(index, (host, _))| {
            let values: Vec<f64> = (0..60).map(|m| usage(index, m)).collect();
            vec![
                json!(host),
                json!(60),
                json!(values.iter().cloned().fold(f64::MAX, f64::min)),
                json!(values.iter().cloned().fold(f64::MIN, f64::max)),
                json!((0..60).sum::<i64>()),
            ]
        })
        .collect();
    assert_eq!(data(&answer), expected);

    // Time bucketing: ten-minute buckets hold 30 rows each.
    let answer = must_query(
        &node,
        "SELECT time_bucket(INTERVAL '10 minutes', time) AS bucket, count(*) FROM golden.cpu GROUP BY bucket ORDER BY bucket",
        &[],
    );
    let rows = data(&answer);
    assert_eq!(rows.len(), 6);
    assert_eq!(
        rows[0],
        vec![json!("2026-11-22T00:00:00.000000Z"), json!(30)]
    );
    assert!(rows.iter().all(|r| r[1] == json!(30)));

    // Filters on a tag and a field.
    let answer = must_query(
        &node,
        "SELECT count(*) FROM golden.cpu WHERE region = 'eu' AND usage > 50",
        &[],
    );
    let expected = (0..2)
        .flat_map(|h| (0..60).map(move |m| usage(h, m)))
        .filter(|&u| u > 50.0)
        .count();
    assert_eq!(data(&answer), vec![vec![json!(expected)]]);

    // Last value per series.
    let answer = must_query(
        &node,
        "SELECT host, arg_max(usage, time), max(time) FROM golden.cpu GROUP BY host ORDER BY host",
        &[],
    );
    let expected: Vec<Vec<Value>> = HOSTS
        .iter()
        .enumerate()
        .map(|(index, (host, _))| {
            vec![
                json!(host),
                json!(usage(index, 59)),
                json!("2026-11-22T00:59:00.000000Z"),
            ]
        })
        .collect();
    assert_eq!(data(&answer), expected);

    // A bare measurement with the Arc database header, and the same via the JSON body.
    let answer = must_query(
        &node,
        "SELECT count(*) FROM cpu",
        &[("x-arc-database", "golden")],
    );
    assert_eq!(data(&answer), vec![vec![json!(180)]]);

    // Listing.
    let databases = harness::json(&node.must_get("/api/v1/databases"));
    assert!(databases["databases"]
        .as_array()
        .unwrap()
        .contains(&json!("golden")));
    let measurements = harness::json(&node.must_get("/api/v1/databases/golden/measurements"));
    assert_eq!(measurements["measurements"], json!(["cpu"]));
    assert_eq!(
        node.must_get("/api/v1/databases/nope/measurements").status,
        404
    );
}

// A row acknowledged a moment ago is in the next query's answer, flushed or not.
#[test]
fn fresh_rows_are_visible_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    for i in 0..20 {
        node.must_write("fresh", &format!("m,host=h v={i} {}\n", BASE_US * 1000 + i));
        let answer = must_query(&node, "SELECT count(*), max(v) FROM fresh.m", &[]);
        assert_eq!(data(&answer), vec![vec![json!(i + 1), json!(i as f64)]]);
    }
}

// The Arrow endpoint streams an IPC stream that pyarrow (here: arrow-rs) reads, with the same
// rows as the JSON answer.
#[test]
fn arrow_ipc_matches_json() {
    use arrow::array::AsArray;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let response = node.post(
        "/write?db=arrow&precision=us",
        &[],
        dataset(0..10).as_bytes(),
    );
    assert_eq!(response.status, 204);
    let sql = "SELECT host, usage FROM arrow.cpu ORDER BY time, host";
    let response = node.post(
        "/api/v1/query/arrow",
        &[],
        json!({ "sql": sql }).to_string().as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/vnd.apache.arrow.stream")
    );
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(response.body), None)
            .unwrap();
    let mut from_arrow = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let hosts =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let hosts = hosts.as_string::<i32>();
        let usage = batch
            .column(1)
            .as_primitive::<arrow::datatypes::Float64Type>();
        for row in 0..batch.num_rows() {
            from_arrow.push(vec![json!(hosts.value(row)), json!(usage.value(row))]);
        }
    }
    assert_eq!(from_arrow, data(&must_query(&node, sql, &[])));
    assert_eq!(from_arrow.len(), 30);
}

// Every way out of the sandbox is refused with a 400 that says why, and nothing is created.
#[test]
fn sandbox_escapes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    node.must_write("safe", "m,host=a v=1\n");
    let attempts = [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/shale-escape.csv'",
        "ATTACH '/tmp/shale-escape.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA database_list",
        "SELECT * FROM glob('/*')",
        "SELECT 1; DROP TABLE x",
        "CREATE TABLE x AS SELECT 1",
        "SELECT * FROM read_parquet('**/*.parquet')",
        "SELECT getenv('HOME')",
        "SELECT * FROM query('SELECT 1')",
        "SELECT * FROM m",
        "SELECT * FROM a.b.c",
    ];
    for sql in attempts {
        let response = node.post(
            "/api/v1/query",
            &[],
            json!({ "sql": sql }).to_string().as_bytes(),
        );
        assert_eq!(
            response.status,
            400,
            "{sql} was not refused: {}",
            response.text()
        );
        let body = harness::json(&response);
        assert_eq!(body["success"], false);
        assert!(!body["error"].as_str().unwrap().is_empty());
    }
    assert!(!std::path::Path::new("/tmp/shale-escape.csv").exists());
    assert!(!std::path::Path::new("/tmp/shale-escape.db").exists());
    // A table that does not exist is a clear 404, and malformed requests are 400s.
    let response = node.post(
        "/api/v1/query",
        &[],
        br#"{"sql":"SELECT * FROM safe.nothing"}"#,
    );
    assert_eq!(response.status, 404, "{}", response.text());
    let response = node.post("/api/v1/query", &[], b"SELECT 1");
    assert_eq!(response.status, 400, "{}", response.text());
}

// Writers add uniquely numbered rows while small flush thresholds make flushes, manifest
// commits and buffer swaps happen all the time; every query must count each row at most once,
// and must see every row acknowledged before it was sent.
#[test]
fn queries_during_flushes_see_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            flush_age_ms: 20,
            flush_rows_max: 300,
            ..NodeOptions::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Vec<AtomicI64>> = Arc::new((0..2).map(|_| AtomicI64::new(-1)).collect());
    let writers: Vec<_> = (0..2usize)
        .map(|writer| {
            let (stop, acknowledged, addr) = (stop.clone(), acknowledged.clone(), node.addr);
            std::thread::spawn(move || {
                let mut client = Client::connect(addr).unwrap();
                let mut seq = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let body: String = (seq..seq + 20)
                        .map(|s| {
                            format!("load,w=w{writer} seq={s}i {}\n", BASE_US * 1000 + s * 1000)
                        })
                        .collect();
                    let response = client
                        .request("POST", "/write?db=race", &[], body.as_bytes())
                        .unwrap();
                    assert_eq!(response.status, 204, "{}", response.text());
                    acknowledged[writer].store(seq + 19, Ordering::SeqCst);
                    seq += 20;
                }
            })
        })
        .collect();
    node.wait_until("flushes under load", || {
        node.metric("shale_flushes_total") >= 3.0
    });
    let mut checked = 0;
    while checked < 30 {
        let before: Vec<i64> = acknowledged
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        if before.iter().any(|&b| b < 0) {
            continue;
        }
        let sql = format!(
            "SELECT w, count(*), count(DISTINCT seq), \
             count(DISTINCT seq) FILTER (WHERE (w = 'w0' AND seq <= {}) OR (w = 'w1' AND seq <= {})) \
             FROM race.load GROUP BY w ORDER BY w",
            before[0], before[1]
        );
        let answer = must_query(&node, &sql, &[]);
        let rows: BTreeMap<String, (i64, i64, i64)> = data(&answer)
            .into_iter()
            .map(|r| {
                let number = |i: usize| r[i].as_i64().unwrap();
                (
                    r[0].as_str().unwrap().to_string(),
                    (number(1), number(2), number(3)),
                )
            })
            .collect();
        for (writer, acked) in before.iter().enumerate() {
            let (count, distinct, acknowledged_seen) = rows[&format!("w{writer}")];
            assert_eq!(count, distinct, "a row was counted twice");
            assert_eq!(
                acknowledged_seen,
                acked + 1,
                "writer {writer}: acknowledged rows missing"
            );
        }
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    assert!(node.metric("shale_flushes_total") >= 3.0);
}

/// An Arc columnar MessagePack body: `{"m": .., "columns": {time, host, usage}, "tag_keys": ["host"]}`.
fn msgpack_columnar(measurement: &str, rows: i64) -> Vec<u8> {
    use rmp::encode::*;
    let mut out = Vec::new();
    write_map_len(&mut out, 3).unwrap();
    write_str(&mut out, "m").unwrap();
    write_str(&mut out, measurement).unwrap();
    write_str(&mut out, "columns").unwrap();
    write_map_len(&mut out, 3).unwrap();
    write_str(&mut out, "time").unwrap();
    write_array_len(&mut out, rows as u32).unwrap();
    for i in 0..rows {
        write_sint(&mut out, BASE_US / 1000 + i).unwrap();
    }
    write_str(&mut out, "host").unwrap();
    write_array_len(&mut out, rows as u32).unwrap();
    for i in 0..rows {
        write_str(&mut out, &format!("h{}", i % 3)).unwrap();
    }
    write_str(&mut out, "usage").unwrap();
    write_array_len(&mut out, rows as u32).unwrap();
    for i in 0..rows {
        write_f64(&mut out, i as f64 * 0.5).unwrap();
    }
    write_str(&mut out, "tag_keys").unwrap();
    write_array_len(&mut out, 1).unwrap();
    write_str(&mut out, "host").unwrap();
    out
}

// Arc's MessagePack write endpoint, plain and gzip- and zstd-compressed (detected by magic
// bytes, as Arc clients send them), then queried back: tags stay tags, millisecond times
// become the right instants, and a malformed body is refused whole.
#[test]
fn msgpack_round_trip() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let body = msgpack_columnar("mp", 30);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&body).unwrap();
    let gzip = gzip.finish().unwrap();
    let zstd = zstd::encode_all(&body[..], 3).unwrap();
    for payload in [&body, &gzip, &zstd] {
        let response = node.post(
            "/api/v1/write/msgpack",
            &[("x-arc-database", "packed")],
            payload,
        );
        assert_eq!(response.status, 204, "{}", response.text());
    }
    let answer = must_query(
        &node,
        "SELECT host, count(*), sum(usage), min(time) FROM packed.mp GROUP BY host ORDER BY host",
        &[],
    );
    let sums: Vec<f64> = (0..3)
        .map(|h| {
            (0..30)
                .filter(|i| i % 3 == h)
                .map(|i| i as f64 * 0.5)
                .sum::<f64>()
                * 3.0
        })
        .collect();
    assert_eq!(
        data(&answer),
        vec![
            vec![
                json!("h0"),
                json!(30),
                json!(sums[0]),
                json!("2026-11-22T00:00:00.000000Z")
            ],
            vec![
                json!("h1"),
                json!(30),
                json!(sums[1]),
                json!("2026-11-22T00:00:00.001000Z")
            ],
            vec![
                json!("h2"),
                json!(30),
                json!(sums[2]),
                json!("2026-11-22T00:00:00.002000Z")
            ],
        ]
    );
    let mut bad = body.clone();
    bad.truncate(bad.len() - 3);
    let response = node.post(
        "/api/v1/write/msgpack",
        &[("x-arc-database", "packed")],
        &bad,
    );
    assert_eq!(response.status, 400, "{}", response.text());
    let response = node.post("/api/v1/write/msgpack", &[], &body);
    assert_eq!(response.status, 400, "{}", response.text());
}

// A query bounded in time reads only the manifest's files that overlap the bound: with one
// file per hour, asking for the last hour skips the other two, and the answer is unchanged.
#[test]
fn time_bounds_prune_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let hour_us = 3_600_000_000i64;
    let body: String = (0..3)
        .flat_map(|hour| {
            (0..10).map(move |i| {
                format!(
                    "m,host=h v={i} {}\n",
                    BASE_US + hour * hour_us + i * 1_000_000
                )
            })
        })
        .collect();
    let response = node.post("/write?db=pruned&precision=us", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    node.stop();
    node.restart();
    assert_eq!(node.manifest_paths("pruned", "m").len(), 3);
    let before = node.metric("shale_query_files_pruned_total");
    let answer = must_query(
        &node,
        "SELECT count(*), min(time) FROM pruned.m WHERE time >= TIMESTAMPTZ '2026-11-22 02:00:00+00'",
        &[],
    );
    assert_eq!(
        data(&answer),
        vec![vec![json!(10), json!("2026-11-22T02:00:00.000000Z")]]
    );
    assert_eq!(node.metric("shale_query_files_pruned_total") - before, 2.0);
    // Two bounds are evaluated together; a bound that is not a constant (it names a column)
    // is ignored without losing the other one.
    for (sql, count) in [
        (
            "SELECT count(*) FROM pruned.m WHERE time BETWEEN TIMESTAMPTZ '2026-11-22 01:00:00+00' \
             AND TIMESTAMPTZ '2026-11-22 01:00:04+00'",
            5,
        ),
        (
            "SELECT count(*) FROM pruned.m WHERE time >= TIMESTAMPTZ '2026-11-22 02:00:00+00' \
             AND time <= TIMESTAMPTZ '2026-11-22 02:00:00+00' + to_seconds(v)",
            10,
        ),
    ] {
        let before = node.metric("shale_query_files_pruned_total");
        let answer = must_query(&node, sql, &[]);
        assert_eq!(data(&answer), vec![vec![json!(count)]], "{sql}");
        assert_eq!(
            node.metric("shale_query_files_pruned_total") - before,
            2.0,
            "{sql}"
        );
    }
    // An OR makes the bound unprovable: every file is read, and the answer is still right.
    let before = node.metric("shale_query_files_pruned_total");
    let answer = must_query(
        &node,
        "SELECT count(*) FROM pruned.m WHERE time >= TIMESTAMPTZ '2026-11-22 02:00:00+00' OR v = 0",
        &[],
    );
    assert_eq!(data(&answer), vec![vec![json!(12)]]);
    assert_eq!(node.metric("shale_query_files_pruned_total") - before, 0.0);
}

// A table whose files have different columns (a field added later, columns first seen in
// another order) reads every row of every file: files with the same columns are scanned
// together, the groups are combined by name, and a column a file lacks reads as NULL. A file
// with an extra column must never be read under a narrower schema, which would drop it.
#[test]
fn files_with_different_columns_are_all_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let hour_us = 3_600_000_000i64;
    let write = |node: &Node, body: String| {
        let response = node.post("/write?db=wide&precision=us", &[], body.as_bytes());
        assert_eq!(response.status, 204, "{}", response.text());
    };
    // Hour 0: fields a only. Hour 1: a and b. Hour 2: b before a, plus tag zone. Each hour is
    // flushed (a graceful restart flushes) before the next is written.
    let lines: [fn(i64, i64) -> String; 3] = [
        |i, t| format!("m,host=h a={i} {t}\n"),
        |i, t| format!("m,host=h a={i},b={i}i {t}\n"),
        |i, t| format!("m,zone=z,host=h b={i}i,a={i} {t}\n"),
    ];
    for (hour, line) in lines.iter().enumerate() {
        write(
            &node,
            (0..5)
                .map(|i| line(i, BASE_US + hour as i64 * hour_us + i))
                .collect(),
        );
        node.stop();
        node.restart();
    }
    assert_eq!(node.manifest_paths("wide", "m").len(), 3);
    let answer = must_query(
        &node,
        "SELECT count(*), count(a), count(b), count(zone), sum(b) FROM wide.m",
        &[],
    );
    assert_eq!(
        data(&answer),
        vec![vec![json!(15), json!(15), json!(10), json!(5), json!(20)]]
    );
    let answer = must_query(
        &node,
        "SELECT time_bucket(INTERVAL 1 hour, time) AS h, count(b), count(zone) FROM wide.m \
         GROUP BY h ORDER BY h",
        &[],
    );
    assert_eq!(
        data(&answer),
        vec![
            vec![json!("2026-11-22T00:00:00.000000Z"), json!(0), json!(0)],
            vec![json!("2026-11-22T01:00:00.000000Z"), json!(5), json!(0)],
            vec![json!("2026-11-22T02:00:00.000000Z"), json!(5), json!(5)],
        ]
    );
}

// Unflushed rows past one buffer chunk (65,536 rows): answers stay exact while the buffer
// seals chunks, gains a column after a seal, and grows between queries (each query worker
// copies only what it has not seen, or reloads when the columns changed).
#[test]
fn queries_over_many_unflushed_chunks_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 1,
            ..NodeOptions::default()
        },
    );
    let write = |range: std::ops::Range<i64>| {
        let body: String = range
            .map(|i| {
                let late = if i >= 100_000 {
                    format!(",late={i}i")
                } else {
                    String::new()
                };
                format!("m,host=h{} v={i}i{late} {}\n", i % 7, BASE_US + i)
            })
            .collect();
        let response = node.post("/write?db=chunks&precision=us", &[], body.as_bytes());
        assert_eq!(response.status, 204, "{}", response.text());
    };
    let check = |rows: i64| {
        let late_rows = (rows - 100_000).max(0);
        let late_sum: i64 = (100_000..rows.max(100_000)).sum();
        // Column `late` exists only once a row has it.
        let (sql, expected) = if rows > 100_000 {
            (
                "SELECT count(*), sum(v), count(late), sum(late) FROM chunks.m",
                vec![
                    json!(rows),
                    json!((0..rows).sum::<i64>()),
                    json!(late_rows),
                    json!(late_sum),
                ],
            )
        } else {
            (
                "SELECT count(*), sum(v) FROM chunks.m",
                vec![json!(rows), json!((0..rows).sum::<i64>())],
            )
        };
        for _ in 0..3 {
            let answer = must_query(&node, sql, &[]);
            assert_eq!(data(&answer), vec![expected.clone()], "after {rows} rows");
        }
    };
    for step in [
        (0, 70_000),
        (70_000, 99_000),
        (99_000, 140_000),
        (140_000, 150_000),
    ] {
        for start in (step.0..step.1).step_by(10_000) {
            write(start..(start + 10_000).min(step.1));
        }
        check(step.1);
    }
    assert_eq!(node.manifest_rows("chunks"), 0, "nothing was flushed");
}

// Limits answer cleanly: a query past query.timeout_ms is interrupted with a 408, and a JSON
// answer over query.json_rows_max is a 413 that points to the Arrow endpoint. The node has one
// query worker, so the queries after the interrupted one prove that worker serves again.
#[test]
fn query_limits() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![
                ("SHALE_QUERY_WORKERS".into(), "1".into()),
                ("SHALE_QUERY_TIMEOUT_MS".into(), "300".into()),
                ("SHALE_QUERY_JSON_ROWS_MAX".into(), "10".into()),
            ],
            ..NodeOptions::default()
        },
    );
    let slow = json!({ "sql": "SELECT sum(i * i % 7) FROM range(100000000000) t(i)" }).to_string();
    let response = node.post("/api/v1/query", &[], slow.as_bytes());
    assert_eq!(response.status, 408, "{}", response.text());
    assert!(node.metric("shale_query_timeouts_total") >= 1.0);
    let big = json!({ "sql": "SELECT * FROM range(100)" }).to_string();
    let response = node.post("/api/v1/query", &[], big.as_bytes());
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(response.text().contains("arrow"), "{}", response.text());
    // The interrupted worker (the only one) is fine afterwards, and its connection carries no
    // leftover interrupt into the next query.
    for _ in 0..3 {
        let answer = must_query(&node, "SELECT 42", &[]);
        assert_eq!(data(&answer), vec![vec![json!(42)]]);
    }
    assert_eq!(node.metric("shale_query_timeouts_total"), 1.0);
}

/// Sends `sql` as a query on a raw connection and returns the socket without reading a byte
/// of the answer, once the answer has started (its status line waits in the socket).
fn send_query_and_stop_reading(node: &Node, path: &str, sql: &str) -> std::net::TcpStream {
    use std::io::Write;
    let body = json!({ "sql": sql }).to_string();
    let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n{body}",
        node.addr,
        body.len()
    )
    .unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let expected = b"HTTP/1.1 200";
    let mut head = [0u8; 12];
    node.wait_until(
        "the unread answer to start",
        || matches!(stream.peek(&mut head), Ok(n) if n == head.len()),
    );
    assert_eq!(&head, expected, "{}", String::from_utf8_lossy(&head));
    stream
}

// A client that sends a query and then stops reading must not hold a query worker past
// query.timeout_ms. Its answer (gigabytes: a cross join of wide rows) fills the socket and the
// response channel; the worker must give the answer up at the deadline, count a timeout, and
// serve other queries. Two such clients (one JSON, one Arrow) take both default workers, so
// before the fix every later query waited forever.
#[test]
fn unread_answers_free_their_workers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_QUERY_TIMEOUT_MS".into(), "2000".into())],
            ..NodeOptions::default()
        },
    );
    let pad = "x".repeat(500);
    let body: String = (0..2000)
        .map(|i| {
            format!(
                "wide,host=h{} pad=\"{pad}\",v={i}i {}\n",
                i % 7,
                BASE_US + i
            )
        })
        .collect();
    let response = node.post("/write?db=stall&precision=us", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    let timeouts_before = node.metric("shale_query_timeouts_total");

    let huge = "SELECT a.pad, b.pad, a.v, b.v FROM stall.wide a, stall.wide b";
    let stalled = [
        send_query_and_stop_reading(&node, "/api/v1/query", huge),
        send_query_and_stop_reading(&node, "/api/v1/query/arrow", huge),
    ];

    // A third client's query must be answered once the stalled answers reach their deadline.
    // It may itself time out while it waits in the queue behind them, so it is retried.
    let (done, finished) = std::sync::mpsc::channel();
    let addr = node.addr;
    std::thread::spawn(move || loop {
        let body = json!({ "sql": "SELECT count(*), sum(v) FROM stall.wide" }).to_string();
        let response =
            harness::request(addr, "POST", "/api/v1/query", &[], body.as_bytes()).unwrap();
        if response.status != 408 {
            let _ = done.send(response);
            return;
        }
    });
    let response = finished
        .recv_timeout(harness::DEADLINE)
        .unwrap_or_else(|_| {
            panic!(
                "no query was answered: the unread answers still hold the workers; log:\n{}",
                node.log()
            )
        });
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        data(&harness::json(&response)),
        vec![vec![json!(2000), json!((0..2000).sum::<i64>())]]
    );
    node.wait_until("both abandoned answers counted as timeouts", || {
        node.metric("shale_query_timeouts_total") - timeouts_before >= 2.0
    });
    drop(stalled);
}

// With the workers' copy cache capped at one row, every query evicts the other table's copy
// and later reloads it: answers stay exact across alternating tables and new writes.
#[test]
fn capped_copy_cache_keeps_answers_exact() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_QUERY_BUFFER_CACHE_ROWS_MAX".into(), "1".into())],
            ..NodeOptions::default()
        },
    );
    for round in 1..=4i64 {
        node.must_write(
            "cache",
            &format!("a,host=h v={round} {round}000\nb,host=h v={round} {round}000\n"),
        );
        for table in ["a", "b", "a"] {
            let answer = must_query(
                &node,
                &format!("SELECT count(*), sum(v) FROM cache.{table}"),
                &[],
            );
            let sum: i64 = (1..=round).sum();
            assert_eq!(
                data(&answer),
                vec![vec![json!(round), json!(sum as f64)]],
                "{table} in round {round}"
            );
        }
    }
}

// Issue 7: fields named like SQL statement words (`load`, `set`, `call`, `copy`, `export`) are
// queryable unquoted through the real API, over one flushed and one unflushed row, in aggregates,
// WHERE, GROUP BY ALL, ORDER BY and as an alias, with and without the default-database header.
// The guard used to refuse these queries as if `load` were the LOAD statement.
#[test]
fn fields_named_like_keywords_are_queryable_unquoted() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    node.must_write(
        "kw",
        "m,host=a load=1,set=10,call=0,copy=7,export=1 1000000000\n",
    );
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("kw"), 1);
    node.must_write(
        "kw",
        "m,host=b load=3,set=20,call=2,copy=5,export=2 2000000000\n",
    );

    let answer = must_query(
        &node,
        "SELECT avg(load), max(set), min(copy) FROM kw.m",
        &[],
    );
    assert_eq!(
        data(&answer),
        vec![vec![json!(2.0), json!(20.0), json!(5.0)]]
    );

    let answer = must_query(
        &node,
        "SELECT host, load AS export, set, copy FROM kw.m WHERE call > 1 GROUP BY ALL ORDER BY load",
        &[],
    );
    assert_eq!(answer["columns"][1], "export");
    assert_eq!(
        data(&answer),
        vec![vec![json!("b"), json!(3.0), json!(20.0), json!(5.0)]]
    );

    let answer = must_query(
        &node,
        "SELECT sum(call), max(export), count(*) FILTER (WHERE (load > 2)) FROM m",
        &[("x-arc-database", "kw")],
    );
    assert_eq!(data(&answer), vec![vec![json!(2.0), json!(2.0), json!(1)]]);
}
