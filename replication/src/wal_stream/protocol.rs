//! The WalStream wire format (sans-IO): messages of one (origin, shard) stream, encoded into and
//! decoded from byte buffers, every length checked against a bound before anything is allocated.
//!
//! After the transport's `[protocol version][kind]` header and its acceptance byte, both
//! directions carry messages framed as `[payload length u32 LE][type u8][payload]` (the length
//! does not count the five header bytes). Integers are little-endian.
//!
//! | type | name     | direction        | payload                                        |
//! |------|----------|------------------|------------------------------------------------|
//! | 1    | Hello    | origin -> replica | `[version u8][origin u64][shard u32]`         |
//! | 2    | Position | replica -> origin | `[durable lsn u64]`                           |
//! | 3    | Group    | origin -> replica | `[first lsn u64][last lsn u64][group bytes]`  |
//! | 4    | Reset    | origin -> replica | `[lsn u64]`                                   |
//! | 5    | Ack      | replica -> origin | `[durable lsn u64]`                           |
//! | 6    | Resync   | replica -> origin | `[durable lsn u64]`                           |
//! | 7    | Refused  | replica -> origin | `[reason, UTF-8]` (at most [`REASON_BYTES_MAX`]) |
//!
//! The version travels in `Hello`; a replica refuses a version it does not speak.

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;

/// The version a `Hello` of this build carries.
pub const WAL_PROTOCOL_VERSION: u8 = 1;
/// `[payload length u32][type u8]`.
pub const HEADER_BYTES: usize = 5;
/// Bytes of a Group payload before the group's own bytes.
pub const GROUP_PREFIX_BYTES: usize = 16;
/// A refusal reason is cut to this many bytes.
pub const REASON_BYTES_MAX: usize = 1024;

const TYPE_HELLO: u8 = 1;
const TYPE_POSITION: u8 = 2;
const TYPE_GROUP: u8 = 3;
const TYPE_RESET: u8 = 4;
const TYPE_ACK: u8 = 5;
const TYPE_RESYNC: u8 = 6;
const TYPE_REFUSED: u8 = 7;
const HELLO_BYTES: usize = 13;
const LSN_BYTES: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Opens a stream: the origin ships `shard` of its WAL. `origin` must be the authenticated
    /// peer.
    Hello {
        version: u8,
        origin: u64,
        shard: u32,
    },
    /// The replica's durable position; shipping starts after it.
    Position { durable_lsn: u64 },
    /// One group commit, opaque bytes covering `first_lsn..=last_lsn`.
    Group {
        first_lsn: u64,
        last_lsn: u64,
        bytes: Bytes,
    },
    /// The origin no longer holds records below `lsn`: restart the replica log there.
    Reset { lsn: u64 },
    /// Everything through `durable_lsn` is durable on the replica.
    Ack { durable_lsn: u64 },
    /// The replica found a gap: the origin must continue after `durable_lsn`.
    Resync { durable_lsn: u64 },
    /// A fatal error; the replica ends the stream.
    Refused { reason: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown wal stream message type {0}")]
    UnknownType(u8),
    #[error("wal stream message type {kind} of {length} bytes exceeds its limit of {limit}")]
    TooLong {
        kind: u8,
        length: usize,
        limit: usize,
    },
    #[error("wal stream message type {kind} of {length} bytes, expected {expected}")]
    BadLength {
        kind: u8,
        length: usize,
        expected: usize,
    },
    #[error("wal stream group with lsn range {first_lsn}..={last_lsn}")]
    BadRange { first_lsn: u64, last_lsn: u64 },
}

/// What [`decode`] found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Message(Message),
    /// The buffer holds only part of a message: at least this many more bytes are needed. The
    /// count is bounded (a header passed the limit check), so a reader may reserve it.
    Need(usize),
}

