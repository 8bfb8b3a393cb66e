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
    RecoveryReport, Wal, WalConfig, WalError, WalRecord, FRAME_HEADER_BYTES, GROUP_HEADER_BYTES,
    GROUP_MAGIC, SEGMENT_FORMAT_VERSION, SEGMENT_FORMAT_VERSION_V1, SEGMENT_HEADER_BYTES,
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

/// The segment format version from a segment's header.
fn segment_version(data: &[u8]) -> u32 {
    u32::from_le_bytes(data[8..12].try_into().unwrap())
}

/// One group commit in a version 2 segment, read from the group headers.
#[derive(Debug, Clone)]
struct Group {
    offset: usize,
    /// Offset just past its last frame.
    end: usize,
    /// (offset, frame length) of each frame.
    frames: Vec<(usize, usize)>,
}

/// Every group of a version 2 segment, in order.
fn groups(data: &[u8]) -> Vec<Group> {
    assert_eq!(segment_version(data), SEGMENT_FORMAT_VERSION);
    let mut groups = Vec::new();
    let mut position = SEGMENT_HEADER_BYTES;
    while position + GROUP_HEADER_BYTES <= data.len() && data[position..position + 4] == GROUP_MAGIC
    {
        let records = u32::from_le_bytes(data[position + 4..position + 8].try_into().unwrap());
        let body_bytes =
            u64::from_le_bytes(data[position + 16..position + 24].try_into().unwrap()) as usize;
        let end = position + GROUP_HEADER_BYTES + body_bytes;
        let frames = frames_from(data, position + GROUP_HEADER_BYTES, end);
        assert_eq!(frames.len(), records as usize, "group at {position}");
        groups.push(Group {
            offset: position,
            end,
            frames,
        });
        position = end;
    }
    groups
}

/// (offset, frame length) of the frames from `start` up to `end` or a zero length field.
fn frames_from(data: &[u8], start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut frames = Vec::new();
    let mut position = start;
    while position + FRAME_HEADER_BYTES <= end.min(data.len()) {
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

/// (offset, frame length) of every frame in a segment of either format version.
fn frame_offsets(data: &[u8]) -> Vec<(usize, usize)> {
    if segment_version(data) == SEGMENT_FORMAT_VERSION_V1 {
        frames_from(data, SEGMENT_HEADER_BYTES, data.len())
    } else {
        groups(data)
            .into_iter()
            .flat_map(|group| group.frames)
            .collect()
    }
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
    let config = WalConfig {
        dir: dir.to_owned(),
        ..wal.config().clone()
    };
    let end = *lsns.end();
    must_append(&wal, lsns).await;
    wal.close().await.unwrap();
    let (wal, report, replayed) = must_open(config, replay_from).await;
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

// Checks recovery from a crash in the middle of writing the last group (the file ends part
// way through its record): the torn group is cut off, everything before it is replayed, and
// the WAL keeps working and reuses no durable LSN.
#[test]
fn torn_tail_mid_record_is_truncated() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=4).await;
        must_append(&wal, 5..=5).await;
        wal.close().await.unwrap();

        let segment = segment_files(dir.path()).pop().unwrap();
        let data = std::fs::read(&segment).unwrap();
        let last_group = groups(&data).pop().unwrap();
        let (last_offset, last_len) = last_group.frames[0];
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
        assert_eq!(report.truncated_bytes, (cut - last_group.offset) as u64);
        let torn = report.torn_tail.expect("torn tail reported");
        assert_eq!(
            (torn.segment, torn.offset),
            (segment.clone(), last_group.offset as u64)
        );
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            last_group.offset as u64
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

// Checks that a flipped byte inside a record whose group is followed by complete groups is
// not mistaken for a torn tail: open refuses with Corrupt naming the segment and the record's
// offset, both in the last segment (decided by scanning forward) and in an earlier one.
#[test]
fn flipped_byte_in_middle_record_refuses_to_start() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=60).await;
        // A few more small groups, so that the last segment holds several.
        for lsn in 61..=64 {
            must_append(&wal, lsn..=lsn).await;
        }
        wal.close().await.unwrap();
        let segments = segment_files(dir.path());
        assert!(segments.len() >= 3);

        for segment in [segments[1].clone(), segments.last().unwrap().clone()] {
            let clean = std::fs::read(&segment).unwrap();
            let segment_groups = groups(&clean);
            assert!(
                segment_groups.len() >= 2,
                "need a group with a complete group after it"
            );
            let frames = &segment_groups[0].frames;
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
        assert_records(&replayed, 1..=64);
        wal.close().await.unwrap();
    });
}

