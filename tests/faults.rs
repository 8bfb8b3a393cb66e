//! Fault tests through the real binary: kill -9 under load, a torn WAL tail, a corrupt WAL
//! record. They check the durability contract: every acknowledged row survives exactly once,
//! and damage that could hide acknowledged data stops start-up with a clear message.

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use harness::{duckdb_rows, parquet_list, Client, Node, NodeOptions, SmallDisk};

/// The WAL segment files of every shard, oldest first per shard.
fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut segments = Vec::new();
    let wal = data_dir.join("_system").join("wal");
    for shard in std::fs::read_dir(&wal).unwrap() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(shard.unwrap().path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect();
        files.sort();
        segments.extend(files);
    }
    segments
}

/// Every (writer, seq) pair stored in `database`.`load`, after a graceful stop flushed all.
fn stored_pairs(node: &mut Node, database: &str) -> Vec<(i64, i64)> {
    let paths = node.manifest_paths(database, "load");
    if paths.is_empty() {
        return Vec::new();
    }
    duckdb_rows(&format!(
        "SELECT writer, seq FROM read_parquet({}) ORDER BY writer, seq",
        parquet_list(&paths)
    ))
    .into_iter()
    .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
    .collect()
}

// Four writers send batches of uniquely numbered rows as fast as the node acknowledges them;
// the node is killed with SIGKILL mid-load, restarted, and stopped gracefully so that it
// flushes. Every acknowledged row must be in the manifest's files exactly once, and no row may
// appear twice (unacknowledged rows may or may not be there). Small flush thresholds make
// flushes, registrations and WAL releases happen during the load, so the kill can land in any
// of them.
#[test]
fn kill9_under_load_keeps_every_acknowledged_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 2,
            flush_age_ms: 50,
            flush_rows_max: 2000,
            extra_env: vec![("SHALE_WAL_SEGMENT_BYTES_MAX".into(), "65536".into())],
            ..NodeOptions::default()
        },
    );
    let acknowledged = Arc::new(Mutex::new(Vec::<(i64, i64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4i64)
        .map(|writer| {
            let (acknowledged, stop, batches) =
                (acknowledged.clone(), stop.clone(), batches.clone());
            let addr = node.addr;
            std::thread::spawn(move || {
                let mut seq = 0i64;
                let mut client = Client::connect(addr).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let first = seq;
                    let body: String = (0..50)
                        .map(|i| {
                            format!(
                                "load,w=w{writer} writer={writer}i,seq={}i {}\n",
                                first + i,
                                1_700_000_000_000_000_000i64 + (first + i) * 1000
                            )
                        })
                        .collect();
                    seq += 50;
                    match client.request("POST", "/write?db=crash", &[], body.as_bytes()) {
                        Ok(response) if response.status == 204 => {
                            let mut acked = acknowledged.lock().unwrap();
                            acked.extend((first..first + 50).map(|s| (writer, s)));
                            batches.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => {
                            panic!("write refused: {} {}", response.status, response.text())
                        }
                        // The node died under us: stop writing.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Kill once a fair amount is acknowledged and several flushes happened.
    node.wait_until("load to be acknowledged and flushed", || {
        batches.load(Ordering::Relaxed) >= 400 && node.metric("shale_flushes_total") >= 4.0
    });
    node.kill9();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 20_000);

    node.restart();
    node.stop();
    node.restart();
    let stored = stored_pairs(&mut node, "crash");
    let unique: HashSet<(i64, i64)> = stored.iter().copied().collect();
    assert_eq!(unique.len(), stored.len(), "some rows are stored twice");
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|p| !unique.contains(p))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged rows lost, e.g. {missing:?}"
    );
}

/// The `truncated_bytes` field of every "shard recovered" line in `log` (ANSI colors, if
/// any, are ignored).
fn recovered_truncated_bytes(log: &str) -> Vec<u64> {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip a color escape: ESC [ parameters final-letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .lines()
        .filter(|line| line.contains("shard recovered"))
        .map(|line| {
            let value = line
                .split_once("truncated_bytes=")
                .unwrap_or_else(|| panic!("no truncated_bytes field in: {line}"))
                .1;
            let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect()
}

// A crash in the middle of a group commit can persist any subset of the group's blocks: here
// the block holding the group's header is lost while its records persisted after it. Nothing
// of that group was acknowledged, so start-up must cut it off (the recovered shard reports
// the bytes it truncated), keep every acknowledged row, and take writes afterwards.
#[test]
fn torn_wal_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 1,
            ..NodeOptions::default()
        },
    );
    for i in 0..10 {
        node.must_write("torn", &format!("load writer=0i,seq={i}i {i}000\n"));
    }
    node.kill9();
    let segments = wal_segments(&node.data_dir);
    let last = segments.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    // Walk the group commits after the 64-byte segment header (format version 2: a 32-byte
    // header, magic "SHGC" with the group's byte count at offset 16, then its frames) to the
    // end of the last one.
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    let mut start = 64;
    let mut end = 64;
    while bytes.len() >= end + 32 && &bytes[end..end + 4] == b"SHGC" {
        let body_bytes = u64::from_le_bytes(bytes[end + 16..end + 24].try_into().unwrap());
        start = end;
        end += 32 + body_bytes as usize;
    }
    assert!(end > 64, "no group found");
    // The torn group: the last group's records again, after a header that never reached the
    // disk.
    let mut torn = bytes[start..end].to_vec();
    torn[..32].fill(0);
    bytes.truncate(end);
    bytes.extend_from_slice(&torn);
    std::fs::write(last, &bytes).unwrap();

    let log_before = node.log().len();
    node.restart();
    let truncated = recovered_truncated_bytes(&node.log()[log_before..]);
    assert_eq!(
        truncated,
        vec![torn.len() as u64],
        "recovery did not cut exactly the torn group"
    );
    assert_eq!(
        std::fs::metadata(last).unwrap().len(),
        end as u64,
        "the segment was not truncated to the end of the last complete group"
    );
    node.must_write("torn", "load writer=0i,seq=10i 10000\n");
    node.stop();
    node.restart();
    let stored = stored_pairs(&mut node, "torn");
    assert_eq!(stored, (0..11).map(|s| (0, s)).collect::<Vec<_>>());
}

// A flipped byte inside a record that is followed by valid records is not a torn tail: it
// may hide acknowledged writes, so start-up must stop with a message naming the segment and
// the offset, and exit non-zero.
#[test]
fn corrupt_wal_record_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 1,
            ..NodeOptions::default()
        },
    );
    for i in 0..20 {
        node.must_write(
            "corrupt",
            &format!(
                "load writer=0i,seq={i}i,pad=\"{}\" {i}000\n",
                "p".repeat(100)
            ),
        );
    }
    node.kill9();
    let segments = wal_segments(&node.data_dir);
    let first = &segments[0];
    let mut bytes = std::fs::read(first).unwrap();
    // Find the first record's payload: the text of the first request is in it verbatim.
    let needle = b"seq=0i";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("first request in the first segment");
    bytes[at] ^= 0x55;
    std::fs::write(first, &bytes).unwrap();

    let (status, log) = node.start_expecting_exit();
    assert!(!status.success(), "node started on a corrupt WAL");
    assert!(
        log.contains("corrupt"),
        "message does not say corrupt:\n{log}"
    );
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        log.contains(&name),
        "message does not name the segment {name}:\n{log}"
    );
    assert!(
        log.contains("offset"),
        "message does not give the offset:\n{log}"
    );
    // The node must not have touched the evidence.
    assert_eq!(std::fs::read(first).unwrap(), bytes);
}

