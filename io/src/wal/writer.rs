//! The group-commit writer task and the active segment file it appends to.
//!
//! Owned by the shard's executor: the task runs on the executor that opened the WAL and
//! shares state with `Wal` through `Rc<Shared>`, so nothing here crosses threads.

use std::{
    io,
    path::{Path, PathBuf},
    rc::Rc,
    task::{Poll, Waker},
    time::Instant,
};

use glommio::io::{Directory, DmaFile, OpenOptions};

use super::{
    error::WalError,
    segment::{segment_file_name, SegmentHeader, SEGMENT_FORMAT_VERSION, SEGMENT_HEADER_BYTES},
    Batch, SegmentEntry, Shared,
};

/// The segment currently written. O_DIRECT writes must start at an aligned offset and have an
/// aligned length, so the bytes of the last partial block (`tail`) are kept in memory and
/// written again, followed by the new records and zero padding, by the next group.
///
/// Rewriting a block that holds synced records is safe even if the write tears: the synced
/// bytes are rewritten with identical content, so any mix of old and new sectors holds them.
pub(crate) struct ActiveSegment {
    file: DmaFile,
    path: PathBuf,
    alignment: usize,
    /// Aligned file offset where the next write starts.
    write_offset: u64,
    /// Bytes from `write_offset` to the end of the last record.
    tail: Vec<u8>,
}

