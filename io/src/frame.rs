//! The one record frame of shale's append-only logs, and the rule that tells a log's torn tail
//! from damage (sans-IO).
//!
//! A frame is `[payload length u32 LE][crc32 of the payload u32 LE][payload]`. The WAL's records,
//! the Raft log and the presence log all write it; each log puts its own version byte first in
//! the payload and gives its own length bounds. Decoding works on a byte slice and never
//! allocates: a declared length outside the caller's bounds is damage, whatever it says.
//!
//! Logs are scanned from the front. Zeroes up to the end of the file are the clean end (a file
//! extended or padded but not written). A frame that is cut short or damaged is the torn end of
//! the last write only when the log's `TailRule` says so; anything else is corruption, which the
//! log refuses naming the file and the offset.

/// Bytes of the `[len u32][crc32 u32]` frame header.
pub const FRAME_HEADER_BYTES: usize = 8;

/// The payload sizes a log writes and accepts. A declared length outside them is damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// At least 1, so a zero length (what a zeroed header reads as) is never a frame.
    pub payload_bytes_min: usize,
    /// At most `u32::MAX`, the largest length the header can carry.
    pub payload_bytes_max: usize,
}

impl FrameLimits {
    /// Limits clamped to what the header can express (`1..=u32::MAX`).
    pub const fn new(payload_bytes_min: usize, payload_bytes_max: usize) -> FrameLimits {
        let min = if payload_bytes_min == 0 {
            1
        } else {
            payload_bytes_min
        };
        let max = if payload_bytes_max > u32::MAX as usize {
            u32::MAX as usize
        } else {
            payload_bytes_max
        };
        FrameLimits {
            payload_bytes_min: min,
            payload_bytes_max: max,
        }
    }
}

/// Why a payload cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame payload of {bytes} bytes is outside the limits of {min}..={max} bytes")]
pub struct EncodeError {
    pub bytes: usize,
    pub min: usize,
    pub max: usize,
}

/// Appends one frame holding `payload` to `out` and returns the frame's length in bytes.
/// On error `out` is left as it was.
pub fn encode(
    out: &mut Vec<u8>,
    payload: &[u8],
    limits: FrameLimits,
) -> Result<usize, EncodeError> {
    let start = begin(out);
    out.extend_from_slice(payload);
    finish(out, start, limits)
}

/// Starts a frame at the end of `out` (a header of zeroes for now) and returns where it starts.
/// The caller appends the payload in place, then calls `finish`; that saves a copy when the
/// payload is serialized straight into the buffer.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    start
}

/// Completes the frame `begin` started at `start`: everything after its header is the payload.
/// Returns the frame's length in bytes. On error `out` is cut back to `start`, so a half-made
/// frame never stays in a buffer.
pub fn finish(out: &mut Vec<u8>, start: usize, limits: FrameLimits) -> Result<usize, EncodeError> {
    let payload_start = start + FRAME_HEADER_BYTES;
    let bytes = out.len().saturating_sub(payload_start);
    if bytes < limits.payload_bytes_min || bytes > limits.payload_bytes_max {
        out.truncate(start);
        return Err(EncodeError {
            bytes,
            min: limits.payload_bytes_min,
            max: limits.payload_bytes_max,
        });
    }
    let crc = crc32fast::hash(&out[payload_start..]);
    // The limits keep `bytes` within u32.
    out[start..start + 4].copy_from_slice(&(bytes as u32).to_le_bytes());
    out[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
    Ok(FRAME_HEADER_BYTES + bytes)
}

/// A whole frame whose checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Where the frame starts in the decoded bytes.
    pub offset: usize,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes of the whole frame, header included.
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }

    /// Where the next frame starts.
    pub fn end(&self) -> usize {
        self.offset + self.frame_bytes()
    }
}

/// The bytes end inside the frame at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incomplete {
    pub offset: usize,
    /// Bytes from `offset` to the end of the input.
    pub available: usize,
    /// The payload length from the header, or `None` when the header itself is cut short.
    pub declared_payload_bytes: Option<usize>,
}

impl Incomplete {
    /// Bytes from `offset` the frame needs (its header, when even that is missing).
    pub fn needed(&self) -> usize {
        FRAME_HEADER_BYTES + self.declared_payload_bytes.unwrap_or(0)
    }
}

/// What is wrong with a damaged frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    LengthBelowMin {
        declared: usize,
        min: usize,
    },
    LengthAboveMax {
        declared: usize,
        max: usize,
    },
    ChecksumMismatch {
        payload_bytes: usize,
        stored: u32,
        computed: u32,
    },
}

