//! What a write request becomes before it reaches a shard: the decoded body (decompressed within
//! limits) and the WAL payload that records it.
//!
//! The WAL stores the validated request body, not parsed rows: it is the cheapest form to log
//! (one copy) and replay re-parses it with the same precision and the same receive time, so a
//! row without a timestamp gets the same time after a crash as before.

use std::io::Read;

/// WAL record kind for a line-protocol request.
pub const RECORD_KIND_LINE_PROTOCOL: u8 = 1;

/// Version of the payload layout below.
const PAYLOAD_VERSION: u8 = 1;

/// The payload of a line-protocol WAL record:
/// `[version u8][precision u8][database length u16 LE][database][body]`.
#[derive(Debug, PartialEq, Eq)]
pub struct IngestPayload<'a> {
    pub database: &'a str,
    pub precision: crate::line_protocol::Precision,
    pub body: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload is truncated")]
    Truncated,
    #[error("payload version {0} is not supported (this build reads version {PAYLOAD_VERSION})")]
    Version(u8),
    #[error("payload precision code {0} is unknown")]
    Precision(u8),
    #[error("payload database name is not UTF-8")]
    Database,
}

impl<'a> IngestPayload<'a> {
    pub fn encoded_len(&self) -> usize {
        4 + self.database.len() + self.body.len()
    }

    /// Writes the payload into `out`, which must be exactly `encoded_len` bytes.
    pub fn encode_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len());
        assert!(self.database.len() <= u16::MAX as usize);
        out[0] = PAYLOAD_VERSION;
        out[1] = precision_code(self.precision);
        out[2..4].copy_from_slice(&(self.database.len() as u16).to_le_bytes());
        let body_start = 4 + self.database.len();
        out[4..body_start].copy_from_slice(self.database.as_bytes());
        out[body_start..].copy_from_slice(self.body);
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
        if bytes[0] != PAYLOAD_VERSION {
            return Err(PayloadError::Version(bytes[0]));
        }
        let precision = precision_from_code(bytes[1]).ok_or(PayloadError::Precision(bytes[1]))?;
        let database_len = u16::from_le_bytes([bytes[2], bytes[3]]) as usize;
        let body_start = 4 + database_len;
        let database = bytes.get(4..body_start).ok_or(PayloadError::Truncated)?;
        let database = std::str::from_utf8(database).map_err(|_| PayloadError::Database)?;
        Ok(IngestPayload {
            database,
            precision,
            body: &bytes[body_start..],
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

/// Decompresses `body`, refusing to produce more than `bytes_max` bytes (a small body can
/// expand enormously; the limit is enforced while reading, not after).
pub fn decompress(
    encoding: Encoding,
    body: bytes::Bytes,
    bytes_max: usize,
) -> Result<bytes::Bytes, DecodeError> {
    let (name, reader): (&'static str, Box<dyn Read + '_>) = match encoding {
        Encoding::Identity => {
            if body.len() > bytes_max {
                return Err(DecodeError::TooLarge { bytes_max });
            }
            return Ok(body);
        }
        Encoding::Gzip => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ),
        Encoding::Zstd => (
            "zstd",
            Box::new(zstd::stream::read::Decoder::new(&body[..]).map_err(|e| {
                DecodeError::Corrupt {
                    encoding: "zstd",
                    reason: e.to_string(),
                }
            })?),
        ),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(bytes_max));
    let read = reader
        .take(bytes_max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt {
            encoding: name,
            reason: e.to_string(),
        })?;
    if read > bytes_max {
        return Err(DecodeError::TooLarge { bytes_max });
    }
    Ok(bytes::Bytes::from(out))
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
}
