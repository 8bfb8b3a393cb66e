//! Opening a WAL: find the segments, validate and replay them in LSN order, cut a torn tail,
//! and prepare the segment the writer continues in.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use std::os::unix::io::AsRawFd;

use glommio::io::{Directory, DmaFile, OpenOptions};

use super::{
    config::WalConfig,
    error::WalError,
    record::RecordView,
    segment::{
        parse_segment_file_name, scan_segment, HeaderFault, ScanError, ScanExpectation,
        SegmentHeader, SEGMENT_FORMAT_VERSION, SEGMENT_HEADER_BYTES,
    },
    writer::ActiveSegment,
    SegmentEntry,
};

/// What `Wal::open` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records passed to the replay callback.
    pub records_replayed: u64,
    /// Valid records below `replay_from_lsn`, checked but not passed on.
    pub records_skipped: u64,
    /// Lowest LSN found on disk, if any record was found.
    pub first_lsn: Option<u64>,
    /// LSN the first append after open gets.
    pub next_lsn: u64,
    /// Segment files on disk after open, including a newly created one.
    pub segments: usize,
    /// Bytes of segment files read.
    pub bytes_scanned: u64,
    /// Bytes cut off the last segment (torn tail or torn header).
    pub truncated_bytes: u64,
    /// Set when the last segment ended in a torn write that was cut off.
    pub torn_tail: Option<TornTail>,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
}

pub(crate) struct Recovered {
    pub report: RecoveryReport,
    pub directory: Directory,
    pub segments: VecDeque<SegmentEntry>,
    pub active: ActiveSegment,
    /// Open created a fresh segment (empty directory, or a skip ahead in LSNs).
    pub created_segment: bool,
}

/// The last segment, kept for resuming appends.
struct LastSegment {
    path: PathBuf,
    first_lsn: u64,
    data: Vec<u8>,
    data_end: usize,
    /// The next LSN after its records; equal to `first_lsn` when it holds none.
    next_lsn: u64,
    /// Segment format version from its header (the current one when the header was missing).
    format_version: u32,
    torn: bool,
    header_missing: bool,
}

