//! Single-node tests through the real binary: ingest over every write endpoint, Parquet read
//! back with DuckDB, bad input refused whole, limits, and the operational endpoints.

#[path = "support/harness.rs"]
mod harness;

use harness::{duckdb_rows, parquet_list, Node, NodeOptions};
use std::io::Write;

/// Rows visible in the manifest for `database`, waiting for flushes to register them.
fn wait_for_manifest_rows(node: &Node, database: &str, rows: u64) {
    node.wait_until(
        &format!("{rows} rows of {database} in the manifest"),
        || node.manifest_rows(database) >= rows,
    );
    assert_eq!(node.manifest_rows(database), rows, "more rows than written");
}

// Ingests a mix of tags, escapes and every field type through the three write endpoints,
// lets the node flush, then reads the Parquet files the manifest lists with DuckDB and compares
// every row, the column types and the sort order. This is the end-to-end contract of ingest.
#[test]
fn ingest_then_read_back_with_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            flush_age_ms: 100,
            ..NodeOptions::default()
        },
    );
    // 2026-11-22T01:00:00Z in seconds.
    let base = 1_795_309_200i64;
    let body = format!(
        "cpu,host=b,region=eu usage=1.5,count=3i,ok=true,note=\"x\" {t0}\n\
         cpu,host=a,region=eu usage=2.5,count=4i,ok=false,note=\"say \\\"hi\\\"\" {t1}\n\
         # a comment line\n\
         \n\
         cpu,host=a,region=eu usage=0.5,count=5i,ok=T,big=18446744073709551615u {t2}\r\n\
         cpu,host=sp\\ ace\\,c,region=us usage=-1e3,count=-9i,ok=F {t3}\n",
        t0 = (base + 3) * 1000,
        t1 = (base + 2) * 1000,
        t2 = (base + 1) * 1000,
        t3 = (base + 4) * 1000,
    );
    let response = node.post("/write?db=metrics&precision=ms", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    let response = node.post(
        "/api/v2/write?bucket=metrics&precision=s",
        &[],
        format!("cpu,host=c,region=eu usage=9 {}\n", base + 5).as_bytes(),
    );
    assert_eq!(response.status, 204, "{}", response.text());
    let response = node.post(
        "/api/v1/write/line-protocol?precision=us",
        &[("x-arc-database", "metrics")],
        format!("cpu,host=d,region=eu usage=10 {}\n", (base + 6) * 1_000_000).as_bytes(),
    );
    assert_eq!(response.status, 204, "{}", response.text());

    wait_for_manifest_rows(&node, "metrics", 6);
    let paths = node.manifest_paths("metrics", "cpu");
    for path in &paths {
        let relative = path
            .strip_prefix(&node.data_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            relative.starts_with("metrics/cpu/2026/11/22/01/") && relative.ends_with(".parquet"),
            "unexpected layout: {relative}"
        );
    }
    let files = parquet_list(&paths);
    let rows = duckdb_rows(&format!(
        "SELECT epoch_us(time), host, region, usage, count, ok, note, big \
         FROM read_parquet({files}, union_by_name = true) ORDER BY time"
    ));
    let want = vec![
        vec![
            format!("{}", (base + 1) * 1_000_000),
            "a".into(),
            "eu".into(),
            "0.5".into(),
            "5".into(),
            "true".into(),
            "NULL".into(),
            "18446744073709551615".into(),
        ],
        vec![
            format!("{}", (base + 2) * 1_000_000),
            "a".into(),
            "eu".into(),
            "2.5".into(),
            "4".into(),
            "false".into(),
            "say \"hi\"".into(),
            "NULL".into(),
        ],
        vec![
            format!("{}", (base + 3) * 1_000_000),
            "b".into(),
            "eu".into(),
            "1.5".into(),
            "3".into(),
            "true".into(),
            "x".into(),
            "NULL".into(),
        ],
        vec![
            format!("{}", (base + 4) * 1_000_000),
            "sp ace,c".into(),
            "us".into(),
            "-1000".into(),
            "-9".into(),
            "false".into(),
            "NULL".into(),
            "NULL".into(),
        ],
        vec![
            format!("{}", (base + 5) * 1_000_000),
            "c".into(),
            "eu".into(),
            "9".into(),
            "NULL".into(),
            "NULL".into(),
            "NULL".into(),
            "NULL".into(),
        ],
        vec![
            format!("{}", (base + 6) * 1_000_000),
            "d".into(),
            "eu".into(),
            "10".into(),
            "NULL".into(),
            "NULL".into(),
            "NULL".into(),
            "NULL".into(),
        ],
    ];
    assert_eq!(rows, want);

    // Types as the design fixes them, read from the first file's own schema.
    let first = parquet_list(&paths[..1]);
    let types = duckdb_rows(&format!(
        "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet({first})) ORDER BY column_name"
    ));
    let types: std::collections::HashMap<String, String> = types
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(types["time"], "TIMESTAMP WITH TIME ZONE");
    assert_eq!(types["host"], "VARCHAR");
    if let Some(usage) = types.get("usage") {
        assert_eq!(usage, "DOUBLE");
    }
    if let Some(count) = types.get("count") {
        assert_eq!(count, "BIGINT");
    }

    // Within each file rows are sorted by tags then time.
    for path in &paths {
        let list = parquet_list(std::slice::from_ref(path));
        let in_file = duckdb_rows(&format!(
            "SELECT host, region, epoch_us(time) FROM read_parquet({list})"
        ));
        let mut sorted = in_file.clone();
        sorted.sort_by(|a, b| {
            (&a[0], &a[1], a[2].parse::<i64>().unwrap()).cmp(&(
                &b[0],
                &b[1],
                b[2].parse::<i64>().unwrap(),
            ))
        });
        assert_eq!(
            in_file,
            sorted,
            "{} is not sorted by tags then time",
            path.display()
        );
    }
}

