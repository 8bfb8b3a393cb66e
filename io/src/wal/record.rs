//! The WAL record: its rkyv schema, wrapped on disk in shale-io's one record frame (sans-IO).
//!
//! A frame is `[body length u32 LE][crc32 of body u32 LE][body]` (`crate::frame`), and a body is
//! `[record format version u8][rkyv archive of WalRecord]`. Inside the archive the payload
//! bytes come first (they are the archived vector's out-of-line data) and the fixed-size
//! root struct last, so `append_with` can let a caller write the payload in place before the
//! root that points at it is serialized.

use rkyv::{
    rancor::Fallible,
    ser::{Positional, Writer},
    util::AlignedVec,
    vec::{ArchivedVec, VecResolver},
    with::{ArchiveWith, SerializeWith},
    Archive, Deserialize, Place, Serialize,
};

/// Version byte at the start of every record body. Bump it (and keep reading the old one)
/// whenever `WalRecord` or its rkyv encoding changes.
pub const RECORD_FORMAT_VERSION: u8 = 1;

pub use crate::frame::FRAME_HEADER_BYTES;
use crate::frame::{self, Decoded, FrameLimits};

/// Alignment the archive needs when it is accessed; bodies are copied into a buffer with this
/// alignment before validation because on disk they start at arbitrary offsets.
const ARCHIVE_ALIGNMENT: usize = 16;

/// One logged record as it is archived. Every record names the node and shard that wrote it
/// and its LSN, so replication and takeover can forward records unchanged.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub origin_node: u64,
    pub shard: u32,
    pub lsn: u64,
    /// Opaque to the WAL; the ingest layer uses it to tell payload encodings apart.
    pub kind: u8,
    /// The writer's clock when the record was appended; replay uses it for rows without
    /// timestamps.
    pub time_ns: i64,
    pub payload: Vec<u8>,
}

/// A replayed record, borrowing its payload from the validated archive (no copy of the
/// payload is made beyond the aligned copy of the whole body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub origin_node: u64,
    pub shard: u32,
    pub lsn: u64,
    pub kind: u8,
    pub time_ns: i64,
    pub payload: &'a [u8],
}

impl<'a> RecordView<'a> {
    pub(crate) fn from_archived(archived: &'a ArchivedWalRecord) -> Self {
        RecordView {
            origin_node: archived.origin_node.to_native(),
            shard: archived.shard.to_native(),
            lsn: archived.lsn.to_native(),
            kind: archived.kind,
            time_ns: archived.time_ns.to_native(),
            payload: archived.payload.as_slice(),
        }
    }

    /// Copies the view into an owned record.
    pub fn to_record(&self) -> WalRecord {
        WalRecord {
            origin_node: self.origin_node,
            shard: self.shard,
            lsn: self.lsn,
            kind: self.kind,
            time_ns: self.time_ns,
            payload: self.payload.to_vec(),
        }
    }
}

/// The fixed fields of a record about to be encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordHeader {
    pub origin_node: u64,
    pub shard: u32,
    pub lsn: u64,
    pub kind: u8,
    pub time_ns: i64,
}

/// Where the payload already sits in the archive being written (relative to its start).
#[derive(Debug, Clone, Copy)]
struct PayloadPlacement {
    position: usize,
    len: usize,
}

/// rkyv wrapper that archives an already-written payload region as `ArchivedVec<u8>`.
struct PlacedPayload;

impl ArchiveWith<PayloadPlacement> for PlacedPayload {
    type Archived = ArchivedVec<u8>;
    type Resolver = VecResolver;

    fn resolve_with(field: &PayloadPlacement, resolver: VecResolver, out: Place<ArchivedVec<u8>>) {
        ArchivedVec::resolve_from_len(field.len, resolver, out);
    }
}

impl<S: Fallible + ?Sized> SerializeWith<PayloadPlacement, S> for PlacedPayload {
    fn serialize_with(
        field: &PayloadPlacement,
        _serializer: &mut S,
    ) -> Result<VecResolver, S::Error> {
        // The bytes were written before serialization started; only their position is needed.
        Ok(VecResolver::from_pos(field.position))
    }
}

/// Serializes into exactly the archived layout of `WalRecord` (`as = ArchivedWalRecord`
/// makes the compiler check that every field archives to the same type), but without
/// owning the payload.
#[derive(Archive, Serialize)]
#[rkyv(as = ArchivedWalRecord)]
struct RecordSource {
    origin_node: u64,
    shard: u32,
    lsn: u64,
    kind: u8,
    time_ns: i64,
    #[rkyv(with = PlacedPayload)]
    payload: PayloadPlacement,
}