// Checks the documented limit of torn-tail detection: damage to the last group cannot be told
// apart from a torn write, so the group is cut off like one (it was the newest, and in a real
// crash it was never acknowledged).
#[test]
fn damaged_final_record_is_treated_as_torn() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = must_open(small_config(dir.path()), 1).await;
        must_append(&wal, 1..=3).await;
        must_append(&wal, 4..=4).await;
        wal.close().await.unwrap();
        let segment = segment_files(dir.path()).pop().unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        let last_group = groups(&data).pop().unwrap();
        let (offset, _) = *last_group.frames.last().unwrap();
        data[offset + FRAME_HEADER_BYTES + 2] ^= 0xFF;
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(small_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=3);
        assert_eq!(
            report.torn_tail.map(|torn| torn.offset),
            Some(last_group.offset as u64)
        );
        wal.close().await.unwrap();
    });
}

/// Large groups in one segment, so that one group spans several disk blocks.
fn large_group_config(dir: &Path) -> WalConfig {
    WalConfig {
        segment_bytes_max: 1 << 20,
        write_bytes_max: 64 << 10,
        ..small_config(dir)
    }
}

/// Writes three groups (LSNs 1..=10, 11..=20 and 21..=40, the last spanning several 4 KiB
/// blocks) into one segment and returns its path and groups.
async fn three_groups(dir: &Path) -> (PathBuf, Vec<Group>) {
    let (wal, _, _) = must_open(large_group_config(dir), 1).await;
    must_append(&wal, 1..=10).await;
    must_append(&wal, 11..=20).await;
    must_append(&wal, 21..=40).await;
    wal.close().await.unwrap();
    let segments = segment_files(dir);
    assert_eq!(segments.len(), 1);
    let data = std::fs::read(&segments[0]).unwrap();
    let segment_groups = groups(&data);
    assert_eq!(
        segment_groups
            .iter()
            .map(|group| group.frames.len())
            .collect::<Vec<_>>(),
        vec![10, 10, 20]
    );
    (segments[0].clone(), segment_groups)
}

/// Zeros a group's first disk block from the group's start: what is on disk when the write
/// of the block holding the group's start did not persist (it keeps its previous content, the
/// zero padding after the group before) while later blocks did. Returns the first offset after
/// the zeroed range.
fn zero_first_block_of(data: &mut [u8], group: &Group) -> usize {
    const BLOCK_BYTES: usize = 4096;
    let block_end = (group.offset + 1).next_multiple_of(BLOCK_BYTES);
    data[group.offset..block_end].fill(0);
    block_end
}

