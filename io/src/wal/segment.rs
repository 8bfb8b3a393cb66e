//! Segment files: naming, the fixed header, and the record scan used by recovery (sans-IO).
//!
//! A segment is `<first_lsn:020>.wal`: a 64-byte header that names its format version, then
//! the records. Version 2 (written today) packs group commits back to back, each a group
//! header followed by its frames; version 1 (still read) packs bare frames back to back. The
//! writer pads the last disk block with zeros, so a clean segment ends with zeros where the
//! next group (or frame) would start, or simply at the end of the file.

use std::path::Path;

use super::{
    group::{self, GroupFault, GROUP_MAGIC},
    record::{self, FrameFault, RecordView},
};
use crate::frame::{self, Reject, TailRule};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SHALEWAL";
/// Version of the segment layout this build writes: frames grouped under group headers.
pub const SEGMENT_FORMAT_VERSION: u32 = 2;
/// The first segment layout (bare frames, no group headers); still read, never written.
pub const SEGMENT_FORMAT_VERSION_V1: u32 = 1;
/// Bytes reserved for the header; records start right after it.
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// Bytes of the header covered by its own checksum (stored right after them).
const HEADER_CHECKED_BYTES: usize = 32;

const SEGMENT_SUFFIX: &str = ".wal";

/// The identity recorded at the start of each segment and checked on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// `SEGMENT_FORMAT_VERSION` for segments this build creates; decoding also accepts
    /// `SEGMENT_FORMAT_VERSION_V1`.
    pub format_version: u32,
    pub origin_node: u64,
    pub shard: u32,
    pub first_lsn: u64,
}

impl SegmentHeader {
    /// Layout (little endian): magic [8] | version u32 | shard u32 | origin node u64 |
    /// first lsn u64 | crc32 of bytes 0..32 u32 | zeros up to 64.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        bytes[0..8].copy_from_slice(&SEGMENT_MAGIC);
        bytes[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.shard.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.origin_node.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..HEADER_CHECKED_BYTES]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(data: &[u8]) -> Result<SegmentHeader, HeaderFault> {
        if data.len() < SEGMENT_HEADER_BYTES {
            return Err(HeaderFault::Missing(format!(
                "file has {} bytes, shorter than the segment header",
                data.len()
            )));
        }
        let bytes = &data[..SEGMENT_HEADER_BYTES];
        if bytes.iter().all(|&byte| byte == 0) {
            return Err(HeaderFault::Missing(
                "segment header is all zeros".to_owned(),
            ));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(HeaderFault::Bad(
                "bad magic: not a shale wal segment".to_owned(),
            ));
        }
        let stored_crc = u32::from_le_bytes(array(bytes, 32));
        let actual_crc = crc32fast::hash(&bytes[..HEADER_CHECKED_BYTES]);
        if stored_crc != actual_crc {
            return Err(HeaderFault::Bad(format!(
                "segment header checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
            )));
        }
        let version = u32::from_le_bytes(array(bytes, 8));
        if version != SEGMENT_FORMAT_VERSION && version != SEGMENT_FORMAT_VERSION_V1 {
            return Err(HeaderFault::Bad(format!(
                "unsupported segment format version {version} (this build reads versions \
                 {SEGMENT_FORMAT_VERSION_V1} and {SEGMENT_FORMAT_VERSION}); was it written by a newer shale?"
            )));
        }
        Ok(SegmentHeader {
            format_version: version,
            shard: u32::from_le_bytes(array(bytes, 12)),
            origin_node: u64::from_le_bytes(array(bytes, 16)),
            first_lsn: u64::from_le_bytes(array(bytes, 24)),
        })
    }
}

/// Why a segment header could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderFault {
    /// Too short or all zeros: the file was created but its header never reached the disk.
    Missing(String),
    /// Present but wrong.
    Bad(String),
}

pub(crate) fn segment_file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// Parses `<20 digits>.wal`; anything else is not a segment.
pub(crate) fn parse_segment_file_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the scan of one segment's records found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanSummary {
    /// Offset just past the last valid record (and, in version 2, its complete group).
    pub data_end: usize,
    /// LSN the next record after this segment must carry.
    pub next_lsn: u64,
    pub records: u64,
    /// Set when the segment ends in a torn write that should be cut off at `data_end`.
    pub torn_tail: Option<String>,
}

/// Why the scan stopped with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// Damage that is not a torn tail; the WAL must not start.
    Corrupt { offset: usize, reason: String },
    /// The caller's record callback refused a record.
    Callback { lsn: u64, reason: String },
}

