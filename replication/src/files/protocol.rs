//! The FileFetch wire format, spoken over one bidirectional stream per file (after the
//! transport's own `[protocol version][kind]` header), over any `AsyncRead`/`AsyncWrite` pair.
//!
//! Request: `[version u8 = 1][path length u16 LE][path, UTF-8][offset u64 LE]`.
//! Response: `[version u8 = 1][status u8]`, then for `Ok`: `[size u64 LE][blake3 32 bytes]` and
//! exactly `size - offset` file bytes, after which the server finishes the stream; for any other
//! status: `[message length u16 LE][message, UTF-8]`. `size` and `blake3` are the manifest's
//! values for the whole file, so a client can refuse a peer with another idea of the file before
//! reading any bytes.
//!
//! The file bytes move as owned buffers ([`ChunkRead`], [`ChunkWrite`]): over QUIC the server
//! hands its read buffers to the stream and the client hands the stream's received pieces to
//! the sink, so neither side copies them on the way; other byte streams go through [`Copying`].

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;

use crate::manifest::PATH_BYTES_MAX;

/// Version byte of requests and responses.
pub const FETCH_PROTOCOL_VERSION: u8 = 1;

/// Bytes of a refusal message; longer messages are cut.
pub const MESSAGE_BYTES_MAX: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// Relative to the data directory, as in the manifest.
    pub path: String,
    /// First byte wanted; the bytes before it are in the client's partial already.
    pub offset: u64,
}

/// Why a server refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchStatus {
    Ok = 0,
    /// The path is not a file of the server's current manifest.
    NotInManifest = 1,
    /// The path is malformed, absolute, climbs with `..`, or resolves through a symlink.
    BadPath = 2,
    /// The server does not hold the file (yet), or its copy has the wrong size.
    Unavailable = 3,
    /// The offset is past the end of the file.
    BadOffset = 4,
    /// The request could not be decoded (unknown version, bad UTF-8).
    BadRequest = 5,
}

impl FetchStatus {
    fn from_byte(byte: u8) -> Option<FetchStatus> {
        Some(match byte {
            0 => FetchStatus::Ok,
            1 => FetchStatus::NotInManifest,
            2 => FetchStatus::BadPath,
            3 => FetchStatus::Unavailable,
            4 => FetchStatus::BadOffset,
            5 => FetchStatus::BadRequest,
            _ => return None,
        })
    }
}

/// The start of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchResponse {
    /// The file follows from the requested offset.
    Ok { size_bytes: u64, blake3: [u8; 32] },
    Refused {
        status: FetchStatus,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("file fetch stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown file fetch protocol version {0}")]
    UnknownVersion(u8),
    #[error("unknown file fetch status {0}")]
    UnknownStatus(u8),
    #[error("path of {0} bytes exceeds the limit of {PATH_BYTES_MAX}")]
    PathTooLong(usize),
    #[error("path is not UTF-8")]
    NotUtf8,
}

/// Checks that `path` is a plain relative path below the data directory: not empty, not
/// absolute, no `.` or `..` component, no empty component, no NUL. Both sides check it: the
/// server before opening, the client before writing under its data directory.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > PATH_BYTES_MAX {
        return Err("empty or too long");
    }
    if path.starts_with('/') {
        return Err("absolute");
    }
    if path.contains('\0') {
        return Err("contains NUL");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("empty component"),
            "." | ".." => return Err("dot component"),
            _ => {}
        }
    }
    Ok(())
}

pub async fn write_request<W: AsyncWrite + Unpin>(
    send: &mut W,
    request: &FetchRequest,
) -> Result<(), ProtocolError> {
    let path = request.path.as_bytes();
    if path.len() > PATH_BYTES_MAX {
        return Err(ProtocolError::PathTooLong(path.len()));
    }
    let mut frame = Vec::with_capacity(11 + path.len());
    frame.push(FETCH_PROTOCOL_VERSION);
    frame.extend_from_slice(&(path.len() as u16).to_le_bytes());
    frame.extend_from_slice(path);
    frame.extend_from_slice(&request.offset.to_le_bytes());
    send.write_all(&frame).await?;
    send.flush().await?;
    Ok(())
}

pub async fn read_request<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<FetchRequest, ProtocolError> {
    let version = recv.read_u8().await?;
    if version != FETCH_PROTOCOL_VERSION {
        return Err(ProtocolError::UnknownVersion(version));
    }
    let length = recv.read_u16_le().await? as usize;
    if length > PATH_BYTES_MAX {
        return Err(ProtocolError::PathTooLong(length));
    }
    let mut path = vec![0; length];
    recv.read_exact(&mut path).await?;
    let path = String::from_utf8(path).map_err(|_| ProtocolError::NotUtf8)?;
    let offset = recv.read_u64_le().await?;
    Ok(FetchRequest { path, offset })
}

