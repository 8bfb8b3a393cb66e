//! Property tests of the frame codec and the tail rules.

use proptest::prelude::*;

use super::*;

const LIMITS: FrameLimits = FrameLimits::new(1, 4096);

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 1..8)
}

/// Encodes `payloads` back to back; returns the bytes and each frame's offset.
fn encode_all(payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut offsets = Vec::new();
    for payload in payloads {
        offsets.push(bytes.len());
        encode(&mut bytes, payload, LIMITS).expect("encode");
    }
    (bytes, offsets)
}

/// Scans `bytes` and returns the accepted frames as (offset, payload) and where the scan stopped.
fn scan_all(bytes: &[u8]) -> (Vec<(usize, Vec<u8>)>, ScanStop) {
    let mut frames = Vec::new();
    let stop = scan::<()>(bytes, 0, LIMITS, |frame| {
        frames.push((frame.offset, frame.payload.to_vec()));
        Ok(())
    })
    .expect("no rejection");
    (frames, stop)
}

fn valid_frame_at(bytes: &[u8]) -> impl FnMut(usize) -> bool + '_ {
    |position| frame_at(bytes, position, LIMITS, &[]).is_some()
}

proptest! {
    // Checks that whatever is encoded scans back as the same payloads at the same offsets, and
    // that the scan ends cleanly (the frames fill the bytes exactly).
    #[test]
    fn round_trip(payloads in payloads()) {
        let (bytes, offsets) = encode_all(&payloads);
        let (frames, stop) = scan_all(&bytes);
        let expected: Vec<(usize, Vec<u8>)> = offsets.into_iter().zip(payloads).collect();
        prop_assert_eq!(frames, expected);
        prop_assert_eq!(stop, ScanStop { valid_end: bytes.len(), fault: None });
    }

    // Checks that cutting a valid log anywhere (a crash mid-append) reads back as exactly the
    // frames that were whole before the cut, with the rest judged a torn tail by every rule
    // that allows one: the cut-off frame must never be refused as corruption or half-accepted.
    #[test]
    fn truncation_is_the_valid_prefix_and_a_torn_tail(payloads in payloads(), cut in any::<prop::sample::Index>()) {
        let (bytes, offsets) = encode_all(&payloads);
        let cut = cut.index(bytes.len() + 1);
        let cut_bytes = &bytes[..cut];
        let (frames, stop) = scan_all(cut_bytes);
        let whole = offsets.iter().zip(&payloads)
            .filter(|(offset, payload)| **offset + FRAME_HEADER_BYTES + payload.len() <= cut)
            .count();
        prop_assert_eq!(frames.len(), whole);
        let expected_end = offsets.get(whole).copied().unwrap_or(bytes.len()).min(cut);
        prop_assert_eq!(stop.valid_end, expected_end);
        if let Some(fault) = &stop.fault {
            prop_assert!(matches!(fault, Fault::Incomplete(_)), "{fault:?}");
            prop_assert!(is_torn_tail(cut_bytes, fault, TailRule::NothingValidFollows, valid_frame_at(cut_bytes)));
            prop_assert!(is_torn_tail(cut_bytes, fault, TailRule::ZeroesFollow, |_| false));
            prop_assert!(!is_torn_tail(cut_bytes, fault, TailRule::Never, |_| false));
        }
    }

    // Checks that a changed byte anywhere in a log is caught at the frame it hit: every frame
    // before it is accepted unchanged, the damaged one and everything after is not accepted,
    // and damage with valid frames after it is refused rather than cut off as a torn tail.
    #[test]
    fn a_flipped_byte_is_never_accepted(payloads in payloads(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let (mut bytes, offsets) = encode_all(&payloads);
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        let hit = offsets.iter().rposition(|offset| *offset <= at).expect("a frame starts at 0");
        let (frames, stop) = scan_all(&bytes);
        let expected: Vec<(usize, Vec<u8>)> = offsets.iter().copied().zip(payloads.iter().cloned()).take(hit).collect();
        prop_assert_eq!(frames, expected);
        prop_assert_eq!(stop.valid_end, offsets[hit]);
        let fault = stop.fault.expect("the damaged frame stops the scan");
        if hit + 1 < offsets.len() {
            prop_assert!(!is_torn_tail(&bytes, &fault, TailRule::NothingValidFollows, valid_frame_at(&bytes)));
        }
    }

    // Checks that a header declaring any length above the limit is damage, reported without
    // looking at (or allocating for) the bytes it claims, and that one within the limit but
    // past the end asks for exactly the bytes it declares.
    #[test]
    fn declared_lengths_are_bounded(declared in any::<u32>(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        bytes.extend_from_slice(&tail);
        let declared = declared as usize;
        match decode(&bytes, 0, LIMITS) {
            Decoded::Damaged(Damage { offset: 0, kind: DamageKind::LengthAboveMax { declared: d, max } }) => {
                prop_assert_eq!(d, declared);
                prop_assert!(declared > max);
            }
            Decoded::Damaged(Damage { offset: 0, kind: DamageKind::LengthBelowMin { .. } }) => prop_assert_eq!(declared, 0),
            Decoded::Incomplete(incomplete) => {
                prop_assert!(declared <= LIMITS.payload_bytes_max && declared > tail.len());
                prop_assert_eq!(incomplete.needed(), FRAME_HEADER_BYTES + declared);
            }
            Decoded::Damaged(Damage { kind: DamageKind::ChecksumMismatch { .. }, .. }) | Decoded::Frame(_) => {
                prop_assert!(declared <= tail.len());
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}

// Checks the presence log's rule case by case, since it differs from the Raft log's: a cut-short
// frame is torn, a checksum mismatch only before zeroes, a zero length before data never.
#[test]
fn zeroes_follow_rule() {
    let mut frame = Vec::new();
    encode(&mut frame, b"payload", LIMITS).unwrap();
    let torn = |bytes: &[u8]| {
        let (_, stop) = scan_all(bytes);
        is_torn_tail(
            bytes,
            &stop.fault.expect("fault"),
            TailRule::ZeroesFollow,
            |_| false,
        )
    };
    let mut damaged = frame.clone();
    damaged[FRAME_HEADER_BYTES] ^= 1;
    let mut then_zeroes = damaged.clone();
    then_zeroes.extend_from_slice(&[0; 64]);
    assert!(torn(&then_zeroes));
    let mut then_frame = damaged.clone();
    then_frame.extend_from_slice(&frame);
    assert!(!torn(&then_frame));
    let mut zero_length = vec![0, 0, 0, 0, 9, 9, 9, 9];
    assert!(!torn(&zero_length));
    zero_length.truncate(6);
    assert!(torn(&zero_length), "a partial header is torn");
    let mut too_long = frame.clone();
    too_long[..4].copy_from_slice(&5000u32.to_le_bytes());
    assert!(torn(&too_long), "runs past the end");
    too_long.extend_from_slice(&[7; 5000]);
    assert!(!torn(&too_long), "data follows its header");
}

// Checks that `finish` refuses a payload outside the limits and leaves the buffer as it was.
#[test]
fn encode_refuses_payloads_outside_the_limits() {
    let mut out = b"kept".to_vec();
    assert!(encode(&mut out, &[], LIMITS).is_err());
    assert!(encode(&mut out, &[0; 4097], LIMITS).is_err());
    assert_eq!(out, b"kept");
}