// Sends gzip and zstd bodies, with and without Content-Encoding (Arc clients rely on magic
// byte detection), and checks every row arrives.
#[test]
fn compressed_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            flush_age_ms: 100,
            shards: 1,
            ..NodeOptions::default()
        },
    );
    let lines: String = (0..100)
        .map(|i| format!("m,host=h{i} v={i} {i}000\n"))
        .collect();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(lines.as_bytes()).unwrap();
    let gzip = gzip.finish().unwrap();
    let zstd = zstd::encode_all(lines.as_bytes(), 3).unwrap();
    for (headers, body) in [
        (vec![("content-encoding", "gzip")], &gzip),
        (vec![], &gzip),
        (vec![("content-encoding", "zstd")], &zstd),
        (vec![], &zstd),
    ] {
        let response = node.post("/write?db=zipped", &headers, body);
        assert_eq!(response.status, 204, "{}", response.text());
    }
    wait_for_manifest_rows(&node, "zipped", 400);
    let response = node.post("/write?db=zipped", &[("content-encoding", "br")], b"m v=1");
    assert_eq!(response.status, 415, "{}", response.text());
}

// Each bad request gets a 400 naming the line and the reason, and stores nothing: after all of
// them, only the one good request's rows exist. A request with a single bad line among good
// ones must not half-store.
#[test]
fn bad_input_is_rejected_whole() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            flush_age_ms: 100,
            shards: 1,
            ..NodeOptions::default()
        },
    );
    let good = "m,host=a v=1 1000\n";
    let cases: Vec<(&str, &str, &str)> = vec![
        ("/write?db=bad", "m v=1 1\nm,host=a\n", "line 2"),
        ("/write?db=bad", "m v=1 1\nm v=\"unterminated 2\n", "line 2"),
        ("/write?db=bad", "m v=1 1\nm v=1i 2\n", "line 2"),
        ("/write?db=bad", "m v=1 1\nm,host=a\\ v=1 2\n", "line 2"),
        ("/write?db=bad", "1m v=1 1\n", "line 1"),
        ("/write?db=bad", "m time=1 1\n", "line 1"),
        ("/write?db=bad", "m v=1 notatime\n", "line 1"),
        (
            "/write?db=bad&precision=fortnight",
            "m v=1 1\n",
            "fortnight",
        ),
        ("/write?db=1bad", good, "database"),
        ("/write", good, "database"),
        ("/write?db=bad", "\n# only a comment\n", "no points"),
    ];
    for (path, body, needle) in cases {
        let response = node.post(path, &[], body.as_bytes());
        assert_eq!(response.status, 400, "{path} {body:?}: {}", response.text());
        let json = harness::json(&response);
        assert_eq!(json["success"], false);
        let message = json["error"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{body:?}: {message:?} lacks {needle:?}"
        );
    }
    // A type conflict with data this shard already holds is a 400 too.
    node.must_write("bad", good);
    let response = node.post("/write?db=bad", &[], b"m,host=a v=\"text\" 2000\n");
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(
        response.text().contains("\\\"v\\\"") || response.text().contains("v"),
        "{}",
        response.text()
    );

    wait_for_manifest_rows(&node, "bad", 1);
    let rows = duckdb_rows(&format!(
        "SELECT host, v FROM read_parquet({})",
        parquet_list(&node.manifest_paths("bad", "m"))
    ));
    assert_eq!(rows, vec![vec!["a".to_string(), "1".to_string()]]);
    assert!(node.manifest_paths("1bad", "m").is_empty());
}