/// Line protocol for rows `first..first + count` of `measurement`, one second apart, all
/// in the hour starting at 2026-01-01T00:00:00Z.
fn numbered_rows(measurement: &str, first: u64, count: u64) -> String {
    (first..first + count)
        .map(|i| {
            format!(
                "{measurement},src=t seq={i}i {}\n",
                1_767_225_600 + i % 3600
            )
        })
        .collect()
}

/// Writes `body` on one connection (so on the shard that holds it); panics unless 204.
fn must_write_on(client: &mut Client, database: &str, body: &str) {
    let response = client
        .request(
            "POST",
            &format!("/write?db={database}&precision=s"),
            &[],
            body.as_bytes(),
        )
        .expect("write");
    assert_eq!(response.status, 204, "write failed: {}", response.text());
}

// Rows acknowledged by every shard of a 2-shard node must stay visible when the node comes
// back with fewer or more shards: start-up recovers the WAL and journals of shard ids beyond
// the configured count (flushing them into files under their own ids). Before, a restart with
// one shard silently hid shard 1's unflushed rows. Connections are pinned to each shard so
// both WALs really hold rows.
#[test]
fn any_shard_count_recovers_every_acknowledged_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("data"), NodeOptions::default());
    let mut clients = node.shard_clients(2);
    let mut written = 0;
    for (shard, client) in clients.iter_mut().enumerate() {
        for _ in 0..3 {
            must_write_on(client, "sc", &numbered_rows("m", written, 7));
            written += 7;
        }
        assert!(node.metric("shale_write_rows_total") > 0.0, "shard {shard}");
    }
    drop(clients);
    let count = "SELECT count(*) FROM sc.m";
    for shards in ["1", "3", "2"] {
        node.kill9();
        node.set_env("SHALE_RUNTIME_SHARDS", shards);
        node.restart();
        assert_eq!(
            node.must_count(count),
            written,
            "after restart with {shards} shards"
        );
        assert_eq!(
            node.must_count("SELECT count(DISTINCT seq) FROM sc.m"),
            written,
            "duplicates after restart with {shards} shards"
        );
        // New rows with this shard count, then the next restart must keep them too.
        let response = node.post(
            "/write?db=sc&precision=s",
            &[],
            numbered_rows("m", written, 5).as_bytes(),
        );
        assert_eq!(response.status, 204, "{}", response.text());
        written += 5;
    }
    node.stop();
    node.restart();
    assert_eq!(node.must_count(count), written);
    assert_eq!(
        node.manifest_rows("sc"),
        written,
        "all rows in files after a stop"
    );
}