pub(crate) async fn recover(
    config: &WalConfig,
    replay_from_lsn: u64,
    mut on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<Recovered, WalError> {
    config.validate()?;
    let replay_from_lsn = replay_from_lsn.max(1);
    let directory = open_directory(&config.dir, config.fsync).await?;
    super::direct_io::prime_direct_io_probe(&config.dir).await?;
    let (paths, others) = list_segments(&config.dir)?;
    for path in others {
        tracing::warn!(path = %path.display(), "ignoring unexpected file in wal directory");
    }

    let mut report = RecoveryReport {
        records_replayed: 0,
        records_skipped: 0,
        first_lsn: None,
        next_lsn: replay_from_lsn,
        segments: 0,
        bytes_scanned: 0,
        truncated_bytes: 0,
        torn_tail: None,
    };
    let mut segments = VecDeque::new();
    let mut last: Option<LastSegment> = None;
    let mut expected_lsn: Option<u64> = None;

    for (index, (name_lsn, path)) in paths.iter().enumerate() {
        let is_last_segment = index + 1 == paths.len();
        let corrupt = |offset: u64, reason: String| WalError::Corrupt {
            segment: path.clone(),
            offset,
            reason,
        };
        let data = read_file(path).await?;
        report.bytes_scanned += data.len() as u64;

        let header = match SegmentHeader::decode(&data) {
            Ok(header) => Some(header),
            // A crash between creating the last segment and syncing its header: nothing in
            // it was ever acknowledged, so it is reinitialized from its name.
            Err(HeaderFault::Missing(reason)) if is_last_segment => {
                tracing::warn!(path = %path.display(), %reason, "wal segment header never reached the disk; rewriting it");
                None
            }
            Err(HeaderFault::Missing(reason) | HeaderFault::Bad(reason)) => {
                return Err(corrupt(0, reason))
            }
        };
        if let Some(header) = header {
            if header.origin_node != config.origin_node || header.shard != config.shard {
                return Err(corrupt(
                    0,
                    format!(
                        "segment belongs to node {} shard {}, but this wal is node {} shard {} (wrong directory?)",
                        header.origin_node, header.shard, config.origin_node, config.shard
                    ),
                ));
            }
            if header.first_lsn != *name_lsn {
                return Err(corrupt(
                    0,
                    format!(
                        "header says first lsn {}, file name says {name_lsn}",
                        header.first_lsn
                    ),
                ));
            }
        }
        let first_lsn = *name_lsn;
        check_continuity(expected_lsn, first_lsn, replay_from_lsn)
            .map_err(|reason| corrupt(0, reason))?;

        let (data_end, next_lsn, torn) = if let Some(header) = header {
            let expect = ScanExpectation {
                format_version: header.format_version,
                origin_node: config.origin_node,
                shard: config.shard,
                first_lsn,
                is_last_segment,
            };
            let summary = scan_segment(&data, expect, |view| {
                if view.lsn < replay_from_lsn {
                    report.records_skipped += 1;
                    return Ok(());
                }
                on_record(view)?;
                report.records_replayed += 1;
                Ok(())
            })
            .map_err(|error| match error {
                ScanError::Corrupt { offset, reason } => corrupt(offset as u64, reason),
                ScanError::Callback { lsn, reason } => WalError::Replay { lsn, reason },
            })?;
            if summary.records > 0 && report.first_lsn.is_none() {
                report.first_lsn = Some(first_lsn);
            }
            let torn = summary.torn_tail.is_some();
            if let Some(reason) = summary.torn_tail {
                let truncated = (data.len() - summary.data_end) as u64;
                tracing::warn!(
                    path = %path.display(),
                    offset = summary.data_end,
                    truncated_bytes = truncated,
                    lsn = summary.next_lsn,
                    %reason,
                    "truncating torn wal tail"
                );
                report.truncated_bytes += truncated;
                report.torn_tail = Some(TornTail {
                    segment: path.clone(),
                    offset: summary.data_end as u64,
                    reason,
                });
            }
            (summary.data_end, summary.next_lsn, torn)
        } else {
            report.truncated_bytes += data.len() as u64;
            (SEGMENT_HEADER_BYTES, first_lsn, false)
        };

        expected_lsn = Some(next_lsn);
        segments.push_back(SegmentEntry {
            first_lsn,
            path: path.clone(),
        });
        if is_last_segment {
            last = Some(LastSegment {
                path: path.clone(),
                first_lsn,
                data,
                data_end,
                next_lsn,
                format_version: header
                    .map_or(SEGMENT_FORMAT_VERSION, |header| header.format_version),
                torn,
                header_missing: header.is_none(),
            });
        }
    }

    let scanned_next_lsn = expected_lsn.unwrap_or(1);
    let next_lsn = scanned_next_lsn.max(replay_from_lsn);
    if expected_lsn.is_some() && next_lsn > scanned_next_lsn {
        // The manifest covers LSNs this WAL never logged (for example after the directory was
        // restored from an older copy); continue above them so no LSN is ever reused.
        tracing::warn!(
            shard_id = config.shard,
            lsn = scanned_next_lsn,
            replay_from_lsn,
            "wal ends below the first unflushed lsn; skipping ahead"
        );
    }
    report.next_lsn = next_lsn;

    let identity = |first_lsn| SegmentHeader {
        format_version: SEGMENT_FORMAT_VERSION,
        origin_node: config.origin_node,
        shard: config.shard,
        first_lsn,
    };
    // Repair the last segment first, whatever happens next: once a later segment exists, a
    // torn tail or missing header in it would read as corruption.
    let mut repaired = None;
    if let Some(last) = &last {
        if last.header_missing {
            repaired = Some(
                ActiveSegment::create(
                    &directory,
                    &config.dir,
                    identity(last.first_lsn),
                    config.fsync,
                    true,
                )
                .await?,
            );
        } else if last.torn {
            truncate_segment(&last.path, last.data_end as u64, config.fsync).await?;
        }
    }
    let mut created_segment = false;
    let active = match (last, repaired) {
        (Some(_), Some(repaired)) if next_lsn == scanned_next_lsn => repaired,
        (Some(last), None)
            if next_lsn == scanned_next_lsn && last.format_version == SEGMENT_FORMAT_VERSION =>
        {
            ActiveSegment::resume(&last.path, &last.data, last.data_end).await?
        }
        // A last segment in an older format is never appended to, so that a segment keeps one
        // layout. Holding no records, it is rewritten in the current format (a new segment
        // would need its name); otherwise appends go to a new segment below.
        (Some(last), None) if next_lsn == scanned_next_lsn && last.next_lsn == last.first_lsn => {
            tracing::info!(path = %last.path.display(), format_version = last.format_version, "rewriting empty wal segment in the current format");
            ActiveSegment::create(
                &directory,
                &config.dir,
                identity(last.first_lsn),
                config.fsync,
                true,
            )
            .await?
        }
        (_, repaired) => {
            if let Some(repaired) = repaired {
                repaired.close().await;
            }
            let active = ActiveSegment::create(
                &directory,
                &config.dir,
                identity(next_lsn),
                config.fsync,
                false,
            )
            .await?;
            segments.push_back(SegmentEntry {
                first_lsn: next_lsn,
                path: active.path().to_owned(),
            });
            created_segment = true;
            active
        }
    };
    report.segments = segments.len();
    tracing::info!(
        shard_id = config.shard,
        records_replayed = report.records_replayed,
        records_skipped = report.records_skipped,
        lsn = report.next_lsn,
        segments = report.segments,
        truncated_bytes = report.truncated_bytes,
        "wal opened"
    );
    Ok(Recovered {
        report,
        directory,
        segments,
        active,
        created_segment,
    })
}

/// Segments must continue each other's LSNs. A gap is harmless only when every missing LSN is
/// below `replay_from_lsn` (already in committed files), e.g. when a crash undid the deletion
/// of an older segment; any other gap means acknowledged records are missing.
fn check_continuity(
    expected_lsn: Option<u64>,
    first_lsn: u64,
    replay_from_lsn: u64,
) -> Result<(), String> {
    match expected_lsn {
        Some(expected) if first_lsn < expected => {
            Err(format!("segment starts at lsn {first_lsn}, but the previous segment already reaches lsn {}", expected - 1))
        }
        Some(expected) if first_lsn > expected && first_lsn > replay_from_lsn => Err(format!(
            "lsn gap: records {expected}..{} are missing between this segment and the previous one",
            first_lsn - 1
        )),
        None if first_lsn > replay_from_lsn => Err(format!(
            "the oldest segment starts at lsn {first_lsn}, but records from lsn {replay_from_lsn} on are not \
             flushed yet: the segments holding lsn {replay_from_lsn}..{} were deleted",
            first_lsn - 1
        )),
        _ => Ok(()),
    }
}

/// Cuts a torn tail off a segment and syncs the new length.
async fn truncate_segment(path: &Path, len: u64, fsync: bool) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .dma_open(path)
        .await
        .map_err(|error| WalError::io("open wal segment to truncate", path, error))?;
    file.truncate(len)
        .await
        .map_err(|error| WalError::io("truncate torn wal tail", path, error))?;
    if fsync {
        file.fdatasync()
            .await
            .map_err(|error| WalError::io("sync truncated wal segment", path, error))?;
    }
    file.close()
        .await
        .map_err(|error| WalError::io("close truncated wal segment", path, error))
}

