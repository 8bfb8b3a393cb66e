//! Reading whole group commits back out of a WAL directory for a peer that is catching up.
//!
//! Plain blocking `std::fs` reads with no glommio, so it runs on any thread (the caller uses
//! a blocking pool) while the shard's writer keeps appending to the same directory. Nothing
//! here takes the directory lock: segments are immutable once the writer has moved past
//! them, the active segment only grows at its end, and segments disappear oldest first when
//! released. A group still being written is simply not returned yet.

use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use bytes::Bytes;

use super::{
    error::WalError,
    group::{self, GroupFault, GroupHeader, GROUP_HEADER_BYTES},
    record::{self, FrameFault, FRAME_HEADER_BYTES},
    segment::{HeaderFault, SegmentHeader, SEGMENT_FORMAT_VERSION_V1, SEGMENT_HEADER_BYTES},
    shipped::DurableGroup,
};

/// Most bytes of frames put in one group synthesized from a version 1 segment.
const V1_GROUP_BYTES_MAX: usize = 1 << 20;
/// Times the segment list is read again after a segment vanished between listing and
/// opening it (it was released); each retry sees strictly newer segments.
const RELIST_ATTEMPTS_MAX: usize = 8;

/// What `read_groups` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRead {
    /// Whole groups in LSN order; the first contains `from_lsn`.
    pub groups: Vec<DurableGroup>,
    /// First LSN of the oldest segment on disk (`None` with no segment): records below it
    /// were released. A `from_lsn` below it returns no groups.
    pub oldest_lsn: Option<u64>,
    /// LSN after the last returned group, where the next read continues; `from_lsn` when no
    /// group is returned.
    pub end_lsn: u64,
}

/// Reads the whole groups of the WAL in `dir` (written by `origin_node`'s `shard`) starting
/// with the group that contains `from_lsn`, in LSN order, up to `bytes_max` bytes (at least
/// one group when one is available), and only groups whose last LSN is at most
/// `through_lsn`. Blocking; callable from any thread.
///
/// `through_lsn` must be at most the WAL's `durable_lsn`: a group can be complete on disk
/// before its fdatasync returned, and a power loss could still take it away and let its LSNs
/// be reused, so it must not reach a peer yet.
///
/// A replica resumes at its own `next_lsn`, normally a group boundary of the origin; when
/// `from_lsn` falls inside a group, that whole group is returned, and the receiver's
/// `Wal::append_group` skips the records it already has. Groups are returned only when
/// complete and valid (header crc, frame crcs and digest); an incomplete group at the end
/// of the active segment is a write in progress and ends the read without an error. A
/// `from_lsn` below `oldest_lsn` returns no groups: those records were released, and the
/// caller decides (a replica is told to `reset_to`). Groups of version 1 segments (bare
/// frames) are returned wrapped in a synthesized group header, their frames unchanged, at
/// most 1 MiB of frames each. Damage in a segment that is no longer written, or a segment
/// from another node or shard, fails with `WalError::Corrupt`.
pub fn read_groups(
    dir: &Path,
    origin_node: u64,
    shard: u32,
    from_lsn: u64,
    through_lsn: u64,
    bytes_max: usize,
) -> Result<GroupRead, WalError> {
    let request = Request {
        origin_node,
        shard,
        from_lsn,
        through_lsn,
        bytes_max,
    };
    for _ in 0..RELIST_ATTEMPTS_MAX {
        match read_once(dir, &request)? {
            Some(read) => return Ok(read),
            None => continue,
        }
    }
    Err(WalError::io(
        "read wal groups (segments kept vanishing while listed)",
        dir,
        io::Error::from(io::ErrorKind::NotFound),
    ))
}

struct Request {
    origin_node: u64,
    shard: u32,
    from_lsn: u64,
    through_lsn: u64,
    bytes_max: usize,
}

/// Whether reading a segment should go on to the next one.
enum SegmentEnd {
    /// The segment ended cleanly; the next record is `next_lsn`.
    Clean { next_lsn: u64 },
    /// Stop reading: the budget is spent, the next group is not durable or not complete.
    Stop,
}

/// One pass over the segment list; `None` when the first segment to read vanished.
fn read_once(dir: &Path, request: &Request) -> Result<Option<GroupRead>, WalError> {
    // Other files (markers, leftovers) are recovery's to report; catch-up only reads segments.
    let (segments, _) = super::recovery::list_segments(dir)?;
    let mut read = GroupRead {
        groups: Vec::new(),
        oldest_lsn: segments.first().map(|(first_lsn, _)| *first_lsn),
        end_lsn: request.from_lsn,
    };
    let Some(start) = segments
        .iter()
        .rposition(|(first_lsn, _)| *first_lsn <= request.from_lsn)
    else {
        return Ok(Some(read));
    };
    let mut expected_lsn = None;
    for (index, (first_lsn, path)) in segments.iter().enumerate().skip(start) {
        let is_last = index + 1 == segments.len();
        if let Some(expected) = expected_lsn {
            if *first_lsn != expected {
                return Err(corrupt(
                    path,
                    0,
                    format!("segment starts at lsn {first_lsn}, but the previous one ends before lsn {expected}"),
                ));
            }
        }
        let file = match File::open(path) {
            Ok(file) => file,
            // Released since the listing: start over unless groups were already read, which
            // stay valid (the next read reports the new oldest LSN).
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if index == start {
                    return Ok(None);
                }
                break;
            }
            Err(error) => return Err(WalError::io("open wal segment to read groups", path, error)),
        };
        let segment = Segment {
            file,
            path,
            first_lsn: *first_lsn,
            is_last,
        };
        match segment.read(request, &mut read)? {
            SegmentEnd::Clean { next_lsn } => expected_lsn = Some(next_lsn),
            SegmentEnd::Stop => break,
        }
    }
    if let Some(last) = read.groups.last() {
        read.end_lsn = last.last_lsn + 1;
    }
    Ok(Some(read))
}

