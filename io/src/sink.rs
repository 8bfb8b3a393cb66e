//! A dedicated glommio executor thread that writes files whose bytes arrive elsewhere (on a tokio
//! thread, from the network), plus small durable appends and replacements for logs beside them.
//!
//! Why a thread of its own: the caller's thread must never wait for the disk, and io_uring on a
//! glommio executor is how shale writes. Every operation is a message over a bounded flume
//! channel, so any async runtime (or none) can drive it, and a full queue slows the producer down
//! instead of buffering without limit.
//!
//! A streamed file is written to a caller-chosen temporary path (the "partial"), hashed with
//! blake3 on this thread as its bytes are written, and published only when the caller asks:
//! fdatasync, rename onto the target, fsync of the target's directory. An interrupted write
//! leaves the partial in place, and reopening it with `resume` hashes the bytes already there so
//! that the caller can continue from its length. The bytes are opaque here.
//!
//! The deep scrub's read runs here too ([`FileSink::scrub`], in `scrub`): a file re-read with
//! O_DIRECT, so from the disk rather than the page cache, hashed with blake3 block by block and
//! paced to a bandwidth limit by sleeping between blocks, so that the other jobs of this thread
//! run between its blocks.

use std::path::Path;
use std::path::PathBuf;

use bytes::Bytes;
use glommio::io::BufferedFile;
use glommio::io::DmaBuffer;
use glommio::io::DmaFile;
use glommio::io::OpenOptions;
use glommio::LocalExecutorBuilder;
use glommio::Placement;

mod scrub;

/// Bytes read per request when hashing an existing file.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Settings of the sink thread.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub thread_name: String,
    /// Registered io_uring buffer memory of the executor (glommio's `io_memory`). Direct-I/O
    /// blocks (the writers' and the scrub's reads in flight, 1 MiB each) come from it; one it
    /// cannot hold comes from the heap, which hands the memory back to the kernel after use,
    /// and faulting it in again costs more CPU than hashing it.
    pub io_memory_bytes: usize,
    /// Jobs (opens, appends, ...) queued before callers wait.
    pub job_queue_depth: usize,
    /// Write commands queued per open file before the writer waits: bounds the memory a fast
    /// network can pile up in front of a slow disk (chunks of the caller's size).
    pub writer_queue_depth: usize,
    /// Write streamed files, and read scrubbed ones, with O_DIRECT where the file system
    /// allows it (see `PartialFile`); `false` always goes through the page cache.
    pub direct_io: bool,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            thread_name: "shale-fetch".to_owned(),
            // Measured with benches/scrub.rs: an unlimited scrub hashed 505 MB/s at 1.0 CPU
            // ms per MB with 1 MiB, 706 at 0.49 with 4 MiB, 796 at 0.42 with 8 MiB (blake3
            // alone: 0.38).
            io_memory_bytes: 8 << 20,
            job_queue_depth: 256,
            writer_queue_depth: 8,
            direct_io: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start the file sink thread: {0}")]
    Start(std::io::Error),
    #[error("the file sink thread has stopped")]
    Stopped,
}

/// Bytes to append to a streamed file, as the network delivered them: pieces written in order.
/// A QUIC stream delivers a packet's worth of bytes per piece, and the sink's copy into its
/// aligned blocks is the only copy the bytes get on the receiving side.
#[derive(Clone, Debug, Default)]
pub struct Chunk {
    pieces: Vec<Bytes>,
    length: usize,
}

impl Chunk {
    pub fn new() -> Chunk {
        Chunk::default()
    }

    /// Appends `piece` (empty pieces are dropped).
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.length += piece.len();
            self.pieces.push(piece);
        }
    }

    /// Bytes in all pieces.
    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Keeps the first `length` bytes.
    pub fn truncate(&mut self, length: usize) {
        let mut kept = 0usize;
        let mut count = 0usize;
        for piece in &mut self.pieces {
            if kept >= length {
                break;
            }
            piece.truncate(length - kept);
            kept += piece.len();
            count += 1;
        }
        self.pieces.truncate(count);
        self.length = kept;
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// The bytes in one buffer (a copy, unless there is a single piece that owns its buffer).
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.pieces.len() == 1 {
            return Vec::from(self.pieces.pop().unwrap_or_default());
        }
        let mut bytes = Vec::with_capacity(self.length);
        for piece in &self.pieces {
            bytes.extend_from_slice(piece);
        }
        bytes
    }
}

