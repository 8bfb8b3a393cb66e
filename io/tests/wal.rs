//! Integration tests of the per-shard WAL on real glommio executors and real files (temp
//! directories on the local disk, so O_DIRECT and fdatasync are exercised for real).

use std::{
    cell::RefCell,
    future::Future,
    path::{Path, PathBuf},
    rc::Rc,
};

use glommio::{LocalExecutorBuilder, Placement};
use shale_io::wal::{
    RecoveryReport, Wal, WalConfig, WalError, WalRecord, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};

const NODE: u64 = 7;
const SHARD: u32 = 1;

/// Runs `test` on a fresh single-threaded glommio executor. The default io_memory (10 MiB of
/// registered DMA buffers) works here: as root, io_uring buffer registration is not limited
/// by RLIMIT_MEMLOCK, and glommio falls back to unregistered buffers when it is.
fn run<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F) {
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .expect("build glommio executor");
    executor.run(test());
}

/// Small segments and groups so a few hundred records cross many groups and segments.
fn small_config(dir: &Path) -> WalConfig {
    WalConfig {
        segment_bytes_max: 16 << 10,
        write_bytes_max: 8 << 10,
        record_bytes_max: 64 << 10,
        queue_bytes_max: 1 << 20,
        ..WalConfig::new(dir, NODE, SHARD)
    }
}

/// Payload of varying size (0..1500 bytes) whose bytes depend on the LSN.
fn payload(lsn: u64) -> Vec<u8> {
    let len = (lsn * 37 % 1500) as usize;
    (0..len)
        .map(|index| (lsn as usize * 131 + index) as u8)
        .collect()
}

fn expected_record(lsn: u64) -> WalRecord {
    WalRecord {
        origin_node: NODE,
        shard: SHARD,
        lsn,
        kind: (lsn % 5) as u8,
        time_ns: lsn as i64 * 1_000 - 3,
        payload: payload(lsn),
    }
}

/// Opens the WAL, collecting every replayed record; panics on error.
async fn must_open(
    config: WalConfig,
    replay_from_lsn: u64,
) -> (Wal, RecoveryReport, Vec<WalRecord>) {
    let mut replayed = Vec::new();
    let (wal, report) = Wal::open(config, replay_from_lsn, |view| {
        replayed.push(view.to_record());
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("open wal: {error}"));
    (wal, report, replayed)
}

async fn open_error(config: WalConfig, replay_from_lsn: u64) -> WalError {
    match Wal::open(config, replay_from_lsn, |_| Ok(())).await {
        Ok(_) => panic!("open should have failed"),
        Err(error) => error,
    }
}

/// Appends the records for `lsns` (which must be the WAL's next LSNs) and waits until all
/// are durable.
async fn must_append(wal: &Wal, lsns: std::ops::RangeInclusive<u64>) {
    let mut pending = Vec::new();
    for lsn in lsns {
        let record = expected_record(lsn);
        let append = wal
            .append(record.kind, record.time_ns, &record.payload)
            .expect("append");
        assert_eq!(append.lsn, lsn);
        pending.push(append);
    }
    for append in pending {
        append.durable().await.expect("durable");
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list wal dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "wal"))
        .collect();
    files.sort();
    files
}

/// (offset, frame length) of every frame in a segment, read from the length fields.
fn frame_offsets(data: &[u8]) -> Vec<(usize, usize)> {
    let mut frames = Vec::new();
    let mut position = SEGMENT_HEADER_BYTES;
    while position + FRAME_HEADER_BYTES <= data.len() {
        let body_len =
            u32::from_le_bytes(data[position..position + 4].try_into().unwrap()) as usize;
        if body_len == 0 {
            break;
        }
        frames.push((position, FRAME_HEADER_BYTES + body_len));
        position += FRAME_HEADER_BYTES + body_len;
    }
    frames
}

/// Appends `lsns` to an open WAL, closes it, reopens it replaying from `replay_from`, and
/// checks that it holds exactly `replay_from..=` the last appended LSN with no torn tail: the
/// log goes on after whatever recovery did.
async fn must_continue(
    wal: Wal,
    dir: &Path,
    lsns: std::ops::RangeInclusive<u64>,
    replay_from: u64,
) {
    let end = *lsns.end();
    must_append(&wal, lsns).await;
    wal.close().await.unwrap();
    let (wal, report, replayed) = must_open(small_config(dir), replay_from).await;
    assert_records(&replayed, replay_from..=end);
    assert!(report.torn_tail.is_none());
    wal.close().await.unwrap();
}

