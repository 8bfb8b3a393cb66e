//! Integration tests of WAL shipping on real glommio executors and real files: the durable
//! observer, a replica WAL fed its origin's groups with `append_group`, `reset_to`, and the
//! catch-up reader `read_groups`.

use std::{
    cell::RefCell,
    future::Future,
    path::{Path, PathBuf},
    rc::{Rc, Weak},
};

use glommio::{LocalExecutorBuilder, Placement};
use shale_io::wal::{
    for_each_record, read_groups, GroupView, Wal, WalConfig, WalError, WalRecord,
    FRAME_HEADER_BYTES, GROUP_HEADER_BYTES, GROUP_MAGIC, SEGMENT_HEADER_BYTES,
};

const NODE: u64 = 7;
const SHARD: u32 = 1;

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

async fn must_open(config: WalConfig, replay_from_lsn: u64) -> (Wal, Vec<WalRecord>) {
    let mut replayed = Vec::new();
    let (wal, _) = Wal::open(config, replay_from_lsn, |view| {
        replayed.push(view.to_record());
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("open wal: {error}"));
    (wal, replayed)
}

/// Appends the records for `lsns` without waiting in between (so groups hold many records),
/// then waits until all are durable.
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

/// A group as the durable observer saw it, with what was true when it was called.
#[derive(Debug, Clone)]
struct Observed {
    bytes: Vec<u8>,
    first_lsn: u64,
    last_lsn: u64,
    durable_lsn_then: u64,
    syncs_then: u64,
}

type Log = Rc<RefCell<Vec<Observed>>>;

/// Takes the groups observed so far out of the log (so no borrow is held across an await).
fn take(log: &Log) -> Vec<Observed> {
    std::mem::take(&mut *log.borrow_mut())
}

/// Registers an observer on `wal` that copies every group into the returned log.
fn observe(wal: &Rc<Wal>) -> Log {
    let log: Log = Rc::default();
    let weak: Weak<Wal> = Rc::downgrade(wal);
    let sink = log.clone();
    wal.set_durable_observer(Box::new(move |bytes, first_lsn, last_lsn| {
        let stats = weak.upgrade().expect("wal alive").stats();
        sink.borrow_mut().push(Observed {
            bytes: bytes.to_vec(),
            first_lsn,
            last_lsn,
            durable_lsn_then: stats.durable_lsn,
            syncs_then: stats.syncs,
        });
    }));
    log
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

/// The byte ranges of every group in a version 2 segment, read from the group headers.
fn disk_groups(data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut position = SEGMENT_HEADER_BYTES;
    while position + GROUP_HEADER_BYTES <= data.len() && data[position..position + 4] == GROUP_MAGIC
    {
        let body_bytes =
            u64::from_le_bytes(data[position + 16..position + 24].try_into().unwrap()) as usize;
        let end = position + GROUP_HEADER_BYTES + body_bytes;
        groups.push(position..end);
        position = end;
    }
    groups
}

/// Every group on disk in `dir`, in order, as bytes.
fn all_disk_groups(dir: &Path) -> Vec<Vec<u8>> {
    segment_files(dir)
        .iter()
        .flat_map(|path| {
            let data = std::fs::read(path).unwrap();
            disk_groups(&data)
                .into_iter()
                .map(|range| data[range].to_vec())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every frame (header and body) on disk in `dir`, in order.
fn all_disk_frames(dir: &Path) -> Vec<Vec<u8>> {
    all_disk_groups(dir)
        .iter()
        .flat_map(|group| frames_of(group))
        .collect()
}

fn frames_of(group: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut position = GROUP_HEADER_BYTES;
    while position < group.len() {
        let body = u32::from_le_bytes(group[position..position + 4].try_into().unwrap()) as usize;
        frames.push(group[position..position + FRAME_HEADER_BYTES + body].to_vec());
        position += FRAME_HEADER_BYTES + body;
    }
    frames
}

/// Writes records 1..=300 to an origin WAL in `dir` and returns every group the observer saw.
async fn origin_with_groups(dir: &Path) -> (Rc<Wal>, Log) {
    let (wal, _) = must_open(small_config(dir), 1).await;
    let wal = Rc::new(wal);
    let log = observe(&wal);
    must_append(&wal, 1..=300).await;
    (wal, log)
}

fn replica_config(dir: &Path) -> WalConfig {
    small_config(dir)
}

// Checks that the observer sees every group exactly once, in LSN order, with the bytes that
// are on disk, and only once the group is durable (durable_lsn covers it and its fdatasync was
// counted): shipping a group before its sync could hand a peer records a power loss erases.
#[test]
fn observer_sees_every_durable_group_once_in_order() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (wal, log) = origin_with_groups(dir.path()).await;
        let stats = wal.stats();
        let log = log.borrow().clone();
        assert_eq!(log.len() as u64, stats.groups, "one call per group");
        assert!(log.len() > 10, "expected many groups, got {}", log.len());
        let mut next = 1;
        for (index, group) in log.iter().enumerate() {
            assert_eq!(group.first_lsn, next, "group {index} in lsn order");
            assert!(group.last_lsn >= group.first_lsn);
            assert!(
                group.durable_lsn_then >= group.last_lsn,
                "group {index} durable"
            );
            assert!(group.syncs_then > index as u64, "group {index} synced");
            next = group.last_lsn + 1;
        }
        assert_eq!(next, 301);
        let observed: Vec<Vec<u8>> = log.iter().map(|group| group.bytes.clone()).collect();
        assert_eq!(
            observed,
            all_disk_groups(dir.path()),
            "observed bytes are the disk's"
        );

        // Cleared, it reports nothing more.
        wal.clear_durable_observer();
        must_append(&wal, 301..=310).await;
        wal.close().await.unwrap();
    });
}

// Checks that a replica fed its origin's groups ends up with byte-identical frames and the
// same records (same LSNs, payloads, times) after a reopen, and continues with later groups
// after the replica is reopened: the replica must be a faithful copy of the origin's log.
#[test]
fn replica_stores_origin_groups_byte_identical() {
    run(|| async {
        let origin_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(origin_dir.path()).await;
        let (replica, _) = must_open(replica_config(replica_dir.path()), 1).await;
        let mut appends = Vec::new();
        for group in log.borrow_mut().drain(..) {
            let append = replica.append_group(&group.bytes).expect("append group");
            assert_eq!(append.lsn, group.last_lsn);
            appends.push(append);
        }
        for append in appends {
            append.durable().await.unwrap();
        }
        assert_eq!((replica.next_lsn(), replica.durable_lsn()), (301, 300));
        replica.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 1).await;
        assert_eq!(replayed, (1..=300).map(expected_record).collect::<Vec<_>>());
        assert_eq!(
            all_disk_frames(replica_dir.path()),
            all_disk_frames(origin_dir.path())
        );

        // The origin goes on; the reopened replica takes the new groups.
        must_append(&origin, 301..=350).await;
        for group in take(&log) {
            replica
                .append_group(&group.bytes)
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        replica.close().await.unwrap();
        origin.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 1).await;
        assert_eq!(replayed, (1..=350).map(expected_record).collect::<Vec<_>>());
        assert_eq!(
            all_disk_frames(replica_dir.path()),
            all_disk_frames(origin_dir.path())
        );
        replica.close().await.unwrap();
    });
}

/// Asserts that appending `group` to `replica` fails as `check` expects and appends nothing.
fn must_refuse(replica: &Wal, group: &[u8], what: &str, check: impl Fn(&WalError) -> bool) {
    let before = replica.stats();
    match replica.append_group(group) {
        Ok(_) => panic!("{what}: accepted"),
        Err(error) => assert!(check(&error), "{what}: unexpected error {error}"),
    }
    let after = replica.stats();
    assert_eq!(
        (after.next_lsn, after.appends, after.queue_bytes),
        (before.next_lsn, before.appends, before.queue_bytes),
        "{what}: something was appended"
    );
}

fn is_bad_group(error: &WalError) -> bool {
    matches!(error, WalError::BadGroup(_))
}

/// Rewrites a group header field at `offset` and recomputes the header's crc, so only the
/// field itself is wrong.
fn with_header_field(group: &[u8], offset: usize, value: &[u8]) -> Vec<u8> {
    let mut group = group.to_vec();
    group[offset..offset + value.len()].copy_from_slice(value);
    let crc = crc32fast::hash(&group[..28]);
    group[28..32].copy_from_slice(&crc.to_le_bytes());
    group
}

// Checks that append_group refuses, with nothing appended, a gap (Gap), a resend (Duplicate),
// a flip of any single byte of a group (header, frame headers, payloads), a truncated group,
// huge length fields, and groups of another node or shard: a replica must never store what
// its origin did not durably write, in the origin's order.
#[test]
fn append_group_refuses_gaps_duplicates_and_damage() {
    run(|| async {
        let origin_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(origin_dir.path()).await;
        origin.close().await.unwrap();
        let log = log.borrow().clone();
        let (replica, _) = must_open(replica_config(replica_dir.path()), 1).await;
        replica
            .append_group(&log[0].bytes)
            .unwrap()
            .durable()
            .await
            .unwrap();
        let next = log[1].first_lsn;
        assert_eq!(replica.next_lsn(), next);

        must_refuse(
            &replica,
            &log[2].bytes,
            "gap",
            |error| matches!(error, WalError::Gap { expected, got } if *expected == next && *got == log[2].first_lsn),
        );
        must_refuse(
            &replica,
            &log[0].bytes,
            "duplicate",
            |error| matches!(error, WalError::Duplicate { next_lsn, got } if *next_lsn == next && *got == 1),
        );

        // Every single-byte change anywhere in the group is caught.
        let group = &log[1].bytes;
        for position in 0..group.len() {
            let mut damaged = group.clone();
            damaged[position] ^= 0x5A;
            must_refuse(
                &replica,
                &damaged,
                &format!("flip at {position}"),
                is_bad_group,
            );
        }
        for len in [
            0,
            10,
            GROUP_HEADER_BYTES,
            GROUP_HEADER_BYTES + 4,
            group.len() - 1,
        ] {
            must_refuse(
                &replica,
                &group[..len],
                &format!("truncated to {len}"),
                is_bad_group,
            );
        }
        let mut longer = group.clone();
        longer.push(0);
        must_refuse(&replica, &longer, "extra byte", is_bad_group);
        must_refuse(
            &replica,
            &with_header_field(group, 16, &u64::MAX.to_le_bytes()),
            "huge body length",
            is_bad_group,
        );
        must_refuse(
            &replica,
            &with_header_field(group, 4, &u32::MAX.to_le_bytes()),
            "huge record count",
            is_bad_group,
        );
        // A frame length field claiming nearly 4 GiB, with the group's digest made to match
        // it, so only the bounds check can catch it.
        let mut huge_frame = group.clone();
        huge_frame[GROUP_HEADER_BYTES..GROUP_HEADER_BYTES + 4]
            .copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let mut digest = crc32fast::Hasher::new();
        digest.update(&huge_frame[GROUP_HEADER_BYTES..GROUP_HEADER_BYTES + FRAME_HEADER_BYTES]);
        let huge_frame = with_header_field(&huge_frame, 24, &digest.finalize().to_le_bytes());
        must_refuse(&replica, &huge_frame, "huge frame length", is_bad_group);
        replica.close().await.unwrap();

        // The same group is refused by WALs of another node or shard.
        for (node, shard) in [(NODE + 1, SHARD), (NODE, SHARD + 1)] {
            let other_dir = tempfile::tempdir().unwrap();
            let config = WalConfig {
                origin_node: node,
                shard,
                ..replica_config(other_dir.path())
            };
            let (other, _) = must_open(config, 1).await;
            must_refuse(&other, &log[0].bytes, "foreign group", is_bad_group);
            other.close().await.unwrap();
        }

        // After all that, the replica holds exactly the first group and takes the next.
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 1).await;
        assert_eq!(replayed.len() as u64, next - 1);
        replica
            .append_group(&log[1].bytes)
            .unwrap()
            .durable()
            .await
            .unwrap();
        replica.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 1).await;
        assert_eq!(
            replayed,
            (1..=log[1].last_lsn)
                .map(expected_record)
                .collect::<Vec<_>>()
        );
        replica.close().await.unwrap();
    });
}