/// A frame at `offset` that can never become valid, however many bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    pub offset: usize,
    pub kind: DamageKind,
}

/// The outcome of decoding one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    Frame(Frame<'a>),
    /// More bytes are needed; with a file, the frame was cut short.
    Incomplete(Incomplete),
    Damaged(Damage),
}

/// Decodes the frame starting at `offset` in `data`. Never allocates and never reads past
/// `data`; a length outside `limits` is damage, checked before the bytes it claims.
pub fn decode(data: &[u8], offset: usize, limits: FrameLimits) -> Decoded<'_> {
    let rest = data.get(offset..).unwrap_or(&[]);
    let incomplete = |declared_payload_bytes| {
        Decoded::Incomplete(Incomplete {
            offset,
            available: rest.len(),
            declared_payload_bytes,
        })
    };
    let Some((header, after)) = rest.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return incomplete(None);
    };
    let declared = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let damaged = |kind| Decoded::Damaged(Damage { offset, kind });
    if declared < limits.payload_bytes_min {
        return damaged(DamageKind::LengthBelowMin {
            declared,
            min: limits.payload_bytes_min,
        });
    }
    if declared > limits.payload_bytes_max {
        return damaged(DamageKind::LengthAboveMax {
            declared,
            max: limits.payload_bytes_max,
        });
    }
    let Some(payload) = after.get(..declared) else {
        return incomplete(Some(declared));
    };
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return damaged(DamageKind::ChecksumMismatch {
            payload_bytes: declared,
            stored,
            computed,
        });
    }
    Decoded::Frame(Frame { offset, payload })
}

/// Decodes the frame at `offset` only if its payload starts with `payload_prefix` and is whole and
/// checksummed. The prefix (a log's version byte, say) is checked before the checksum, which
/// keeps a byte-by-byte search for a later valid frame cheap.
pub fn frame_at<'a>(
    data: &'a [u8],
    offset: usize,
    limits: FrameLimits,
    payload_prefix: &[u8],
) -> Option<Frame<'a>> {
    let start = offset.checked_add(FRAME_HEADER_BYTES)?;
    if !data.get(start..)?.starts_with(payload_prefix) {
        return None;
    }
    match decode(data, offset, limits) {
        Decoded::Frame(frame) if frame.payload.starts_with(payload_prefix) => Some(frame),
        _ => None,
    }
}

/// Why the scan of a log stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Incomplete(Incomplete),
    Damaged(Damage),
    /// The frame is whole and checksummed, but the log's payload decoder says it is damaged in a
    /// way a torn write can explain (the WAL's archive validation).
    Rejected {
        offset: usize,
        frame_bytes: usize,
        reason: String,
    },
}

impl Fault {
    /// Where the frame that stopped the scan starts.
    pub fn offset(&self) -> usize {
        match self {
            Fault::Incomplete(incomplete) => incomplete.offset,
            Fault::Damaged(damage) => damage.offset,
            Fault::Rejected { offset, .. } => *offset,
        }
    }

    /// For `TailRule::ZeroesFollow`: from where the rest of the file must be zeroes for this
    /// fault to be a torn tail, or `None` when it never is.
    fn zeroes_from(&self, data_len: usize) -> Option<usize> {
        match self {
            Fault::Incomplete(_) => Some(data_len),
            Fault::Damaged(Damage { offset, kind }) => match *kind {
                // A zero length before data is not how a write tears.
                DamageKind::LengthBelowMin { .. } => None,
                // A header garbled by a torn write: what it claims cannot be trusted, but no
                // frame may follow its header.
                DamageKind::LengthAboveMax { declared, .. } => {
                    if offset + FRAME_HEADER_BYTES + declared > data_len {
                        Some(data_len)
                    } else {
                        Some(offset + FRAME_HEADER_BYTES)
                    }
                }
                DamageKind::ChecksumMismatch { payload_bytes, .. } => {
                    Some(offset + FRAME_HEADER_BYTES + payload_bytes)
                }
            },
            Fault::Rejected {
                offset,
                frame_bytes,
                ..
            } => Some(offset + frame_bytes),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Incomplete(Incomplete {
                available,
                declared_payload_bytes: None,
                ..
            }) => write!(
                f,
                "partial frame header ({available} bytes left in the file)"
            ),
            Fault::Incomplete(Incomplete {
                available,
                declared_payload_bytes: Some(declared),
                ..
            }) => write!(
                f,
                "record length {declared} runs past the end of the file ({} bytes left)",
                available - FRAME_HEADER_BYTES
            ),
            Fault::Damaged(damage) => match damage.kind {
                DamageKind::LengthBelowMin { declared: 0, .. } => {
                    write!(f, "zero-length record followed by data")
                }
                DamageKind::LengthBelowMin { declared, min } => {
                    write!(
                        f,
                        "impossible record length {declared} (the minimum is {min})"
                    )
                }
                DamageKind::LengthAboveMax { declared, max } => {
                    write!(f, "record length {declared} exceeds the limit of {max}")
                }
                DamageKind::ChecksumMismatch {
                    stored, computed, ..
                } => write!(
                    f,
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                ),
            },
            Fault::Rejected { reason, .. } => f.write_str(reason),
        }
    }
}