fn assert_records(replayed: &[WalRecord], lsns: std::ops::RangeInclusive<u64>) {
    let expected: Vec<WalRecord> = lsns.map(expected_record).collect();
    assert_eq!(replayed.len(), expected.len(), "number of replayed records");
    for (got, want) in replayed.iter().zip(&expected) {
        assert_eq!(got, want, "record lsn {}", want.lsn);
    }
}

// Checks the basic contract end to end: records appended across many group commits and
// segment rotations all come back, in order and byte for byte, after close and reopen, and
// LSNs continue where they stopped (never reused) over several restarts.
#[test]
fn records_survive_reopen_across_groups_and_rotations() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_eq!(
            (report.next_lsn, report.segments, replayed.len()),
            (1, 1, 0)
        );

        must_append(&wal, 1..=300).await;
        let stats = wal.stats();
        assert!(
            stats.groups > 10,
            "expected many groups, got {}",
            stats.groups
        );
        assert!(
            stats.segments > 5,
            "expected many segments, got {}",
            stats.segments
        );
        assert_eq!(stats.segments, segment_files(dir.path()).len());
        assert_eq!(
            (stats.next_lsn, stats.durable_lsn, stats.queue_bytes),
            (301, 300, 0)
        );
        wal.close().await.unwrap();
        for path in segment_files(dir.path()) {
            let size = std::fs::metadata(&path).unwrap().len();
            // One record never exceeds a segment here, so no segment may pass the limit.
            assert!(size <= 16 << 10, "{} has {size} bytes", path.display());
        }

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=300);
        assert_eq!(
            (report.next_lsn, report.first_lsn, report.truncated_bytes),
            (301, Some(1), 0)
        );
        assert!(report.torn_tail.is_none());
        must_append(&wal, 301..=350).await;
        wal.close().await.unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=350);
        assert_eq!(report.next_lsn, 351);
        wal.close().await.unwrap();
    });
}

// Checks that many concurrent writers (the shape of many HTTP requests on one shard) share
// fdatasyncs, and that every LSN is handed out exactly once.
#[test]
fn concurrent_appenders_share_group_commits() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = WalConfig {
            segment_bytes_max: 1 << 20,
            write_bytes_max: 256 << 10,
            ..small_config(dir.path())
        };
        let (wal, _, _) = must_open(config.clone(), 1).await;
        let wal = Rc::new(wal);
        let lsns = Rc::new(RefCell::new(Vec::new()));
        let tasks: Vec<_> = (0..16)
            .map(|task| {
                let wal = wal.clone();
                let lsns = lsns.clone();
                glommio::spawn_local(async move {
                    for index in 0..40u64 {
                        let append = wal
                            .append(3, (task * 1000 + index) as i64, &[task as u8; 8192])
                            .unwrap();
                        let lsn = append.durable().await.unwrap();
                        lsns.borrow_mut().push(lsn);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        let mut lsns = lsns.take();
        lsns.sort_unstable();
        assert_eq!(lsns, (1..=640).collect::<Vec<_>>());
        let stats = wal.stats();
        assert_eq!(stats.appends, 640);
        assert!(
            stats.syncs * 4 <= stats.appends,
            "{} syncs for {} appends: no batching",
            stats.syncs,
            stats.appends
        );
        wal.close().await.unwrap();

        let (wal, _, replayed) = must_open(config, 1).await;
        assert_eq!(replayed.len(), 640);
        assert!(replayed
            .iter()
            .all(|record| record.payload.len() == 8192 && record.kind == 3));
        wal.close().await.unwrap();
    });
}

// Checks the acknowledgement contract: `durable` resolves only after the group's fdatasync
// completed (the sync counter moved past the value it had at append time), never before.
#[test]
fn durable_resolves_only_after_sync() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        let before = wal.stats();
        let append = wal.append(1, 10, b"one record").unwrap();
        let lsn = append.lsn;
        // Nothing can have been written yet: append never waits, and the writer task has not
        // run since.
        assert_eq!(wal.stats().syncs, before.syncs);
        assert!(wal.durable_lsn() < lsn);
        assert!(wal.stats().queue_bytes > 0);
        assert_eq!(append.durable().await.unwrap(), lsn);
        let after = wal.stats();
        assert!(after.syncs > before.syncs);
        assert!(after.durable_lsn >= lsn);
        assert_eq!(after.sync_latency.count, after.syncs);
        wal.close().await.unwrap();
    });
}

