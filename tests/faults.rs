//! Fault tests through the real binary: kill -9 under load, a torn WAL tail, a corrupt WAL
//! record. They check the durability contract: every acknowledged row survives exactly once,
//! and damage that could hide acknowledged data stops start-up with a clear message.

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use harness::{duckdb_rows, parquet_list, Client, Node, NodeOptions};

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