struct Segment<'a> {
    file: File,
    path: &'a Path,
    first_lsn: u64,
    is_last: bool,
}

impl Segment<'_> {
    fn read(&self, request: &Request, read: &mut GroupRead) -> Result<SegmentEnd, WalError> {
        let file_len = self
            .file
            .metadata()
            .map_err(|error| WalError::io("stat wal segment", self.path, error))?
            .len();
        let mut header_bytes = [0u8; SEGMENT_HEADER_BYTES];
        if !self.read_at(&mut header_bytes, 0)? {
            return self.incomplete(0, "segment header not written yet".to_owned());
        }
        let header = match SegmentHeader::decode(&header_bytes) {
            Ok(header) => header,
            Err(HeaderFault::Missing(reason)) => return self.incomplete(0, reason),
            Err(HeaderFault::Bad(reason)) => return Err(corrupt(self.path, 0, reason)),
        };
        if (header.origin_node, header.shard, header.first_lsn)
            != (request.origin_node, request.shard, self.first_lsn)
        {
            return Err(corrupt(
                self.path,
                0,
                format!(
                    "segment header says node {} shard {} first lsn {}, expected node {} shard {} first lsn {}",
                    header.origin_node,
                    header.shard,
                    header.first_lsn,
                    request.origin_node,
                    request.shard,
                    self.first_lsn
                ),
            ));
        }
        if header.format_version == SEGMENT_FORMAT_VERSION_V1 {
            self.read_v1(file_len, request, read)
        } else {
            self.read_v2(file_len, request, read)
        }
    }

    /// Hops from group header to group header (skipping bodies below `from_lsn`) and reads
    /// the wanted groups whole.
    fn read_v2(
        &self,
        file_len: u64,
        request: &Request,
        read: &mut GroupRead,
    ) -> Result<SegmentEnd, WalError> {
        let mut position = SEGMENT_HEADER_BYTES as u64;
        let mut lsn = self.first_lsn;
        let mut bytes_read: usize = read.groups.iter().map(|group| group.bytes.len()).sum();
        loop {
            let mut header_bytes = [0u8; GROUP_HEADER_BYTES];
            if !self.read_at(&mut header_bytes, position)?
                || header_bytes.iter().all(|&byte| byte == 0)
            {
                // The zero padding after the last group, or the end of the file.
                return Ok(SegmentEnd::Clean { next_lsn: lsn });
            }
            let header = match GroupHeader::decode(&header_bytes, 0) {
                Ok(header) => header,
                Err(reason) => return self.incomplete(position, reason),
            };
            if header.first_lsn != lsn {
                return self.incomplete(
                    position,
                    format!(
                        "group lsn out of sequence: expected {lsn}, found {}",
                        header.first_lsn
                    ),
                );
            }
            let group_bytes = GROUP_HEADER_BYTES as u64 + header.body_bytes;
            if group_bytes > file_len.saturating_sub(position) {
                return self.incomplete(
                    position,
                    format!("group of {group_bytes} bytes runs past the end of the file"),
                );
            }
            let last_lsn = lsn + u64::from(header.records) - 1;
            if last_lsn < request.from_lsn {
                position += group_bytes;
                lsn = last_lsn + 1;
                continue;
            }
            if last_lsn > request.through_lsn {
                return Ok(SegmentEnd::Stop);
            }
            // Bounded by the file's length above, so a damaged length cannot make it huge.
            let group_len = group_bytes as usize;
            if !read.groups.is_empty() && bytes_read + group_len > request.bytes_max {
                return Ok(SegmentEnd::Stop);
            }
            let mut bytes = vec![0u8; group_len];
            if !self.read_at(&mut bytes, position)? {
                return self.incomplete(position, "group cut short".to_owned());
            }
            if let Err(fault) = group::check_group(&bytes, 0) {
                let reason = match fault {
                    GroupFault::Incomplete { offset, reason } => {
                        format!("{reason} (group offset {offset})")
                    }
                    GroupFault::UnsupportedVersion { version, .. } => {
                        format!("unsupported record format version {version}")
                    }
                };
                return self.incomplete(position, reason);
            }
            read.groups.push(DurableGroup {
                first_lsn: lsn,
                last_lsn,
                bytes: Bytes::from(bytes),
            });
            bytes_read += group_len;
            position += group_bytes;
            lsn = last_lsn + 1;
        }
    }

    /// Reads a version 1 segment (closed for good, so read whole) and wraps runs of its frames
    /// in synthesized group headers.
    fn read_v1(
        &self,
        file_len: u64,
        request: &Request,
        read: &mut GroupRead,
    ) -> Result<SegmentEnd, WalError> {
        let data_len = usize::try_from(file_len).map_err(|_| {
            corrupt(
                self.path,
                0,
                format!("segment of {file_len} bytes is too large"),
            )
        })?;
        let mut data = vec![0u8; data_len];
        if !self.read_at(&mut data, 0)? {
            return self.incomplete(0, "segment shrank while read".to_owned());
        }
        let mut bytes_read: usize = read.groups.iter().map(|group| group.bytes.len()).sum();
        let mut position = SEGMENT_HEADER_BYTES;
        let mut lsn = self.first_lsn;
        let mut pending = V1Group::new();
        let end = loop {
            if frame_end_of_segment(&data, position) {
                break SegmentEnd::Clean { next_lsn: lsn };
            }
            let (_, frame_len) = match record::check_frame(&data, position) {
                Ok(frame) => frame,
                Err(FrameFault::Bad(reason)) => return self.incomplete(position as u64, reason),
                Err(FrameFault::UnsupportedVersion(version)) => {
                    return self.incomplete(
                        position as u64,
                        format!("unsupported record format version {version}"),
                    )
                }
            };
            if lsn >= request.from_lsn {
                if lsn > request.through_lsn {
                    break SegmentEnd::Stop;
                }
                let budget_spent = !(read.groups.is_empty() && pending.records == 0)
                    && bytes_read + pending.bytes_len() + frame_len > request.bytes_max;
                if budget_spent {
                    break SegmentEnd::Stop;
                }
                if pending.records > 0 && pending.body.len() + frame_len > V1_GROUP_BYTES_MAX {
                    bytes_read += pending.bytes_len();
                    read.groups.push(pending.finish());
                    pending = V1Group::new();
                }
                pending.push(lsn, &data[position..position + frame_len]);
            }
            position += frame_len;
            lsn += 1;
        };
        if pending.records > 0 {
            read.groups.push(pending.finish());
        }
        Ok(end)
    }

    /// Reads exactly `buffer.len()` bytes at `offset`; false when the file ends first.
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<bool, WalError> {
        match self.file.read_exact_at(buffer, offset) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(error) => Err(WalError::io("read wal segment", self.path, error)),
        }
    }

    /// An incomplete group or frame: in the segment being written it is a write still in
    /// progress (stop reading, no error); in any older segment it is damage.
    fn incomplete(&self, offset: u64, reason: String) -> Result<SegmentEnd, WalError> {
        if self.is_last {
            tracing::trace!(path = %self.path.display(), offset, %reason, "wal group not complete yet");
            Ok(SegmentEnd::Stop)
        } else {
            Err(corrupt(self.path, offset, reason))
        }
    }
}