/// The most payload bytes a message of `kind` may have, `payload_limit` being the configured
/// bound on group messages.
fn payload_limit_of(kind: u8, payload_limit: usize) -> Result<(usize, usize), ProtocolError> {
    // (minimum, maximum)
    Ok(match kind {
        TYPE_HELLO => (HELLO_BYTES, HELLO_BYTES),
        TYPE_POSITION | TYPE_RESET | TYPE_ACK | TYPE_RESYNC => (LSN_BYTES, LSN_BYTES),
        TYPE_GROUP => (GROUP_PREFIX_BYTES, payload_limit),
        TYPE_REFUSED => (0, REASON_BYTES_MAX),
        other => return Err(ProtocolError::UnknownType(other)),
    })
}

/// Takes one message off the front of `buffer`. The header is checked (known type, length
/// within that type's bound and `payload_limit`) before the caller is asked for more bytes, so
/// a peer can never make a reader allocate more than `payload_limit + HEADER_BYTES`. Group bytes
/// are split off the buffer without copying.
pub fn decode(buffer: &mut BytesMut, payload_limit: usize) -> Result<Decoded, ProtocolError> {
    if buffer.len() < HEADER_BYTES {
        return Ok(Decoded::Need(HEADER_BYTES - buffer.len()));
    }
    let length = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    let kind = buffer[4];
    let (minimum, maximum) = payload_limit_of(kind, payload_limit)?;
    if length > maximum {
        return Err(ProtocolError::TooLong {
            kind,
            length,
            limit: maximum,
        });
    }
    if length < minimum || (minimum == maximum && length != minimum) {
        return Err(ProtocolError::BadLength {
            kind,
            length,
            expected: minimum,
        });
    }
    if buffer.len() < HEADER_BYTES + length {
        return Ok(Decoded::Need(HEADER_BYTES + length - buffer.len()));
    }
    buffer.advance(HEADER_BYTES);
    let mut payload = buffer.split_to(length);
    let message = match kind {
        TYPE_HELLO => Message::Hello {
            version: payload.get_u8(),
            origin: payload.get_u64_le(),
            shard: payload.get_u32_le(),
        },
        TYPE_POSITION => Message::Position {
            durable_lsn: payload.get_u64_le(),
        },
        TYPE_RESET => Message::Reset {
            lsn: payload.get_u64_le(),
        },
        TYPE_ACK => Message::Ack {
            durable_lsn: payload.get_u64_le(),
        },
        TYPE_RESYNC => Message::Resync {
            durable_lsn: payload.get_u64_le(),
        },
        TYPE_GROUP => {
            let first_lsn = payload.get_u64_le();
            let last_lsn = payload.get_u64_le();
            if first_lsn == 0 || first_lsn > last_lsn {
                return Err(ProtocolError::BadRange {
                    first_lsn,
                    last_lsn,
                });
            }
            Message::Group {
                first_lsn,
                last_lsn,
                bytes: payload.freeze(),
            }
        }
        TYPE_REFUSED => Message::Refused {
            reason: String::from_utf8_lossy(&payload).into_owned(),
        },
        _ => unreachable!("type checked by payload_limit_of"),
    };
    Ok(Decoded::Message(message))
}

fn put_header(out: &mut BytesMut, kind: u8, length: usize) {
    out.put_u32_le(length as u32);
    out.put_u8(kind);
}

/// Appends `message` to `out`. A Group's bytes are copied; to send them without a copy, write
/// [`group_header`] and then the bytes.
pub fn encode(message: &Message, out: &mut BytesMut) {
    match message {
        Message::Hello {
            version,
            origin,
            shard,
        } => {
            put_header(out, TYPE_HELLO, HELLO_BYTES);
            out.put_u8(*version);
            out.put_u64_le(*origin);
            out.put_u32_le(*shard);
        }
        Message::Position { durable_lsn } => put_lsn(out, TYPE_POSITION, *durable_lsn),
        Message::Reset { lsn } => put_lsn(out, TYPE_RESET, *lsn),
        Message::Ack { durable_lsn } => put_lsn(out, TYPE_ACK, *durable_lsn),
        Message::Resync { durable_lsn } => put_lsn(out, TYPE_RESYNC, *durable_lsn),
        Message::Group {
            first_lsn,
            last_lsn,
            bytes,
        } => {
            out.extend_from_slice(&group_header(*first_lsn, *last_lsn, bytes.len()));
            out.extend_from_slice(bytes);
        }
        Message::Refused { reason } => {
            let mut end = reason.len().min(REASON_BYTES_MAX);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            put_header(out, TYPE_REFUSED, end);
            out.extend_from_slice(&reason.as_bytes()[..end]);
        }
    }
}