// A panic on a shard must end the process (non-zero exit, a logged reason) instead of leaving
// a dead executor behind a live port; a restart then serves every acknowledged row. The
// `request-header` failpoint makes a request panic its shard.
#[test]
fn a_panicking_shard_stops_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![("SHALE_FAILPOINTS".into(), "request-header".into())],
            ..NodeOptions::default()
        },
    );
    node.must_write("p", &numbered_rows("m", 0, 10));
    // The connection dies with the process: no answer is expected.
    let _ = harness::request(
        node.addr,
        "GET",
        "/health",
        &[("x-shale-failpoint", "panic")],
        b"",
    );
    let status = node.must_exit();
    assert_eq!(status.code(), Some(101), "log:\n{}", node.log());
    assert!(
        node.log().contains("panic; stopping the process"),
        "{}",
        node.log()
    );
    node.set_env("SHALE_FAILPOINTS", "");
    node.restart();
    assert_eq!(node.must_count("SELECT count(*) FROM p.m"), 10);
}

// A shard whose thread stops running tasks (a blocking call, a runaway loop) must show in
// /health and /ready within the stall limit, named, and recover when it runs again.
#[test]
fn a_stuck_shard_is_reported_by_health() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            extra_env: vec![
                ("SHALE_FAILPOINTS".into(), "request-header".into()),
                ("SHALE_RUNTIME_SHARD_STALL_MS_MAX".into(), "300".into()),
            ],
            ..NodeOptions::default()
        },
    );
    let mut clients = node.shard_clients(2);
    let mut stuck = clients.remove(0);
    let mut healthy = clients.remove(0);
    let stall = std::thread::spawn(move || {
        stuck.request(
            "GET",
            "/health",
            &[("x-shale-failpoint", "stall-ms=3000")],
            b"",
        )
    });
    let mut seen = None;
    node.wait_until("/health to report shard 0 stuck", || {
        let response = healthy.request("GET", "/health", &[], b"").unwrap();
        let ready = healthy.request("GET", "/ready", &[], b"").unwrap();
        if response.status == 503 && ready.status == 503 {
            seen = Some(response.text());
            true
        } else {
            false
        }
    });
    assert!(seen.unwrap().contains("shard 0 has not run"));
    stall.join().unwrap().unwrap();
    node.wait_until("/health to recover", || {
        healthy.request("GET", "/health", &[], b"").unwrap().status == 200
    });
    assert!(
        node.log().contains("shard executor is stuck"),
        "{}",
        node.log()
    );
}