// Limits answer 413 with a message, for an over-long line, an over-large body and a small
// gzip body that expands past the decompressed limit; nothing is stored.
#[test]
fn limits_answer_413() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 1,
            extra_env: vec![
                ("SHALE_INGEST_LINE_BYTES_MAX".into(), "100".into()),
                ("SHALE_INGEST_BODY_BYTES_MAX".into(), "10000".into()),
                ("SHALE_INGEST_DECOMPRESSED_BYTES_MAX".into(), "20000".into()),
                ("SHALE_WAL_RECORD_BYTES_MAX".into(), "1048576".into()),
                ("SHALE_WAL_QUEUE_BYTES_MAX".into(), "8388608".into()),
            ],
            ..NodeOptions::default()
        },
    );
    let long_line = format!("m v=1,s=\"{}\"\n", "x".repeat(200));
    let response = node.post("/write?db=lim", &[], long_line.as_bytes());
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(response.text().contains("line 1"), "{}", response.text());

    let big: String = (0..3000).map(|i| format!("m v={i}\n")).collect();
    let response = node.post("/write?db=lim", &[], big.as_bytes());
    assert_eq!(response.status, 413, "{}", response.text());

    let bomb = vec![b'a'; 1 << 20];
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gzip.write_all(&bomb).unwrap();
    let gzip = gzip.finish().unwrap();
    assert!(gzip.len() < 10000);
    let response = node.post("/write?db=lim", &[("content-encoding", "gzip")], &gzip);
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(node.metric("shale_wal_appends_total"), 0.0);
}

// Checks the operational endpoints: liveness, readiness, Prometheus metrics that move with
// writes (rows, WAL syncs) and a JSON 404 for unknown paths.
#[test]
fn health_ready_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    assert_eq!(node.must_get("/health").status, 200);
    assert_eq!(node.must_get("/ready").status, 200);
    node.must_write("ops", "m,host=a v=1\nm,host=b v=2\n");
    assert_eq!(node.metric("shale_write_rows_total"), 2.0);
    assert!(node.metric("shale_wal_syncs_total") >= 1.0);
    let text = node.must_get("/metrics").text();
    for name in [
        "shale_wal_sync_seconds_bucket",
        "shale_write_request_seconds_count",
        "shale_flushes_total",
        "shale_manifest_commits_total",
        "shale_http_requests_total",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    let missing = node.must_get("/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(harness::json(&missing)["success"], false);
}

// The manifest is Raft state persisted on disk: a graceful restart flushes the buffers, and the
// files registered before the restart are all listed after it.
#[test]
fn manifest_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let lines: String = (0..500)
        .map(|i| format!("m,host=h{} v={i} {}\n", i % 7, 1_000_000 + i))
        .collect();
    node.must_write("keep", &lines);
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("keep"), 500);
    let before = node.manifest_files();
    node.stop();
    node.restart();
    assert_eq!(node.manifest_files(), before);
}