pub async fn write_response<W: AsyncWrite + Unpin>(
    send: &mut W,
    response: &FetchResponse,
) -> Result<(), ProtocolError> {
    let mut frame = vec![FETCH_PROTOCOL_VERSION];
    match response {
        FetchResponse::Ok { size_bytes, blake3 } => {
            frame.push(FetchStatus::Ok as u8);
            frame.extend_from_slice(&size_bytes.to_le_bytes());
            frame.extend_from_slice(blake3);
        }
        FetchResponse::Refused { status, message } => {
            let mut end = message.len().min(MESSAGE_BYTES_MAX);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            frame.push(*status as u8);
            frame.extend_from_slice(&(end as u16).to_le_bytes());
            frame.extend_from_slice(&message.as_bytes()[..end]);
        }
    }
    send.write_all(&frame).await?;
    Ok(())
}

pub async fn read_response<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<FetchResponse, ProtocolError> {
    let version = recv.read_u8().await?;
    if version != FETCH_PROTOCOL_VERSION {
        return Err(ProtocolError::UnknownVersion(version));
    }
    let byte = recv.read_u8().await?;
    let status = FetchStatus::from_byte(byte).ok_or(ProtocolError::UnknownStatus(byte))?;
    if status == FetchStatus::Ok {
        let size_bytes = recv.read_u64_le().await?;
        let mut blake3 = [0; 32];
        recv.read_exact(&mut blake3).await?;
        return Ok(FetchResponse::Ok { size_bytes, blake3 });
    }
    let length = (recv.read_u16_le().await? as usize).min(MESSAGE_BYTES_MAX);
    let mut message = vec![0; length];
    recv.read_exact(&mut message).await?;
    Ok(FetchResponse::Refused {
        status,
        message: String::from_utf8_lossy(&message).into_owned(),
    })
}

/// The receiving half of a FileFetch stream, read in the buffers it received.
pub trait ChunkRead: AsyncRead + Unpin + Send {
    /// The next at most `max` bytes (`max > 0`) in order, or `None` at the end of the stream.
    fn read_chunk(
        &mut self,
        max: usize,
    ) -> impl Future<Output = std::io::Result<Option<Bytes>>> + Send;
}

/// The sending half of a FileFetch stream, written with owned buffers.
pub trait ChunkWrite: AsyncWrite + Unpin + Send {
    /// Writes all of `bytes`.
    fn write_chunk(&mut self, bytes: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ChunkRead for quinn::RecvStream {
    async fn read_chunk(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        let chunk = quinn::RecvStream::read_chunk(self, max, true).await?;
        Ok(chunk.map(|chunk| chunk.bytes))
    }
}

impl ChunkWrite for quinn::SendStream {
    async fn write_chunk(&mut self, bytes: Bytes) -> std::io::Result<()> {
        // quinn keeps the buffer itself until it is acknowledged, instead of a copy of it.
        quinn::SendStream::write_chunk(self, bytes).await?;
        Ok(())
    }
}

/// Largest buffer [`Copying`] reads into at once.
const COPY_READ_BYTES_MAX: usize = 64 << 10;

/// A byte stream without buffers of its own (a TCP stream, an in-memory pipe) as a FileFetch
/// stream half: its bytes are copied in and out.
#[derive(Debug)]
pub struct Copying<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Copying<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Copying<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin + Send> ChunkRead for Copying<T> {
    async fn read_chunk(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        let mut buffer = BytesMut::with_capacity(max.clamp(1, COPY_READ_BYTES_MAX));
        let read = self.0.read_buf(&mut buffer).await?;
        Ok((read > 0).then(|| buffer.freeze()))
    }
}

impl<T: AsyncWrite + Unpin + Send> ChunkWrite for Copying<T> {
    async fn write_chunk(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.0.write_all(&bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks the stored sample of a request and of both response kinds, byte for byte: peers of
    // different builds must keep understanding each other, so the format may not drift silently.
    #[test]
    fn wire_samples_are_stable() {
        futures_lite::future::block_on(async {
            let request = FetchRequest {
                path: "db/m/f.parquet".to_owned(),
                offset: 258,
            };
            let mut bytes = Vec::new();
            write_request(&mut bytes, &request).await.unwrap();
            let mut sample = vec![1, 14, 0];
            sample.extend_from_slice(b"db/m/f.parquet");
            sample.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(bytes, sample);
            assert_eq!(read_request(&mut &bytes[..]).await.unwrap(), request);

            let ok = FetchResponse::Ok {
                size_bytes: 5,
                blake3: [7; 32],
            };
            let mut bytes = Vec::new();
            write_response(&mut bytes, &ok).await.unwrap();
            let mut sample = vec![1, 0, 5, 0, 0, 0, 0, 0, 0, 0];
            sample.extend_from_slice(&[7; 32]);
            assert_eq!(bytes, sample);
            assert_eq!(read_response(&mut &bytes[..]).await.unwrap(), ok);

            let refused = FetchResponse::Refused {
                status: FetchStatus::BadPath,
                message: "no".to_owned(),
            };
            let mut bytes = Vec::new();
            write_response(&mut bytes, &refused).await.unwrap();
            assert_eq!(bytes, vec![1, 2, 2, 0, b'n', b'o']);
            assert_eq!(read_response(&mut &bytes[..]).await.unwrap(), refused);

            assert!(matches!(
                read_request(&mut &[9u8, 0, 0][..]).await,
                Err(ProtocolError::UnknownVersion(9))
            ));
        });
    }

    // Checks the path rule both sides apply before touching the disk.
    #[test]
    fn relative_path_rule() {
        assert!(check_relative_path("db/m/2026/f.parquet").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