/// An rkyv writer that appends to a frame buffer and reports positions relative to the start
/// of the archive, so the archive's internal alignment is the same as when it is later copied
/// to an aligned buffer at offset 0.
struct ArchiveWriter<'a> {
    buffer: &'a mut Vec<u8>,
    archive_start: usize,
}

impl Positional for ArchiveWriter<'_> {
    fn pos(&self) -> usize {
        self.buffer.len() - self.archive_start
    }
}

impl<E> Writer<E> for ArchiveWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }
}

/// Restores a buffer's length if encoding does not finish (an error, or a panic in the
/// caller's payload writer), so a half-written frame never stays in a batch.
struct TruncateGuard<'a> {
    buffer: &'a mut Vec<u8>,
    len: usize,
    armed: bool,
}

impl Drop for TruncateGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.buffer.truncate(self.len);
        }
    }
}

/// Most bytes a frame adds around a payload: frame header, version byte, alignment padding
/// before the root struct, and the root struct itself.
pub(crate) const FRAME_OVERHEAD_BYTES_MAX: usize =
    FRAME_HEADER_BYTES + 1 + 7 + std::mem::size_of::<ArchivedWalRecord>();

/// Smallest possible body: version byte plus a root struct with an empty payload.
pub(crate) const BODY_BYTES_MIN: usize = 1 + std::mem::size_of::<ArchivedWalRecord>();

/// The WAL's frame bounds: a body is at least a version byte and an empty record, and at most
/// what the length field holds (a batch is bounded far below by `WalConfig::write_bytes_max`).
pub(crate) const FRAME_LIMITS: FrameLimits = FrameLimits::new(BODY_BYTES_MIN, u32::MAX as usize);

/// Appends one complete frame to `out`. `fill` must append exactly `payload_len` bytes.
/// Returns the frame's length in bytes. On error `out` is left as it was.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    header: RecordHeader,
    payload_len: usize,
    fill: impl FnOnce(&mut Vec<u8>),
) -> Result<usize, String> {
    let frame_start = out.len();
    let mut guard = TruncateGuard {
        buffer: out,
        len: frame_start,
        armed: true,
    };
    let buffer = &mut *guard.buffer;
    buffer.reserve(payload_len + FRAME_OVERHEAD_BYTES_MAX);
    frame::begin(buffer);
    buffer.push(RECORD_FORMAT_VERSION);
    let archive_start = buffer.len();
    fill(buffer);
    assert_eq!(
        buffer.len() - archive_start,
        payload_len,
        "payload writer appended the wrong number of bytes"
    );

    let source = RecordSource {
        origin_node: header.origin_node,
        shard: header.shard,
        lsn: header.lsn,
        kind: header.kind,
        time_ns: header.time_ns,
        payload: PayloadPlacement {
            position: 0,
            len: payload_len,
        },
    };
    let writer = ArchiveWriter {
        buffer: &mut *buffer,
        archive_start,
    };
    rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&source, writer)
        .map_err(|error| format!("serialize wal record: {error}"))?;

    let frame_len = frame::finish(buffer, frame_start, FRAME_LIMITS)
        .map_err(|error| format!("frame wal record: {error}"))?;
    guard.armed = false;
    Ok(frame_len)
}

/// Why a frame at some offset is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameFault {
    /// Structural damage: bad length, checksum, or encoding. Either a torn write or corruption,
    /// depending on where it is and what follows it.
    Bad(String),
    /// The checksum passed but the version byte is one this build does not know: the file was
    /// written by a newer shale, which is never a torn write.
    UnsupportedVersion(u8),
}

/// Decodes the frame at `position` (length bounds and checksum, `crate::frame`) and checks its
/// version byte. Returns the body and the total frame length.
pub(crate) fn check_frame(data: &[u8], position: usize) -> Result<(&[u8], usize), FrameFault> {
    let frame = match frame::decode(data, position, FRAME_LIMITS) {
        Decoded::Frame(frame) => frame,
        Decoded::Incomplete(incomplete) => {
            return Err(FrameFault::Bad(
                frame::Fault::Incomplete(incomplete).to_string(),
            ))
        }
        Decoded::Damaged(damage) => {
            return Err(FrameFault::Bad(frame::Fault::Damaged(damage).to_string()))
        }
    };
    if frame.payload[0] != RECORD_FORMAT_VERSION {
        return Err(FrameFault::UnsupportedVersion(frame.payload[0]));
    }
    Ok((frame.payload, frame.frame_bytes()))
}