// One request with rows in more hours than one flush may write files for is refused whole
// (413, nothing stored), instead of a flush writing ~10k files that the manifest refuses
// forever while the shard's other tables stop flushing. Within the limit, a buffer that would
// grow past it answers 503 until its flush, and every other table keeps flushing.
#[test]
fn rows_in_many_hours_cannot_wedge_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(
        &dir.path().join("data"),
        NodeOptions {
            shards: 1,
            extra_env: vec![("SHALE_BUFFER_FLUSH_HOURS_MAX".into(), "100".into())],
            ..NodeOptions::default()
        },
    );
    let hours = |first: u64, count: u64| -> String {
        (first..first + count)
            .map(|h| format!("wide,src=t v={h}i {h}\n"))
            .collect()
    };
    let response = node.post("/write?db=h&precision=h", &[], hours(0, 10_001).as_bytes());
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(
        response.text().contains("buffer.flush_hours_max"),
        "{}",
        response.text()
    );
    let response = node.post("/write?db=h&precision=h", &[], hours(0, 100).as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    // 60 more hours would make 160 files in one flush: wait for the flush, then retry.
    let mut stored = 100;
    let mut refused = 0;
    node.wait_until("the second request to be accepted", || {
        let response = node.post("/write?db=h&precision=h", &[], hours(100, 60).as_bytes());
        match response.status {
            204 => true,
            503 => {
                refused += 1;
                assert!(response.header("retry-after").is_some());
                false
            }
            other => panic!("unexpected {other}: {}", response.text()),
        }
    });
    stored += 60;
    assert!(
        refused >= 1,
        "the second request should have waited for a flush"
    );
    node.must_write("h", "other,src=t v=1i");
    node.stop();
    node.restart();
    assert_eq!(node.must_count("SELECT count(*) FROM h.wide"), stored);
    assert_eq!(node.must_count("SELECT count(*) FROM h.other"), 1);
    assert_eq!(node.manifest_rows("h"), stored + 1);
}

