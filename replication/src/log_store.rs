//! The Raft log and vote, persisted in one append-only file of checksummed records.
//!
//! Format of `raft-log`: a sequence of shale-io frames `[len u32 LE][crc32 u32 LE][payload]`
//! (`shale_io::frame`), where the payload is `[format version u8][serde_json of a LogRecord]`, `len` counts the payload bytes and
//! the crc covers them. Each record is one operation (an entry, a truncation, a purge, a vote, the
//! committed id); opening the store replays them into memory. A torn tail (a partial or damaged
//! record with no valid record anywhere after it, or zeroes where records would follow) is
//! truncated; any other damage, including a bad record followed by valid ones, refuses to open
//! with the file and byte offset.
//!
//! Threads: the store lives on the control thread; its file writes and fdatasyncs run on a
//! dedicated writer thread (`shale-raft-log`) fed through a bounded queue, so the control thread
//! never waits for the disk and concurrent appends share one fdatasync (group commit). The queue
//! keeps operations in order, which gives openraft the serialized write order it requires.
//! When purged and truncated records outweigh the live ones, the file is rewritten (temporary,
//! fsync, rename, directory fsync) by the same writer thread, in order with the other writes.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::fs::File;
use std::io;
use std::io::Write;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::AnyError;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::StorageIOError;
use serde::Deserialize;
use serde::Serialize;
use shale_io::frame;
use shale_io::frame::FrameLimits;
use shale_io::frame::Reject;
use shale_io::frame::TailRule;

use crate::durable;
use crate::raft_types::Entry;
use crate::raft_types::LogId;
use crate::raft_types::StorageError;
use crate::raft_types::TypeConfig;
use crate::raft_types::Vote;

/// Name of the log file inside the manifest directory.
pub const LOG_FILE_NAME: &str = "raft-log";

/// Version byte at the start of every record payload.
pub const LOG_FORMAT_VERSION: u8 = 1;

/// Largest record payload written or accepted. A manifest command is bounded far below this.
pub const RECORD_BYTES_MAX: usize = 64 << 20;

/// Frame bounds: a payload is at least its version byte.
const FRAME_LIMITS: FrameLimits = FrameLimits::new(1, RECORD_BYTES_MAX);

/// Operations queued for the writer thread before the log store waits.
const WRITE_QUEUE_DEPTH_MAX: usize = 4096;

/// Operations the writer thread takes from its queue per fdatasync.
const WRITE_GROUP_OPS_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("raft log {path} is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("encode raft log record: {0}")]
    Encode(String),
    #[error("raft log record of {bytes} bytes exceeds the limit of {RECORD_BYTES_MAX}")]
    RecordTooLarge { bytes: usize },
    #[error("append entry {index} after {last:?}: the log would have a hole or overlap")]
    NotContiguous { index: u64, last: Option<u64> },
    #[error("raft log writer failed: {0}")]
    WriterFailed(String),
}

/// One operation in the log file.
#[derive(Debug, Serialize, Deserialize)]
enum LogRecord {
    Entry(Entry),
    Truncate { since: u64 },
    Purge { upto: LogId },
    Vote(Vote),
    Committed(Option<LogId>),
}