impl From<Bytes> for Chunk {
    fn from(piece: Bytes) -> Chunk {
        let mut chunk = Chunk::new();
        chunk.push(piece);
        chunk
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(bytes: Vec<u8>) -> Chunk {
        Chunk::from(Bytes::from(bytes))
    }
}

/// Size and blake3 of everything in a streamed file (the resumed prefix included), or of
/// a file as hashed or scrubbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub size_bytes: u64,
    pub blake3: [u8; 32],
}

type Reply<T> = flume::Sender<Result<T, SinkError>>;

enum Job {
    Open {
        partial: PathBuf,
        resume: bool,
        direct_io: bool,
        commands: flume::Receiver<WriterCommand>,
        reply: Reply<u64>,
    },
    AppendDurable {
        path: PathBuf,
        bytes: Vec<u8>,
        reply: Reply<()>,
    },
    Replace {
        path: PathBuf,
        bytes: Vec<u8>,
        reply: Reply<()>,
    },
    Hash {
        path: PathBuf,
        reply: Reply<Option<Written>>,
    },
    Scrub {
        path: PathBuf,
        bytes_per_second: u64,
        direct_io: bool,
        reply: Reply<Option<Written>>,
    },
    Remove {
        path: PathBuf,
        reply: Reply<bool>,
    },
    RemoveDurable {
        paths: Vec<PathBuf>,
        reply: Reply<u64>,
    },
}

enum WriterCommand {
    Write(Chunk),
    Finish { reply: Reply<Written> },
    Publish { target: PathBuf, reply: Reply<()> },
    Discard { reply: Reply<()> },
}

/// Handle to the sink thread. Cheap to clone; the thread stops once every handle and every open
/// [`SinkWriter`] is gone (or at [`FileSink::shutdown`] of the last handle).
#[derive(Clone)]
pub struct FileSink {
    jobs: flume::Sender<Job>,
    writer_queue_depth: usize,
    direct_io: bool,
    thread: std::sync::Arc<std::sync::Mutex<Option<glommio::ExecutorJoinHandle<()>>>>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink").finish_non_exhaustive()
    }
}

