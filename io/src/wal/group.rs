//! The group header of segment format 2: it opens every group commit and says what the group
//! holds, so recovery can tell a group that reached the disk whole from a torn one (sans-IO).
//!
//! A group is written with one O_DIRECT write and made durable with one fdatasync. A power
//! loss during that write may persist any subset of its blocks, in any order, so the records
//! of an unsynced group cannot be judged one by one: a later block may have landed while an
//! earlier one did not. The header lets recovery check the group as a unit: it is complete
//! when the header is intact and exactly `records` valid frames fill `body_bytes`, with
//! `frames_crc` matching their frame headers (which carry each record's own crc32, so the
//! digest transitively covers every byte of the group).

use super::record::{self, FrameFault, FRAME_HEADER_BYTES};

/// First bytes of every group header ("shale group commit").
pub const GROUP_MAGIC: [u8; 4] = *b"SHGC";
/// Bytes of a group header; the group's frames follow it directly.
pub const GROUP_HEADER_BYTES: usize = 32;
/// Bytes of the header covered by its own checksum (stored right after them).
const GROUP_HEADER_CHECKED_BYTES: usize = 28;

/// What a group header says about the frames that follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupHeader {
    /// Number of frames in the group; never zero.
    pub records: u32,
    /// LSN of the group's first record; the others follow one by one.
    pub first_lsn: u64,
    /// Bytes of frames after the header.
    pub body_bytes: u64,
    /// crc32 of the 8-byte `[len][crc32]` headers of the group's frames, in order.
    pub frames_crc: u32,
}

impl GroupHeader {
    /// Layout (little endian): magic [4] | records u32 | first lsn u64 | body bytes u64 |
    /// frames crc32 u32 | crc32 of bytes 0..28 u32.
    pub fn encode(&self) -> [u8; GROUP_HEADER_BYTES] {
        let mut bytes = [0u8; GROUP_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&GROUP_MAGIC);
        bytes[4..8].copy_from_slice(&self.records.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.first_lsn.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.body_bytes.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.frames_crc.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..GROUP_HEADER_CHECKED_BYTES]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Reads and checks the header at `position`.
    pub fn decode(data: &[u8], position: usize) -> Result<GroupHeader, String> {
        let remaining = data.len().saturating_sub(position);
        if remaining < GROUP_HEADER_BYTES {
            return Err(format!(
                "truncated group header ({remaining} bytes left in file)"
            ));
        }
        let bytes = &data[position..position + GROUP_HEADER_BYTES];
        if bytes[0..4] != GROUP_MAGIC {
            return Err("no group header (bad magic)".to_owned());
        }
        let stored_crc = u32::from_le_bytes(array(bytes, 28));
        let actual_crc = crc32fast::hash(&bytes[..GROUP_HEADER_CHECKED_BYTES]);
        if stored_crc != actual_crc {
            return Err(format!(
                "group header checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
            ));
        }
        let header = GroupHeader {
            records: u32::from_le_bytes(array(bytes, 4)),
            first_lsn: u64::from_le_bytes(array(bytes, 8)),
            body_bytes: u64::from_le_bytes(array(bytes, 16)),
            frames_crc: u32::from_le_bytes(array(bytes, 24)),
        };
        if header.records == 0 || header.body_bytes < FRAME_HEADER_BYTES as u64 {
            return Err(format!(
                "impossible group of {} records in {} bytes",
                header.records, header.body_bytes
            ));
        }
        Ok(header)
    }
}

/// A group that is entirely on disk: every frame checksummed, the count and digest right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompleteGroup {
    pub header: GroupHeader,
    /// Offset of the first frame.
    pub body_start: usize,
    /// Offset just past the last frame (where the next group starts).
    pub end: usize,
}

/// Why the group at some offset is not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupFault {
    /// Not entirely on disk, or damaged: a torn write or corruption, depending on where it is
    /// and what follows it. `offset` is the first bad frame, or the group's start when the
    /// header or the group as a whole is wrong.
    Incomplete { offset: usize, reason: String },
    /// A checksummed record in a format this build cannot read: never a torn write.
    UnsupportedVersion { offset: usize, version: u8 },
}

/// Checks that the group starting at `position` is complete. Frames are checked against the
/// group's end, so a frame can never reach into the next group.
pub(crate) fn check_group(data: &[u8], position: usize) -> Result<CompleteGroup, GroupFault> {
    let incomplete = |offset: usize, reason: String| GroupFault::Incomplete { offset, reason };
    let header =
        GroupHeader::decode(data, position).map_err(|reason| incomplete(position, reason))?;
    let body_start = position + GROUP_HEADER_BYTES;
    let end = usize::try_from(header.body_bytes)
        .ok()
        .and_then(|body_bytes| body_start.checked_add(body_bytes));
    // Frames are walked even when the group runs past the end of the file, so that damage
    // inside it is reported at the record it hit.
    let group = &data[..end.unwrap_or(usize::MAX).min(data.len())];
    let mut digest = crc32fast::Hasher::new();
    let mut frame_position = body_start;
    let mut frames = 0u32;
    while frames < header.records && frame_position < group.len() {
        match record::check_frame(group, frame_position) {
            Ok((_, frame_len)) => {
                digest.update(&group[frame_position..frame_position + FRAME_HEADER_BYTES]);
                frame_position += frame_len;
                frames += 1;
            }
            Err(FrameFault::Bad(reason)) => return Err(incomplete(frame_position, reason)),
            Err(FrameFault::UnsupportedVersion(version)) => {
                return Err(GroupFault::UnsupportedVersion {
                    offset: frame_position,
                    version,
                })
            }
        }
    }
    let Some(end) = end.filter(|&end| end <= data.len()) else {
        return Err(incomplete(
            position,
            format!(
                "group of {} bytes runs past the end of the file ({} bytes left)",
                header.body_bytes,
                data.len() - body_start.min(data.len())
            ),
        ));
    };
    if frames != header.records || frame_position != end {
        return Err(incomplete(
            position,
            format!(
                "group header says {} records in {} bytes, found {frames} records in {} bytes",
                header.records,
                header.body_bytes,
                frame_position - body_start
            ),
        ));
    }
    let frames_crc = digest.finalize();
    if frames_crc != header.frames_crc {
        return Err(incomplete(
            position,
            format!(
                "group frame digest mismatch (stored {:#010x}, computed {frames_crc:#010x})",
                header.frames_crc
            ),
        ));
    }
    Ok(CompleteGroup {
        header,
        body_start,
        end,
    })
}

fn array<const N: usize>(data: &[u8], position: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(&data[position..position + N]);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks the header round trip and that every single-bit flip in it is rejected, since a
    // damaged header must never describe a different group.
    #[test]
    fn header_round_trip_and_bit_flips() {
        let header = GroupHeader {
            records: 3,
            first_lsn: u64::MAX - 9,
            body_bytes: 4096,
            frames_crc: 0xdead_beef,
        };
        let bytes = header.encode();
        assert_eq!(GroupHeader::decode(&bytes, 0), Ok(header));
        for byte in 0..GROUP_HEADER_BYTES {
            for bit in 0..8 {
                let mut damaged = bytes;
                damaged[byte] ^= 1 << bit;
                assert!(
                    GroupHeader::decode(&damaged, 0).is_err(),
                    "flip of bit {bit} in byte {byte} was accepted"
                );
            }
        }
        assert!(GroupHeader::decode(&bytes[..31], 0).is_err());
    }
}