/// Pending-registration journals of every shard (`*.json`, not the ones set aside).
fn pending_journals(data_dir: &Path) -> Vec<PathBuf> {
    let pending = data_dir.join("_system").join("pending");
    let Ok(shards) = std::fs::read_dir(&pending) else {
        return Vec::new();
    };
    shards
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

// A crash at each step of a flush (after the files are published, after the pending journal
// is written, after the registration committed but before the journal is removed) must lose
// no acknowledged row and register none twice: start-up registers the journaled files (or
// finds them registered), replay skips what files hold, and a republished file that exists
// but is not registered is replaced.
#[test]
fn a_crash_at_any_flush_step_keeps_rows_exactly_once() {
    for step in [
        "crash-after-publish",
        "crash-after-journal",
        "crash-after-register",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut node = Node::start(
            &data,
            NodeOptions {
                shards: 1,
                flush_rows_max: 50,
                extra_env: vec![("SHALE_FAILPOINTS".into(), step.into())],
                ..NodeOptions::default()
            },
        );
        // 60 rows: the flush of the first 50 crashes the node at `step`; the write that
        // triggered it was acknowledged before the flush ran.
        let response = node.post(
            "/write?db=c&precision=s",
            &[],
            numbered_rows("m", 0, 60).as_bytes(),
        );
        assert_eq!(response.status, 204, "{step}: {}", response.text());
        let status = node.must_exit();
        assert_eq!(status.code(), Some(86), "{step}: log:\n{}", node.log());
        let journals = pending_journals(&data);
        match step {
            "crash-after-publish" => assert!(journals.is_empty(), "{step}"),
            _ => assert_eq!(journals.len(), 1, "{step}"),
        }
        node.set_env("SHALE_FAILPOINTS", "");
        node.restart();
        assert_eq!(node.must_count("SELECT count(*) FROM c.m"), 60, "{step}");
        assert_eq!(
            node.must_count("SELECT count(DISTINCT seq) FROM c.m"),
            60,
            "{step}"
        );
        // A flush of the replayed rows may be writing its own journal right now; wait for it.
        node.wait_until(&format!("{step}: no pending journal"), || {
            pending_journals(&data).is_empty()
        });
        node.stop();
        node.restart();
        assert_eq!(node.manifest_rows("c"), 60, "{step}");
        assert_eq!(node.must_count("SELECT count(*) FROM c.m"), 60, "{step}");
    }
}

// A pending journal whose file was damaged after the crash must not stop start-up (before,
// the node refused to start until someone deleted the journal): it is set aside, logged, and
// the rows come back from the WAL into a fresh file.
#[test]
fn a_damaged_pending_journal_never_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(
        &data,
        NodeOptions {
            shards: 1,
            flush_rows_max: 50,
            extra_env: vec![("SHALE_FAILPOINTS".into(), "crash-after-journal".into())],
            ..NodeOptions::default()
        },
    );
    let response = node.post(
        "/write?db=j&precision=s",
        &[],
        numbered_rows("m", 0, 60).as_bytes(),
    );
    assert_eq!(response.status, 204, "{}", response.text());
    node.must_exit();
    let journal = pending_journals(&data).pop().expect("a pending journal");
    let entries: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap();
    let file = data.join(entries[0]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    node.set_env("SHALE_FAILPOINTS", "");
    node.restart();
    assert_eq!(node.must_count("SELECT count(*) FROM j.m"), 60);
    assert!(
        node.log().contains("pending journal unusable"),
        "{}",
        node.log()
    );
    assert!(journal.with_extension("json.invalid").exists());
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("j"), 60);
    assert_eq!(node.must_count("SELECT count(DISTINCT seq) FROM j.m"), 60);
}

// A WAL directory that lost its segments (deleted by hand, or a fresh disk under `_system`)
// must not make the shard reuse LSNs: file names and the exactly-once rule are keyed by them.
// Before, the next row got LSN 1 again: queries hid it behind the older file reaching LSN 1,
// and its flush collided with that file's name.
#[test]
fn a_lost_wal_directory_never_reuses_lsns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(
        &data,
        NodeOptions {
            shards: 1,
            ..NodeOptions::default()
        },
    );
    let row = |v: u32| format!("r,src=t v={v}i 1767225600");
    let response = node.post("/write?db=x&precision=s", &[], row(1).as_bytes());
    assert_eq!(response.status, 204);
    node.stop();
    std::fs::remove_dir_all(data.join("_system").join("wal")).unwrap();
    node.restart();
    let response = node.post("/write?db=x&precision=s", &[], row(2).as_bytes());
    assert_eq!(response.status, 204);
    assert_eq!(node.must_count("SELECT count(*) FROM x.r"), 2);
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("x"), 2);
    assert_eq!(node.must_count("SELECT count(DISTINCT v) FROM x.r"), 2);
}

