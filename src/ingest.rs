//! What a write request becomes before it reaches a shard: the decoded body (decompressed within
//! limits) and the WAL payload that records it.
//!
//! The WAL stores the validated request body, not parsed rows: it is the cheapest form to log
//! (one copy) and replay re-parses it with the same precision and the same receive time, so a
//! row without a timestamp gets the same time after a crash as before.

use std::io::Read;

/// WAL record kind for a line-protocol request.
pub const RECORD_KIND_LINE_PROTOCOL: u8 = 1;

/// Version of the payload layout below without an idempotency key.
const PAYLOAD_VERSION: u8 = 1;
/// Version of the layout with an idempotency key.
const PAYLOAD_VERSION_KEYED: u8 = 2;

/// Longest `Idempotency-Key` accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// The payload of a line-protocol WAL record:
/// `[version u8 = 1][precision u8][database length u16 LE][database][body]`, or with the
/// request's `Idempotency-Key` (so the key travels to replicas and survives a takeover):
/// `[version u8 = 2][precision u8][database length u16 LE][database][key length u16 LE][key]
/// [body]`.
#[derive(Debug, PartialEq, Eq)]
pub struct IngestPayload<'a> {
    pub database: &'a str,
    pub precision: crate::line_protocol::Precision,
    pub body: &'a [u8],
    pub key: Option<&'a str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload is truncated")]
    Truncated,
    #[error("payload version {0} is not supported (this build reads versions 1 and 2)")]
    Version(u8),
    #[error("payload precision code {0} is unknown")]
    Precision(u8),
    #[error("payload database name is not UTF-8")]
    Database,
    #[error("payload idempotency key is not UTF-8")]
    Key,
}

impl<'a> IngestPayload<'a> {
    fn key_bytes(&self) -> usize {
        self.key.map_or(0, |key| 2 + key.len())
    }

    pub fn encoded_len(&self) -> usize {
        4 + self.database.len() + self.key_bytes() + self.body.len()
    }

    /// Writes the payload into `out`, which must be exactly `encoded_len` bytes.
    pub fn encode_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len());
        assert!(self.database.len() <= u16::MAX as usize);
        out[0] = if self.key.is_some() {
            PAYLOAD_VERSION_KEYED
        } else {
            PAYLOAD_VERSION
        };
        out[1] = precision_code(self.precision);
        out[2..4].copy_from_slice(&(self.database.len() as u16).to_le_bytes());
        let mut position = 4 + self.database.len();
        out[4..position].copy_from_slice(self.database.as_bytes());
        if let Some(key) = self.key {
            assert!(key.len() <= u16::MAX as usize);
            out[position..position + 2].copy_from_slice(&(key.len() as u16).to_le_bytes());
            position += 2;
            out[position..position + key.len()].copy_from_slice(key.as_bytes());
            position += key.len();
        }
        out[position..].copy_from_slice(self.body);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; self.encoded_len()];
        self.encode_into(&mut out);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Result<IngestPayload<'a>, PayloadError> {
        if bytes.len() < 4 {
            return Err(PayloadError::Truncated);
        }
        let keyed = match bytes[0] {
            PAYLOAD_VERSION => false,
            PAYLOAD_VERSION_KEYED => true,
            other => return Err(PayloadError::Version(other)),
        };
        let precision = precision_from_code(bytes[1]).ok_or(PayloadError::Precision(bytes[1]))?;
        let database_len = u16::from_le_bytes([bytes[2], bytes[3]]) as usize;
        let mut position = 4 + database_len;
        let database = bytes.get(4..position).ok_or(PayloadError::Truncated)?;
        let database = std::str::from_utf8(database).map_err(|_| PayloadError::Database)?;
        let key = if keyed {
            let length = bytes
                .get(position..position + 2)
                .ok_or(PayloadError::Truncated)?;
            let length = u16::from_le_bytes([length[0], length[1]]) as usize;
            position += 2;
            let key = bytes
                .get(position..position + length)
                .ok_or(PayloadError::Truncated)?;
            position += length;
            Some(std::str::from_utf8(key).map_err(|_| PayloadError::Key)?)
        } else {
            None
        };
        Ok(IngestPayload {
            database,
            precision,
            body: &bytes[position..],
            key,
        })
    }
}