/// The replayed log, shared with readers (replication tasks).
#[derive(Debug, Default)]
struct LogContents {
    entries: BTreeMap<u64, Entry>,
    /// Frame bytes of each live entry in the file, to decide when a rewrite pays off.
    entry_frame_bytes: BTreeMap<u64, u64>,
    live_entry_bytes: u64,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

impl LogContents {
    fn last_index(&self) -> Option<u64> {
        self.entries
            .last_key_value()
            .map(|(index, _)| *index)
            .or(self.last_purged.map(|id| id.index))
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, entry)| entry.log_id)
            .or(self.last_purged)
    }

    /// Applies one record; the same code runs live and at replay, so both agree.
    fn apply(&mut self, record: LogRecord, frame_bytes: u64) -> Result<(), LogStoreError> {
        match record {
            LogRecord::Entry(entry) => {
                // No hole, ever. Right after a purge an entry at or below the purge point is
                // tolerated: openraft's storage suite does that, and it leaves no hole.
                let index = entry.log_id.index;
                let contiguous = match (self.entries.last_key_value(), self.last_purged) {
                    (Some((last, _)), _) => index == last + 1,
                    (None, Some(purged)) => index <= purged.index + 1,
                    (None, None) => true,
                };
                if !contiguous {
                    return Err(LogStoreError::NotContiguous {
                        index,
                        last: self.last_index(),
                    });
                }
                self.entries.insert(index, entry);
                self.entry_frame_bytes.insert(index, frame_bytes);
                self.live_entry_bytes += frame_bytes;
            }
            LogRecord::Truncate { since } => {
                self.entries.split_off(&since);
                let removed = self.entry_frame_bytes.split_off(&since);
                self.live_entry_bytes -= removed.values().sum::<u64>();
            }
            LogRecord::Purge { upto } => {
                let kept = self.entries.split_off(&(upto.index + 1));
                self.entries = kept;
                let kept = self.entry_frame_bytes.split_off(&(upto.index + 1));
                let removed = std::mem::replace(&mut self.entry_frame_bytes, kept);
                self.live_entry_bytes -= removed.values().sum::<u64>();
                if self.last_purged < Some(upto) {
                    self.last_purged = Some(upto);
                }
            }
            LogRecord::Vote(vote) => self.vote = Some(vote),
            LogRecord::Committed(committed) => self.committed = committed,
        }
        Ok(())
    }
}

fn encode_frame(record: &LogRecord) -> Result<Vec<u8>, LogStoreError> {
    let mut frame = Vec::new();
    let start = frame::begin(&mut frame);
    frame.push(LOG_FORMAT_VERSION);
    serde_json::to_writer(&mut frame, record).map_err(|e| LogStoreError::Encode(e.to_string()))?;
    frame::finish(&mut frame, start, FRAME_LIMITS)
        .map_err(|error| LogStoreError::RecordTooLarge { bytes: error.bytes })?;
    Ok(frame)
}

/// Decodes a checksummed payload; an error here is never a torn write.
fn decode_record(payload: &[u8]) -> Result<LogRecord, String> {
    if payload[0] != LOG_FORMAT_VERSION {
        return Err(format!("unknown format version {}", payload[0]));
    }
    serde_json::from_slice(&payload[1..]).map_err(|e| format!("decode record: {e}"))
}

/// Replays `bytes` (the whole file) and returns the contents and the length of the valid prefix.
///
/// A record that cannot be read (cut short, a length running past the end of the file, a bad
/// checksum, zeros followed by data) is the torn tail of the last write only if no valid record
/// follows it anywhere in the file (`TailRule::NothingValidFollows`): the writer appends in
/// order, so a valid record after it means the bad one was written and synced before, and may
/// hold committed entries. That refuses to open, naming the offset. A record whose checksum
/// holds but whose version or content is wrong is never a torn write and refuses too.
fn replay(bytes: &[u8], path: &Path) -> Result<(LogContents, usize), LogStoreError> {
    let corrupt = |offset: usize, reason: String| LogStoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut contents = LogContents::default();
    let stop = frame::scan(bytes, 0, FRAME_LIMITS, |frame| {
        let record = decode_record(frame.payload)
            .map_err(|reason| Reject::Refuse(corrupt(frame.offset, reason)))?;
        contents
            .apply(record, frame.frame_bytes() as u64)
            .map_err(|e| Reject::Refuse(corrupt(frame.offset, e.to_string())))
    })?;
    if let Some(fault) = &stop.fault {
        if !frame::is_torn_tail(bytes, fault, TailRule::NothingValidFollows, |position| {
            is_valid_record_at(bytes, position)
        }) {
            return Err(corrupt(
                fault.offset(),
                format!("{fault}, and valid records follow (not a torn tail)"),
            ));
        }
    }
    Ok((contents, stop.valid_end))
}

/// Whether a record valid in every respect (length, checksum, version, decoding) starts at
/// `position`. Every payload is a JSON object after the version byte, which rules out almost
/// every position before the checksum is computed.
fn is_valid_record_at(bytes: &[u8], position: usize) -> bool {
    frame::frame_at(bytes, position, FRAME_LIMITS, &[LOG_FORMAT_VERSION, b'{'])
        .is_some_and(|frame| decode_record(frame.payload).is_ok())
}

/// Something waiting for a queued write to become durable.
enum Done {
    Nothing,
    Flushed(LogFlushed<TypeConfig>),
    Reply(flume::Sender<io::Result<()>>),
}

