//! The server side of FileFetch: answers one request per stream with the bytes of a current
//! manifest file, and nothing else.
//!
//! A path is served only if it passes the relative-path rule, is a file of the current manifest
//! version, and opens with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to the data
//! directory, so neither `..`, an absolute path, nor a symlink anywhere on the way (a file or a
//! directory component) can reach outside it. The opened file must be a regular file of the
//! manifest's size. Bytes are read on tokio's blocking pool into fresh buffers (never zeroed
//! first) and handed to the stream through a small bounded channel, so the control thread never
//! waits for the disk; over QUIC the stream keeps those buffers until they are acknowledged
//! instead of copying them.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;

use crate::files::parse_blake3_hex;
use crate::files::protocol;
use crate::files::protocol::ChunkWrite;
use crate::files::protocol::FetchRequest;
use crate::files::protocol::FetchResponse;
use crate::files::protocol::FetchStatus;
use crate::files::protocol::ProtocolError;
use crate::manifest::FileEntry;
use crate::version::ManifestVersion;

/// Settings of the server side.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Bytes per read and per stream write.
    pub chunk_bytes: usize,
    /// Chunks read ahead of the stream.
    pub read_ahead_chunks: usize,
    /// How long a client may take to send its request.
    pub request_timeout_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            chunk_bytes: 1 << 20,
            read_ahead_chunks: 4,
            request_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("open data directory {path}: {source}")]
    OpenDataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no request within {0} ms")]
    RequestTimeout(u64),
}

/// A refused request: what the client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: FetchStatus,
    pub message: String,
}

fn refuse(status: FetchStatus, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// What one served stream did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// Sent `bytes` of `path` from the request's offset.
    Sent {
        path: String,
        bytes: u64,
    },
    Refused(Refusal),
}

/// Returns the manifest version in force.
pub type CurrentVersion = dyn Fn() -> Arc<ManifestVersion> + Send + Sync;

/// Serves FileFetch streams for one data directory. Cheap to clone.
#[derive(Clone)]
pub struct FetchServer {
    data_dir: Arc<OwnedFd>,
    current: Arc<CurrentVersion>,
    config: ServeConfig,
    /// Paths recorded damaged here are refused (their copy is quarantined or being replaced).
    holdings: Option<crate::files::holdings::Holdings>,
}