// Checks recovery from a crash in the middle of writing the last record (the file ends part
// way through it): the torn record is cut off, everything before it is replayed, and the WAL
// keeps working and reuses no durable LSN.
#[test]
fn torn_tail_mid_record_is_truncated() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=5).await;
        wal.close().await.unwrap();

        let segment = segment_files(dir.path()).pop().unwrap();
        let data = std::fs::read(&segment).unwrap();
        let (last_offset, last_len) = *frame_offsets(&data).last().unwrap();
        let cut = last_offset + last_len / 2;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=4);
        assert_eq!(report.next_lsn, 5);
        assert_eq!(report.truncated_bytes, (cut - last_offset) as u64);
        let torn = report.torn_tail.expect("torn tail reported");
        assert_eq!(
            (torn.segment, torn.offset),
            (segment.clone(), last_offset as u64)
        );
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            last_offset as u64
        );

        must_continue(wal, dir.path(), 5..=8, 1).await;
    });
}

// Checks that garbage after the last record (a half-written group over the zero padding) is
// a torn tail: cut off, reported, and the WAL continues after the last valid record.
#[test]
fn garbage_after_last_record_is_truncated() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=5).await;
        wal.close().await.unwrap();

        let segment = segment_files(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        let (last_offset, last_len) = *frame_offsets(&data).last().unwrap();
        let data_end = last_offset + last_len;
        let garbage: Vec<u8> = (0..3000u32).map(|index| (index * 7 + 1) as u8).collect();
        data.truncate(data_end);
        data.extend_from_slice(&garbage);
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=5);
        assert_eq!(report.truncated_bytes, garbage.len() as u64);
        assert_eq!(
            report.torn_tail.as_ref().map(|torn| torn.offset),
            Some(data_end as u64)
        );
        must_continue(wal, dir.path(), 6..=9, 1).await;
    });
}

// Checks that zeros after the last record (a preallocated or zero-filled tail) are the clean
// end of the log, not damage: nothing is reported or cut, and appends continue.
#[test]
fn zeros_after_last_record_are_a_clean_end() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=5).await;
        wal.close().await.unwrap();

        let segment = segment_files(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        data.extend_from_slice(&[0u8; 10_000]);
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=5);
        assert_eq!(report.truncated_bytes, 0);
        assert!(report.torn_tail.is_none());
        must_append(&wal, 6..=7).await;
        wal.close().await.unwrap();
        let (wal, _, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=7);
        wal.close().await.unwrap();
    });
}

// Checks that a crash right after a segment file was created, before its header reached the
// disk (an empty last file), is recovered: the segment is reinitialized and LSNs continue.
#[test]
fn empty_last_segment_is_reinitialized() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=3).await;
        wal.close().await.unwrap();
        std::fs::File::create(dir.path().join("00000000000000000004.wal")).unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=3);
        assert_eq!((report.next_lsn, report.segments), (4, 2));
        must_append(&wal, 4..=6).await;
        wal.close().await.unwrap();
        let (wal, _, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=6);
        wal.close().await.unwrap();
    });
}