// Checks the power-loss case version 2 exists for: the O_DIRECT write of the last group lost
// its first block while a later block of the same group persisted, leaving intact records
// after zeros. Nothing of that group was acknowledged (it was never synced), so recovery must
// cut it off as a torn tail, replay every record of the earlier groups, and go on appending.
// Version 1 found the intact later record and refused to start.
#[test]
fn last_group_with_lost_first_block_is_a_torn_tail() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (segment, segment_groups) = three_groups(dir.path()).await;
        let last = &segment_groups[2];
        let mut data = std::fs::read(&segment).unwrap();
        let zeroed_end = zero_first_block_of(&mut data, last);
        assert!(
            last.frames
                .iter()
                .any(|&(offset, len)| offset >= zeroed_end && offset + len <= last.end),
            "a whole record of the last group must lie after its first block"
        );
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(large_group_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=20);
        assert_eq!(report.next_lsn, 21);
        let torn = report.torn_tail.clone().expect("torn tail reported");
        assert_eq!(
            (torn.segment, torn.offset),
            (segment.clone(), last.offset as u64)
        );
        assert_eq!(report.truncated_bytes, (data.len() - last.offset) as u64);
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            last.offset as u64
        );
        must_continue(wal, dir.path(), 21..=30, 1).await;
    });
}

// Checks that a torn last group whose only damage is one record in its middle (a lost block
// in the middle of the write) is cut off whole: the records after the damaged one are valid
// but belong to the same unsynced group. Version 1 called this corruption.
#[test]
fn last_group_with_damaged_middle_record_is_a_torn_tail() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (segment, segment_groups) = three_groups(dir.path()).await;
        let last = &segment_groups[2];
        let mut data = std::fs::read(&segment).unwrap();
        let (offset, len) = last.frames[10];
        data[offset + len / 2] ^= 0x08;
        std::fs::write(&segment, &data).unwrap();

        let (wal, report, replayed) = must_open(large_group_config(dir.path()), 1).await;
        assert_records(&replayed, 1..=20);
        assert_eq!(
            report.torn_tail.as_ref().map(|torn| torn.offset),
            Some(last.offset as u64)
        );
        assert!(report.truncated_bytes > 0);
        must_continue(wal, dir.path(), 21..=25, 1).await;
    });
}