/// How a log decides whether the frame that stopped its scan is the torn end of its last write
/// (cut off and forgotten) or corruption (refused). Each log keeps the rule it was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailRule {
    /// Never torn: the file was synced whole (a WAL segment that is not the last).
    Never,
    /// Torn only when no valid frame starts anywhere after it: the writer appends in order, so
    /// a valid frame after the bad one shows the bad one was written and synced before. The Raft
    /// log and the WAL use it.
    NothingValidFollows,
    /// Torn only when nothing but zeroes follows the bytes the frame can be trusted to span: a
    /// cut-short frame always, a checksum mismatch when zeroes follow its declared end, a length
    /// above the limit when zeroes follow its header or it runs past the end; a zero length
    /// never. The presence log uses it.
    ZeroesFollow,
}

/// Whether `fault` is a torn tail under `rule`. `valid_at` says whether a valid unit (a frame,
/// or the log's own larger unit) starts at a position; only `NothingValidFollows` asks it.
pub fn is_torn_tail(
    data: &[u8],
    fault: &Fault,
    rule: TailRule,
    valid_at: impl FnMut(usize) -> bool,
) -> bool {
    match rule {
        TailRule::Never => false,
        TailRule::NothingValidFollows => !valid_unit_follows(data.len(), fault.offset(), valid_at),
        TailRule::ZeroesFollow => fault
            .zeroes_from(data.len())
            .is_some_and(|start| is_zero_tail(data, start)),
    }
}

/// Searches byte by byte after `position` (to the end of `data_len` bytes) for a valid unit.
pub fn valid_unit_follows(
    data_len: usize,
    position: usize,
    valid_at: impl FnMut(usize) -> bool,
) -> bool {
    (position.saturating_add(1)..data_len).any(valid_at)
}

/// True when only zeroes remain from `position` (or nothing): the clean end of a log.
pub fn is_zero_tail(data: &[u8], position: usize) -> bool {
    data.get(position..)
        .is_none_or(|rest| rest.iter().all(|byte| *byte == 0))
}

/// How a log's payload decoder turns down a checksummed frame.
#[derive(Debug)]
pub enum Reject<E> {
    /// Damage a torn write can explain: the scan stops with `Fault::Rejected`, and the log's
    /// tail rule decides.
    Damaged(String),
    /// Never a torn write (an unknown version, a record that breaks the log's invariants, a
    /// caller's error): the scan stops with this error.
    Refuse(E),
}

/// Where a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanStop {
    /// Just past the last accepted frame: the valid prefix, where appends continue.
    pub valid_end: usize,
    /// `None` at the clean end (the end of the data, or only zeroes after `valid_end`);
    /// otherwise the frame that stopped the scan, at `valid_end`, for `is_torn_tail` to judge.
    pub fault: Option<Fault>,
}

/// Decodes frames from `start` and hands each to `on_frame` until the clean end, a frame that
/// is not whole and checksummed, or a rejection.
pub fn scan<E>(
    data: &[u8],
    start: usize,
    limits: FrameLimits,
    mut on_frame: impl FnMut(Frame<'_>) -> Result<(), Reject<E>>,
) -> Result<ScanStop, E> {
    let mut position = start;
    loop {
        if is_zero_tail(data, position) {
            return Ok(ScanStop {
                valid_end: position,
                fault: None,
            });
        }
        let fault = match decode(data, position, limits) {
            Decoded::Frame(frame) => match on_frame(frame) {
                Ok(()) => {
                    position = frame.end();
                    continue;
                }
                Err(Reject::Refuse(error)) => return Err(error),
                Err(Reject::Damaged(reason)) => Fault::Rejected {
                    offset: position,
                    frame_bytes: frame.frame_bytes(),
                    reason,
                },
            },
            Decoded::Incomplete(incomplete) => Fault::Incomplete(incomplete),
            Decoded::Damaged(damage) => Fault::Damaged(damage),
        };
        return Ok(ScanStop {
            valid_end: position,
            fault: Some(fault),
        });
    }
}

#[cfg(test)]
mod tests;