impl ActiveSegment {
    /// Creates a segment file (or, with `replace`, rewrites one whose header never reached the
    /// disk), writes and syncs its header, and syncs the directory so the file's name is
    /// durable before any record in it is acknowledged.
    pub(crate) async fn create(
        directory: &Directory,
        dir: &Path,
        header: SegmentHeader,
        fsync: bool,
        replace: bool,
    ) -> Result<ActiveSegment, WalError> {
        let path = dir.join(segment_file_name(header.first_lsn));
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if replace {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        let file = options
            .dma_open(&path)
            .await
            .map_err(|error| WalError::io("create wal segment", &path, error))?;
        let alignment = file.alignment() as usize;
        let header_bytes = header.encode();
        let mut buffer = file.alloc_dma_buffer(align_up(SEGMENT_HEADER_BYTES, alignment));
        buffer.as_bytes_mut().fill(0);
        buffer.as_bytes_mut()[..SEGMENT_HEADER_BYTES].copy_from_slice(&header_bytes);
        let expected = buffer.len();
        let written = file
            .write_at(buffer, 0)
            .await
            .map_err(|error| WalError::io("write wal segment header", &path, error))?;
        if written != expected {
            return Err(WalError::io(
                "write wal segment header",
                &path,
                short_write(written, expected),
            ));
        }
        if fsync {
            file.fdatasync()
                .await
                .map_err(|error| WalError::io("sync wal segment header", &path, error))?;
            directory
                .sync()
                .await
                .map_err(|error| WalError::io("sync wal directory", dir, error))?;
        }
        Ok(ActiveSegment {
            file,
            path,
            alignment,
            write_offset: 0,
            tail: header_bytes.to_vec(),
        })
    }

    /// Reopens the last segment found by recovery for appending after its last valid record.
    /// `data` is the segment's content as scanned (any torn tail is already cut off).
    pub(crate) async fn resume(
        path: &Path,
        data: &[u8],
        data_end: usize,
    ) -> Result<ActiveSegment, WalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(|error| WalError::io("open wal segment for append", path, error))?;
        let alignment = file.alignment() as usize;
        let write_offset = align_down(data_end, alignment);
        Ok(ActiveSegment {
            file,
            path: path.to_owned(),
            alignment,
            write_offset: write_offset as u64,
            tail: data[write_offset..data_end].to_vec(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the segment up to the end of its last record.
    pub(crate) fn data_end(&self) -> u64 {
        self.write_offset + self.tail.len() as u64
    }

    /// Writes `records` right after the last record. Returns the bytes handed to the disk.
    async fn write(&mut self, records: &[u8]) -> io::Result<usize> {
        let total = self.tail.len() + records.len();
        let padded = align_up(total, self.alignment);
        let mut buffer = self.file.alloc_dma_buffer(padded);
        let bytes = buffer.as_bytes_mut();
        bytes[..self.tail.len()].copy_from_slice(&self.tail);
        bytes[self.tail.len()..total].copy_from_slice(records);
        bytes[total..].fill(0);
        let keep_from = align_down(total, self.alignment);
        self.tail.clear();
        self.tail.extend_from_slice(&bytes[keep_from..total]);
        let written = self
            .file
            .write_at(buffer, self.write_offset)
            .await
            .map_err(io::Error::from)?;
        if written != padded {
            return Err(short_write(written, padded));
        }
        self.write_offset += keep_from as u64;
        Ok(padded)
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io::Error::from)
    }

    pub(crate) async fn close(self) {
        if let Err(error) = self.file.close().await {
            // Every byte was already synced; a failing close loses nothing.
            tracing::warn!(path = %self.path.display(), %error, "close wal segment");
        }
    }
}

/// The group-commit loop: take the oldest pending group, rotate if it was planned to start a
/// new segment, write it (group header and frames in one write), fdatasync, then resolve every
/// waiter up to its last LSN. Runs until
/// `close` (after draining what was appended) or the first I/O error, which is fatal.
pub(crate) async fn run(shared: Rc<Shared>, mut segment: ActiveSegment) {
    while let Some(work) = next_work(&shared).await {
        let result = match work {
            Work::Batch(batch) => commit(&shared, &mut segment, &batch)
                .await
                .map(|()| complete(&shared, batch)),
            Work::Reset(lsn) => reset(&shared, &mut segment, lsn).await,
        };
        if let Err(reason) = result {
            fail(&shared, reason);
            break;
        }
    }
    segment.close().await;
}

/// What the writer does next.
enum Work {
    Batch(Batch),
    /// Start a fresh segment at this LSN and delete every older one (`Wal::reset_to`).
    Reset(u64),
}

/// Waits for work; `None` when the WAL is closing with nothing left, or failed. A reset comes
/// before any group: `reset_to` requires an empty queue, so every queued group came after it.
async fn next_work(shared: &Shared) -> Option<Work> {
    std::future::poll_fn(|context| {
        let mut state = shared.state.borrow_mut();
        if state.failure.is_some() {
            return Poll::Ready(None);
        }
        if let Some(lsn) = state.reset_requested.take() {
            state.reset_running = true;
            return Poll::Ready(Some(Work::Reset(lsn)));
        }
        if let Some(mut batch) = state.batches.pop_front() {
            // Taken from the queue, the group can grow no more: its header is final.
            batch.seal();
            return Poll::Ready(Some(Work::Batch(batch)));
        }
        if state.closing {
            return Poll::Ready(None);
        }
        state.writer_waker = Some(context.waker().clone());
        Poll::Pending
    })
    .await
}

async fn commit(shared: &Shared, segment: &mut ActiveSegment, batch: &Batch) -> Result<(), String> {
    let config = &shared.config;
    if batch.rotate_before {
        let header = SegmentHeader {
            format_version: SEGMENT_FORMAT_VERSION,
            origin_node: config.origin_node,
            shard: config.shard,
            first_lsn: batch.first_lsn,
        };
        let directory = shared.directory().map_err(|error| error.to_string())?;
        let next = ActiveSegment::create(&directory, &config.dir, header, config.fsync, false)
            .await
            .map_err(|error| error.to_string())?;
        tracing::debug!(shard_id = config.shard, lsn = batch.first_lsn, path = %next.path().display(), "wal segment rotated");
        let previous = std::mem::replace(segment, next);
        {
            let mut state = shared.state.borrow_mut();
            state.segments.push_back(SegmentEntry {
                first_lsn: batch.first_lsn,
                path: segment.path().to_owned(),
            });
            state.stats.segments_created += 1;
        }
        previous.close().await;
    }

    let write_started = Instant::now();
    let written = segment
        .write(&batch.bytes)
        .await
        .map_err(|error| format!("write wal segment {}: {error}", segment.path().display()))?;
    let write_us = elapsed_us(write_started);
    let sync_us = if config.fsync {
        let sync_started = Instant::now();
        segment.sync().await.map_err(|error| {
            format!(
                "fdatasync wal segment {}: {error}",
                segment.path().display()
            )
        })?;
        Some(elapsed_us(sync_started))
    } else {
        None
    };

    let mut state = shared.state.borrow_mut();
    state.stats.write_bytes += written as u64;
    state.stats.write_latency.record(write_us);
    if let Some(sync_us) = sync_us {
        state.stats.syncs += 1;
        state.stats.sync_latency.record(sync_us);
    }
    Ok(())
}

/// Marks a written (and synced) group durable, shows it to the durable observer, and wakes
/// its waiters.
fn complete(shared: &Shared, mut batch: Batch) {
    let ready: Vec<Waker> = {
        let mut state = shared.state.borrow_mut();
        debug_assert_eq!(
            state.durable_lsn + 1,
            batch.first_lsn,
            "groups must complete in lsn order"
        );
        state.durable_lsn = batch.last_lsn;
        state.queue_bytes -= batch.bytes.len();
        state.stats.groups += 1;
        state.stats.group_records += batch.records;
        let later = state.waiters.split_off(&(batch.last_lsn + 1));
        let ready = std::mem::replace(&mut state.waiters, later);
        ready.into_values().collect()
    };
    // Cloned out of its cell so the observer may replace itself or call into the WAL.
    let observer = shared.observer.borrow().clone();
    if let Some(observer) = observer {
        observer(&batch.bytes, batch.first_lsn, batch.last_lsn);
    }
    {
        let mut state = shared.state.borrow_mut();
        if state.spare_buffers.len() < 2
            && batch.bytes.capacity() <= 2 * shared.config.write_bytes_max
        {
            batch.bytes.clear();
            state.spare_buffers.push(std::mem::take(&mut batch.bytes));
        }
    }
    ready.into_iter().for_each(Waker::wake);
}

/// Carries out `Wal::reset_to`: creates and syncs a segment starting at `lsn` (and syncs the
/// directory), switches to it, then deletes every older segment and syncs the directory.
/// The order keeps every crash state openable with `replay_from_lsn >= lsn`: the fresh
/// segment exists before any old one goes, and the LSNs missing from whatever old segments
/// survive are all below `lsn`.
async fn reset(shared: &Shared, segment: &mut ActiveSegment, lsn: u64) -> Result<(), String> {
    let config = &shared.config;
    let directory = shared.directory().map_err(|error| error.to_string())?;
    let header = SegmentHeader {
        format_version: SEGMENT_FORMAT_VERSION,
        origin_node: config.origin_node,
        shard: config.shard,
        first_lsn: lsn,
    };
    let next = ActiveSegment::create(&directory, &config.dir, header, config.fsync, false)
        .await
        .map_err(|error| error.to_string())?;
    let previous = std::mem::replace(segment, next);
    previous.close().await;
    let old: Vec<SegmentEntry> = {
        let mut state = shared.state.borrow_mut();
        let old = state.segments.iter().cloned().collect();
        state.segments.push_back(SegmentEntry {
            first_lsn: lsn,
            path: segment.path().to_owned(),
        });
        state.stats.segments_created += 1;
        old
    };
    for victim in old {
        match glommio::io::remove(&victim.path)
            .await
            .map_err(io::Error::from)
        {
            Ok(()) => {}
            // A concurrent release_below got there first.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(format!(
                    "delete wal segment {} in reset: {error}",
                    victim.path.display()
                ))
            }
        }
        let mut state = shared.state.borrow_mut();
        if state
            .segments
            .front()
            .is_some_and(|entry| entry.first_lsn == victim.first_lsn)
        {
            state.segments.pop_front();
            state.stats.segments_released += 1;
        }
    }
    if config.fsync {
        directory
            .sync()
            .await
            .map_err(|error| format!("sync wal directory {}: {error}", config.dir.display()))?;
    }
    tracing::info!(
        shard_id = config.shard,
        origin_node = config.origin_node,
        lsn,
        "wal reset"
    );
    let waker = {
        let mut state = shared.state.borrow_mut();
        state.durable_lsn = lsn - 1;
        state.reset_running = false;
        state.reset_waker.take()
    };
    if let Some(waker) = waker {
        waker.wake();
    }
    Ok(())
}

