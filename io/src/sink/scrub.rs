//! The deep scrub's read: a file re-read from the disk and hashed with blake3 on the sink
//! thread, at a bandwidth limit, so that bit rot shows up as a wrong hash.
//!
//! The bytes are read with O_DIRECT: a scrub that hashed pages already in the page cache would
//! prove nothing about the disk. File systems that refuse O_DIRECT are read through the page
//! cache, as the sink's writer writes them. The read is paced by sleeping on a glommio timer,
//! and each block is hashed between two awaits, so the other jobs of the sink thread (fetched
//! files, presence appends) run between the scrub's blocks.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;
use std::time::Instant;

use glommio::io::BufferedFile;
use glommio::io::DmaFile;
use glommio::io::OpenOptions;
use glommio::io::ReadResult;

use super::io_error;
use super::probe_polling_once;
use super::std_error;
use super::SinkError;
use super::Written;

/// Bytes read per request: large enough that a disk streams, small enough that the pacing
/// sleeps often and one block's hashing (under a millisecond) is short next to other jobs.
const SCRUB_BLOCK_BYTES: usize = 1 << 20;
/// Reads in flight at once: two, so that the disk reads one block while the thread hashes the
/// one before it (measured in `benches/scrub.rs`).
const READS_AHEAD: usize = 2;

/// Hashes the file at `path` as it is on the disk, reading at most `bytes_per_second` (0 is
/// unlimited) measured from the call; `None` if there is no file. The answer's size is the
/// bytes read.
pub(super) async fn scrub(
    path: &Path,
    bytes_per_second: u64,
    direct_io: bool,
) -> Result<Option<Written>, SinkError> {
    let started = Instant::now();
    // The file is opened once here, and glommio opens this open file again through its
    // /proc/self/fd link rather than by `path`. Why: glommio's open looks the path up again
    // after opening it (statx, statfs) and panics if statfs fails, so a file unlinked in that
    // moment (a removal job of this same thread runs while the open is awaited) would stop the
    // sink thread. The link names the open file whatever happens to the path.
    let opened = match std::fs::File::open(path) {
        Ok(opened) => opened,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(std_error("open", path)(error)),
    };
    let size = opened.metadata().map_err(std_error("stat", path))?.len();
    let link = std::path::PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
    let reader = ScrubReader::open(path, &link, direct_io).await;
    drop(opened);
    let reader = Rc::new(reader?);
    let hashed = hash_paced(&reader, path, size, started, bytes_per_second).await;
    // Every read has finished or been dropped. A dropped read whose task has not let go of
    // the reader yet closes the file when it does.
    if let Ok(reader) = Rc::try_unwrap(reader) {
        if let Err(error) = reader.close().await {
            tracing::warn!(path = %path.display(), %error, "close scrubbed file");
        }
    }
    hashed.map(Some)
}

/// Reads the file's `size` bytes (its size when opened) in blocks and hashes them, sleeping
/// after each block until its bytes have had their time at `bytes_per_second` since
/// `started`. [`READS_AHEAD`] reads are in flight, so the disk reads the next block while this
/// thread hashes one. Every read asks for a whole block at a multiple of the block size, so
/// direct reads stay aligned, and the file's unaligned tail is simply the last, short answer.
/// A block shorter than the bytes the file had left ends the scrub (the file was cut while
/// being read), and the answer is what was read.
async fn hash_paced(
    reader: &Rc<ScrubReader>,
    path: &Path,
    size: u64,
    started: Instant,
    bytes_per_second: u64,
) -> Result<Written, SinkError> {
    let mut hasher = blake3::Hasher::new();
    let mut reads = std::collections::VecDeque::with_capacity(READS_AHEAD);
    // Offsets are whole multiples of the block size, so every direct read is aligned.
    let mut next = 0u64;
    let mut at = 0u64;
    loop {
        while reads.len() < READS_AHEAD && next < size {
            let reader = Rc::clone(reader);
            let offset = next;
            reads.push_back(glommio::spawn_local(async move {
                reader.read_block(offset).await
            }));
            next += SCRUB_BLOCK_BYTES as u64;
        }
        let Some(read) = reads.pop_front() else {
            break;
        };
        let block = read.await.map_err(io_error("read", path))?;
        let asked = (size - at).min(SCRUB_BLOCK_BYTES as u64);
        let length = (block.len() as u64).min(asked);
        // The single-threaded update: this thread has other jobs, and one block is small.
        hasher.update(&block[..length as usize]);
        at += length;
        pace(started, at, bytes_per_second).await;
        if length < asked {
            break;
        }
    }
    Ok(Written {
        size_bytes: at,
        blake3: *hasher.finalize().as_bytes(),
    })
}

/// Where the scrub reads from: the device (O_DIRECT) or, where that is refused, the page cache.
enum ScrubReader {
    Direct(DmaFile),
    Buffered(BufferedFile),
}

impl ScrubReader {
    /// Opens `link` (the scrubbed file's /proc/self/fd link); `path` names it in errors.
    async fn open(path: &Path, link: &Path, direct_io: bool) -> Result<ScrubReader, SinkError> {
        let mut options = OpenOptions::new();
        options.read(true);
        if direct_io {
            probe_polling_once(path).await;
            match options.dma_open(link).await.map_err(std::io::Error::from) {
                Ok(file) => return Ok(ScrubReader::Direct(file)),
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
                Err(error) => return Err(std_error("open for direct read", path)(error)),
            }
        }
        options
            .buffered_open(link)
            .await
            .map(ScrubReader::Buffered)
            .map_err(io_error("open", path))
    }

    /// Up to [`SCRUB_BLOCK_BYTES`] at `at`, a multiple of them.
    async fn read_block(&self, at: u64) -> Result<ReadResult, glommio::GlommioError<()>> {
        match self {
            // Aligned reads only: glommio's unaligned `read_at` near the end of a file slices
            // past the bytes read.
            ScrubReader::Direct(file) => file.read_at_aligned(at, SCRUB_BLOCK_BYTES).await,
            ScrubReader::Buffered(file) => file.read_at(at, SCRUB_BLOCK_BYTES).await,
        }
    }

    async fn close(self) -> Result<(), glommio::GlommioError<()>> {
        match self {
            ScrubReader::Direct(file) => file.close().await,
            ScrubReader::Buffered(file) => file.close().await,
        }
    }
}

/// Sleeps until `bytes` have had their time at `bytes_per_second` (0: no limit) since
/// `started`. Measured from the start rather than per block, so a block that took long to read
/// is not paid for twice, and called after the last block too, so that back-to-back scrubs of
/// small files hold the rate as well as one large scrub does.
async fn pace(started: Instant, bytes: u64, bytes_per_second: u64) {
    if bytes_per_second == 0 {
        return;
    }
    let due_ns = u128::from(bytes) * 1_000_000_000 / u128::from(bytes_per_second);
    let due = Duration::from_nanos(u64::try_from(due_ns).unwrap_or(u64::MAX));
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        glommio::timer::sleep(wait).await;
    }
}