// Checks that a flipped byte inside a record that is followed by valid records is not
// mistaken for a torn tail: open refuses with Corrupt naming the segment and the record's
// offset, both in the last segment (decided by scanning forward) and in an earlier one.
#[test]
fn flipped_byte_in_middle_record_refuses_to_start() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=60).await;
        wal.close().await.unwrap();
        let segments = segment_files(dir.path());
        assert!(segments.len() >= 3);

        for segment in [segments[1].clone(), segments.last().unwrap().clone()] {
            let clean = std::fs::read(&segment).unwrap();
            let frames = frame_offsets(&clean);
            assert!(frames.len() >= 3, "need a record with records after it");
            let (offset, len) = frames[frames.len() / 2];
            let mut damaged = clean.clone();
            damaged[offset + len - 20] ^= 0x10;
            std::fs::write(&segment, &damaged).unwrap();

            match open_error(small_config(dir.path()), 1).await {
                WalError::Corrupt {
                    segment: reported,
                    offset: reported_offset,
                    reason,
                } => {
                    assert_eq!(reported, segment);
                    assert_eq!(reported_offset, offset as u64);
                    assert!(reason.contains("checksum"), "{reason}");
                }
                other => panic!("expected Corrupt, got {other}"),
            }
            let message = open_error(small_config(dir.path()), 1).await.to_string();
            assert!(
                message.contains(&format!(
                    "{} is corrupt at offset {offset}",
                    segment.display()
                )),
                "{message}"
            );
            assert!(message.contains("refusing to start"), "{message}");
            // The damaged file is left as it was for the operator.
            assert_eq!(std::fs::read(&segment).unwrap(), damaged);
            std::fs::write(&segment, &clean).unwrap();
        }
        let (wal, _, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=60);
        wal.close().await.unwrap();
    });
}

// Checks the documented limit of torn-tail detection: damage to the very last record cannot
// be told apart from a torn write, so it is cut off like one (that record was the newest, and
// in a real crash it was never acknowledged).
#[test]
fn damaged_final_record_is_treated_as_torn() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=4).await;
        wal.close().await.unwrap();
        let segment = segment_files(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        let (offset, _) = *frame_offsets(&data).last().unwrap();
        data[offset + FRAME_HEADER_BYTES + 2] ^= 0xFF;
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=3);
        assert_eq!(
            report.torn_tail.map(|torn| torn.offset),
            Some(offset as u64)
        );
        wal.close().await.unwrap();
    });
}

// Checks that segments must continue each other's LSNs: removing a middle segment (lost
// acknowledged records) refuses to start, as does a segment from another node or shard.
#[test]
fn missing_middle_segment_or_foreign_segment_refuses_to_start() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=60).await;
        wal.close().await.unwrap();
        let segments = segment_files(dir.path());
        let removed = std::fs::read(&segments[1]).unwrap();
        std::fs::remove_file(&segments[1]).unwrap();
        match open_error(small_config(dir.path()), 1).await {
            WalError::Corrupt {
                segment, reason, ..
            } => {
                assert_eq!(segment, segments[2]);
                assert!(reason.contains("lsn gap"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        std::fs::write(&segments[1], removed).unwrap();

        let foreign = WalConfig {
            origin_node: NODE + 1,
            ..small_config(dir.path())
        };
        let message = open_error(foreign, 1).await.to_string();
        assert!(message.contains("wrong directory"), "{message}");
    });
}

// Checks truncation: release_below deletes exactly the segments whose records are all below
// the given LSN, oldest first, never the segment being written, and a reopen that starts
// replay at that LSN finds everything it needs.
#[test]
fn release_below_deletes_only_fully_covered_segments() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=100).await;
        let first_lsns: Vec<u64> = wal
            .segment_paths()
            .iter()
            .map(|path| path.file_stem().unwrap().to_str().unwrap().parse().unwrap())
            .collect();
        assert!(first_lsns.len() >= 4);

        // Segment 1 holds first_lsns[1]..first_lsns[2]-1; one LSN short of covering it.
        let release_lsn = first_lsns[2] - 1;
        assert_eq!(wal.release_below(release_lsn).await.unwrap(), 1);
        assert_eq!(wal.release_below(first_lsns[2]).await.unwrap(), 1);
        assert_eq!(segment_files(dir.path()).len(), first_lsns.len() - 2);
        assert_eq!(wal.stats().segments_released, 2);

        assert_eq!(
            wal.release_below(u64::MAX).await.unwrap() as usize,
            first_lsns.len() - 3
        );
        let remaining = segment_files(dir.path());
        assert_eq!(remaining, vec![wal.segment_paths().pop().unwrap()]);
        must_append(&wal, 101..=102).await;
        wal.close().await.unwrap();

        let active_first = *first_lsns.last().unwrap();
        let (wal, report, replayed) = must_open(small_config(dir.path()), active_first).await;
        assert_records(&replayed, active_first..=102);
        assert_eq!((report.records_skipped, report.next_lsn), (0, 103));
        wal.close().await.unwrap();

        // Replaying from below the oldest remaining segment would silently lose records.
        let message = open_error(small_config(dir.path()), 1).await.to_string();
        assert!(message.contains("were deleted"), "{message}");
    });
}

