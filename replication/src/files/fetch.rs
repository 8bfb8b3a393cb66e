//! The client side of file replication: where bytes come from ([`FileSource`]), a source that
//! speaks the FileFetch protocol over any stream pair ([`StreamSource`], e.g. QUIC streams from
//! `Transport::open`), and [`fetch_file`], which writes one file durably and verified.
//!
//! `fetch_file` writes into `<path>.partial` on the sink thread, which hashes the bytes as they
//! arrive (the prefix of a resumed partial first). Only when the size and blake3 match the
//! manifest is the partial fdatasynced, renamed onto the path and its directory fsynced. A
//! transfer that breaks off keeps the partial, and the next attempt asks for the rest.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use shale_io::sink::Chunk;
use shale_io::sink::FileSink;
use shale_io::sink::SinkError;
use shale_io::sink::Written;
use tokio::io::AsyncWrite;

use crate::files::partial_path;
use crate::files::protocol;
use crate::files::protocol::ChunkRead;
use crate::files::protocol::FetchRequest;
use crate::files::protocol::FetchResponse;
use crate::files::protocol::FetchStatus;
use crate::files::protocol::ProtocolError;
use crate::files::throttle::Throttle;
use crate::files::NodeId;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The file a fetch must produce, as the manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedFile {
    pub path: String,
    pub size_bytes: u64,
    pub blake3: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect to node {node}: {message}")]
    Connect { node: NodeId, message: String },
    #[error("node {node} refused {path}: {status:?}: {message}")]
    Refused {
        node: NodeId,
        path: String,
        status: FetchStatus,
        message: String,
    },
    #[error("node {node}: {source}")]
    Protocol { node: NodeId, source: ProtocolError },
    #[error("node {node} describes {path} as {size_bytes} bytes with another blake3 or size than the manifest")]
    HeaderMismatch {
        node: NodeId,
        path: String,
        size_bytes: u64,
    },
    #[error("node {node} sent more than the {size_bytes} bytes of {path}")]
    TooLong {
        node: NodeId,
        path: String,
        size_bytes: u64,
    },
    #[error("node {node} ended {path} {missing_bytes} bytes early")]
    Truncated {
        node: NodeId,
        path: String,
        missing_bytes: u64,
    },
    #[error("{path} from node {node} has blake3 {actual} and {size_bytes} bytes, the manifest says {expected}")]
    HashMismatch {
        node: NodeId,
        path: String,
        expected: String,
        actual: String,
        size_bytes: u64,
    },
    #[error("{path} is not a plain relative path: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("write fetched file: {0}")]
    Sink(#[from] SinkError),
}

impl FetchError {
    /// Whether the source served bytes (or a description) that contradict the manifest, so it
    /// must not be asked for this file again for a while. Other errors are worth a retry.
    pub fn is_bad_source(&self) -> bool {
        matches!(
            self,
            FetchError::HeaderMismatch { .. }
                | FetchError::TooLong { .. }
                | FetchError::HashMismatch { .. }
        )
    }
}

/// A stream of a file's bytes from one offset to its end.
pub trait ChunkStream: Send {
    /// The next chunk, `None` at the end. The stream may end early (a broken connection); the
    /// caller counts bytes.
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Chunk>, FetchError>>;
}

/// Where file bytes come from: a peer over the transport today, an object store later.
pub trait FileSource: Send + Sync {
    /// Starts sending `file` from `offset` out of `source`. Implementations check what they can
    /// before bytes flow (a peer's header against `file`).
    fn fetch<'a>(
        &'a self,
        source: NodeId,
        file: &'a ExpectedFile,
        offset: u64,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, FetchError>>;
}

/// Opens a fresh bidirectional stream to a node for one FileFetch request. With the QUIC
/// transport: `transport.open(node, address_of(node), StreamKind::FileFetch)`; other byte
/// streams are wrapped in [`protocol::Copying`].
pub trait Connector: Send + Sync {
    type Send: AsyncWrite + Unpin + Send + 'static;
    type Recv: ChunkRead + 'static;

    fn connect(&self, node: NodeId) -> BoxFuture<'_, Result<StreamPair<Self>, FetchError>>;
}

/// The (send, receive) halves a [`Connector`] opens.
pub type StreamPair<C> = (<C as Connector>::Send, <C as Connector>::Recv);

/// A [`FileSource`] that speaks the FileFetch protocol over streams from a [`Connector`].
#[derive(Debug)]
pub struct StreamSource<C> {
    connector: C,
    chunk_bytes: usize,
}

impl<C: Connector> StreamSource<C> {
    /// `chunk_bytes` bounds each chunk handed to the writer.
    pub fn new(connector: C, chunk_bytes: usize) -> StreamSource<C> {
        StreamSource {
            connector,
            chunk_bytes: chunk_bytes.max(1),
        }
    }
}

impl<C: Connector> FileSource for StreamSource<C> {
    fn fetch<'a>(
        &'a self,
        source: NodeId,
        file: &'a ExpectedFile,
        offset: u64,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, FetchError>> {
        Box::pin(async move {
            let protocol_error = |source_error| FetchError::Protocol {
                node: source,
                source: source_error,
            };
            let (mut send, mut recv) = self.connector.connect(source).await?;
            let request = FetchRequest {
                path: file.path.clone(),
                offset,
            };
            protocol::write_request(&mut send, &request)
                .await
                .map_err(protocol_error)?;
            match protocol::read_response(&mut recv)
                .await
                .map_err(protocol_error)?
            {
                FetchResponse::Refused { status, message } => Err(FetchError::Refused {
                    node: source,
                    path: file.path.clone(),
                    status,
                    message,
                }),
                FetchResponse::Ok { size_bytes, blake3 } => {
                    if size_bytes != file.size_bytes || blake3 != file.blake3 {
                        return Err(FetchError::HeaderMismatch {
                            node: source,
                            path: file.path.clone(),
                            size_bytes,
                        });
                    }
                    let stream: Box<dyn ChunkStream> = Box::new(ProtocolChunks {
                        _send: send,
                        recv,
                        node: source,
                        remaining: size_bytes - offset.min(size_bytes),
                        chunk_bytes: self.chunk_bytes,
                    });
                    Ok(stream)
                }
            }
        })
    }
}

struct ProtocolChunks<S, R> {
    /// Kept open until the transfer ends: closing it early may reset the stream on some
    /// transports.
    _send: S,
    recv: R,
    node: NodeId,
    remaining: u64,
    chunk_bytes: usize,
}

impl<S: Send, R: ChunkRead> ChunkStream for ProtocolChunks<S, R> {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Chunk>, FetchError>> {
        Box::pin(async move {
            // One byte past the expected end is asked for at the end, so a source that sends
            // more than the file is caught here rather than trusted.
            let want = (self.remaining.min(self.chunk_bytes as u64) as usize).max(1);
            // The stream's received buffers are collected as they are (a packet's worth each),
            // so the sink's copy into its aligned blocks is the only copy they get here.
            let mut chunk = Chunk::new();
            while chunk.len() < want {
                let piece = self
                    .recv
                    .read_chunk(want - chunk.len())
                    .await
                    .map_err(|e| FetchError::Protocol {
                        node: self.node,
                        source: ProtocolError::Io(e),
                    })?;
                match piece {
                    Some(piece) => chunk.push(piece),
                    None => break,
                }
            }
            if chunk.is_empty() {
                return Ok(None);
            }
            self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
            Ok(Some(chunk))
        })
    }
}

/// What a successful fetch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes that were in the partial already.
    pub resumed_bytes: u64,
    /// Bytes received now.
    pub transferred_bytes: u64,
}