fn put_lsn(out: &mut BytesMut, kind: u8, lsn: u64) {
    put_header(out, kind, LSN_BYTES);
    out.put_u64_le(lsn);
}

/// The frame header and LSN prefix of a Group message whose `group_bytes` bytes follow.
pub fn group_header(
    first_lsn: u64,
    last_lsn: u64,
    group_bytes: usize,
) -> [u8; HEADER_BYTES + GROUP_PREFIX_BYTES] {
    let mut header = [0u8; HEADER_BYTES + GROUP_PREFIX_BYTES];
    let length = (GROUP_PREFIX_BYTES + group_bytes) as u32;
    header[0..4].copy_from_slice(&length.to_le_bytes());
    header[4] = TYPE_GROUP;
    header[5..13].copy_from_slice(&first_lsn.to_le_bytes());
    header[13..21].copy_from_slice(&last_lsn.to_le_bytes());
    header
}

/// The payload bytes a Group of `group_bytes` takes, to compare with the configured limit.
pub fn group_payload_bytes(group_bytes: usize) -> usize {
    GROUP_PREFIX_BYTES + group_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(message: &Message) -> BytesMut {
        let mut out = BytesMut::new();
        encode(message, &mut out);
        out
    }

    // Checks a stored sample of every message kind byte for byte, and that each decodes back:
    // origins and replicas of different builds must keep understanding each other, so the
    // format may not drift silently.
    #[test]
    fn wire_samples_are_stable() {
        let samples: Vec<(Message, Vec<u8>)> = vec![
            (
                Message::Hello {
                    version: 1,
                    origin: 2,
                    shard: 3,
                },
                vec![13, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0],
            ),
            (
                Message::Position { durable_lsn: 258 },
                vec![8, 0, 0, 0, 2, 2, 1, 0, 0, 0, 0, 0, 0],
            ),
            (
                Message::Group {
                    first_lsn: 5,
                    last_lsn: 6,
                    bytes: Bytes::from_static(b"ab"),
                },
                vec![
                    18, 0, 0, 0, 3, 5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, b'a', b'b',
                ],
            ),
            (
                Message::Reset { lsn: 7 },
                vec![8, 0, 0, 0, 4, 7, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Message::Ack { durable_lsn: 8 },
                vec![8, 0, 0, 0, 5, 8, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Message::Resync { durable_lsn: 9 },
                vec![8, 0, 0, 0, 6, 9, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Message::Refused {
                    reason: "no".to_owned(),
                },
                vec![2, 0, 0, 0, 7, b'n', b'o'],
            ),
        ];
        for (message, sample) in samples {
            let mut bytes = encoded(&message);
            assert_eq!(&bytes[..], &sample[..], "{message:?}");
            assert_eq!(
                decode(&mut bytes, 1 << 20).unwrap(),
                Decoded::Message(message)
            );
            assert!(bytes.is_empty());
        }
    }

    // Checks that messages split at every byte boundary decode only once complete, and that
    // the reader is told how many bytes are missing, so it can read exactly what is needed.
    #[test]
    fn partial_messages_ask_for_the_rest() {
        let message = Message::Group {
            first_lsn: 1,
            last_lsn: 3,
            bytes: Bytes::from(vec![9u8; 100]),
        };
        let whole = encoded(&message);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            match decode(&mut part, 1 << 20).unwrap() {
                Decoded::Need(missing) if cut < HEADER_BYTES => {
                    assert_eq!(missing, HEADER_BYTES - cut)
                }
                Decoded::Need(missing) => assert_eq!(missing, whole.len() - cut),
                other => panic!("decoded {other:?} from {cut} bytes"),
            }
            assert_eq!(part.len(), cut, "a partial message was consumed");
        }
    }

    // Checks that a header announcing more than the limit, or more than a fixed-size type can
    // have, is refused from its five header bytes alone: the reader never reserves memory for
    // it, so a peer cannot make a node allocate gigabytes with one forged length.
    #[test]
    fn oversized_and_garbage_messages_are_refused_before_allocation() {
        let limit = 1 << 20;
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (
                vec![0xff, 0xff, 0xff, 0xff, TYPE_GROUP],
                ProtocolError::TooLong {
                    kind: TYPE_GROUP,
                    length: u32::MAX as usize,
                    limit,
                },
            ),
            (
                {
                    let mut header = ((limit + 1) as u32).to_le_bytes().to_vec();
                    header.push(TYPE_GROUP);
                    header
                },
                ProtocolError::TooLong {
                    kind: TYPE_GROUP,
                    length: limit + 1,
                    limit,
                },
            ),
            (
                vec![0, 0, 0, 0x10, TYPE_REFUSED],
                ProtocolError::TooLong {
                    kind: TYPE_REFUSED,
                    length: 0x1000_0000,
                    limit: REASON_BYTES_MAX,
                },
            ),
            (
                vec![9, 0, 0, 0, TYPE_ACK],
                ProtocolError::TooLong {
                    kind: TYPE_ACK,
                    length: 9,
                    limit: LSN_BYTES,
                },
            ),
            (
                vec![7, 0, 0, 0, TYPE_ACK],
                ProtocolError::BadLength {
                    kind: TYPE_ACK,
                    length: 7,
                    expected: LSN_BYTES,
                },
            ),
            (
                vec![15, 0, 0, 0, TYPE_GROUP],
                ProtocolError::BadLength {
                    kind: TYPE_GROUP,
                    length: 15,
                    expected: GROUP_PREFIX_BYTES,
                },
            ),
            (vec![1, 0, 0, 0, 0], ProtocolError::UnknownType(0)),
            (vec![1, 0, 0, 0, 200], ProtocolError::UnknownType(200)),
        ];
        for (header, expected) in cases {
            let mut buffer = BytesMut::from(&header[..]);
            let capacity = buffer.capacity();
            assert_eq!(decode(&mut buffer, limit), Err(expected), "{header:?}");
            assert_eq!(buffer.capacity(), capacity, "decode grew the buffer");
        }
        // A group whose range is empty or starts at 0 is refused once complete.
        let mut bad = BytesMut::new();
        bad.extend_from_slice(&group_header(5, 4, 0));
        assert_eq!(
            decode(&mut bad, limit),
            Err(ProtocolError::BadRange {
                first_lsn: 5,
                last_lsn: 4
            })
        );
        let mut zero = BytesMut::new();
        zero.extend_from_slice(&group_header(0, 4, 0));
        assert!(matches!(
            decode(&mut zero, limit),
            Err(ProtocolError::BadRange { .. })
        ));
    }

    // Checks that a refusal reason is cut on a character boundary, so the peer always
    // receives valid UTF-8 within the bound.
    #[test]
    fn long_refusal_reasons_are_cut() {
        let reason = "é".repeat(REASON_BYTES_MAX);
        let mut bytes = encoded(&Message::Refused { reason });
        match decode(&mut bytes, 1 << 20).unwrap() {
            Decoded::Message(Message::Refused { reason }) => {
                assert!(reason.len() <= REASON_BYTES_MAX && reason.chars().all(|c| c == 'é'))
            }
            other => panic!("{other:?}"),
        }
    }
}