fn precision_code(precision: crate::line_protocol::Precision) -> u8 {
    use crate::line_protocol::Precision::*;
    match precision {
        Nanoseconds => 0,
        Microseconds => 1,
        Milliseconds => 2,
        Seconds => 3,
        Minutes => 4,
        Hours => 5,
    }
}

fn precision_from_code(code: u8) -> Option<crate::line_protocol::Precision> {
    use crate::line_protocol::Precision::*;
    Some(match code {
        0 => Nanoseconds,
        1 => Microseconds,
        2 => Milliseconds,
        3 => Seconds,
        4 => Minutes,
        5 => Hours,
        _ => return None,
    })
}

/// How a request body is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("content-encoding {0:?} is not supported (use gzip or zstd)")]
    Unsupported(String),
    #[error("body decompresses to more than {bytes_max} bytes")]
    TooLarge { bytes_max: usize },
    #[error("body is not valid {encoding}: {reason}")]
    Corrupt {
        encoding: &'static str,
        reason: String,
    },
}

/// The encoding named by a Content-Encoding header, or sniffed from magic bytes when the header
/// is absent (Arc clients send compressed bodies without it).
pub fn detect_encoding(header: Option<&str>, body: &[u8]) -> Result<Encoding, DecodeError> {
    match header.map(|h| h.trim().to_ascii_lowercase()) {
        Some(h) if h == "gzip" || h == "x-gzip" => return Ok(Encoding::Gzip),
        Some(h) if h == "zstd" => return Ok(Encoding::Zstd),
        Some(h) if h.is_empty() || h == "identity" => {}
        Some(h) => return Err(DecodeError::Unsupported(h)),
        None => {}
    }
    Ok(if body.starts_with(&[0x1f, 0x8b]) {
        Encoding::Gzip
    } else if body.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Encoding::Zstd
    } else {
        Encoding::Identity
    })
}

/// The smallest zstd window accepted whatever the limit: 8 MiB, what zstd's levels up to 19 and
/// Telegraf's encoder declare even for small bodies.
const ZSTD_WINDOW_LOG_FLOOR: u32 = 23;

/// The largest zstd window accepted: 128 MiB, zstd's own default limit for streaming decoders.
const ZSTD_WINDOW_LOG_CEILING: u32 = 27;

/// How much is read per call to the decompressor, into a scratch buffer that is then appended.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Decompresses `body`, refusing to produce more than `bytes_max` bytes (a small body can
/// expand enormously; the limit is enforced while reading, not after).
pub fn decompress(
    encoding: Encoding,
    body: bytes::Bytes,
    bytes_max: usize,
) -> Result<bytes::Bytes, DecodeError> {
    if encoding == Encoding::Identity {
        if body.len() > bytes_max {
            return Err(DecodeError::TooLarge { bytes_max });
        }
        return Ok(body);
    }
    let mut out = Vec::new();
    decompress_into(encoding, &body, bytes_max, &mut out)?;
    Ok(bytes::Bytes::from(out))
}

/// Decompresses a gzip or zstd `body` into `out` (empty), which is never grown past
/// `bytes_max + 1` bytes of capacity: the decompressor is read through that bound, and nothing
/// is sized from what the stream declares about itself.
fn decompress_into(
    encoding: Encoding,
    body: &[u8],
    bytes_max: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let corrupt = |encoding: &'static str| {
        move |error: std::io::Error| DecodeError::Corrupt {
            encoding,
            reason: error.to_string(),
        }
    };
    let (name, mut reader): (&'static str, Box<dyn Read + '_>) = match encoding {
        Encoding::Identity => {
            if body.len() > bytes_max {
                return Err(DecodeError::TooLarge { bytes_max });
            }
            out.extend_from_slice(body);
            return Ok(());
        }
        Encoding::Gzip => ("gzip", Box::new(flate2::read::MultiGzDecoder::new(body))),
        Encoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(body).map_err(corrupt("zstd"))?;
            // The decoder allocates its window from the size the frame header declares. No
            // back-reference reaches further than the whole output, so a window much larger than
            // the limit is refused (the floor keeps what ordinary encoders declare).
            decoder
                .window_log_max(zstd_window_log_max(bytes_max))
                .map_err(corrupt("zstd"))?;
            ("zstd", Box::new(decoder))
        }
    };
    // The body's size hints at the output's, but the limit caps even the first guess.
    let capacity_max = bytes_max.saturating_add(1);
    out.reserve_exact(body.len().saturating_mul(4).min(capacity_max));
    let mut chunk = vec![0; READ_CHUNK_BYTES.min(capacity_max)];
    loop {
        // Never ask for more than the limit plus the one byte that shows the body exceeds it.
        let room = capacity_max - out.len();
        let wanted = chunk.len().min(room);
        let read = match reader.read(&mut chunk[..wanted]) {
            Ok(0) => return Ok(()),
            Ok(read) => read.min(wanted),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(corrupt(name)(error)),
        };
        if out.capacity() - out.len() < read {
            // Double as a Vec would, but never past `capacity_max`.
            let target = out
                .capacity()
                .saturating_mul(2)
                .min(capacity_max)
                .max(out.len() + read);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..read]);
        if out.len() > bytes_max {
            return Err(DecodeError::TooLarge { bytes_max });
        }
    }
}

