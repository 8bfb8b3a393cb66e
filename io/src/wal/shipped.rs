//! Group commits as they travel between WALs: the owned `DurableGroup` a sender ships, and
//! `GroupView`, the complete validation of a received group (sans-IO).
//!
//! A group is exactly what a version 2 segment holds for one group commit: the 32-byte group
//! header followed by its frames. Every record in it carries its origin node, shard and LSN,
//! so a replica can store the frames unchanged and a receiver can parse rows out of them.
//! Nothing received is trusted: `GroupView::parse` checks every length against the bytes it
//! was given before using it, and every checksum, record encoding and LSN, and it allocates
//! nothing beyond one aligned copy of the largest record body.

use bytes::Bytes;

use super::{
    error::WalError,
    group::{self, GroupFault, GroupHeader, GROUP_HEADER_BYTES},
    record::{self, FrameFault, RecordView, FRAME_HEADER_BYTES, FRAME_OVERHEAD_BYTES_MAX},
};

/// One group commit exactly as it is on disk: the sealed 32-byte group header and its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableGroup {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub bytes: Bytes,
}

/// A received group that passed every check: header magic and crc, a body length equal to
/// the bytes given, each frame's length and crc, the frame digest and count, each record's
/// version and encoding, one origin node and shard for every record, payloads within the
/// limit, and LSNs `first_lsn, first_lsn + 1, ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupView<'a> {
    bytes: &'a [u8],
    first_lsn: u64,
    records: u32,
    origin_node: u64,
    shard: u32,
    /// Largest payload in the group, so a WAL with a smaller `record_bytes_max` can refuse it.
    payload_bytes_max: usize,
}