// A column's kind is declared once, through the manifest, for every shard and across restarts:
// after `v` is stored as a float on shard 0, an integer `v` is refused on both shards (each
// written through a connection pinned to it), and a string `v` still after a restart; a new
// column is accepted.
#[test]
fn column_kinds_hold_across_shards_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let mut clients = node.shard_clients(2);
    let first = clients[0]
        .request("POST", "/write?db=kinds", &[], b"m,host=a v=1.5 1000\n")
        .unwrap();
    assert_eq!(first.status, 204, "{}", first.text());
    for attempt in 0..8 {
        let response = clients[attempt % 2]
            .request(
                "POST",
                "/write?db=kinds",
                &[],
                format!("m,host=a v={attempt}i 2000\n").as_bytes(),
            )
            .unwrap();
        assert_eq!(
            response.header("x-shale-shard"),
            Some((attempt % 2).to_string().as_str())
        );
        assert_eq!(
            response.status,
            400,
            "attempt {attempt}: {}",
            response.text()
        );
        assert!(response.text().contains("float"), "{}", response.text());
    }
    drop(clients);
    node.stop();
    node.restart();
    let response = node.post("/write?db=kinds", &[], b"m,host=a v=\"text\" 3000\n");
    assert_eq!(response.status, 400, "{}", response.text());
    let response = node.post("/write?db=kinds", &[], b"m,v=tagnow w=1 3000\n");
    assert_eq!(
        response.status,
        400,
        "a field may not become a tag: {}",
        response.text()
    );
    node.must_write("kinds", "m,host=b v=2.5,w=7i 4000\n");
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("kinds"), 2);
}

// Two processes on one data directory would corrupt the WAL and the Raft log: the second one
// must refuse to start and say why.
#[test]
fn second_process_on_a_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .arg("serve")
        .env("SHALE_NODE_DATA_DIR", &node.data_dir)
        .env(
            "SHALE_HTTP_ADDR",
            format!("127.0.0.1:{}", harness::free_port()),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another shale process"),
        "{stderr}"
    );
    assert_eq!(node.must_get("/ready").status, 200);
}

// Shards share their port with SO_REUSEPORT; a second node started on the same port must not
// join in and take half of the connections: it refuses to start and says why.
#[test]
fn second_node_on_the_same_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("one"), NodeOptions::default());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .arg("serve")
        .env("SHALE_NODE_DATA_DIR", dir.path().join("two"))
        .env("SHALE_HTTP_ADDR", node.addr.to_string())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("address is in use"), "{stderr}");
    assert_eq!(node.must_get("/ready").status, 200);
}

// A client that starts a request head and stalls is disconnected once
// http.header_read_timeout_ms passes, so stalled clients cannot hold connection slots; whole
// requests on the same settings are still served.
#[test]
fn stalled_request_heads_are_disconnected() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_HTTP_HEADER_READ_TIMEOUT_MS".into(), "500".into())],
            ..NodeOptions::default()
        },
    );
    let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
    stream
        .write_all(b"POST /write?db=stall HTTP/1.1\r\nHost: shale\r\n")
        .unwrap();
    // An upper bound only: the server must close well before it.
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("the stalled connection was not closed: {error}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "closed after {elapsed:?}, before the timeout"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    node.must_write("stall", "m v=1 1\n");
    assert_eq!(node.metric("shale_write_rows_total"), 1.0);
}