// Checks that a group straddling the replica's next LSN (a catch-up restarting inside a
// group) appends only the records the replica lacks, with their frames unchanged, and that
// for_each_record hands out a validated group's records: both are how a receiver resumes.
#[test]
fn straddling_group_appends_only_missing_records() {
    run(|| async {
        let origin_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(origin_dir.path()).await;
        origin.close().await.unwrap();
        let log = log.borrow().clone();
        let group = log
            .iter()
            .find(|group| group.last_lsn - group.first_lsn >= 2)
            .expect("a group of three records or more");
        let resume = group.first_lsn + 1;
        let mut seen = Vec::new();
        for_each_record(&group.bytes, 64 << 10, |view| {
            seen.push(view.to_record());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            (group.first_lsn..=group.last_lsn)
                .map(expected_record)
                .collect::<Vec<_>>()
        );
        let view = GroupView::parse(&group.bytes, 64 << 10).unwrap();
        assert_eq!(
            (
                view.first_lsn(),
                view.last_lsn(),
                view.origin_node(),
                view.shard()
            ),
            (group.first_lsn, group.last_lsn, NODE, SHARD)
        );

        // A replica that starts at `resume` (empty, opened past the flushed records).
        let (replica, _) = must_open(replica_config(replica_dir.path()), resume).await;
        let append = replica.append_group(&group.bytes).unwrap();
        assert_eq!(append.lsn, group.last_lsn);
        append.durable().await.unwrap();
        replica.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), resume).await;
        assert_eq!(
            replayed,
            (resume..=group.last_lsn)
                .map(expected_record)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            all_disk_frames(replica_dir.path()),
            frames_of(&group.bytes)[1..].to_vec()
        );
        replica.close().await.unwrap();
    });
}