/// Creates (if needed), opens and locks the WAL directory. The exclusive `flock` keeps a
/// second process, or a second `Wal` in this one, from writing the same log; it is released
/// when the directory handle is closed.
async fn open_directory(dir: &Path, fsync: bool) -> Result<Directory, WalError> {
    let existed = dir.is_dir();
    // Start-up only: the few blocking syscalls here run before the shard serves traffic.
    std::fs::create_dir_all(dir)
        .map_err(|error| WalError::io("create wal directory", dir, error))?;
    if !existed && fsync {
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::File::open(parent)
                .and_then(|parent| parent.sync_all())
                .map_err(|error| WalError::io("sync parent of wal directory", parent, error))?;
        }
    }
    let directory = Directory::open(dir)
        .await
        .map_err(|error| WalError::io("open wal directory", dir, error))?;
    // SAFETY: flock only operates on the descriptor, which `directory` keeps open.
    if unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(WalError::io(
            "lock wal directory (is another process or Wal using it?)",
            dir,
            error,
        ));
    }
    Ok(directory)
}

/// A WAL directory's segment files as (first LSN, path) in LSN order, and its other files.
pub(crate) type SegmentListing = (Vec<(u64, PathBuf)>, Vec<PathBuf>);

/// Segment files in LSN order, and the other files of the directory (left alone).
pub(crate) fn list_segments(dir: &Path) -> Result<SegmentListing, WalError> {
    let entries =
        std::fs::read_dir(dir).map_err(|error| WalError::io("list wal directory", dir, error))?;
    let mut segments = Vec::new();
    let mut others = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|error| WalError::io("list wal directory", dir, error))?
            .path();
        match parse_segment_file_name(&path) {
            Some(first_lsn) => segments.push((first_lsn, path)),
            None => others.push(path),
        }
    }
    segments.sort_unstable();
    Ok((segments, others))
}

/// Reads a whole segment with direct I/O, in bounded chunks.
async fn read_file(path: &Path) -> Result<Vec<u8>, WalError> {
    const CHUNK_BYTES: usize = 1 << 20;
    let file = DmaFile::open(path)
        .await
        .map_err(|error| WalError::io("open wal segment", path, error))?;
    let size = file
        .file_size()
        .await
        .map_err(|error| WalError::io("stat wal segment", path, error))? as usize;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        let want = CHUNK_BYTES.min(size - data.len());
        let chunk = file
            .read_at(data.len() as u64, want)
            .await
            .map_err(|error| WalError::io("read wal segment", path, error))?;
        if chunk.is_empty() {
            break;
        }
        data.extend_from_slice(&chunk[..chunk.len().min(want)]);
    }
    if let Err(error) = file.close().await {
        tracing::warn!(path = %path.display(), %error, "close wal segment after reading");
    }
    Ok(data)
}