/// What the scan expects every record to carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanExpectation {
    /// From the segment header: decides how the records are laid out.
    pub format_version: u32,
    pub origin_node: u64,
    pub shard: u32,
    pub first_lsn: u64,
    /// Only the last segment may end in a torn write: earlier ones were synced in full
    /// before the next segment was created.
    pub is_last_segment: bool,
}

/// Validates every record after the header and calls `on_record` for each, in order, using
/// the rules of the segment's format version.
pub(crate) fn scan_segment(
    data: &[u8],
    expect: ScanExpectation,
    on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<ScanSummary, ScanError> {
    if expect.format_version == SEGMENT_FORMAT_VERSION_V1 {
        scan_frames_v1(data, expect, on_record)
    } else {
        debug_assert_eq!(expect.format_version, SEGMENT_FORMAT_VERSION);
        scan_groups(data, expect, on_record)
    }
}

/// Scans a version 2 segment, group by group.
///
/// Rules (design §Durability 5): zeros where a group would start, up to the end of the file,
/// are the clean end. Only the newest group of the last segment can be unsynced, and a power
/// loss may have persisted any subset of its blocks, so an incomplete group in the last
/// segment with no complete group anywhere after it is a torn tail, whatever survived inside
/// it. Any other incomplete group, a record from another node or shard, an LSN out of
/// sequence, or a checksummed record this build cannot decode is corruption.
fn scan_groups(
    data: &[u8],
    expect: ScanExpectation,
    mut on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<ScanSummary, ScanError> {
    let mut scratch = record::new_scratch();
    let mut position = SEGMENT_HEADER_BYTES.min(data.len());
    let mut next_lsn = expect.first_lsn;
    let mut records = 0u64;
    loop {
        if frame::is_zero_tail(data, position) {
            return Ok(ScanSummary {
                data_end: position,
                next_lsn,
                records,
                torn_tail: None,
            });
        }
        let (offset, reason) = match group::check_group(data, position) {
            Ok(complete) => {
                if complete.header.first_lsn != next_lsn {
                    return Err(ScanError::Corrupt {
                        offset: position,
                        reason: format!(
                            "group lsn out of sequence: expected {next_lsn}, found {}",
                            complete.header.first_lsn
                        ),
                    });
                }
                // The group is whole, so its records are replayed; anything wrong with one of
                // them now is damage to checksummed data, never a torn write.
                let mut frame_position = complete.body_start;
                while frame_position < complete.end {
                    let frame = record::check_frame(&data[..complete.end], frame_position)
                        .and_then(|(body, frame_len)| {
                            record::access_body(body, &mut scratch)
                                .map(|archived| (archived, frame_len))
                        });
                    let (archived, frame_len) = match frame {
                        Ok(frame) => frame,
                        Err(FrameFault::Bad(reason)) => {
                            return Err(ScanError::Corrupt {
                                offset: frame_position,
                                reason,
                            })
                        }
                        Err(FrameFault::UnsupportedVersion(version)) => {
                            return Err(unsupported_record_version(frame_position, version))
                        }
                    };
                    let view = RecordView::from_archived(archived);
                    check_record(&view, expect, next_lsn, frame_position)?;
                    on_record(view).map_err(|reason| ScanError::Callback {
                        lsn: view.lsn,
                        reason,
                    })?;
                    next_lsn += 1;
                    records += 1;
                    frame_position += frame_len;
                }
                position = complete.end;
                continue;
            }
            Err(GroupFault::UnsupportedVersion { offset, version }) => {
                return Err(unsupported_record_version(offset, version))
            }
            Err(GroupFault::Incomplete { offset, reason }) => (offset, reason),
        };
        if expect.is_last_segment && !has_complete_group_after(data, position, next_lsn) {
            return Ok(ScanSummary {
                data_end: position,
                next_lsn,
                records,
                torn_tail: Some(reason),
            });
        }
        return Err(ScanError::Corrupt { offset, reason });
    }
}

/// Scans forward byte by byte after `position` for a later group that is complete and not older
/// than `next_lsn`. Finding one means the incomplete group at `position` was not the last one
/// written, so it was synced once and cannot be a torn tail (`frame`'s nothing-valid-follows
/// rule, with groups for units).
fn has_complete_group_after(data: &[u8], position: usize, next_lsn: u64) -> bool {
    frame::valid_unit_follows(data.len(), position, |start| {
        data.get(start..start + GROUP_MAGIC.len()) == Some(&GROUP_MAGIC[..])
            && group::check_group(data, start)
                .is_ok_and(|complete| complete.header.first_lsn >= next_lsn)
    })
}

/// Scans a version 1 segment, frame by frame.
///
/// Rules (design §Durability 5): a zero length followed only by zeros is the clean end. A bad
/// record in the last segment with no valid record anywhere after it is a torn tail. Any other
/// bad record, an LSN out of sequence, or a record from another node or shard is corruption.
/// (Version 1 cannot tell an unsynced group whose early block was lost from damage before a
/// valid record; that is why version 2 exists.)
fn scan_frames_v1(
    data: &[u8],
    expect: ScanExpectation,
    mut on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<ScanSummary, ScanError> {
    let mut scratch = record::new_scratch();
    let start = SEGMENT_HEADER_BYTES.min(data.len());
    let mut next_lsn = expect.first_lsn;
    let mut records = 0u64;
    let stop = frame::scan(data, start, record::FRAME_LIMITS, |frame| {
        let body = frame.payload;
        if body[0] != record::RECORD_FORMAT_VERSION {
            return Err(Reject::Refuse(unsupported_record_version(
                frame.offset,
                body[0],
            )));
        }
        // An archive that fails validation behind a good checksum is treated like any other bad
        // frame (torn or corrupt by where it is), as version 1 always did.
        let archived = record::access_body(body, &mut scratch).map_err(|fault| match fault {
            FrameFault::Bad(reason) => Reject::Damaged(reason),
            FrameFault::UnsupportedVersion(version) => {
                Reject::Refuse(unsupported_record_version(frame.offset, version))
            }
        })?;
        let view = RecordView::from_archived(archived);
        check_record(&view, expect, next_lsn, frame.offset).map_err(Reject::Refuse)?;
        on_record(view).map_err(|reason| {
            Reject::Refuse(ScanError::Callback {
                lsn: view.lsn,
                reason,
            })
        })?;
        next_lsn += 1;
        records += 1;
        Ok(())
    })?;
    let summary = |torn_tail| ScanSummary {
        data_end: stop.valid_end,
        next_lsn,
        records,
        torn_tail,
    };
    let Some(fault) = &stop.fault else {
        return Ok(summary(None));
    };
    let rule = if expect.is_last_segment {
        TailRule::NothingValidFollows
    } else {
        TailRule::Never
    };
    if frame::is_torn_tail(data, fault, rule, |position| {
        is_valid_record_at(data, position, expect, next_lsn)
    }) {
        return Ok(summary(Some(fault.to_string())));
    }
    Err(ScanError::Corrupt {
        offset: fault.offset(),
        reason: fault.to_string(),
    })
}

/// A valid record must belong to this WAL and carry the next LSN.
fn check_record(
    view: &RecordView<'_>,
    expect: ScanExpectation,
    next_lsn: u64,
    offset: usize,
) -> Result<(), ScanError> {
    if view.origin_node != expect.origin_node || view.shard != expect.shard {
        return Err(ScanError::Corrupt {
            offset,
            reason: format!(
                "record lsn {} belongs to node {} shard {}, not to this wal (node {} shard {})",
                view.lsn, view.origin_node, view.shard, expect.origin_node, expect.shard
            ),
        });
    }
    if view.lsn != next_lsn {
        return Err(ScanError::Corrupt {
            offset,
            reason: format!(
                "lsn out of sequence: expected {next_lsn}, found {}",
                view.lsn
            ),
        });
    }
    Ok(())
}

/// A checksummed record in a format this build cannot read is never a torn write.
fn unsupported_record_version(offset: usize, version: u8) -> ScanError {
    ScanError::Corrupt {
        offset,
        reason: format!(
            "unsupported record format version {version} (this build reads version {}); \
             was it written by a newer shale?",
            record::RECORD_FORMAT_VERSION
        ),
    }
}

/// Whether a record valid in every respect (checksum, encoding, this node and shard, an LSN not
/// yet seen) starts at `position`. One found after a bad record means the bad record is not the
/// end of what was written, so it cannot be a torn tail.
fn is_valid_record_at(
    data: &[u8],
    position: usize,
    expect: ScanExpectation,
    next_lsn: u64,
) -> bool {
    if !record::is_plausible_frame(data, position) {
        return false;
    }
    let Ok((body, _)) = record::check_frame(data, position) else {
        return false;
    };
    let mut scratch = record::new_scratch();
    let Ok(archived) = record::access_body(body, &mut scratch) else {
        return false;
    };
    let view = RecordView::from_archived(archived);
    view.origin_node == expect.origin_node && view.shard == expect.shard && view.lsn >= next_lsn
}

fn array<const N: usize>(data: &[u8], position: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(&data[position..position + N]);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::group::GROUP_HEADER_BYTES;
    use crate::wal::{
        group::GroupHeader,
        record::{encode_frame, RecordHeader, FRAME_HEADER_BYTES},
    };

    const NODE: u64 = 11;
    const SHARD: u32 = 2;

    fn encode_record(data: &mut Vec<u8>, lsn: u64) {
        let payload = vec![lsn as u8; (lsn % 7 * 13) as usize];
        let header = RecordHeader {
            origin_node: NODE,
            shard: SHARD,
            lsn,
            kind: 1,
            time_ns: 5,
        };
        encode_frame(data, header, payload.len(), |buffer| {
            buffer.extend_from_slice(&payload)
        })
        .unwrap();
    }

    /// A version 1 segment holding records `first_lsn..first_lsn+count` with a zero-padded
    /// tail; returns the bytes and the offset of every frame.
    fn segment(first_lsn: u64, count: u64) -> (Vec<u8>, Vec<usize>) {
        let mut data = SegmentHeader {
            format_version: SEGMENT_FORMAT_VERSION_V1,
            origin_node: NODE,
            shard: SHARD,
            first_lsn,
        }
        .encode()
        .to_vec();
        let mut offsets = Vec::new();
        for lsn in first_lsn..first_lsn + count {
            offsets.push(data.len());
            encode_record(&mut data, lsn);
        }
        offsets.push(data.len());
        data.resize(data.len().next_multiple_of(512), 0);
        (data, offsets)
    }

    /// One group of a version 2 segment: where it starts and where each of its frames starts.
    struct GroupLayout {
        offset: usize,
        frames: Vec<usize>,
        end: usize,
    }

    /// A version 2 segment starting at `first_lsn` with one group per entry of `group_sizes`
    /// (that many records each) and a zero-padded tail.
    fn group_segment(first_lsn: u64, group_sizes: &[u64]) -> (Vec<u8>, Vec<GroupLayout>) {
        let mut data = SegmentHeader {
            format_version: SEGMENT_FORMAT_VERSION,
            origin_node: NODE,
            shard: SHARD,
            first_lsn,
        }
        .encode()
        .to_vec();
        let mut groups = Vec::new();
        let mut lsn = first_lsn;
        for &size in group_sizes {
            let offset = data.len();
            data.extend_from_slice(&[0u8; GROUP_HEADER_BYTES]);
            let mut frames = Vec::new();
            let mut digest = crc32fast::Hasher::new();
            for lsn in lsn..lsn + size {
                frames.push(data.len());
                encode_record(&mut data, lsn);
                digest.update(&data[*frames.last().unwrap()..][..FRAME_HEADER_BYTES]);
            }
            let header = GroupHeader {
                records: size as u32,
                first_lsn: lsn,
                body_bytes: (data.len() - offset - GROUP_HEADER_BYTES) as u64,
                frames_crc: digest.finalize(),
            };
            data[offset..offset + GROUP_HEADER_BYTES].copy_from_slice(&header.encode());
            lsn += size;
            groups.push(GroupLayout {
                offset,
                frames,
                end: data.len(),
            });
        }
        data.resize(data.len().next_multiple_of(512), 0);
        (data, groups)
    }

    fn expect_v2(first_lsn: u64, is_last_segment: bool) -> ScanExpectation {
        ScanExpectation {
            format_version: SEGMENT_FORMAT_VERSION,
            ..expect(first_lsn, is_last_segment)
        }
    }

    fn expect(first_lsn: u64, is_last_segment: bool) -> ScanExpectation {
        ScanExpectation {
            format_version: SEGMENT_FORMAT_VERSION_V1,
            origin_node: NODE,
            shard: SHARD,
            first_lsn,
            is_last_segment,
        }
    }

    fn scan(
        data: &[u8],
        expectation: ScanExpectation,
    ) -> (Result<ScanSummary, ScanError>, Vec<u64>) {
        let mut lsns = Vec::new();
        let result = scan_segment(data, expectation, |view| {
            lsns.push(view.lsn);
            Ok(())
        });
        (result, lsns)
    }

    // Checks the header round trip and that damage to it is never accepted.
    #[test]
    fn header_round_trip_and_damage() {
        let header = SegmentHeader {
            format_version: SEGMENT_FORMAT_VERSION,
            origin_node: u64::MAX,
            shard: 9,
            first_lsn: 12345,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        assert!(matches!(
            SegmentHeader::decode(&bytes[..20]),
            Err(HeaderFault::Missing(_))
        ));
        assert!(matches!(
            SegmentHeader::decode(&[0u8; 64]),
            Err(HeaderFault::Missing(_))
        ));
        for index in 0..36 {
            let mut damaged = bytes;
            damaged[index] ^= 0x01;
            assert!(
                matches!(SegmentHeader::decode(&damaged), Err(HeaderFault::Bad(_))),
                "byte {index}"
            );
        }
    }

    // Checks that only canonical segment names are recognized, so stray files are not replayed.
    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.wal");
        assert_eq!(
            parse_segment_file_name(Path::new("/x/00000000000000000042.wal")),
            Some(42)
        );
        for name in [
            "42.wal",
            "00000000000000000042.wal.tmp",
            "0000000000000000004a.wal",
            ".direct-io-probe",
        ] {
            assert_eq!(parse_segment_file_name(Path::new(name)), None, "{name}");
        }
    }

    // Checks the clean case: every record is returned in order and zero padding ends the scan.
    #[test]
    fn clean_segment_scans_to_the_padding() {
        let (data, offsets) = segment(10, 20);
        let (result, lsns) = scan(&data, expect(10, false));
        let summary = result.unwrap();
        assert_eq!(lsns, (10..30).collect::<Vec<_>>());
        assert_eq!(
            (summary.data_end, summary.next_lsn, summary.records),
            (*offsets.last().unwrap(), 30, 20)
        );
        assert_eq!(summary.torn_tail, None);
        let (result, _) = scan(&data[..SEGMENT_HEADER_BYTES], expect(10, false));
        assert_eq!(result.unwrap().records, 0);
    }

    // Checks torn tails in the last segment: a cut record or garbage after the last record
    // ends the scan at the bad record's offset; the same damage in an earlier segment is
    // corruption, because earlier segments were fully synced before the next one was created.
    #[test]
    fn torn_tail_only_in_last_segment() {
        let (data, offsets) = segment(1, 5);
        let cut = &data[..offsets[4] + 10];
        let (result, lsns) = scan(cut, expect(1, true));
        assert_eq!(lsns, vec![1, 2, 3, 4]);
        let summary = result.unwrap();
        assert_eq!(summary.data_end, offsets[4]);
        assert!(summary.torn_tail.unwrap().contains("past the end"));
        assert!(
            matches!(scan(cut, expect(1, false)).0, Err(ScanError::Corrupt { offset, .. }) if offset == offsets[4])
        );

        let mut garbage = data[..offsets[5]].to_vec();
        garbage.extend((0..100u8).map(|byte| byte | 0x80));
        let summary = scan(&garbage, expect(1, true)).0.unwrap();
        assert_eq!(summary.data_end, offsets[5]);
        assert!(summary.torn_tail.is_some());
    }

    // Checks that a damaged record followed by a valid one is corruption even in the last
    // segment, found by scanning forward byte by byte.
    #[test]
    fn damage_before_a_valid_record_is_corruption() {
        let (mut data, offsets) = segment(1, 5);
        data[offsets[2] + 12] ^= 0x40;
        match scan(&data, expect(1, true)).0 {
            Err(ScanError::Corrupt { offset, reason }) => {
                assert_eq!(offset, offsets[2]);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    // Checks that a valid record with the wrong LSN, node or shard stops the scan: those are
    // never torn writes.
    #[test]
    fn wrong_lsn_or_identity_is_corruption() {
        let (data, _) = segment(5, 3);
        assert!(
            matches!(scan(&data, expect(4, true)).0, Err(ScanError::Corrupt { reason, .. }) if reason.contains("lsn out of sequence"))
        );
        let other_shard = ScanExpectation {
            shard: SHARD + 1,
            ..expect(5, true)
        };
        assert!(
            matches!(scan(&data, other_shard).0, Err(ScanError::Corrupt { reason, .. }) if reason.contains("belongs to node"))
        );
    }

    // Checks that a callback error stops the scan and names the record.
    #[test]
    fn callback_error_stops_the_scan() {
        let (data, _) = segment(1, 5);
        let result = scan_segment(&data, expect(1, true), |view| {
            if view.lsn == 3 {
                Err("full".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(
            result,
            Err(ScanError::Callback {
                lsn: 3,
                reason: "full".into()
            })
        );
    }

    // Checks a clean version 2 segment: every record of every group is returned in order and
    // the zero padding after the last group ends the scan.
    #[test]
    fn clean_group_segment_scans_to_the_padding() {
        let (data, groups) = group_segment(10, &[1, 4, 2]);
        let (result, lsns) = scan(&data, expect_v2(10, true));
        let summary = result.unwrap();
        assert_eq!(lsns, (10..17).collect::<Vec<_>>());
        assert_eq!(
            (
                summary.data_end,
                summary.next_lsn,
                summary.records,
                summary.torn_tail
            ),
            (groups[2].end, 17, 7, None)
        );
    }

    // Checks the torn-group rule of version 2: a power loss may persist any subset of the
    // last group's blocks, so a last group with its start zeroed (while later frames of it
    // survived) or with only a middle frame damaged is cut off whole, and none of its records
    // is replayed. Version 1 called both of these corruption.
    #[test]
    fn incomplete_last_group_is_a_torn_tail() {
        let (clean, groups) = group_segment(1, &[2, 5]);
        let last = &groups[1];
        let mut zeroed_start = clean.clone();
        zeroed_start[last.offset..last.frames[2]].fill(0);
        let mut damaged_middle = clean.clone();
        damaged_middle[last.frames[2] + FRAME_HEADER_BYTES + 3] ^= 0x20;
        let mut cut = clean[..last.frames[4] + 5].to_vec();
        cut.resize(cut.len() + 100, 0);
        for (name, data) in [
            ("zeroed start", zeroed_start),
            ("damaged middle", damaged_middle),
            ("cut short", cut),
        ] {
            let (result, lsns) = scan(&data, expect_v2(1, true));
            let summary = result.unwrap_or_else(|error| panic!("{name}: {error:?}"));
            assert_eq!(lsns, vec![1, 2], "{name}");
            assert_eq!(
                (summary.data_end, summary.next_lsn),
                (last.offset, 3),
                "{name}"
            );
            assert!(summary.torn_tail.is_some(), "{name}");
            // The same damage in a segment that is not the last was synced once: corruption.
            assert!(
                matches!(
                    scan(&data, expect_v2(1, false)).0,
                    Err(ScanError::Corrupt { .. })
                ),
                "{name}"
            );
        }
    }

    // Checks that an incomplete group followed by a complete one is corruption, reported at
    // the first damaged frame (or at the group when its header is what is damaged).
    #[test]
    fn incomplete_group_before_a_complete_one_is_corruption() {
        let (clean, groups) = group_segment(1, &[2, 3, 2]);
        let middle = &groups[1];
        let mut damaged_frame = clean.clone();
        damaged_frame[middle.frames[1] + FRAME_HEADER_BYTES + 3] ^= 0x20;
        let mut damaged_header = clean.clone();
        damaged_header[middle.offset + 5] ^= 0x01;
        let mut zeroed_start = clean.clone();
        zeroed_start[middle.offset..middle.frames[1]].fill(0);
        for (name, data, offset, reason) in [
            ("damaged frame", damaged_frame, middle.frames[1], "checksum"),
            (
                "damaged header",
                damaged_header,
                middle.offset,
                "group header checksum",
            ),
            (
                "zeroed start",
                zeroed_start,
                middle.offset,
                "no group header",
            ),
        ] {
            let (result, lsns) = scan(&data, expect_v2(1, true));
            match result {
                Err(ScanError::Corrupt {
                    offset: reported,
                    reason: reported_reason,
                }) => {
                    assert_eq!(reported, offset, "{name}");
                    assert!(
                        reported_reason.contains(reason),
                        "{name}: {reported_reason}"
                    );
                }
                other => panic!("{name}: expected corruption, got {other:?}"),
            }
            assert_eq!(
                lsns,
                vec![1, 2],
                "{name}: nothing of the damaged group is replayed"
            );
        }
    }

    // Checks that a whole group carrying the wrong LSNs is corruption, never a torn tail.
    #[test]
    fn group_with_wrong_lsn_is_corruption() {
        let (data, _) = group_segment(5, &[2, 2]);
        assert!(matches!(
            scan(&data, expect_v2(4, true)).0,
            Err(ScanError::Corrupt { reason, .. }) if reason.contains("group lsn out of sequence")
        ));
    }
}