// Checks reset_to: refused at or below next_lsn and while records are pending; otherwise the
// replica holds one fresh segment starting at the new LSN, takes groups from there, and keeps
// that next LSN across a reopen, also when a crash left an old segment behind. A replica whose
// origin released the records it lacks has no other way to continue.
#[test]
fn reset_to_continues_at_the_new_lsn() {
    run(|| async {
        let origin_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(origin_dir.path()).await;
        origin.close().await.unwrap();
        let (replica, _) = must_open(replica_config(replica_dir.path()), 1).await;
        for group in take(&log).iter().take(20) {
            replica
                .append_group(&group.bytes)
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        let old_segment = segment_files(replica_dir.path())[0].clone();
        let old_bytes = std::fs::read(&old_segment).unwrap();
        assert!(segment_files(replica_dir.path()).len() > 1);
        let next = replica.next_lsn();
        for lsn in [next - 1, next] {
            assert!(matches!(
                replica.reset_to(lsn).await,
                Err(WalError::ResetRefused(_))
            ));
        }
        let pending = replica.append(1, 1, b"pending").unwrap();
        assert!(matches!(
            replica.reset_to(5000).await,
            Err(WalError::ResetRefused(_))
        ));
        pending.durable().await.unwrap();

        replica.reset_to(5000).await.unwrap();
        assert_eq!((replica.next_lsn(), replica.durable_lsn()), (5000, 4999));
        assert_eq!(
            segment_files(replica_dir.path()),
            vec![replica_dir.path().join("00000000000000005000.wal")]
        );

        // The origin's log from 5000 on (an origin that restarted past flushed records).
        let origin_dir = tempfile::tempdir().unwrap();
        let (origin, _) = must_open(small_config(origin_dir.path()), 5000).await;
        let origin = Rc::new(origin);
        let log = observe(&origin);
        let records = 5000..=5040;
        must_append(&origin, records.clone()).await;
        origin.close().await.unwrap();
        for group in take(&log) {
            replica
                .append_group(&group.bytes)
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        replica.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 5000).await;
        assert_eq!(
            replayed,
            records.clone().map(expected_record).collect::<Vec<_>>()
        );
        assert_eq!(replica.next_lsn(), 5041);
        replica.close().await.unwrap();

        // A crash before the old segments were deleted leaves one behind: still consistent.
        std::fs::write(&old_segment, old_bytes).unwrap();
        let (replica, replayed) = must_open(replica_config(replica_dir.path()), 5000).await;
        assert_eq!(replayed, records.map(expected_record).collect::<Vec<_>>());
        assert_eq!(replica.next_lsn(), 5041);
        replica.close().await.unwrap();
    });
}

/// Every group `read_groups` returns from `from_lsn` on, reading in steps of `bytes_max`.
fn read_all(dir: &Path, from_lsn: u64, bytes_max: usize) -> Vec<Vec<u8>> {
    let mut groups = Vec::new();
    let mut from = from_lsn;
    loop {
        let read = read_groups(dir, NODE, SHARD, from, u64::MAX, bytes_max).unwrap();
        if read.groups.is_empty() {
            return groups;
        }
        assert!(read.groups[0].first_lsn <= from);
        from = read.end_lsn;
        groups.extend(read.groups.into_iter().map(|group| group.bytes.to_vec()));
    }
}

// Checks read_groups against what the observer shipped: from LSN 1 across segment rotations,
// from inside a group (that whole group comes back), in steps bounded by bytes_max (always at
// least one group), bounded by through_lsn, and with oldest_lsn moving after release_below.
// Catch-up must hand a replica exactly the groups it missed.
#[test]
fn read_groups_returns_the_shipped_groups() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(dir.path()).await;
        let log = log.borrow().clone();
        let shipped: Vec<Vec<u8>> = log.iter().map(|group| group.bytes.clone()).collect();
        assert!(segment_files(dir.path()).len() > 3, "reads cross rotations");

        let read = read_groups(dir.path(), NODE, SHARD, 1, 300, usize::MAX).unwrap();
        assert_eq!((read.oldest_lsn, read.end_lsn), (Some(1), 301));
        let bytes: Vec<Vec<u8>> = read
            .groups
            .iter()
            .map(|group| group.bytes.to_vec())
            .collect();
        assert_eq!(bytes, shipped);
        for (group, observed) in read.groups.iter().zip(&log) {
            assert_eq!(
                (group.first_lsn, group.last_lsn),
                (observed.first_lsn, observed.last_lsn)
            );
        }
        assert_eq!(read_all(dir.path(), 1, 1), shipped, "one group at a time");
        assert_eq!(read_all(dir.path(), 1, 20_000), shipped, "bounded steps");
        let three: usize = shipped[..3].iter().map(Vec::len).sum();
        let read = read_groups(dir.path(), NODE, SHARD, 1, 300, three).unwrap();
        assert_eq!(read.groups.len(), 3);
        assert_eq!(read.end_lsn, log[2].last_lsn + 1);

        // From inside a group: the whole group comes back first.
        let (index, group) = log
            .iter()
            .enumerate()
            .find(|(_, group)| group.last_lsn > group.first_lsn)
            .unwrap();
        let read = read_groups(dir.path(), NODE, SHARD, group.first_lsn + 1, 300, 1).unwrap();
        assert_eq!(read.groups[0].bytes.to_vec(), shipped[index]);

        // Nothing past through_lsn, which stands for the durable LSN.
        let read = read_groups(dir.path(), NODE, SHARD, 1, log[4].last_lsn, usize::MAX).unwrap();
        assert_eq!(read.groups.len(), 5);
        let read = read_groups(dir.path(), NODE, SHARD, 301, 300, usize::MAX).unwrap();
        assert_eq!((read.groups.len(), read.end_lsn), (0, 301));

        // Released segments move oldest_lsn; reads below it return nothing.
        assert!(origin.release_below(200).await.unwrap() > 0);
        let read = read_groups(dir.path(), NODE, SHARD, 1, 300, usize::MAX).unwrap();
        let oldest = read.oldest_lsn.unwrap();
        assert!(oldest > 1 && oldest <= 200, "oldest lsn {oldest}");
        assert!(read.groups.is_empty());
        let read = read_groups(dir.path(), NODE, SHARD, oldest, 300, usize::MAX).unwrap();
        assert_eq!(read.groups[0].first_lsn, oldest);
        assert_eq!(read.end_lsn, 301);
        origin.close().await.unwrap();
    });
}