impl std::fmt::Debug for FetchServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl FetchServer {
    /// `current` returns the manifest version in force (e.g. `ManifestClient::current`).
    pub fn new(
        data_dir: &Path,
        current: Arc<CurrentVersion>,
        config: ServeConfig,
    ) -> Result<FetchServer, ServeError> {
        let error = |source| ServeError::OpenDataDir {
            path: data_dir.to_path_buf(),
            source,
        };
        let path = CString::new(data_dir.as_os_str().as_encoded_bytes())
            .map_err(|e| error(std::io::Error::other(e)))?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned descriptor is owned.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(error(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let data_dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(FetchServer {
            data_dir: Arc::new(data_dir),
            current: current.clone(),
            config,
            holdings: None,
        })
    }

    /// Refuses the paths `holdings` records as damaged: a damaged copy is never served.
    pub fn refusing_damaged(mut self, holdings: crate::files::holdings::Holdings) -> FetchServer {
        self.holdings = Some(holdings);
        self
    }

    /// Decides a request: the opened file and its manifest entry, or why not. Does blocking
    /// system calls (openat2, fstat) that do not wait for data; cheap enough for any thread.
    pub fn open_checked(&self, request: &FetchRequest) -> Result<(File, FileEntry), Refusal> {
        if let Err(why) = protocol::check_relative_path(&request.path) {
            return Err(refuse(FetchStatus::BadPath, why));
        }
        let version = (self.current)();
        let Some(entry) = version.manifest.file(&request.path) else {
            return Err(refuse(
                FetchStatus::NotInManifest,
                format!("not in manifest version {}", version.index),
            ));
        };
        if self
            .holdings
            .as_ref()
            .is_some_and(|holdings| holdings.damaged(&request.path).is_some())
        {
            return Err(refuse(
                FetchStatus::Unavailable,
                "the copy here is damaged and being repaired",
            ));
        }
        if request.offset > entry.size_bytes {
            return Err(refuse(FetchStatus::BadOffset, "offset past the end"));
        }
        let file = open_beneath(&self.data_dir, &request.path).map_err(|error| {
            match error.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => refuse(
                    FetchStatus::BadPath,
                    "resolves through a symlink or outside",
                ),
                Some(libc::ENOENT) => refuse(FetchStatus::Unavailable, "not held here"),
                _ => refuse(FetchStatus::Unavailable, format!("open: {error}")),
            }
        })?;
        let metadata = file
            .metadata()
            .map_err(|e| refuse(FetchStatus::Unavailable, format!("stat: {e}")))?;
        if !metadata.is_file() {
            return Err(refuse(FetchStatus::BadPath, "not a regular file"));
        }
        if metadata.len() != entry.size_bytes {
            return Err(refuse(
                FetchStatus::Unavailable,
                "local copy has another size",
            ));
        }
        Ok((file, entry.clone()))
    }

    /// Serves one FileFetch stream: reads the request, answers, streams the file, finishes the
    /// stream. Errors are about the stream itself (the peer went away); refusals are answered
    /// to the client and returned as [`Served::Refused`].
    pub async fn serve<R, W>(&self, mut recv: R, mut send: W) -> Result<Served, ServeError>
    where
        R: AsyncRead + Unpin,
        W: ChunkWrite,
    {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let request = match tokio::time::timeout(timeout, protocol::read_request(&mut recv)).await {
            Err(_) => return Err(ServeError::RequestTimeout(self.config.request_timeout_ms)),
            Ok(Ok(request)) => request,
            Ok(Err(ProtocolError::Io(error))) => return Err(ProtocolError::Io(error).into()),
            Ok(Err(error)) => {
                let refusal = refuse(FetchStatus::BadRequest, error.to_string());
                self.answer_refusal(&mut send, &refusal).await?;
                return Ok(Served::Refused(refusal));
            }
        };
        let (file, entry) = match self.open_checked(&request) {
            Ok(opened) => opened,
            Err(refusal) => {
                tracing::debug!(path = %request.path, status = ?refusal.status, reason = %refusal.message, "refused file fetch");
                self.answer_refusal(&mut send, &refusal).await?;
                return Ok(Served::Refused(refusal));
            }
        };
        let Some(blake3) = parse_blake3_hex(&entry.blake3_hex) else {
            let refusal = refuse(FetchStatus::Unavailable, "manifest blake3 is not hex");
            self.answer_refusal(&mut send, &refusal).await?;
            return Ok(Served::Refused(refusal));
        };
        protocol::write_response(
            &mut send,
            &FetchResponse::Ok {
                size_bytes: entry.size_bytes,
                blake3,
            },
        )
        .await?;
        let bytes = self
            .stream(
                file,
                &request.path,
                request.offset,
                entry.size_bytes,
                &mut send,
            )
            .await?;
        send.shutdown().await.map_err(ProtocolError::Io)?;
        Ok(Served::Sent {
            path: request.path,
            bytes,
        })
    }

    async fn answer_refusal<W: AsyncWrite + Unpin>(
        &self,
        send: &mut W,
        refusal: &Refusal,
    ) -> Result<(), ServeError> {
        protocol::write_response(
            send,
            &FetchResponse::Refused {
                status: refusal.status,
                message: refusal.message.clone(),
            },
        )
        .await?;
        send.shutdown().await.map_err(ProtocolError::Io)?;
        Ok(())
    }

    async fn stream<W: ChunkWrite>(
        &self,
        file: File,
        path: &str,
        offset: u64,
        size: u64,
        send: &mut W,
    ) -> Result<u64, ServeError> {
        let chunk_bytes = self.config.chunk_bytes.max(1);
        let (chunks, mut queue) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(
            self.config.read_ahead_chunks.max(1),
        );
        // The reader stops at the first send that fails: the stream side went away.
        let reader = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            while at < size {
                let length = (size - at).min(chunk_bytes as u64) as usize;
                let result = read_exact_at(&file, length, at);
                let failed = result.is_err();
                if chunks.blocking_send(result).is_err() || failed {
                    return;
                }
                at += length as u64;
            }
        });
        let mut sent = 0u64;
        while let Some(chunk) = queue.recv().await {
            let chunk = chunk.map_err(|source| ServeError::Read {
                path: path.to_owned(),
                source,
            })?;
            let length = chunk.len() as u64;
            send.write_chunk(chunk).await.map_err(ProtocolError::Io)?;
            sent += length;
        }
        drop(queue);
        let _ = reader.await;
        Ok(sent)
    }
}

/// Reads `length` bytes of `file` at `at` into a fresh buffer that is not zeroed first (the
/// kernel fills every byte handed out).
fn read_exact_at(file: &File, length: usize, at: u64) -> std::io::Result<Bytes> {
    let mut buffer = BytesMut::with_capacity(length);
    while buffer.len() < length {
        let filled = buffer.len();
        let spare = buffer.spare_capacity_mut();
        // SAFETY: `spare` is valid for writes of `length - filled` bytes (the capacity is
        // `length`), and pread writes at most that many.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                length - filled,
                (at + filled as u64) as libc::off_t,
            )
        };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: the kernel initialised the `read` bytes after `filled`.
        unsafe { buffer.set_len(filled + read as usize) };
    }
    Ok(buffer.freeze())
}

/// Opens `path` read-only below `dir` without following any symlink and without leaving `dir`.
fn open_beneath(dir: &OwnedFd, path: &str) -> std::io::Result<File> {
    let path = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: open_how is a plain C struct; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: every pointer is valid for the call and the size matches the struct passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}