// A client that sends a request head and then trickles (or stops sending) its body gets a 408
// once http.body_read_timeout_ms passes and the connection is closed, so slow bodies cannot
// hold connection slots and buffers. Before, only the head had a deadline and this hung.
#[test]
fn stalled_request_bodies_get_408() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_HTTP_BODY_READ_TIMEOUT_MS".into(), "500".into())],
            ..NodeOptions::default()
        },
    );
    for path in ["/write?db=slow", "/api/v1/query"] {
        let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
        stream
            .write_all(
                format!("POST {path} HTTP/1.1\r\nHost: shale\r\ncontent-length: 1000\r\n\r\nm v=")
                    .as_bytes(),
            )
            .unwrap();
        // An upper bound only: the server must answer well before it.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(error) => panic!("{path}: the stalled body was not answered: {error}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(400), "{path}");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("body_read_timeout_ms"), "{path}: {answer}");
    }
    assert_eq!(node.metric("shale_http_body_read_timeouts_total"), 2.0);
    node.must_write("slow", "m v=1 1\n");
}

// Paths and methods a router must survive: the path that used to panic a shard
// (`/api/v1/databases/measurements`), empty and doubled segments, percent escapes that are
// not UTF-8, wrong methods (405 with Allow), unknown paths (404). Each goes to every shard on
// its own connection; afterwards every shard still answers and the node is ready.
#[test]
fn odd_paths_and_methods_never_hurt_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    node.must_write("db1", "cpu,host=a v=1 1\n");
    let cases: [(&str, &str, u16); 10] = [
        ("GET", "/api/v1/databases/measurements", 404),
        ("GET", "/api/v1/databases//measurements", 404),
        ("GET", "/api/v1/databases/%ff%fe/measurements", 404),
        ("GET", "/api/v1/databases/db%31/measurements", 200),
        ("GET", "/api/v1/databases/db1/measurements/", 404),
        ("DELETE", "/write", 405),
        ("GET", "/api/v1/query", 405),
        ("PUT", "/api/v1/write/msgpack", 405),
        ("GET", "/write?db=%zz&precision=%", 405),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd", 404),
    ];
    for mut client in node.shard_clients(2) {
        for (method, path, status) in cases {
            let response = client.request(method, path, &[], b"").unwrap();
            assert_eq!(
                response.status,
                status,
                "{method} {path}: {}",
                response.text()
            );
            if status == 405 {
                assert!(response.header("allow").is_some(), "{method} {path}");
            }
        }
        let response = client.request("GET", "/ready", &[], b"").unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let response = node.must_get("/api/v1/databases/db1/measurements");
    assert_eq!(harness::json(&response)["measurements"][0], "cpu");
}

// InfluxDB clients and Telegraf check `/ping` before writing: GET and HEAD answer 204 with the
// version headers they read.
#[test]
fn ping_answers_like_influxdb() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), NodeOptions::default());
    for method in ["GET", "HEAD"] {
        let response = harness::request(node.addr, method, "/ping", &[], b"").unwrap();
        assert_eq!(response.status, 204, "{method}");
        assert!(response.header("x-influxdb-version").is_some(), "{method}");
        assert!(response.header("x-influxdb-build").is_some(), "{method}");
    }
    let response = node.must_get("/ping?verbose=true");
    assert_eq!(response.status, 200);
    assert!(harness::json(&response)["version"].is_string());
}

// A table may not grow past ingest.columns_per_table_max columns: the request that would
// pass it is refused whole with a 400 naming the limit, and nothing of it is stored.
#[test]
fn too_many_columns_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_INGEST_COLUMNS_PER_TABLE_MAX".into(), "10".into())],
            ..NodeOptions::default()
        },
    );
    node.must_write("wide", "m,t=a f0=1,f1=1,f2=1 1\n");
    let fields: Vec<String> = (0..10).map(|i| format!("g{i}=1")).collect();
    let response = node.post(
        "/write?db=wide",
        &[],
        format!("m,t=a f0=2 2\nm,t=b {} 3\n", fields.join(",")).as_bytes(),
    );
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(
        response.text().contains("columns_per_table_max"),
        "{}",
        response.text()
    );
    assert_eq!(node.must_count("SELECT count(*) FROM wide.m"), 1);
}