// Checks that an incomplete group at the end of the active segment (a write in progress, here
// the first half of a real next group written over the zero padding of a copy of the log) is
// not returned and is no error, while the complete groups before it are: the origin's writer
// appends while catch-up reads.
#[test]
fn read_groups_skips_an_incomplete_trailing_group() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (origin, log) = origin_with_groups(dir.path()).await;
        let copy = tempfile::tempdir().unwrap();
        for path in segment_files(dir.path()) {
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
        let complete_groups = log.borrow().len();
        must_append(&origin, 301..=320).await;
        origin.close().await.unwrap();
        let next_group = log
            .borrow()
            .iter()
            .find(|group| group.first_lsn == 301)
            .unwrap()
            .bytes
            .clone();
        let last = segment_files(copy.path()).pop().unwrap();
        let mut data = std::fs::read(&last).unwrap();
        let data_end = disk_groups(&data)
            .last()
            .map_or(SEGMENT_HEADER_BYTES, |range| range.end);
        for half in [GROUP_HEADER_BYTES / 2, next_group.len() / 2] {
            data.truncate(data_end);
            data.extend_from_slice(&next_group[..half]);
            std::fs::write(&last, &data).unwrap();
            let read = read_groups(copy.path(), NODE, SHARD, 1, u64::MAX, usize::MAX).unwrap();
            assert_eq!(read.end_lsn, 301, "half {half}");
            assert_eq!(read.groups.len(), complete_groups, "half {half}");
        }
    });
}