// When the manifest refuses a flush for good, the refusal is final: logged at ERROR, counted,
// the refused rows stay queryable and in the WAL (and come back after a restart), writes to
// that table are refused with a message, and every other table on the shard keeps flushing.
// Before, the flush retried forever and no other table of the shard flushed again. The
// `reject-registration` failpoint makes the manifest's answer a refusal for one measurement.
#[test]
fn a_refused_registration_stops_only_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(
        &data,
        NodeOptions {
            shards: 1,
            flush_age_ms: 100,
            extra_env: vec![(
                "SHALE_FAILPOINTS".into(),
                "reject-registration=refused".into(),
            )],
            ..NodeOptions::default()
        },
    );
    let response = node.post(
        "/write?db=x&precision=s",
        &[],
        b"refused,src=t v=1i 1767225600",
    );
    assert_eq!(response.status, 204);
    node.wait_until("the registration to be refused", || {
        node.metric("shale_registrations_rejected_total") >= 1.0
    });
    assert!(node.log().contains("flush refused by the manifest"));
    assert_eq!(node.must_count("SELECT count(*) FROM x.refused"), 1);
    let response = node.post(
        "/write?db=x&precision=s",
        &[],
        b"refused,src=t v=2i 1767225601",
    );
    assert_eq!(response.status, 500, "{}", response.text());
    assert!(
        response.text().contains("refused its files"),
        "{}",
        response.text()
    );
    let response = node.post(
        "/write?db=x&precision=s",
        &[],
        b"other,src=t v=1i 1767225600",
    );
    assert_eq!(response.status, 204);
    node.wait_until("the other table to flush", || {
        node.manifest_files()
            .iter()
            .any(|f| f["measurement"] == "other")
    });
    // The WAL kept the refused row: without the failpoint it is flushed after a restart.
    node.kill9();
    node.set_env("SHALE_FAILPOINTS", "");
    node.restart();
    assert_eq!(node.must_count("SELECT count(*) FROM x.refused"), 1);
    node.stop();
    node.restart();
    assert_eq!(node.manifest_rows("x"), 2);
}

// A WAL write that fails (here: the disk is full) makes the node stop with a non-zero exit and
// a logged reason, instead of staying up with a WAL that refuses everything and flushes that
// retry forever. After space is freed, a restart serves every acknowledged row.
#[test]
fn a_failing_wal_disk_stops_the_node() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("a_failing_wal_disk_stops_the_node needs root (loop mounts); CI runs as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path(), 64);
    let data = disk.mount_point.join("data");
    let mut node = Node::start(
        &data,
        NodeOptions {
            shards: 1,
            extra_env: vec![("SHALE_WAL_SEGMENT_BYTES_MAX".into(), (1 << 20).to_string())],
            ..NodeOptions::default()
        },
    );
    // Leave about 2 MiB free, then write 256 KiB requests until the disk is full.
    let filler = disk.mount_point.join("filler");
    let keep_free = 2 << 20;
    let file = std::fs::File::create(&filler).unwrap();
    file.set_len(disk.free_bytes().saturating_sub(keep_free))
        .unwrap();
    // set_len makes a sparse file: write it so the blocks are really taken.
    {
        use std::io::Write;
        let mut writer = std::io::BufWriter::new(&file);
        let zeros = vec![0u8; 1 << 20];
        let mut left = file.metadata().unwrap().len();
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            if writer.write_all(&zeros[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = writer.flush();
    }
    let mut acknowledged = 0u64;
    let mut failed = false;
    for batch in 0..64 {
        let body = numbered_rows("m", batch * 4000, 4000);
        match harness::request(
            node.addr,
            "POST",
            "/write?db=diskfull&precision=s",
            &[],
            body.as_bytes(),
        ) {
            Ok(response) if response.status == 204 => acknowledged += 4000,
            _ => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the disk never filled up");
    let status = node.must_exit();
    assert!(
        !status.success(),
        "exited with {status}; log:\n{}",
        node.log()
    );
    assert!(
        node.log().contains("fatal error; shutting down"),
        "{}",
        node.log()
    );
    std::fs::remove_file(&filler).unwrap();
    node.restart();
    let stored = node.must_count("SELECT count(*) FROM diskfull.m");
    assert!(
        stored >= acknowledged,
        "acknowledged {acknowledged} rows, {stored} survived"
    );
    assert_eq!(
        node.must_count("SELECT count(DISTINCT seq) FROM diskfull.m"),
        stored
    );
    node.stop();
}