// Checks back-pressure: when queue_bytes_max is reached, append fails with Full without
// appending anything (no LSN consumed), and succeeds again once the queue drained.
#[test]
fn full_queue_rejects_appends_without_consuming_lsns() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = WalConfig {
            record_bytes_max: 1024,
            queue_bytes_max: 4096,
            ..small_config(dir.path())
        };
        let (wal, _, _) = must_open(config.clone(), 1).await;
        let mut pending = Vec::new();
        let full = loop {
            match wal.append(1, 0, &[9u8; 1000]) {
                Ok(append) => pending.push(append),
                Err(error) => break error,
            }
            assert!(pending.len() < 10, "queue never filled");
        };
        assert!(
            matches!(
                full,
                WalError::Full {
                    queue_bytes_max: 4096,
                    ..
                }
            ),
            "{full}"
        );
        let stats = wal.stats();
        assert_eq!(
            (stats.appends_rejected_full, stats.next_lsn),
            (1, pending.len() as u64 + 1)
        );
        assert!(stats.queue_bytes <= 4096);
        assert!(matches!(
            wal.append(1, 0, &[0u8; 1025]),
            Err(WalError::TooLarge {
                payload_bytes: 1025,
                ..
            })
        ));

        for append in pending {
            append.durable().await.unwrap();
        }
        assert_eq!(wal.stats().queue_bytes, 0);
        let lsn = wal
            .append(1, 0, &[9u8; 1000])
            .unwrap()
            .durable()
            .await
            .unwrap();
        assert_eq!(lsn, wal.next_lsn() - 1);
        wal.close().await.unwrap();
        assert!(matches!(wal.append(1, 0, b"late"), Err(WalError::Closed)));
    });
}

// Checks replay_from_lsn: records below it are validated but not passed to the callback, new
// LSNs never go below it (even in an empty directory), and a callback error stops open.
#[test]
fn replay_from_lsn_skips_flushed_records() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=50).await;
        wal.close().await.unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 31).await;
        assert_records(&replayed, 31..=50);
        assert_eq!(
            (
                report.records_replayed,
                report.records_skipped,
                report.next_lsn
            ),
            (20, 30, 51)
        );
        wal.close().await.unwrap();

        let failed = Wal::open(small_config(dir.path()), 1, |view| {
            if view.lsn == 12 {
                Err("no room for this record".to_owned())
            } else {
                Ok(())
            }
        })
        .await;
        assert!(matches!(failed, Err(WalError::Replay { lsn: 12, .. })));

        let empty = tempfile::tempdir().unwrap();
        let (wal, report, _) = must_open(small_config(empty.path()), 1000).await;
        assert_eq!(report.next_lsn, 1000);
        assert_eq!(
            wal.append(0, 0, b"x").unwrap().durable().await.unwrap(),
            1000
        );
        wal.close().await.unwrap();
        assert_eq!(
            segment_files(empty.path()),
            vec![empty.path().join("00000000000000001000.wal")]
        );
    });
}

// Checks that skipping ahead to replay_from_lsn (the manifest is ahead of this WAL) after a
// torn tail leaves a directory that reopens cleanly: the torn tail is cut before the new
// segment is created, so it cannot later read as corruption in a non-last segment.
#[test]
fn skip_ahead_after_torn_tail_reopens_cleanly() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=5).await;
        wal.close().await.unwrap();
        let segment = segment_files(dir.path()).pop().unwrap();
        let data = std::fs::read(&segment).unwrap();
        let (offset, len) = *frame_offsets(&data).last().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len((offset + len - 3) as u64)
            .unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 100).await;
        assert!(replayed.is_empty());
        assert_eq!(
            (report.records_skipped, report.next_lsn, report.segments),
            (4, 100, 2)
        );
        assert!(report.torn_tail.is_some());
        must_continue(wal, dir.path(), 100..=102, 100).await;
    });
}