impl FileSink {
    /// Starts the sink thread.
    pub fn start(config: SinkConfig) -> Result<FileSink, SinkError> {
        let (jobs, queue) = flume::bounded(config.job_queue_depth.max(1));
        let thread = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&config.thread_name)
            .io_memory(config.io_memory_bytes)
            .spawn(move || run(queue))
            .map_err(|e| SinkError::Start(std::io::Error::other(e.to_string())))?;
        Ok(FileSink {
            jobs,
            writer_queue_depth: config.writer_queue_depth.max(1),
            direct_io: config.direct_io,
            thread: std::sync::Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, SinkError> {
        let (reply, answer) = flume::bounded(1);
        self.jobs
            .send_async(job(reply))
            .await
            .map_err(|_| SinkError::Stopped)?;
        answer.recv_async().await.map_err(|_| SinkError::Stopped)?
    }

    /// Opens `partial` for a streamed write, creating it (and its missing parent directories,
    /// durably) if needed. With `resume`, the bytes already in it are kept and hashed, and the
    /// writer continues at their end ([`SinkWriter::resumed_bytes`]); otherwise it is emptied.
    pub async fn open(&self, partial: &Path, resume: bool) -> Result<SinkWriter, SinkError> {
        let (commands, queue) = flume::bounded(self.writer_queue_depth);
        let resumed_bytes = self
            .ask(|reply| Job::Open {
                partial: partial.to_path_buf(),
                resume,
                direct_io: self.direct_io,
                commands: queue,
                reply,
            })
            .await?;
        Ok(SinkWriter {
            commands,
            resumed_bytes,
        })
    }

    /// Appends `bytes` to `path` (created if missing) and fdatasyncs it before answering.
    pub async fn append_durable(&self, path: &Path, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.ask(|reply| Job::AppendDurable {
            path: path.to_path_buf(),
            bytes,
            reply,
        })
        .await
    }

    /// Atomically and durably replaces (or creates) `path` with `bytes`.
    pub async fn replace(&self, path: &Path, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.ask(|reply| Job::Replace {
            path: path.to_path_buf(),
            bytes,
            reply,
        })
        .await
    }

    /// Size and blake3 of the file at `path`, or `None` if there is none.
    pub async fn hash(&self, path: &Path) -> Result<Option<Written>, SinkError> {
        self.ask(|reply| Job::Hash {
            path: path.to_path_buf(),
            reply,
        })
        .await
    }

    /// Size and blake3 of the file at `path` as read from the disk (O_DIRECT, bypassing the
    /// page cache, where the file system allows it), or `None` if there is none. Reads at most
    /// `bytes_per_second` on average from the call until the answer (0: no limit), sleeping
    /// after each block and after the last one, so that back-to-back scrubs hold the rate too.
    /// Other jobs of the sink run between its blocks. The answer's size is the bytes read.
    pub async fn scrub(
        &self,
        path: &Path,
        bytes_per_second: u64,
    ) -> Result<Option<Written>, SinkError> {
        self.ask(|reply| Job::Scrub {
            path: path.to_path_buf(),
            bytes_per_second,
            direct_io: self.direct_io,
            reply,
        })
        .await
    }

    /// Removes `path`; answers whether it existed.
    pub async fn remove(&self, path: &Path) -> Result<bool, SinkError> {
        self.ask(|reply| Job::Remove {
            path: path.to_path_buf(),
            reply,
        })
        .await
    }

    /// Removes every file of `paths` that exists, then fsyncs each directory that lost one, so
    /// the removals survive a crash once this answers. Answers how many files existed.
    pub async fn remove_durable(&self, paths: Vec<PathBuf>) -> Result<u64, SinkError> {
        self.ask(|reply| Job::RemoveDurable { paths, reply }).await
    }

    /// Stops accepting jobs from this handle and, if it is the last handle, waits for the thread
    /// to finish the work already queued. Blocks: call it from a thread that may block.
    pub fn shutdown(self) {
        let FileSink { jobs, thread, .. } = self;
        drop(jobs);
        if let Ok(thread) = std::sync::Arc::try_unwrap(thread) {
            let thread = thread.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(thread) = thread {
                if thread.join().is_err() {
                    tracing::error!("file sink thread panicked");
                }
            }
        }
    }
}

/// One streamed file being written on the sink thread. Dropping it without publishing or
/// discarding closes the file and keeps the partial for a later resume.
#[derive(Debug)]
pub struct SinkWriter {
    commands: flume::Sender<WriterCommand>,
    resumed_bytes: u64,
}

impl SinkWriter {
    /// Bytes that were already in the partial when it was opened with `resume`.
    pub fn resumed_bytes(&self) -> u64 {
        self.resumed_bytes
    }

    /// Queues `bytes` to be appended. A write error is reported by [`SinkWriter::finish`]; this
    /// fails only when the sink has stopped.
    pub async fn write(&self, bytes: impl Into<Chunk>) -> Result<(), SinkError> {
        self.commands
            .send_async(WriterCommand::Write(bytes.into()))
            .await
            .map_err(|_| SinkError::Stopped)
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> WriterCommand,
    ) -> Result<T, SinkError> {
        let (reply, answer) = flume::bounded(1);
        self.commands
            .send_async(command(reply))
            .await
            .map_err(|_| SinkError::Stopped)?;
        answer.recv_async().await.map_err(|_| SinkError::Stopped)?
    }

    /// Waits for every queued write, fdatasyncs the partial and returns the size and blake3 of
    /// its whole content.
    pub async fn finish(&self) -> Result<Written, SinkError> {
        self.ask(|reply| WriterCommand::Finish { reply }).await
    }

    /// Renames the partial onto `target` (same file system; missing directories are created
    /// durably) and fsyncs the target's directory. Call [`SinkWriter::finish`] first: publishing
    /// does not sync the file's data.
    pub async fn publish(self, target: &Path) -> Result<(), SinkError> {
        self.ask(|reply| WriterCommand::Publish {
            target: target.to_path_buf(),
            reply,
        })
        .await
    }

    /// Closes and removes the partial.
    pub async fn discard(self) -> Result<(), SinkError> {
        self.ask(|reply| WriterCommand::Discard { reply }).await
    }
}

/// How often the sink thread wakes with nothing to do. Why: a job sent from another thread
/// reaches a sleeping glommio executor as a wake through its eventfd, and under load, after
/// paced scrubs, such a wake was seen to go unnoticed: the thread slept in `io_uring_enter`
/// with jobs queued for minutes, until anything else woke it (a later job, a debugger). A
/// timer that fires regardless bounds such a loss to this interval, as the shards' heartbeat
/// tasks do for the shards. Its cost is a few dozen wake-ups a second.
const WAKE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

async fn run(queue: flume::Receiver<Job>) {
    let active = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let finished = crate::runtime::LocalNotify::new();
    // Dropped (cancelled) when this function returns.
    let _wake_ticker = glommio::spawn_local(async {
        loop {
            glommio::timer::sleep(WAKE_INTERVAL).await;
        }
    });
    while let Ok(job) = queue.recv_async().await {
        active.set(active.get() + 1);
        let (active, finished) = (active.clone(), finished.clone());
        glommio::spawn_local(async move {
            handle(job).await;
            active.set(active.get() - 1);
            finished.notify();
        })
        .detach();
    }
    // Work already accepted finishes before the thread exits; open writers finish once their
    // owners drop them. One thread: nothing can finish between the check and the wait.
    while active.get() > 0 {
        finished.notified().await;
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(glommio::GlommioError<()>) -> SinkError + 'a {
    move |error| SinkError::Io {
        action,
        path: path.to_path_buf(),
        source: std::io::Error::from(error),
    }
}

fn std_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

async fn handle(job: Job) {
    match job {
        Job::Open {
            partial,
            resume,
            direct_io,
            commands,
            reply,
        } => match open_partial(&partial, resume, direct_io).await {
            Ok((file, hasher)) => {
                let _ = reply.send_async(Ok(file.size())).await;
                write_loop(partial, file, hasher, commands).await;
            }
            Err(error) => {
                let _ = reply.send_async(Err(error)).await;
            }
        },
        Job::AppendDurable { path, bytes, reply } => {
            let _ = reply.send_async(append_durable(&path, bytes).await).await;
        }
        Job::Replace { path, bytes, reply } => {
            let result = crate::publish::replace(&path, &bytes)
                .await
                .map(|_| ())
                .map_err(|e| SinkError::Io {
                    action: "replace",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                });
            let _ = reply.send_async(result).await;
        }
        Job::Hash { path, reply } => {
            let result = match OpenOptions::new().read(true).buffered_open(&path).await {
                Ok(file) => hash_prefix(&file, &path).await.map(|(hasher, size)| {
                    Some(Written {
                        size_bytes: size,
                        blake3: *hasher.finalize().as_bytes(),
                    })
                }),
                Err(error) => {
                    let error = std::io::Error::from(error);
                    if error.kind() == std::io::ErrorKind::NotFound {
                        Ok(None)
                    } else {
                        Err(std_error("open", &path)(error))
                    }
                }
            };
            let _ = reply.send_async(result).await;
        }
        Job::Scrub {
            path,
            bytes_per_second,
            direct_io,
            reply,
        } => {
            let result = scrub::scrub(&path, bytes_per_second, direct_io).await;
            let _ = reply.send_async(result).await;
        }
        Job::Remove { path, reply } => {
            let result = match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(std_error("remove", &path)(e)),
            };
            let _ = reply.send_async(result).await;
        }
        Job::RemoveDurable { paths, reply } => {
            let _ = reply.send_async(remove_durable(&paths).await).await;
        }
    }
}

async fn remove_durable(paths: &[PathBuf]) -> Result<u64, SinkError> {
    let mut removed = 0u64;
    let mut directories = std::collections::BTreeSet::new();
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => {
                removed += 1;
                if let Some(parent) = path.parent() {
                    directories.insert(parent.to_path_buf());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(std_error("remove", path)(e)),
        }
    }
    for directory in directories {
        crate::publish::sync_directory(&directory)
            .await
            .map_err(|e| SinkError::Io {
                action: "sync directory",
                path: directory.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    Ok(removed)
}

async fn create_parent(path: &Path) -> Result<(), SinkError> {
    if let Some(parent) = path.parent() {
        crate::publish::create_dir_durable(parent)
            .await
            .map_err(|e| SinkError::Io {
                action: "create directory for",
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    Ok(())
}

/// Bytes of the aligned block a direct-I/O partial collects before writing it.
const DIRECT_BLOCK_BYTES: usize = 1 << 20;
/// Bytes hashed at once while copying into a block (see [`DirectFile::write`]).
const HASH_SPAN_BYTES: usize = 64 << 10;

/// Where a streamed file's bytes go. O_DIRECT where the file system allows it: the bytes go to
/// the device in aligned blocks without the page cache, which on the machines measured makes
/// fetched (incompressible) bytes durable about three times faster than buffered writes and an
/// fdatasync (dd: 1.5 against 0.5 GB/s), and leaves the page cache to queries. File systems
/// without O_DIRECT (tmpfs) get buffered writes.
enum PartialFile {
    Direct(DirectFile),
    Buffered { file: BufferedFile, size: u64 },
}

/// A file written with O_DIRECT: full blocks are written as they fill; the last partial block
/// is written zero-padded at [`DirectFile::sync`], and the file truncated to its true size.
struct DirectFile {
    file: DmaFile,
    /// Bytes in the file before `block`: a multiple of the alignment.
    written: u64,
    /// The block being filled (always `DIRECT_BLOCK_BYTES` long) and how much of it is filled.
    block: Option<DmaBuffer>,
    filled: usize,
}

impl DirectFile {
    fn size(&self) -> u64 {
        self.written + self.filled as u64
    }

    async fn write_block(
        &self,
        block: DmaBuffer,
        at: u64,
        path: &Path,
    ) -> Result<DmaBuffer, SinkError> {
        let length = block.len();
        let block = std::rc::Rc::new(block);
        let written = self
            .file
            .write_rc_at(block.clone(), at)
            .await
            .map_err(io_error("write", path))?;
        check_whole_write(path, written, length)?;
        Ok(std::rc::Rc::try_unwrap(block).unwrap_or_else(|_| self.file.alloc_dma_buffer(length)))
    }

    /// Copies the pieces of `chunk` into blocks and writes every block that fills. The bytes
    /// are hashed from the block they were copied into, in spans of [`HASH_SPAN_BYTES`]: large
    /// enough for blake3 to hash many 1 KiB chunks at once with SIMD (a piece is only a
    /// packet's worth), small enough that the span is still in this core's cache from the copy.
    /// Everything copied is hashed before this returns.
    async fn write(
        &mut self,
        chunk: &Chunk,
        hasher: &mut blake3::Hasher,
        path: &Path,
    ) -> Result<(), SinkError> {
        // Bytes of the block before `hashed` are in the hasher; `hashed <= filled`.
        let mut hashed = self.filled;
        for piece in chunk.pieces() {
            let mut bytes = &piece[..];
            while !bytes.is_empty() {
                let mut block = self
                    .block
                    .take()
                    .unwrap_or_else(|| self.file.alloc_dma_buffer(DIRECT_BLOCK_BYTES));
                let length = bytes.len().min(DIRECT_BLOCK_BYTES - self.filled);
                block.as_bytes_mut()[self.filled..self.filled + length]
                    .copy_from_slice(&bytes[..length]);
                self.filled += length;
                bytes = &bytes[length..];
                if self.filled - hashed >= HASH_SPAN_BYTES || self.filled == DIRECT_BLOCK_BYTES {
                    hasher.update(&block.as_bytes()[hashed..self.filled]);
                    hashed = self.filled;
                }
                if self.filled == DIRECT_BLOCK_BYTES {
                    let block = self.write_block(block, self.written, path).await?;
                    self.written += DIRECT_BLOCK_BYTES as u64;
                    self.filled = 0;
                    hashed = 0;
                    self.block = Some(block);
                } else {
                    self.block = Some(block);
                }
            }
        }
        if let Some(block) = self.block.as_ref().filter(|_| hashed < self.filled) {
            hasher.update(&block.as_bytes()[hashed..self.filled]);
        }
        Ok(())
    }

    /// Writes the filled part of the last block (padded to the alignment), cuts the file to
    /// its true size and fdatasyncs it. The block stays, so later writes continue after it.
    async fn sync(&mut self, path: &Path) -> Result<(), SinkError> {
        if let Some(block) = self.block.as_ref().filter(|_| self.filled > 0) {
            let padded = self.file.align_up(self.filled as u64) as usize;
            let mut tail = self.file.alloc_dma_buffer(padded);
            tail.as_bytes_mut()[..self.filled].copy_from_slice(&block.as_bytes()[..self.filled]);
            tail.as_bytes_mut()[self.filled..].fill(0);
            self.write_block(tail, self.written, path).await?;
        }
        self.file
            .truncate(self.size())
            .await
            .map_err(io_error("truncate", path))?;
        self.file.fdatasync().await.map_err(io_error("sync", path))
    }
}

impl PartialFile {
    fn size(&self) -> u64 {
        match self {
            PartialFile::Direct(direct) => direct.size(),
            PartialFile::Buffered { size, .. } => *size,
        }
    }

    /// Appends `chunk` and adds it to `hasher`.
    async fn write(
        &mut self,
        chunk: Chunk,
        hasher: &mut blake3::Hasher,
        path: &Path,
    ) -> Result<(), SinkError> {
        match self {
            PartialFile::Direct(direct) => direct.write(&chunk, hasher, path).await,
            PartialFile::Buffered { file, size } => {
                // glommio's buffered writes take one owned buffer.
                let bytes = chunk.into_vec();
                hasher.update(&bytes);
                let length = bytes.len() as u64;
                write_all(file, path, bytes, *size).await?;
                *size += length;
                Ok(())
            }
        }
    }

    async fn sync(&mut self, path: &Path) -> Result<(), SinkError> {
        match self {
            PartialFile::Direct(direct) => direct.sync(path).await,
            PartialFile::Buffered { file, .. } => {
                file.fdatasync().await.map_err(io_error("sync", path))
            }
        }
    }

    async fn close(self) -> Result<(), glommio::GlommioError<()>> {
        match self {
            PartialFile::Direct(direct) => direct.file.close().await,
            PartialFile::Buffered { file, .. } => file.close().await,
        }
    }
}

std::thread_local! {
    /// Devices (`st_dev`) on which this thread's glommio executor has decided whether direct
    /// I/O is polled.
    static PROBED_DEVICES: std::cell::RefCell<std::collections::HashSet<u64>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Makes glommio decide correctly whether `partial`'s device completes direct I/O by polling.
///
/// Why: glommio decides it once per device and thread, at the first `dma_open` there, by
/// reading the opened file's first block on its polling ring. A new, empty partial answers
/// that read at end of file without reaching the device, so every device looked pollable;
/// writes then went to the polling ring, which the executor cannot sleep on while one is in
/// flight, and the sink thread spun through io_uring_enter (about 50,000 calls a second during
/// a catch-up, over half of its CPU). Opening a file that holds a block first makes the probe
/// reach the device, which refuses polled I/O unless it has poll queues. The probe file is
/// removed at once; a failure here only leaves glommio to probe the partial as before.
async fn probe_polling_once(partial: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = partial.parent() else {
        return;
    };
    let Ok(device) = std::fs::metadata(parent).map(|m| m.dev()) else {
        return;
    };
    if PROBED_DEVICES.with(|probed| probed.borrow().contains(&device)) {
        return;
    }
    let mut probe = partial.as_os_str().to_owned();
    probe.push(".iopoll-probe");
    let probe = PathBuf::from(probe);
    if std::fs::write(&probe, [0u8; PROBE_BYTES]).is_ok() {
        match OpenOptions::new().read(true).dma_open(&probe).await {
            Ok(file) => {
                let _ = file.close().await;
            }
            Err(error) => {
                tracing::debug!(path = %probe.display(), %error, "direct-i/o polling probe");
            }
        }
    }
    let _ = std::fs::remove_file(&probe);
    PROBED_DEVICES.with(|probed| probed.borrow_mut().insert(device));
}

/// Bytes of the probe file: a block of any device's logical block size.
const PROBE_BYTES: usize = 64 << 10;

/// Opens the partial and hashes what it holds. A direct-I/O partial is cut to a multiple of
/// the alignment first (at most one block's worth of bytes is fetched again).
async fn open_partial(
    partial: &Path,
    resume: bool,
    direct_io: bool,
) -> Result<(PartialFile, blake3::Hasher), SinkError> {
    create_parent(partial).await?;
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create(true)
        .truncate(!resume);
    let direct = if direct_io {
        probe_polling_once(partial).await;
        options
            .dma_open(partial)
            .await
            .map_err(std::io::Error::from)
    } else {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    match direct {
        Ok(file) => {
            let size = file.file_size().await.map_err(io_error("stat", partial))?;
            let kept = file.align_down(size);
            if kept < size {
                file.truncate(kept)
                    .await
                    .map_err(io_error("truncate", partial))?;
            }
            // Hashed through a buffered descriptor of its own: glommio reads direct-I/O files
            // only on NVMe polling rings.
            let reader = OpenOptions::new()
                .read(true)
                .buffered_open(partial)
                .await
                .map_err(io_error("open", partial))?;
            let hashed = hash_prefix(&reader, partial).await;
            if let Err(error) = reader.close().await {
                tracing::warn!(path = %partial.display(), %error, "close hashed partial");
            }
            let (hasher, at) = hashed?;
            debug_assert_eq!(at, kept);
            let direct = DirectFile {
                file,
                written: at,
                block: None,
                filled: 0,
            };
            Ok((PartialFile::Direct(direct), hasher))
        }
        Err(error) => {
            if error.raw_os_error() != Some(libc::EINVAL) {
                return Err(std_error("open", partial)(error));
            }
            let file = options
                .buffered_open(partial)
                .await
                .map_err(io_error("open", partial))?;
            let (hasher, size) = hash_prefix(&file, partial).await?;
            Ok((PartialFile::Buffered { file, size }, hasher))
        }
    }
}

async fn hash_prefix(file: &BufferedFile, path: &Path) -> Result<(blake3::Hasher, u64), SinkError> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let read = file
            .read_at(size, READ_CHUNK_BYTES)
            .await
            .map_err(io_error("read", path))?;
        if read.is_empty() {
            return Ok((hasher, size));
        }
        hasher.update(&read);
        size += read.len() as u64;
    }
}

/// Writes all of `bytes` at `at`. A short write (a full disk) is an error: the caller never
/// publishes after an error, and a resume re-reads the partial, so nothing is lost by not
/// retrying the tail here.
async fn write_all(
    file: &BufferedFile,
    path: &Path,
    bytes: Vec<u8>,
    at: u64,
) -> Result<(), SinkError> {
    let length = bytes.len();
    let written = file
        .write_at(bytes, at)
        .await
        .map_err(io_error("write", path))?;
    check_whole_write(path, written, length)
}

/// A write that stored fewer bytes than asked (a full disk) is an error, never retried here.
fn check_whole_write(path: &Path, written: usize, length: usize) -> Result<(), SinkError> {
    if written == length {
        return Ok(());
    }
    Err(SinkError::Io {
        action: "write",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short write: {written} of {length} bytes"),
        ),
    })
}

async fn write_loop(
    partial: PathBuf,
    mut file: PartialFile,
    mut hasher: blake3::Hasher,
    commands: flume::Receiver<WriterCommand>,
) {
    // The first write error is kept and reported by every later finish or publish: the bytes
    // after a failed write are not in the file, so the file must never be published.
    let mut failed: Option<String> = None;
    let fail_with = |message: &Option<String>| SinkError::Io {
        action: "write",
        path: partial.clone(),
        source: std::io::Error::other(message.clone().unwrap_or_default()),
    };
    while let Ok(command) = commands.recv_async().await {
        match command {
            WriterCommand::Write(bytes) => {
                if failed.is_some() {
                    continue;
                }
                if let Err(error) = file.write(bytes, &mut hasher, &partial).await {
                    failed = Some(error.to_string());
                }
            }
            WriterCommand::Finish { reply } => {
                let result = if failed.is_some() {
                    Err(fail_with(&failed))
                } else {
                    file.sync(&partial).await.map(|()| Written {
                        size_bytes: file.size(),
                        blake3: *hasher.finalize().as_bytes(),
                    })
                };
                let _ = reply.send_async(result).await;
            }
            WriterCommand::Publish { target, reply } => {
                let result = if failed.is_some() {
                    Err(fail_with(&failed))
                } else {
                    publish(&partial, &target).await
                };
                let _ = reply.send_async(result).await;
                break;
            }
            WriterCommand::Discard { reply } => {
                let result = std::fs::remove_file(&partial).map_err(std_error("remove", &partial));
                let _ = reply.send_async(result).await;
                break;
            }
        }
    }
    if let Err(error) = file.close().await {
        tracing::warn!(path = %partial.display(), %error, "close streamed file");
    }
}

async fn publish(partial: &Path, target: &Path) -> Result<(), SinkError> {
    create_parent(target).await?;
    glommio::io::rename(partial, target)
        .await
        .map_err(io_error("rename", partial))?;
    if let Some(parent) = target.parent() {
        crate::publish::sync_directory(parent)
            .await
            .map_err(|e| SinkError::Io {
                action: "sync directory of",
                path: target.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    Ok(())
}

async fn append_durable(path: &Path, bytes: Vec<u8>) -> Result<(), SinkError> {
    create_parent(path).await?;
    // A file created here needs its directory entry synced too, or a crash could lose it whole.
    let created = !path.exists();
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .buffered_open(path)
        .await
        .map_err(io_error("open", path))?;
    let result = async {
        let at = file.file_size().await.map_err(io_error("stat", path))?;
        write_all(&file, path, bytes, at).await?;
        file.fdatasync().await.map_err(io_error("sync", path))
    }
    .await;
    if let Err(error) = file.close().await {
        tracing::warn!(path = %path.display(), %error, "close appended file");
    }
    result?;
    if created {
        if let Some(parent) = path.parent() {
            crate::publish::sync_directory(parent)
                .await
                .map_err(|e| SinkError::Io {
                    action: "sync directory of",
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        futures_lite::future::block_on(future)
    }

    // Checks the streamed-file cycle the fetcher relies on: bytes written in chunks are hashed
    // as they go, an interrupted partial is resumed with its prefix hashed, and publishing
    // renames the partial onto the target with the exact bytes. On the test's disk this is the
    // O_DIRECT path.
    #[test]
    fn streamed_file_resumes_and_publishes() {
        streamed_file_cycle(true);
    }

    // The same cycle through the page cache, the path file systems without O_DIRECT take.
    #[test]
    fn streamed_file_resumes_and_publishes_buffered() {
        streamed_file_cycle(false);
    }

    fn streamed_file_cycle(direct_io: bool) {
        crate::runtime::raise_memlock_limit();
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("a/b/file.partial");
        let target = dir.path().join("a/b/file");
        let sink = FileSink::start(SinkConfig {
            direct_io,
            ..SinkConfig::default()
        })
        .unwrap();
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        block_on(async {
            let writer = sink.open(&partial, true).await.unwrap();
            assert_eq!(writer.resumed_bytes(), 0);
            writer.write(content[..1_000_001].to_vec()).await.unwrap();
            writer.finish().await.unwrap();
            drop(writer);

            // A direct-I/O partial resumes from the last aligned offset at or before its end.
            let writer = sink.open(&partial, true).await.unwrap();
            let resumed = writer.resumed_bytes() as usize;
            assert!(
                resumed <= 1_000_001 && resumed > 1_000_001 - 65_536,
                "{resumed}"
            );
            for chunk in content[resumed..].chunks(65_536) {
                writer.write(chunk.to_vec()).await.unwrap();
            }
            let written = writer.finish().await.unwrap();
            assert_eq!(written.size_bytes, content.len() as u64);
            assert_eq!(written.blake3, *blake3::hash(&content).as_bytes());
            writer.publish(&target).await.unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), content);
            assert!(!partial.exists());

            let hashed = sink.hash(&target).await.unwrap().unwrap();
            assert_eq!(hashed, written);
            assert_eq!(sink.hash(&partial).await.unwrap(), None);

            let log = dir.path().join("log");
            sink.append_durable(&log, b"ab".to_vec()).await.unwrap();
            sink.append_durable(&log, b"cd".to_vec()).await.unwrap();
            assert_eq!(std::fs::read(&log).unwrap(), b"abcd");
            sink.replace(&log, b"x".to_vec()).await.unwrap();
            assert_eq!(std::fs::read(&log).unwrap(), b"x");
            assert!(sink.remove(&log).await.unwrap());
            assert!(!sink.remove(&log).await.unwrap());
            let gone = vec![target.clone(), log.clone()];
            assert_eq!(sink.remove_durable(gone.clone()).await.unwrap(), 1);
            assert!(!target.exists());
            assert_eq!(sink.remove_durable(gone).await.unwrap(), 0);
        });
        sink.shutdown();
    }
}