// Checks that the torn-group rule does not reach past the last group: a group in the middle
// that lost its first block, followed by a complete group, was synced once (the writer syncs
// each group before writing the next), so acknowledged records are damaged and open must
// refuse, naming the segment and the group's offset, and leave the file as it was.
#[test]
fn damaged_middle_group_before_a_complete_group_refuses_to_start() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (segment, segment_groups) = three_groups(dir.path()).await;
        let middle = &segment_groups[1];
        let mut data = std::fs::read(&segment).unwrap();
        zero_first_block_of(&mut data, middle);
        std::fs::write(&segment, &data).unwrap();

        match open_error(large_group_config(dir.path()), 1).await {
            WalError::Corrupt {
                segment: reported,
                offset,
                ..
            } => {
                assert_eq!(reported, segment);
                assert_eq!(offset, middle.offset as u64);
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        assert_eq!(std::fs::read(&segment).unwrap(), data);
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
        must_append(&wal, 1..=4).await;
        must_append(&wal, 5..=5).await;
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

/// Node and shard of the stored sample segments.
const SAMPLE_NODE: u64 = 42;
const SAMPLE_SHARD: u32 = 3;

/// The records both stored sample segments were made from, written in two groups (LSNs 1..=2
/// and 3..=5).
fn sample_records() -> Vec<WalRecord> {
    [
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
    .collect()
}

fn sample_config(dir: &Path) -> WalConfig {
    WalConfig::new(dir, SAMPLE_NODE, SAMPLE_SHARD)
}

fn sample_path(format: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format)
        .join("00000000000000000001.wal")
}

/// Writes the sample records in their two groups with today's code and returns the segment
/// bytes up to the end of the last record (the zero padding after it depends on the disk's
/// block size).
fn write_sample_with_current_code() -> Vec<u8> {
    let records = sample_records();
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
}

/// Opens a copy of a stored sample segment, checks that it replays to exactly the sample
/// records, then appends two more and checks that all seven come back after a reopen.
/// Returns the directory (deleted when dropped) and its segment files after the appends.
fn replay_sample_and_continue(sample: &Path) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(sample, dir.path().join("00000000000000000001.wal")).unwrap();
    let config = sample_config(dir.path());
    let expected = sample_records();
    run(move || async move {
        let (wal, report, replayed) = must_open(config.clone(), 1).await;
        assert_eq!(replayed, expected);
        assert_eq!((report.next_lsn, report.truncated_bytes), (6, 0));
        assert!(report.torn_tail.is_none());
        for lsn in 6..=7 {
            let lsn_appended = wal
                .append(1, lsn as i64, &[lsn as u8; 10])
                .unwrap()
                .durable()
                .await
                .unwrap();
            assert_eq!(lsn_appended, lsn);
        }
        wal.close().await.unwrap();
        let (wal, _, replayed) = must_open(config, 1).await;
        assert_eq!(&replayed[..5], &expected[..]);
        assert_eq!(
            replayed.iter().map(|record| record.lsn).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        wal.close().await.unwrap();
    });
    let segments = segment_files(dir.path());
    (dir, segments)
}

// Checks format compatibility with a version 1 segment written by an earlier build (stored
// under tests/data, never regenerated: this build no longer writes version 1): it must replay
// to exactly the records it was made from, and appends after it must go to a new version 2
// segment, since a segment keeps one layout.
#[test]
fn format_v1_sample_segment_still_reads() {
    let stored = std::fs::read(sample_path("wal-v1")).expect("read stored sample segment");
    assert_eq!(&stored[..8], &SEGMENT_MAGIC);
    assert_eq!(segment_version(&stored), SEGMENT_FORMAT_VERSION_V1);
    assert_eq!(frame_offsets(&stored).len(), sample_records().len());

    let (_dir, segments) = replay_sample_and_continue(&sample_path("wal-v1"));
    assert_eq!(segments.len(), 2, "appends continue in a new segment");
    let old = std::fs::read(&segments[0]).unwrap();
    assert_eq!(old, stored, "the version 1 segment is left as it was");
    assert!(segments[1].ends_with("00000000000000000006.wal"));
    let new = std::fs::read(&segments[1]).unwrap();
    assert_eq!(segment_version(&new), SEGMENT_FORMAT_VERSION);
    assert_eq!(groups(&new).len(), 2);
}

// Checks format compatibility with a version 2 segment (stored under tests/data): it must
// replay to exactly the records it was made from, the WAL must keep appending to it, and
// today's encoder must still produce the same bytes. A failure of the last check means the
// on-disk format changed: bump RECORD_FORMAT_VERSION or SEGMENT_FORMAT_VERSION and keep
// reading the old one. Regenerate (only for a deliberate format change, after storing the
// old sample under its own version) with SHALE_WAL_SAMPLE_REGENERATE=1.
#[test]
fn format_v2_sample_segment_reads() {
    let sample = sample_path("wal-v2");
    if std::env::var_os("SHALE_WAL_SAMPLE_REGENERATE").is_some() {
        std::fs::create_dir_all(sample.parent().unwrap()).unwrap();
        std::fs::write(&sample, write_sample_with_current_code()).unwrap();
    }
    let stored = std::fs::read(&sample).expect("read stored sample segment");
    assert_eq!(&stored[..8], &SEGMENT_MAGIC);
    assert_eq!(segment_version(&stored), SEGMENT_FORMAT_VERSION);
    let sample_groups = groups(&stored);
    assert_eq!(
        sample_groups
            .iter()
            .map(|group| group.frames.len())
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(sample_groups[1].end, stored.len());

    let (_dir, segments) = replay_sample_and_continue(&sample);
    assert_eq!(segments.len(), 1, "appends continue in the same segment");
    let continued = std::fs::read(&segments[0]).unwrap();
    assert_eq!(&continued[..stored.len()], &stored[..]);
    assert_eq!(groups(&continued).len(), 4);

    assert_eq!(
        write_sample_with_current_code(),
        stored,
        "today's encoder no longer writes the v2 format"
    );
}