// Checks that a WAL directory can only be open once at a time (two writers would interleave
// LSNs and overwrite each other's tail), and that close releases it.
#[test]
fn directory_is_locked_while_open() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        let append = wal.append(1, 1, b"kept alive past close").unwrap();
        let message = open_error(small_config(dir.path()), 1).await.to_string();
        assert!(message.contains("lock wal directory"), "{message}");
        wal.close().await.unwrap();
        // A stale Append handle keeps the shared state alive but not the lock.
        assert_eq!(append.durable().await.unwrap(), 1);
        let (wal, _, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_eq!(replayed.len(), 1);
        wal.close().await.unwrap();
    });
}

// Checks the workaround for glommio 0.9's per-thread io_uring polling probe: if something
// opened an empty DmaFile on this thread first, direct reads on the device fail with
// EOPNOTSUPP, and open must say so clearly instead of failing on a segment read. (Should a
// glommio upgrade fix the probe, open simply succeeds.)
#[test]
fn poisoned_polling_probe_is_reported_clearly() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        // Read-write, as a file that is created and then read back would be opened.
        let empty = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(dir.path().join("empty"))
            .await
            .unwrap();
        empty.close().await.unwrap();
        let wal_dir = dir.path().join("wal");
        match Wal::open(small_config(&wal_dir), 1, |_| Ok(())).await {
            Ok((wal, _)) => wal.close().await.unwrap(),
            Err(error) => {
                let message = error.to_string();
                assert!(message.contains("prime_direct_io_probe"), "{message}");
            }
        }
    });
}

// Checks that an I/O error in the writer is fatal (the fsyncgate rule: after a failed write
// or fdatasync the kernel may have dropped the data, so a retry could report lost records as
// durable): the waiting append fails, every later append, release and close fail with
// Failed, and after a restart exactly the records acknowledged before the error (plus, at
// most, the one whose write failed part way) are replayed. The error is provoked with
// RLIMIT_FSIZE (writes past it fail), which is process-wide, so the test re-runs this test
// binary as a child process that sets the limit.
#[test]
fn write_error_fails_the_wal_for_good() {
    const CHILD_ENV: &str = "SHALE_WAL_TEST_FILE_SIZE_LIMIT_CHILD";
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        write_error_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "write_error_fails_the_wal_for_good",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .output()
        .expect("run child test process");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && log.contains("1 passed"),
        "child failed:\n{log}"
    );
    let acknowledged: u64 = std::fs::read_to_string(dir.path().join("acknowledged"))
        .expect("child wrote its result")
        .parse()
        .unwrap();
    assert!(
        acknowledged > 5,
        "the limit should allow some records first"
    );

    let config = failing_config(&dir.path().join("wal"));
    run(move || async move {
        let (wal, _, replayed) = must_open(config, 1).await;
        let count = replayed.len() as u64;
        assert!(
            count == acknowledged || count == acknowledged + 1,
            "{count} replayed, {acknowledged} acknowledged"
        );
        assert_records(&replayed[..acknowledged as usize], 1..=acknowledged);
        wal.close().await.unwrap();
    });
}

fn failing_config(dir: &Path) -> WalConfig {
    WalConfig {
        segment_bytes_max: 1 << 20,
        ..small_config(dir)
    }
}