/// Cheap test used when scanning forward byte by byte for any later valid frame: plausible
/// length, known version byte (checked before the checksum), matching checksum.
pub(crate) fn is_plausible_frame(data: &[u8], position: usize) -> bool {
    frame::frame_at(data, position, FRAME_LIMITS, &[RECORD_FORMAT_VERSION]).is_some()
}

/// Validates a checksummed body's archive with bytecheck and returns the archived record.
/// `scratch` receives an aligned copy of the archive; the result borrows from it.
pub(crate) fn access_body<'a>(
    body: &[u8],
    scratch: &'a mut AlignedVec<ARCHIVE_ALIGNMENT>,
) -> Result<&'a ArchivedWalRecord, FrameFault> {
    debug_assert_eq!(body.first(), Some(&RECORD_FORMAT_VERSION));
    scratch.clear();
    scratch.extend_from_slice(&body[1..]);
    rkyv::access::<ArchivedWalRecord, rkyv::rancor::Error>(scratch.as_slice())
        .map_err(|error| FrameFault::Bad(format!("invalid record encoding: {error}")))
}

/// A reusable aligned buffer for `access_body`.
pub(crate) fn new_scratch() -> AlignedVec<ARCHIVE_ALIGNMENT> {
    AlignedVec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(lsn: u64) -> RecordHeader {
        RecordHeader {
            origin_node: 7,
            shard: 3,
            lsn,
            kind: 2,
            time_ns: -5,
        }
    }

    fn encode(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) -> usize {
        encode_frame(out, header(lsn), payload.len(), |buffer| {
            buffer.extend_from_slice(payload)
        })
        .unwrap()
    }

    // Checks that a frame written at an arbitrary (unaligned) offset decodes to the same fields,
    // since frames are packed back to back on disk.
    #[test]
    fn frame_round_trip_at_unaligned_offsets() {
        let mut buffer = vec![0xAA; 3];
        let mut scratch = new_scratch();
        for (index, size) in [0usize, 1, 7, 8, 100, 8192].into_iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|i| (i * 31 + index) as u8).collect();
            let start = buffer.len();
            let frame_len = encode(&mut buffer, index as u64 + 1, &payload);
            assert!(frame_len <= payload.len() + FRAME_OVERHEAD_BYTES_MAX);
            let (body, checked_len) = check_frame(&buffer, start).unwrap();
            assert_eq!(checked_len, frame_len);
            assert!(is_plausible_frame(&buffer, start));
            let view = RecordView::from_archived(access_body(body, &mut scratch).unwrap());
            assert_eq!(
                view.to_record(),
                WalRecord {
                    origin_node: 7,
                    shard: 3,
                    lsn: index as u64 + 1,
                    kind: 2,
                    time_ns: -5,
                    payload,
                }
            );
        }
    }

    // Checks that the borrowed encoder produces byte-for-byte what rkyv makes of an owned
    // WalRecord, so the on-disk body really is "an rkyv archive of WalRecord".
    #[test]
    fn borrowed_encoding_matches_owned_record() {
        let record = WalRecord {
            origin_node: 7,
            shard: 3,
            lsn: 9,
            kind: 2,
            time_ns: -5,
            payload: b"hello wal".to_vec(),
        };
        let owned = rkyv::to_bytes::<rkyv::rancor::Error>(&record).unwrap();
        let mut buffer = Vec::new();
        encode(&mut buffer, 9, b"hello wal");
        assert_eq!(&buffer[FRAME_HEADER_BYTES + 1..], owned.as_slice());
    }

    // Checks that every single-bit flip anywhere in a frame is caught by check_frame or by
    // validation, never accepted as a different record.
    #[test]
    fn bit_flips_are_detected() {
        let mut clean = Vec::new();
        encode(&mut clean, 1, b"payload bytes");
        let mut scratch = new_scratch();
        for byte in 0..clean.len() {
            for bit in 0..8 {
                let mut damaged = clean.clone();
                damaged[byte] ^= 1 << bit;
                let accepted = match check_frame(&damaged, 0) {
                    Ok((body, _)) => access_body(body, &mut scratch).is_ok(),
                    Err(_) => false,
                };
                assert!(!accepted, "flip of bit {bit} in byte {byte} was accepted");
            }
        }
    }

    // Checks that a panic in the caller's payload writer leaves no partial frame behind.
    #[test]
    fn panicking_payload_writer_leaves_buffer_unchanged() {
        let mut buffer = b"before".to_vec();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = encode_frame(&mut buffer, header(1), 4, |_| panic!("writer failed"));
        }));
        assert!(result.is_err());
        assert_eq!(buffer, b"before");
    }
}