/// Fetches `file` from `source` into `<data_dir>/<path>`, resuming its partial. On success the
/// file is durably in place with the expected size and blake3. A source whose bytes do not
/// match the manifest gets an error for which [`FetchError::is_bad_source`] holds, and the
/// partial is removed (its bytes cannot be trusted); any other failure keeps the partial.
///
/// Not cancellation-safe in the sense that a dropped call leaves the partial behind, which is
/// exactly what a later resume wants.
pub async fn fetch_file(
    sink: &FileSink,
    data_dir: &Path,
    file: &ExpectedFile,
    source: &dyn FileSource,
    node: NodeId,
    throttle: &Throttle,
) -> Result<Fetched, FetchError> {
    if let Err(reason) = protocol::check_relative_path(&file.path) {
        return Err(FetchError::BadPath {
            path: file.path.clone(),
            reason,
        });
    }
    let target = data_dir.join(&file.path);
    let partial = partial_path(&target);
    let mut writer = sink.open(&partial, true).await?;
    if writer.resumed_bytes() > file.size_bytes {
        // Longer than the file: not a prefix of it.
        writer.discard().await?;
        writer = sink.open(&partial, false).await?;
    }
    let resumed_bytes = writer.resumed_bytes();
    let mut received = 0u64;
    if resumed_bytes < file.size_bytes {
        let mut stream = source.fetch(node, file, resumed_bytes).await?;
        let wanted = file.size_bytes - resumed_bytes;
        while let Some(chunk) = stream.next_chunk().await? {
            let length = chunk.len() as u64;
            if received + length > wanted {
                writer.discard().await?;
                return Err(FetchError::TooLong {
                    node,
                    path: file.path.clone(),
                    size_bytes: file.size_bytes,
                });
            }
            throttle.acquire(length).await;
            writer.write(chunk).await?;
            received += length;
        }
        if received < wanted {
            // Keep what arrived: the next attempt resumes after it.
            writer.finish().await?;
            return Err(FetchError::Truncated {
                node,
                path: file.path.clone(),
                missing_bytes: wanted - received,
            });
        }
    }
    let Written { size_bytes, blake3 } = writer.finish().await?;
    if size_bytes != file.size_bytes || blake3 != file.blake3 {
        writer.discard().await?;
        return Err(FetchError::HashMismatch {
            node,
            path: file.path.clone(),
            expected: crate::files::blake3_hex(&file.blake3),
            actual: crate::files::blake3_hex(&blake3),
            size_bytes,
        });
    }
    writer.publish(&target).await?;
    Ok(Fetched {
        resumed_bytes,
        transferred_bytes: received,
    })
}