fn write_error_child(dir: &Path) {
    const FILE_SIZE_LIMIT_BYTES: u64 = 32 << 10;
    // SAFETY: plain libc calls on this (child) process; ignoring SIGXFSZ turns the signal a
    // write past the limit raises into an EFBIG or short-write error.
    unsafe {
        assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
        let limit = libc::rlimit {
            rlim_cur: FILE_SIZE_LIMIT_BYTES,
            rlim_max: FILE_SIZE_LIMIT_BYTES,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let config = failing_config(&dir.join("wal"));
    let result_path = dir.join("acknowledged");
    run(move || async move {
        let (wal, _, _) = must_open(config, 1).await;
        let mut acknowledged = 0u64;
        let error = loop {
            let record = expected_record(acknowledged + 1);
            let append = wal
                .append(record.kind, record.time_ns, &record.payload)
                .expect("append before the failure");
            match append.durable().await {
                Ok(lsn) => acknowledged = lsn,
                Err(error) => break error,
            }
            assert!(acknowledged < 1000, "the file size limit never hit");
        };
        assert!(matches!(error, WalError::Failed { .. }), "{error}");
        assert!(wal.stats().failed);
        assert!(matches!(
            wal.append(1, 1, b"after"),
            Err(WalError::Failed { .. })
        ));
        assert!(matches!(
            wal.release_below(u64::MAX).await,
            Err(WalError::Failed { .. })
        ));
        assert!(matches!(wal.close().await, Err(WalError::Failed { .. })));
        std::fs::write(&result_path, acknowledged.to_string()).unwrap();
    });
}

// Checks format compatibility with a segment written by an earlier build (stored under
// tests/data): it must replay to exactly the records it was made from, and today's encoder
// must still produce the same bytes. A failure means the on-disk format changed: bump
// RECORD_FORMAT_VERSION or SEGMENT_FORMAT_VERSION and keep reading the old one.
// Regenerate (only for a deliberate format change) with SHALE_WAL_SAMPLE_REGENERATE=1.
#[test]
fn format_v1_sample_segment_still_reads() {
    const SAMPLE_NODE: u64 = 42;
    const SAMPLE_SHARD: u32 = 3;
    let sample_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wal-v1/00000000000000000001.wal");
    let records: Vec<WalRecord> = [
        (
            1,
            0u8,
            1_700_000_000_000_000_000i64,
            b"cpu,host=a value=1 1700000000000000000".to_vec(),
        ),
        (2, 1, -1, Vec::new()),
        (3, 255, i64::MAX, (0..=255u8).collect()),
        (4, 2, 0, vec![0u8; 17]),
        (
            5,
            0,
            1_700_000_000_000_000_123,
            "mem,host=b used=42i\ncpu,host=ü value=0.5"
                .as_bytes()
                .to_vec(),
        ),
    ]
    .into_iter()
    .map(|(lsn, kind, time_ns, payload)| WalRecord {
        origin_node: SAMPLE_NODE,
        shard: SAMPLE_SHARD,
        lsn,
        kind,
        time_ns,
        payload,
    })
    .collect();
    let sample_config = |dir: &Path| WalConfig::new(dir, SAMPLE_NODE, SAMPLE_SHARD);

    // Writes the records in two groups with today's code and returns the segment bytes up to
    // the end of the last record (the zero padding after it depends on the disk's block size).
    let write_current = |records: Vec<WalRecord>| -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let config = sample_config(dir.path());
        let path = dir.path().join("00000000000000000001.wal");
        run(move || async move {
            let (wal, _, _) = must_open(config, 1).await;
            for group in [&records[..2], &records[2..]] {
                let appends: Vec<_> = group
                    .iter()
                    .map(|record| {
                        wal.append(record.kind, record.time_ns, &record.payload)
                            .unwrap()
                    })
                    .collect();
                for append in appends {
                    append.durable().await.unwrap();
                }
            }
            wal.close().await.unwrap();
        });
        let data = std::fs::read(&path).unwrap();
        let (offset, len) = *frame_offsets(&data).last().unwrap();
        data[..offset + len].to_vec()
    };

    if std::env::var_os("SHALE_WAL_SAMPLE_REGENERATE").is_some() {
        std::fs::create_dir_all(sample_path.parent().unwrap()).unwrap();
        std::fs::write(&sample_path, write_current(records.clone())).unwrap();
    }
    let stored = std::fs::read(&sample_path).expect("read stored sample segment");
    assert_eq!(&stored[..8], &SEGMENT_MAGIC);
    assert_eq!(
        u32::from_le_bytes(stored[8..12].try_into().unwrap()),
        1,
        "segment format version"
    );
    assert_eq!(frame_offsets(&stored).len(), records.len());

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&sample_path, dir.path().join("00000000000000000001.wal")).unwrap();
    let config = sample_config(dir.path());
    let expected = records.clone();
    run(move || async move {
        let (wal, report, replayed) = must_open(config, 1).await;
        assert_eq!(replayed, expected);
        assert_eq!((report.next_lsn, report.truncated_bytes), (6, 0));
        wal.close().await.unwrap();
    });

    assert_eq!(
        write_current(records),
        stored,
        "today's encoder no longer writes the v1 format"
    );
}