/// Fails the WAL for good: after a failed write or fdatasync the state of the file is
/// unknown (the kernel may have dropped dirty pages), so nothing may be acknowledged again.
fn fail(shared: &Shared, reason: String) {
    tracing::error!(shard_id = shared.config.shard, %reason, "wal failed; refusing all further appends");
    let ready: Vec<Waker> = {
        let mut state = shared.state.borrow_mut();
        state.failure = Some(reason);
        state.batches.clear();
        state.queue_bytes = 0;
        state.stats.failed = true;
        let mut ready: Vec<Waker> = std::mem::take(&mut state.waiters).into_values().collect();
        ready.extend(state.reset_waker.take());
        ready
    };
    ready.into_iter().for_each(Waker::wake);
}

fn elapsed_us(started: Instant) -> u64 {
    started.elapsed().as_micros().try_into().unwrap_or(u64::MAX)
}

fn short_write(written: usize, expected: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::WriteZero,
        format!("short write: {written} of {expected} bytes"),
    )
}

pub(crate) fn align_up(value: usize, alignment: usize) -> usize {
    debug_assert!(alignment.is_power_of_two());
    (value + alignment - 1) & !(alignment - 1)
}

pub(crate) fn align_down(value: usize, alignment: usize) -> usize {
    debug_assert!(alignment.is_power_of_two());
    value & !(alignment - 1)
}
