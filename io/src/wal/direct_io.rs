//! Works around glommio 0.9's per-thread probe of io_uring polling support.
//!
//! The first `DmaFile` a thread opens on a block device decides, for that thread and device,
//! whether glommio submits I/O on its polling ring. glommio probes by reading the first block
//! of the file being opened; for an empty file the kernel answers that read at end-of-file
//! without touching the device, the probe "succeeds", and polling is wrongly enabled. On a
//! device without poll queues (virtio here, most NVMe setups without `poll_queues`) every
//! later direct read on that thread then fails with EOPNOTSUPP (os error 95). Opening a
//! non-empty file first makes the probe reach the device and record the right answer.

use std::path::Path;

use glommio::io::DmaFile;

use super::error::WalError;

const PROBE_FILE_NAME: &str = ".direct-io-probe";
const PROBE_BYTES: usize = 4096;

/// Makes glommio record the right polling support for the device holding `dir` on the
/// current thread, and checks that direct reads work there. Call it on each shard thread,
/// for each data directory, before anything opens an empty `DmaFile` (creating a file does);
/// `Wal::open` calls it for the WAL directory. `dir` must exist. Start-up only: it makes a
/// few small blocking syscalls.
pub async fn prime_direct_io_probe(dir: &Path) -> Result<(), WalError> {
    // One name per thread: shards prime concurrently, and glommio's open panics if the file
    // vanishes under it.
    let thread = std::thread::current();
    let path = dir.join(format!(
        "{PROBE_FILE_NAME}-{}-{:?}",
        std::process::id(),
        thread.id()
    ));
    std::fs::write(&path, [0x5A; PROBE_BYTES])
        .map_err(|error| WalError::io("write direct i/o probe file", &path, error))?;
    let result = read_probe(&path).await;
    if let Err(error) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), %error, "remove direct i/o probe file");
    }
    result
}

async fn read_probe(path: &Path) -> Result<(), WalError> {
    let file = DmaFile::open(path)
        .await
        .map_err(|error| WalError::io("open direct i/o probe file", path, error))?;
    let read = file
        .read_at_aligned(0, PROBE_BYTES)
        .await
        .map_err(std::io::Error::from);
    if let Err(error) = file.close().await {
        tracing::warn!(path = %path.display(), %error, "close direct i/o probe file");
    }
    match read {
        Ok(_) => Ok(()),
        // glommio keeps the error kind but not the errno when it adds context.
        Err(error) if error.kind() == std::io::ErrorKind::Unsupported => Err(WalError::io(
            "direct reads are refused on this thread (glommio enabled io_uring polling for this device \
             because an empty DmaFile was opened on this thread before prime_direct_io_probe ran)",
            path,
            error,
        )),
        Err(error) => Err(WalError::io("read direct i/o probe file", path, error)),
    }
}