// A graceful stop is not an error: the log of a SIGTERM'd node has no ERROR line (before, the
// manifest service logged its own requested shutdown as an error).
#[test]
fn a_graceful_stop_logs_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    node.must_write("quiet", "m v=1 1\n");
    node.stop();
    let log = node.log();
    assert!(log.contains("shale node stopped"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

// Arc MessagePack repeats column names on every translated line, so a small body can expand
// to far more rows of text than ingest.decompressed_bytes_max: the translation stops at the
// limit while it writes (413, nothing stored) instead of building the whole text first.
#[test]
fn msgpack_expanding_past_the_limit_is_413() {
    use rmp::encode::*;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![(
                "SHALE_INGEST_DECOMPRESSED_BYTES_MAX".into(),
                (1 << 20).to_string(),
            )],
            ..NodeOptions::default()
        },
    );
    let rows = 15_000u32;
    let names: Vec<String> = (0..4)
        .map(|i| format!("{}{i}", "field_".repeat(20)))
        .collect();
    let mut body = Vec::new();
    write_map_len(&mut body, 2).unwrap();
    write_str(&mut body, "m").unwrap();
    write_str(&mut body, "wide").unwrap();
    write_str(&mut body, "columns").unwrap();
    write_map_len(&mut body, 1 + names.len() as u32).unwrap();
    write_str(&mut body, "time").unwrap();
    write_array_len(&mut body, rows).unwrap();
    for i in 0..rows {
        write_sint(&mut body, 1_767_225_600_000 + i64::from(i)).unwrap();
    }
    for name in &names {
        write_str(&mut body, name).unwrap();
        write_array_len(&mut body, rows).unwrap();
        for i in 0..rows {
            write_f64(&mut body, f64::from(i)).unwrap();
        }
    }
    assert!(body.len() < 1 << 20, "the body itself is within the limit");
    let response = node.post("/api/v1/write/msgpack", &[("x-arc-database", "mp")], &body);
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(
        response.text().contains("decompressed_bytes_max"),
        "{}",
        response.text()
    );
    assert_eq!(node.metric("shale_write_rows_total"), 0.0);
}

// A standalone node answers the cluster API as a one-voter cluster (leader, term, indexes,
// itself as the only voter), and `shale cluster status` prints it. With an admin token
// configured, the cluster API refuses requests without it (401) or with a wrong one (403).
#[test]
fn cluster_api_on_a_standalone_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_CLUSTER_ADMIN_TOKEN".into(), "s3cret".into())],
            ..NodeOptions::default()
        },
    );
    assert_eq!(node.must_get("/api/v1/cluster").status, 401);
    let wrong = harness::request(
        node.addr,
        "GET",
        "/api/v1/cluster",
        &[("authorization", "Bearer nope")],
        b"",
    )
    .unwrap();
    assert_eq!(wrong.status, 403);
    let response = harness::request(
        node.addr,
        "GET",
        "/api/v1/cluster",
        &[("authorization", "Bearer s3cret")],
        b"",
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let status = harness::json(&response);
    assert_eq!(status["mode"], "standalone");
    assert_eq!(status["leader_id"], 1);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(status["nodes"][0]["raft_role"], "voter");
    assert_eq!(status["nodes"][0]["is_local"], true);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .args([
            "cluster",
            "status",
            "--target",
            &format!("http://{}", node.addr),
        ])
        .env("SHALE_ADMIN_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("standalone") && printed.contains("voter"),
        "{printed}"
    );
    // The token is a secret: `shale config` never prints it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .arg("config")
        .env("SHALE_CLUSTER_ADMIN_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&output.stdout).contains("s3cret"));
}

// A data directory is bound to its node id: starting it as another node is refused with a
// message, so a copied or misconfigured directory cannot pose as a different node.
#[test]
fn a_data_directory_keeps_its_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    node.must_write("id", "m v=1 1\n");
    node.stop();
    node.set_env("SHALE_NODE_ID", "2");
    let (status, log) = node.start_expecting_exit();
    assert!(!status.success());
    assert!(log.contains("belongs to node 1"), "{log}");
}