impl<'a> GroupView<'a> {
    /// Validates `bytes` as one whole group whose payloads are at most `record_bytes_max`
    /// bytes. Fails with `WalError::BadGroup` naming the first fault.
    pub fn parse(bytes: &'a [u8], record_bytes_max: u32) -> Result<GroupView<'a>, WalError> {
        walk(bytes, record_bytes_max, |_| Ok(()))
    }

    /// Calls `f` for each record, in LSN order. The group was validated by `parse`, so this
    /// only fails when `f` does (`WalError::Replay` with the record's LSN). Each record's
    /// archive is validated again on the way (it must be copied to an aligned buffer to be
    /// read at all, and bytecheck is cheap next to that copy).
    pub fn for_each_record(
        &self,
        f: impl FnMut(RecordView<'_>) -> Result<(), String>,
    ) -> Result<(), WalError> {
        walk_records(self.bytes, f)
    }

    /// The whole group, header included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }

    pub fn last_lsn(&self) -> u64 {
        self.first_lsn + u64::from(self.records) - 1
    }

    pub fn records(&self) -> u32 {
        self.records
    }

    pub fn origin_node(&self) -> u64 {
        self.origin_node
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub(crate) fn payload_bytes_max(&self) -> usize {
        self.payload_bytes_max
    }

    /// `(lsn, frame bytes)` of each frame, in order. The lengths were checked by `parse`.
    pub(crate) fn frames(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let bytes = self.bytes;
        let mut position = GROUP_HEADER_BYTES;
        let mut lsn = self.first_lsn;
        std::iter::from_fn(move || {
            let header = bytes.get(position..position + FRAME_HEADER_BYTES)?;
            let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let end = position + FRAME_HEADER_BYTES + body_len as usize;
            let frame = bytes.get(position..end)?;
            let item = (lsn, frame);
            position = end;
            lsn += 1;
            Some(item)
        })
    }
}

/// Validates a received group completely (as `GroupView::parse`), then calls `f` for each of
/// its records in LSN order. `f` runs only once the whole group is known to be good, so a
/// damaged group never hands out part of its rows.
pub fn for_each_record(
    group: &[u8],
    record_bytes_max: u32,
    f: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<(), WalError> {
    GroupView::parse(group, record_bytes_max)?.for_each_record(f)
}

fn bad(reason: String) -> WalError {
    WalError::BadGroup(reason)
}

/// The full check behind `GroupView::parse`; `on_record` sees each record once it is checked.
fn walk<'a>(
    bytes: &'a [u8],
    record_bytes_max: u32,
    mut on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<GroupView<'a>, WalError> {
    let header = GroupHeader::decode(bytes, 0).map_err(bad)?;
    let body_bytes = bytes.len() - GROUP_HEADER_BYTES;
    if header.body_bytes != body_bytes as u64 {
        return Err(bad(format!(
            "group header says {} bytes of frames, but {body_bytes} bytes follow it",
            header.body_bytes
        )));
    }
    if header.first_lsn == 0
        || header
            .first_lsn
            .checked_add(u64::from(header.records))
            .is_none()
    {
        return Err(bad(format!(
            "impossible first lsn {} for {} records",
            header.first_lsn, header.records
        )));
    }
    // Every length is bounded by `bytes` inside `check_group`: a frame claiming more bytes
    // than are left is a fault, never a read or an allocation.
    group::check_group(bytes, 0).map_err(|fault| match fault {
        GroupFault::Incomplete { offset, reason } => bad(format!("at offset {offset}: {reason}")),
        GroupFault::UnsupportedVersion { offset, version } => bad(format!(
            "at offset {offset}: unsupported record format version {version}"
        )),
    })?;
    let body_bytes_max = record_bytes_max as usize + FRAME_OVERHEAD_BYTES_MAX - FRAME_HEADER_BYTES;
    let mut identity: Option<(u64, u32)> = None;
    let mut payload_bytes_max = 0;
    let mut expected_lsn = header.first_lsn;
    let mut scratch = record::new_scratch();
    let mut position = GROUP_HEADER_BYTES;
    while position < bytes.len() {
        let (body, frame_len) = record::check_frame(bytes, position)
            .map_err(|fault| bad(format!("at offset {position}: {}", frame_fault(fault))))?;
        if body.len() > body_bytes_max {
            return Err(bad(format!(
                "at offset {position}: record body of {} bytes exceeds the {body_bytes_max} bytes \
                 record_bytes_max {record_bytes_max} allows",
                body.len()
            )));
        }
        let archived = record::access_body(body, &mut scratch)
            .map_err(|fault| bad(format!("at offset {position}: {}", frame_fault(fault))))?;
        let view = RecordView::from_archived(archived);
        let (origin_node, shard) = *identity.get_or_insert((view.origin_node, view.shard));
        if (view.origin_node, view.shard) != (origin_node, shard) {
            return Err(bad(format!(
                "record lsn {} belongs to node {} shard {}, but the group's first record to node \
                 {origin_node} shard {shard}",
                view.lsn, view.origin_node, view.shard
            )));
        }
        if view.lsn != expected_lsn {
            return Err(bad(format!(
                "at offset {position}: lsn out of sequence: expected {expected_lsn}, found {}",
                view.lsn
            )));
        }
        if view.payload.len() > record_bytes_max as usize {
            return Err(bad(format!(
                "record lsn {} has a payload of {} bytes, over record_bytes_max {record_bytes_max}",
                view.lsn,
                view.payload.len()
            )));
        }
        payload_bytes_max = payload_bytes_max.max(view.payload.len());
        on_record(view).map_err(|reason| WalError::Replay {
            lsn: view.lsn,
            reason,
        })?;
        expected_lsn += 1;
        position += frame_len;
    }
    let (origin_node, shard) = identity.ok_or_else(|| bad("group holds no records".to_owned()))?;
    Ok(GroupView {
        bytes,
        first_lsn: header.first_lsn,
        records: header.records,
        origin_node,
        shard,
        payload_bytes_max,
    })
}

/// Hands each record of an already validated group to `f`.
fn walk_records(
    bytes: &[u8],
    mut f: impl FnMut(RecordView<'_>) -> Result<(), String>,
) -> Result<(), WalError> {
    let mut scratch = record::new_scratch();
    let mut position = GROUP_HEADER_BYTES;
    while position < bytes.len() {
        let (body, frame_len) = record::check_frame(bytes, position)
            .map_err(|fault| bad(format!("at offset {position}: {}", frame_fault(fault))))?;
        let archived = record::access_body(body, &mut scratch)
            .map_err(|fault| bad(format!("at offset {position}: {}", frame_fault(fault))))?;
        let view = RecordView::from_archived(archived);
        f(view).map_err(|reason| WalError::Replay {
            lsn: view.lsn,
            reason,
        })?;
        position += frame_len;
    }
    Ok(())
}

fn frame_fault(fault: FrameFault) -> String {
    match fault {
        FrameFault::Bad(reason) => reason,
        FrameFault::UnsupportedVersion(version) => {
            format!("unsupported record format version {version}")
        }
    }
}