/// The largest zstd window (as a power of two) accepted for output limited to `bytes_max`: the
/// limit rounded up to a power of two, within [`ZSTD_WINDOW_LOG_FLOOR`] and
/// [`ZSTD_WINDOW_LOG_CEILING`].
fn zstd_window_log_max(bytes_max: usize) -> u32 {
    let log = bytes_max
        .checked_next_power_of_two()
        .map_or(usize::BITS, |power| power.trailing_zeros());
    log.clamp(ZSTD_WINDOW_LOG_FLOOR, ZSTD_WINDOW_LOG_CEILING)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::Precision;
    use std::io::Write;

    // Checks that a payload round-trips and that the stored sample of format version 1 still
    // decodes: replay must read WAL records written by earlier builds.
    #[test]
    fn payload_round_trip_and_stored_sample() {
        let payload = IngestPayload {
            database: "metrics",
            precision: Precision::Milliseconds,
            body: b"cpu v=1 5\n",
            key: None,
        };
        let encoded = payload.encode();
        let sample: &[u8] = b"\x01\x02\x07\x00metricscpu v=1 5\n";
        assert_eq!(encoded, sample);
        assert_eq!(IngestPayload::decode(sample).unwrap(), payload);
        assert_eq!(
            IngestPayload::decode(b"\x09\x00\x00\x00").unwrap_err(),
            PayloadError::Version(9)
        );
        assert_eq!(
            IngestPayload::decode(b"\x01\x00\x09\x00ab").unwrap_err(),
            PayloadError::Truncated
        );
        // Version 2 carries the request's idempotency key between database and body.
        let keyed = IngestPayload {
            key: Some("retry-7"),
            ..payload
        };
        let sample: &[u8] = b"\x02\x02\x07\x00metrics\x07\x00retry-7cpu v=1 5\n";
        assert_eq!(keyed.encode(), sample);
        assert_eq!(IngestPayload::decode(sample).unwrap(), keyed);
        assert_eq!(
            IngestPayload::decode(b"\x02\x02\x01\x00m\x09\x00ab").unwrap_err(),
            PayloadError::Truncated
        );
    }

    // Checks gzip and zstd by header and by magic bytes, and that the decompressed-size limit
    // holds for a body that expands far past it.
    #[test]
    fn decompression_with_limits() {
        let text = b"cpu v=1\n".repeat(1000);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&text).unwrap();
        let gzip = bytes::Bytes::from(gzip.finish().unwrap());
        let zstd = bytes::Bytes::from(zstd::encode_all(&text[..], 1).unwrap());

        assert_eq!(detect_encoding(None, &gzip).unwrap(), Encoding::Gzip);
        assert_eq!(detect_encoding(None, &zstd).unwrap(), Encoding::Zstd);
        assert_eq!(detect_encoding(Some("gzip"), b"x").unwrap(), Encoding::Gzip);
        assert_eq!(detect_encoding(None, b"cpu").unwrap(), Encoding::Identity);
        assert!(matches!(
            detect_encoding(Some("br"), b"x"),
            Err(DecodeError::Unsupported(_))
        ));

        assert_eq!(
            &decompress(Encoding::Gzip, gzip.clone(), 1 << 20).unwrap()[..],
            &text[..]
        );
        assert_eq!(
            &decompress(Encoding::Zstd, zstd.clone(), 1 << 20).unwrap()[..],
            &text[..]
        );
        assert_eq!(
            decompress(Encoding::Gzip, gzip, 100).unwrap_err(),
            DecodeError::TooLarge { bytes_max: 100 }
        );
        assert_eq!(
            decompress(Encoding::Zstd, zstd, 100).unwrap_err(),
            DecodeError::TooLarge { bytes_max: 100 }
        );
        assert!(matches!(
            decompress(
                Encoding::Gzip,
                bytes::Bytes::from_static(b"\x1f\x8bxx"),
                100
            ),
            Err(DecodeError::Corrupt { .. })
        ));
    }

    // Checks that a zstd bomb (200 MB of zeros in a few KB) is refused at a 1 MiB limit while
    // decompressing, and that the output buffer never reserved more than the limit plus the one
    // byte that proves the excess. Before, `read_to_end` grew the buffer by doubling, so its
    // capacity reached about twice the limit (2 MiB here) before the limit was noticed.
    #[test]
    fn zstd_bomb_is_refused_within_the_limit() {
        let bytes_max = 1 << 20;
        // 25 frames that each declare 8 MiB of content: the decoder reads on past the first.
        let frame = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
        let bomb = frame.repeat(25);
        assert!(bomb.len() < 20_000, "bomb is {} bytes", bomb.len());

        let mut out = Vec::new();
        assert_eq!(
            decompress_into(Encoding::Zstd, &bomb, bytes_max, &mut out),
            Err(DecodeError::TooLarge { bytes_max })
        );
        assert!(
            out.capacity() <= bytes_max + 1,
            "capacity {} for a limit of {bytes_max}",
            out.capacity()
        );
        assert_eq!(
            decompress(Encoding::Zstd, bytes::Bytes::from(bomb), bytes_max),
            Err(DecodeError::TooLarge { bytes_max })
        );
    }

    // Checks the same bound for a gzip bomb, and that a body of exactly the limit is accepted
    // (the one extra byte read is what tells the two apart).
    #[test]
    fn gzip_bomb_is_refused_within_the_limit() {
        let bytes_max = 1 << 20;
        let gzip = |size: usize| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(&vec![0u8; size]).unwrap();
            encoder.finish().unwrap()
        };
        let bomb = gzip(64 << 20);
        let mut out = Vec::new();
        assert_eq!(
            decompress_into(Encoding::Gzip, &bomb, bytes_max, &mut out),
            Err(DecodeError::TooLarge { bytes_max })
        );
        assert!(
            out.capacity() <= bytes_max + 1,
            "capacity {} for a limit of {bytes_max}",
            out.capacity()
        );

        let exact = decompress(
            Encoding::Gzip,
            bytes::Bytes::from(gzip(bytes_max)),
            bytes_max,
        );
        assert_eq!(exact.map(|body| body.len()), Ok(bytes_max));
    }

    // Checks that a zstd frame declaring a window far larger than the limit is refused before
    // the decoder allocates that window, while the window ordinary encoders declare (8 MiB) is
    // accepted even with a small limit. Before, any window up to zstd's default of 128 MiB was
    // accepted whatever the limit.
    #[test]
    fn zstd_window_is_bounded_by_the_limit() {
        let compress = |window_log: u32| {
            let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            encoder.window_log(window_log).unwrap();
            encoder.write_all(b"cpu v=1\n").unwrap();
            encoder.finish().unwrap()
        };
        let bytes_max = 1 << 20;
        let wide = bytes::Bytes::from(compress(27));
        assert!(matches!(
            decompress(Encoding::Zstd, wide.clone(), bytes_max),
            Err(DecodeError::Corrupt {
                encoding: "zstd",
                ..
            })
        ));
        // The default limit (100 MiB) allows zstd's usual maximum window.
        assert_eq!(
            &decompress(Encoding::Zstd, wide, 100 << 20).unwrap()[..],
            b"cpu v=1\n"
        );
        assert_eq!(
            &decompress(Encoding::Zstd, bytes::Bytes::from(compress(23)), bytes_max).unwrap()[..],
            b"cpu v=1\n"
        );
        assert_eq!(zstd_window_log_max(1), 23);
        assert_eq!(zstd_window_log_max((16 << 20) + 1), 25);
        assert_eq!(zstd_window_log_max(usize::MAX), 27);
    }
}