impl Done {
    fn complete(self, result: &Result<(), String>) {
        let result = result.clone().map_err(io::Error::other);
        match self {
            Done::Nothing => {}
            Done::Flushed(callback) => callback.log_io_completed(result),
            Done::Reply(sender) => {
                let _ = sender.try_send(result);
            }
        }
    }
}

enum WriteOp {
    /// Append one frame to the file.
    Append { frame: Vec<u8>, done: Done },
    /// Replace the whole file with `image` (a sequence of frames).
    Replace { image: Vec<u8>, done: Done },
}

/// The writer thread: owns the file handle, writes in queue order, one fdatasync per group.
struct Writer {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Set by the first I/O error; every later operation fails with it (an fsync error is fatal).
    failed: Option<String>,
}

impl Writer {
    fn run(mut self, queue: flume::Receiver<WriteOp>) {
        while let Ok(first) = queue.recv() {
            let mut buffer = Vec::new();
            let mut waiting = Vec::new();
            for op in std::iter::once(first).chain(queue.try_iter().take(WRITE_GROUP_OPS_MAX - 1)) {
                match op {
                    WriteOp::Append { frame, done } => {
                        buffer.extend_from_slice(&frame);
                        waiting.push(done);
                    }
                    WriteOp::Replace { image, done } => {
                        self.sync(&buffer, std::mem::take(&mut waiting));
                        buffer.clear();
                        let result = self.replace(&image);
                        done.complete(&result);
                    }
                }
            }
            self.sync(&buffer, waiting);
        }
        // Clean shutdown: leave nothing unsynced behind.
        if self.failed.is_none() {
            if let Err(error) = self.file.sync_data() {
                tracing::error!(path = %self.path.display(), %error, "sync raft log at shutdown");
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        match &self.failed {
            Some(error) => Err(format!("an earlier write failed: {error}")),
            None => Ok(()),
        }
    }

    fn fail(&mut self, action: &str, error: io::Error) -> Result<(), String> {
        let message = format!("{action} {}: {error}", self.path.display());
        tracing::error!(path = %self.path.display(), error = %error, "raft log write failed; the manifest stops");
        self.failed = Some(message.clone());
        Err(message)
    }

    /// Writes `buffer`, fdatasyncs if anything waits for durability, and then completes
    /// everything in `waiting`. Records nobody waits for (committed ids, purges) become durable
    /// with the next synced write.
    fn sync(&mut self, buffer: &[u8], waiting: Vec<Done>) {
        if waiting.is_empty() && buffer.is_empty() {
            return;
        }
        let durable = waiting.iter().any(|done| !matches!(done, Done::Nothing));
        let mut result = self.check();
        if result.is_ok() {
            if let Err(error) = self.file.write_all(buffer) {
                result = self.fail("write raft log", error);
            } else if durable {
                if let Err(error) = self.file.sync_data() {
                    result = self.fail("sync raft log", error);
                }
            }
        }
        for done in waiting {
            done.complete(&result);
        }
    }

    fn replace(&mut self, image: &[u8]) -> Result<(), String> {
        self.check()?;
        if let Err(error) = durable::replace_file(&self.dir, LOG_FILE_NAME, image) {
            return self.fail("rewrite raft log", error);
        }
        match File::options().append(true).open(&self.path) {
            Ok(file) => {
                self.file = file;
                Ok(())
            }
            Err(error) => self.fail("reopen raft log", error),
        }
    }
}

struct WriterHandle {
    queue: flume::Sender<WriteOp>,
    thread: JoinHandle<()>,
}

/// Openraft's log storage for the manifest group. Owned by the Raft core on the control thread.
pub struct LogStore {
    contents: Arc<Mutex<LogContents>>,
    /// `None` only while dropping.
    writer: Option<WriterHandle>,
    path: PathBuf,
    /// Bytes in the file once every queued write is done.
    file_bytes: u64,
    rewrite_garbage_bytes_min: u64,
}

/// A reader of the log for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    contents: Arc<Mutex<LogContents>>,
}

fn lock(contents: &Mutex<LogContents>) -> std::sync::MutexGuard<'_, LogContents> {
    // A panic while holding the lock is a bug that already stopped Raft; the data is still valid.
    contents.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, truncating a torn tail. Blocking: reads the whole file.
    /// The file is rewritten once dead records exceed both `rewrite_garbage_bytes_min` and the
    /// live records.
    pub fn open(dir: &Path, rewrite_garbage_bytes_min: u64) -> Result<LogStore, LogStoreError> {
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| LogStoreError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io_error("create manifest directory", dir))?;
        durable::remove_temporaries(dir).map_err(io_error("remove temporaries in", dir))?;
        let path = dir.join(LOG_FILE_NAME);
        if !path.exists() {
            File::create(&path)
                .and_then(|file| file.sync_all())
                .map_err(io_error("create raft log", &path))?;
            durable::sync_directory(dir).map_err(io_error("sync directory", dir))?;
        }
        let bytes = fs::read(&path).map_err(io_error("read raft log", &path))?;
        let (contents, valid_bytes) = replay(&bytes, &path)?;
        let file = File::options()
            .append(true)
            .open(&path)
            .map_err(io_error("open raft log", &path))?;
        if valid_bytes < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                offset = valid_bytes,
                torn_bytes = bytes.len() - valid_bytes,
                "truncating torn tail of raft log"
            );
            file.set_len(valid_bytes as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_error("truncate raft log", &path))?;
        }
        tracing::info!(
            path = %path.display(),
            entries = contents.entries.len(),
            last_log_index = ?contents.last_index(),
            "opened raft log"
        );

        let (queue, receiver) = flume::bounded(WRITE_QUEUE_DEPTH_MAX);
        let writer = Writer {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file,
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("shale-raft-log".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(io_error("spawn writer thread for", &path))?;
        Ok(LogStore {
            contents: Arc::new(Mutex::new(contents)),
            writer: Some(WriterHandle { queue, thread }),
            path,
            file_bytes: valid_bytes as u64,
            rewrite_garbage_bytes_min,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `record` in memory and queues it for the file. Returns once it is queued.
    async fn write(&mut self, record: LogRecord, done: Done) -> Result<(), LogStoreError> {
        let frame = encode_frame(&record)?;
        lock(&self.contents).apply(record, frame.len() as u64)?;
        self.file_bytes += frame.len() as u64;
        self.send(WriteOp::Append { frame, done }).await
    }

    async fn send(&self, op: WriteOp) -> Result<(), LogStoreError> {
        let Some(writer) = &self.writer else {
            unreachable!("log store used while dropping");
        };
        writer
            .queue
            .send_async(op)
            .await
            .map_err(|_| LogStoreError::WriterFailed("writer thread stopped".to_owned()))
    }

    /// Like [`Self::write`], and waits until the record is durable.
    async fn write_durable(&mut self, record: LogRecord) -> Result<(), LogStoreError> {
        let (sender, receiver) = flume::bounded(1);
        self.write(record, Done::Reply(sender)).await?;
        match receiver.recv_async().await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(LogStoreError::WriterFailed(error.to_string())),
            Err(_) => Err(LogStoreError::WriterFailed(
                "writer thread stopped".to_owned(),
            )),
        }
    }

    /// Rewrites the file with only the live records when the dead ones outweigh them.
    async fn maybe_rewrite(&mut self) -> Result<(), LogStoreError> {
        let image = {
            let contents = lock(&self.contents);
            let garbage_bytes = self.file_bytes.saturating_sub(contents.live_entry_bytes);
            if garbage_bytes < self.rewrite_garbage_bytes_min
                || garbage_bytes < contents.live_entry_bytes
            {
                return Ok(());
            }
            let mut image = Vec::new();
            if let Some(vote) = contents.vote {
                image.extend(encode_frame(&LogRecord::Vote(vote))?);
            }
            if let Some(upto) = contents.last_purged {
                image.extend(encode_frame(&LogRecord::Purge { upto })?);
            }
            if contents.committed.is_some() {
                image.extend(encode_frame(&LogRecord::Committed(contents.committed))?);
            }
            for entry in contents.entries.values() {
                // Borrowing encode would avoid this clone; rewrites are rare.
                image.extend(encode_frame(&LogRecord::Entry(entry.clone()))?);
            }
            tracing::info!(
                path = %self.path.display(),
                file_bytes = self.file_bytes,
                image_bytes = image.len(),
                entries = contents.entries.len(),
                "rewriting raft log"
            );
            image
        };
        self.file_bytes = image.len() as u64;
        self.send(WriteOp::Replace {
            image,
            done: Done::Nothing,
        })
        .await
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Wait for queued writes so that a store reopened on the same directory (a restart in the
        // same process) never races the previous writer.
        if let Some(WriterHandle { queue, thread }) = self.writer.take() {
            drop(queue);
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "raft log writer thread panicked");
            }
        }
    }
}

fn read_entries<RB: RangeBounds<u64>>(contents: &Mutex<LogContents>, range: RB) -> Vec<Entry> {
    lock(contents)
        .entries
        .range(range)
        .map(|(_, entry)| entry.clone())
        .collect()
}

fn write_error(error: LogStoreError) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&error)).into()
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_entries(&self.contents, range))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(read_entries(&self.contents, range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let contents = lock(&self.contents);
        Ok(LogState {
            last_purged_log_id: contents.last_purged,
            last_log_id: contents.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            contents: self.contents.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_durable(LogRecord::Vote(*vote))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(lock(&self.contents).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not waited for: a lost committed id only means re-applying fewer entries at start-up;
        // the leader commits the rest again. It becomes durable with the next synced write.
        self.write(LogRecord::Committed(committed), Done::Nothing)
            .await
            .map_err(write_error)?;
        self.maybe_rewrite().await.map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.contents).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.pop() else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        for entry in entries {
            self.write(LogRecord::Entry(entry), Done::Nothing)
                .await
                .map_err(write_error)?;
        }
        // The callback rides on the last entry: the writer completes it after the fdatasync that
        // covers every entry of this call.
        self.write(LogRecord::Entry(last), Done::Flushed(callback))
            .await
            .map_err(write_error)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.write_durable(LogRecord::Truncate {
            since: log_id.index,
        })
        .await
        .map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Not waited for: purged entries that come back after a crash are covered by the snapshot
        // and purged again.
        self.write(LogRecord::Purge { upto: log_id }, Done::Nothing)
            .await
            .map_err(write_error)?;
        self.maybe_rewrite().await.map_err(write_error)
    }
}

/// Rewrites the log at `path` without its committed-id records, as if the process was killed
/// before any of them reached the disk. Test support for start-up recovery.
#[cfg(test)]
pub(crate) fn drop_committed_records(path: &Path) {
    let bytes = fs::read(path).expect("read raft log");
    let mut kept = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let frame::Decoded::Frame(frame) = frame::decode(&bytes, offset, FRAME_LIMITS) else {
            panic!("raft log frame at {offset} does not decode");
        };
        if !matches!(decode_record(frame.payload), Ok(LogRecord::Committed(_))) {
            kept.extend_from_slice(&bytes[offset..frame.end()]);
        }
        offset = frame.end();
    }
    fs::write(path, kept).expect("write raft log");
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;
    use openraft::EntryPayload;

    use super::*;
    use crate::manifest::tests::file;
    use crate::manifest::ManifestCommand;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(ManifestCommand::Register {
                files: vec![file(&format!("f{index}"), index, index)],
            }),
        }
    }

    /// Runs `f` against a fresh store on `dir` in a tokio runtime, then drops the store.
    fn with_store<T>(dir: &Path, f: impl AsyncFnOnce(&mut LogStore) -> T) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("build runtime");
        runtime.block_on(async {
            let mut store = LogStore::open(dir, 1 << 20).expect("open log store");
            f(&mut store).await
        })
    }

    /// Appends `entries` through the v2 API and waits until they are durable.
    async fn append_durable(store: &mut LogStore, entries: Vec<Entry>) {
        use openraft::storage::RaftLogStorageExt;
        store
            .blocking_append(entries)
            .await
            .expect("append entries");
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store
            .try_get_log_entries(..)
            .await
            .expect("read entries")
            .iter()
            .map(|entry| entry.log_id.index)
            .collect()
    }

    #[test]
    fn records_survive_reopen() {
        // Everything acknowledged as durable (entries, vote, purge, truncate) must be replayed.
        let dir = tempfile::tempdir().expect("temp dir");
        with_store(dir.path(), async |store| {
            append_durable(store, (0..10).map(entry).collect()).await;
            store.save_vote(&Vote::new(3, 1)).await.expect("save vote");
            store.purge(log_id(1, 2)).await.expect("purge");
            store.truncate(log_id(1, 8)).await.expect("truncate");
            store
                .save_committed(Some(log_id(1, 7)))
                .await
                .expect("save committed");
            append_durable(store, vec![entry(8)]).await;
        });
        with_store(dir.path(), async |store| {
            assert_eq!(indexes(store).await, vec![3, 4, 5, 6, 7, 8]);
            assert_eq!(
                store.read_vote().await.expect("vote"),
                Some(Vote::new(3, 1))
            );
            assert_eq!(
                store.read_committed().await.expect("committed"),
                Some(log_id(1, 7))
            );
            let state = store.get_log_state().await.expect("log state");
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
            assert_eq!(state.last_log_id, Some(log_id(1, 8)));
        });
    }

    #[test]
    fn torn_tail_is_truncated() {
        // A crash mid-write leaves a partial last record (or zeroes, or a damaged record before a
        // partial one when the pages of the last write persisted out of order); it was never
        // acknowledged, so it is dropped and the log opens with everything before it.
        for tail in [
            TornTail::PartialRecord,
            TornTail::PartialHeader,
            TornTail::Zeroes,
            TornTail::DamagedLastRecord,
            TornTail::DamagedRecordBeforePartialRecord,
        ] {
            let dir = tempfile::tempdir().expect("temp dir");
            with_store(dir.path(), async |store| {
                append_durable(store, (0..3).map(entry).collect()).await;
            });
            let path = dir.path().join(LOG_FILE_NAME);
            let good_bytes = fs::read(&path).expect("read log");
            let mut bytes = good_bytes.clone();
            let frame = encode_frame(&LogRecord::Entry(entry(3))).expect("encode");
            match tail {
                TornTail::PartialRecord => bytes.extend_from_slice(&frame[..frame.len() / 2]),
                TornTail::PartialHeader => bytes.extend_from_slice(&frame[..5]),
                TornTail::Zeroes => bytes.extend_from_slice(&[0; 4096]),
                TornTail::DamagedLastRecord => {
                    let mut damaged = frame.clone();
                    let middle = damaged.len() / 2;
                    damaged[middle..].fill(0);
                    bytes.extend_from_slice(&damaged);
                    bytes.extend_from_slice(&[0; 512]);
                }
                TornTail::DamagedRecordBeforePartialRecord => {
                    let mut damaged = frame.clone();
                    let middle = damaged.len() / 2;
                    damaged[middle..middle + 16].fill(0);
                    bytes.extend_from_slice(&damaged);
                    let next = encode_frame(&LogRecord::Entry(entry(4))).expect("encode");
                    bytes.extend_from_slice(&next[..next.len() - 7]);
                }
            }
            fs::write(&path, &bytes).expect("write torn log");

            with_store(dir.path(), async |store| {
                assert_eq!(indexes(store).await, vec![0, 1, 2], "{tail:?}");
                // The store appends cleanly after the truncated point.
                append_durable(store, vec![entry(3)]).await;
            });
            assert_eq!(
                fs::metadata(&path).expect("stat").len(),
                (good_bytes.len() + frame.len()) as u64
            );
            with_store(dir.path(), async |store| {
                assert_eq!(indexes(store).await, vec![0, 1, 2, 3], "{tail:?}");
            });
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum TornTail {
        PartialRecord,
        PartialHeader,
        Zeroes,
        DamagedLastRecord,
        DamagedRecordBeforePartialRecord,
    }

    #[test]
    fn corruption_before_the_tail_is_refused() {
        // Damage followed by valid records is not a torn write: silently dropping acknowledged
        // entries would lose committed manifest changes, so opening must fail and say where.
        let dir = tempfile::tempdir().expect("temp dir");
        with_store(dir.path(), async |store| {
            append_durable(store, (0..3).map(entry).collect()).await;
        });
        let path = dir.path().join(LOG_FILE_NAME);
        let mut bytes = fs::read(&path).expect("read log");
        let first_frame_bytes = encode_frame(&LogRecord::Entry(entry(0)))
            .expect("encode")
            .len();
        bytes[first_frame_bytes + frame::FRAME_HEADER_BYTES + 10] ^= 0x40;
        fs::write(&path, &bytes).expect("write corrupt log");

        let error = LogStore::open(dir.path(), 1 << 20)
            .err()
            .expect("corrupt log must not open");
        match &error {
            LogStoreError::Corrupt {
                path: p, offset, ..
            } => {
                assert_eq!(p, &path);
                assert_eq!(*offset, first_frame_bytes as u64);
            }
            other => panic!("expected corruption error, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("raft-log") && message.contains("offset"),
            "{message}"
        );
    }

    #[test]
    fn length_past_the_end_before_valid_records_is_refused() {
        // A damaged length field that points past the end of the file looks like a cut-short
        // last record, but the valid records after it show it was written and synced before
        // them: truncating there would drop committed entries, so opening must fail and say where.
        let dir = tempfile::tempdir().expect("temp dir");
        with_store(dir.path(), async |store| {
            append_durable(store, (0..3).map(entry).collect()).await;
            append_durable(store, (3..5).map(entry).collect()).await;
        });
        let path = dir.path().join(LOG_FILE_NAME);
        let mut bytes = fs::read(&path).expect("read log");
        let first_frame_bytes = encode_frame(&LogRecord::Entry(entry(0)))
            .expect("encode")
            .len();
        let past_the_end = (bytes.len() as u32).to_le_bytes();
        bytes[first_frame_bytes..first_frame_bytes + 4].copy_from_slice(&past_the_end);
        fs::write(&path, &bytes).expect("write corrupt log");

        let error = LogStore::open(dir.path(), 1 << 20)
            .err()
            .expect("corrupt log must not open");
        match &error {
            LogStoreError::Corrupt {
                path: p,
                offset,
                reason,
            } => {
                assert_eq!(p, &path);
                assert_eq!(*offset, first_frame_bytes as u64);
                assert!(reason.contains("past the end"), "{reason}");
            }
            other => panic!("expected corruption error, got {other}"),
        }
        // Nothing was truncated: the evidence is left for the operator.
        assert_eq!(fs::read(&path).expect("read log"), bytes);
    }

    #[test]
    fn purged_garbage_triggers_a_rewrite() {
        // Without rewrites the file grows forever; after one, the store must reopen to the same
        // state from the smaller file.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(LOG_FILE_NAME);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("build runtime");
        runtime.block_on(async {
            let mut store = LogStore::open(dir.path(), 4096).expect("open");
            append_durable(&mut store, (0..100).map(entry).collect()).await;
            store.save_vote(&Vote::new(2, 1)).await.expect("vote");
            let before = fs::metadata(&path).expect("stat").len();
            store.purge(log_id(1, 95)).await.expect("purge");
            // The rewrite is queued behind the purge; a durable write after it waits for both.
            store.save_vote(&Vote::new(2, 1)).await.expect("vote");
            let after = fs::metadata(&path).expect("stat").len();
            assert!(
                after < before / 5,
                "file did not shrink: {before} -> {after}"
            );
        });
        with_store(dir.path(), async |store| {
            assert_eq!(indexes(store).await, vec![96, 97, 98, 99]);
            let state = store.get_log_state().await.expect("log state");
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 95)));
            assert_eq!(
                store.read_vote().await.expect("vote"),
                Some(Vote::new(2, 1))
            );
            append_durable(store, vec![entry(100)]).await;
        });
        with_store(dir.path(), async |store| {
            assert_eq!(indexes(store).await, vec![96, 97, 98, 99, 100]);
        });
    }

    #[test]
    fn appending_a_hole_is_refused() {
        // A hole in the log would break Raft's log matching; it must fail loudly, not persist.
        let dir = tempfile::tempdir().expect("temp dir");
        with_store(dir.path(), async |store| {
            append_durable(store, vec![entry(0)]).await;
            let error = store
                .write(LogRecord::Entry(entry(5)), Done::Nothing)
                .await
                .expect_err("hole");
            assert!(matches!(error, LogStoreError::NotContiguous { .. }));
        });
    }

    #[test]
    fn stored_sample_decodes() {
        // Compatibility: a vote record written by format version 1 must keep decoding.
        let sample = hex_to_bytes(VOTE_RECORD_V1_HEX);
        let (contents, valid) = replay(&sample, Path::new("sample")).expect("replay sample");
        assert_eq!(valid, sample.len());
        assert_eq!(contents.vote, Some(Vote::new_committed(7, 3)));
    }

    /// `{"Vote":{"leader_id":{"term":7,"node_id":3},"committed":true}}` framed by format version 1.
    const VOTE_RECORD_V1_HEX: &str =
        "3f000000810a69f7017b22566f7465223a7b226c65616465725f6964223a7b22\
        7465726d223a372c226e6f64655f6964223a337d2c22636f6d6d6974746564223a747275657d7d";

    fn hex_to_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }
}