/// A group being synthesized around version 1 frames.
struct V1Group {
    first_lsn: u64,
    records: u32,
    frames_crc: crc32fast::Hasher,
    body: Vec<u8>,
}

impl V1Group {
    fn new() -> V1Group {
        V1Group {
            first_lsn: 0,
            records: 0,
            frames_crc: crc32fast::Hasher::new(),
            body: Vec::new(),
        }
    }

    fn push(&mut self, lsn: u64, frame: &[u8]) {
        if self.records == 0 {
            self.first_lsn = lsn;
        }
        self.records += 1;
        self.frames_crc.update(&frame[..FRAME_HEADER_BYTES]);
        self.body.extend_from_slice(frame);
    }

    fn bytes_len(&self) -> usize {
        if self.records == 0 {
            0
        } else {
            GROUP_HEADER_BYTES + self.body.len()
        }
    }

    fn finish(self) -> DurableGroup {
        let header = GroupHeader {
            records: self.records,
            first_lsn: self.first_lsn,
            body_bytes: self.body.len() as u64,
            frames_crc: self.frames_crc.finalize(),
        };
        let mut bytes = Vec::with_capacity(GROUP_HEADER_BYTES + self.body.len());
        bytes.extend_from_slice(&header.encode());
        bytes.extend_from_slice(&self.body);
        DurableGroup {
            first_lsn: self.first_lsn,
            last_lsn: self.first_lsn + u64::from(self.records) - 1,
            bytes: Bytes::from(bytes),
        }
    }
}

/// A version 1 segment ends where a zero length field is followed only by zeros.
fn frame_end_of_segment(data: &[u8], position: usize) -> bool {
    crate::frame::is_zero_tail(data, position)
}

fn corrupt(path: &Path, offset: u64, reason: String) -> WalError {
    WalError::Corrupt {
        segment: path.to_owned(),
        offset,
        reason,
    }
}