// Checks that read_groups wraps the bare frames of a version 1 segment (the stored sample of
// an earlier build) in synthesized groups that a replica accepts, so a log written before
// group headers existed can still be shipped; the replica must replay the sample's records.
#[test]
fn read_groups_wraps_version_1_frames() {
    const SAMPLE_NODE: u64 = 42;
    const SAMPLE_SHARD: u32 = 3;
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wal-v1/00000000000000000001.wal");
    let source = tempfile::tempdir().unwrap();
    std::fs::copy(&sample, source.path().join("00000000000000000001.wal")).unwrap();
    let read = read_groups(
        source.path(),
        SAMPLE_NODE,
        SAMPLE_SHARD,
        1,
        u64::MAX,
        usize::MAX,
    )
    .unwrap();
    assert_eq!((read.oldest_lsn, read.end_lsn), (Some(1), 6));
    let sample_frames: Vec<Vec<u8>> = {
        let data = std::fs::read(&sample).unwrap();
        let mut frames = Vec::new();
        let mut position = SEGMENT_HEADER_BYTES;
        while position + FRAME_HEADER_BYTES <= data.len() {
            let body = u32::from_le_bytes(data[position..position + 4].try_into().unwrap());
            if body == 0 {
                break;
            }
            let end = position + FRAME_HEADER_BYTES + body as usize;
            frames.push(data[position..end].to_vec());
            position = end;
        }
        frames
    };
    let shipped: Vec<Vec<u8>> = read
        .groups
        .iter()
        .flat_map(|group| frames_of(&group.bytes))
        .collect();
    assert_eq!(shipped, sample_frames, "frames unchanged");

    let replica_dir = tempfile::tempdir().unwrap();
    let sample_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&sample, sample_dir.path().join("00000000000000000001.wal")).unwrap();
    let replica_config = WalConfig::new(replica_dir.path(), SAMPLE_NODE, SAMPLE_SHARD);
    let sample_config = WalConfig::new(sample_dir.path(), SAMPLE_NODE, SAMPLE_SHARD);
    run(move || async move {
        let (replica, _) = must_open(replica_config.clone(), 1).await;
        for group in &read.groups {
            replica
                .append_group(&group.bytes)
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        replica.close().await.unwrap();
        let (replica, replayed) = must_open(replica_config, 1).await;
        replica.close().await.unwrap();
        let (sample, expected) = must_open(sample_config, 1).await;
        sample.close().await.unwrap();
        assert_eq!(expected.len(), 5);
        assert_eq!(replayed, expected);
    });
}
