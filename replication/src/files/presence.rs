//! The durable presence index: which files this node holds, verified against their blake3, so
//! that a restart knows what is present without re-hashing every file.
//!
//! Format of `_system/presence/presence-log`: shale-io frames `[len u32 LE][crc32 u32 LE][payload]`
//! (`shale_io::frame`, as the Raft log and the WAL), payload `[format version u8][serde_json of a
//! PresenceRecord]`. Replaying the records in order rebuilds the index. A torn tail (a partial
//! or damaged last record followed only by zeroes, or zeroes: `TailRule::ZeroesFollow`) is cut
//! off at open; damage before the tail refuses to open. When dead records outweigh the live
//! ones the log is rewritten as one record per entry.
//!
//! Removing a file is two records around the unlink: `Deleting` (the file no longer counts as
//! present, and a restart finishes the removal), then the unlink and directory sync, then
//! `Remove`. So a crash at any point neither counts a vanished file as present nor forgets a
//! file that is still on disk.
//!
//! Threads: owned by the replicator on the control thread. Reads are from memory; every write is
//! an append plus fdatasync on the `shale-fetch` sink thread, and the in-memory index changes only
//! after the write is durable, so it never claims more than a restart would find.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;
use shale_io::frame;
use shale_io::frame::FrameLimits;
use shale_io::frame::Reject;
use shale_io::frame::TailRule;
use shale_io::sink::FileSink;
use shale_io::sink::SinkError;

use crate::files::holdings::Damage;

/// Name of the log inside the presence directory.
pub const PRESENCE_LOG_NAME: &str = "presence-log";

/// Version byte at the start of every record payload.
pub const PRESENCE_FORMAT_VERSION: u8 = 1;

/// Largest record payload accepted; an entry is a path and two numbers.
const RECORD_BYTES_MAX: usize = 64 << 10;

/// Frame bounds: a payload is at least its version byte.
const FRAME_LIMITS: FrameLimits = FrameLimits::new(1, RECORD_BYTES_MAX);

/// Below this many log bytes a rewrite is not worth it.
const COMPACT_BYTES_MIN: u64 = 1 << 20;

/// One verified local file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// Relative to the data directory, as in the manifest.
    pub path: String,
    pub size_bytes: u64,
    /// 64 lowercase hex digits, as in the manifest.
    pub blake3_hex: String,
    /// Wall-clock time of the verification, milliseconds since the Unix epoch.
    pub verified_at_ms: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum PresenceRecord {
    Insert(PresenceEntry),
    Remove {
        path: String,
    },
    /// The file is being removed from disk: not present any more, but not gone for sure.
    Deleting {
        path: String,
    },
    /// The local copy was found damaged and set aside: not present, and to be repaired. Kept
    /// across restarts so queries keep waiting for the repair instead of skipping the file.
    Damaged(Damage),
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("presence log {path} is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("encode presence record: {0}")]
    Encode(String),
    #[error("write presence log: {0}")]
    Sink(#[from] SinkError),
}

/// The index. See the module documentation for the format and threads.
#[derive(Debug)]
pub struct PresenceIndex {
    log_path: PathBuf,
    entries: BTreeMap<String, PresenceEntry>,
    /// Paths whose removal from disk was started but is not known to be finished.
    deleting: BTreeSet<String>,
    /// Paths found damaged and not repaired yet.
    damaged: BTreeMap<String, Damage>,
    /// Bytes in the log file, and the frame bytes of each live entry's latest insert.
    log_bytes: u64,
    live_bytes: BTreeMap<String, u64>,
    live_bytes_total: u64,
}

impl PresenceIndex {
    /// Opens (or creates) the index in `dir`, typically `<data dir>/_system/presence`. Blocks on
    /// the disk: call it at start-up, before the control thread serves anything.
    pub fn open(dir: &Path) -> Result<PresenceIndex, PresenceError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| PresenceError::Io {
                action,
                path,
                source,
            }
        };
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            // Make the new directory's entry durable; the log's own appends sync the file.
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)
                    .and_then(|parent| parent.sync_all())
                    .map_err(io("sync", parent))?;
            }
        }
        let log_path = dir.join(PRESENCE_LOG_NAME);
        let bytes = match std::fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read", &log_path)(e)),
        };
        let mut index = PresenceIndex {
            log_path: log_path.clone(),
            entries: BTreeMap::new(),
            deleting: BTreeSet::new(),
            damaged: BTreeMap::new(),
            log_bytes: 0,
            live_bytes: BTreeMap::new(),
            live_bytes_total: 0,
        };
        let valid = index.replay(&bytes)?;
        if valid < bytes.len() {
            tracing::warn!(
                path = %log_path.display(),
                valid_bytes = valid,
                file_bytes = bytes.len(),
                "cut torn tail of presence log"
            );
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&log_path)
                .map_err(io("open", &log_path))?;
            file.set_len(valid as u64)
                .map_err(io("truncate", &log_path))?;
            file.sync_all().map_err(io("sync", &log_path))?;
        }
        index.log_bytes = valid as u64;
        Ok(index)
    }

    /// Whether `path` is present with exactly this blake3 (a re-registered path with other bytes
    /// is not present).
    pub fn contains(&self, path: &str, blake3_hex: &str) -> bool {
        self.entries
            .get(path)
            .is_some_and(|entry| entry.blake3_hex == blake3_hex)
    }

    pub fn get(&self, path: &str) -> Option<&PresenceEntry> {
        self.entries.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PresenceEntry> + '_ {
        self.entries.values()
    }

    /// Paths whose removal from disk was started and may not have finished (a crash in
    /// between): the caller removes them again, then [`PresenceIndex::forget`]s them.
    pub fn deleting(&self) -> impl Iterator<Item = &str> + '_ {
        self.deleting.iter().map(String::as_str)
    }

    /// Files found damaged and not repaired yet (or not yet forgotten).
    pub fn damaged(&self) -> impl Iterator<Item = &Damage> + '_ {
        self.damaged.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `entry` durably (replacing any entry of its path). Not cancellation-safe: a
    /// dropped call may still have appended the record, which the next open replays.
    pub async fn insert(
        &mut self,
        sink: &FileSink,
        entry: PresenceEntry,
    ) -> Result<(), PresenceError> {
        let frame = encode_frame(&PresenceRecord::Insert(entry.clone()))?;
        let frame_bytes = frame.len() as u64;
        sink.append_durable(&self.log_path, frame).await?;
        self.log_bytes += frame_bytes;
        self.note(PresenceRecord::Insert(entry), frame_bytes);
        self.compact_if_worth_it(sink).await
    }

    /// Durably records a damaged local copy: it stops counting as present, and a restart lists
    /// it in [`PresenceIndex::damaged`] until an insert (the repair) or a forget replaces it.
    /// Not cancellation-safe (like [`PresenceIndex::insert`]).
    pub async fn mark_damaged(
        &mut self,
        sink: &FileSink,
        damage: Damage,
    ) -> Result<(), PresenceError> {
        self.append_all(sink, std::iter::once(PresenceRecord::Damaged(damage)))
            .await
    }

    /// Forgets `path` durably; answers whether it was present.
    pub async fn remove(&mut self, sink: &FileSink, path: &str) -> Result<bool, PresenceError> {
        if !self.entries.contains_key(path) {
            return Ok(false);
        }
        let record = PresenceRecord::Remove {
            path: path.to_owned(),
        };
        let frame = encode_frame(&record)?;
        let frame_bytes = frame.len() as u64;
        sink.append_durable(&self.log_path, frame).await?;
        self.log_bytes += frame_bytes;
        self.note(record, frame_bytes);
        self.compact_if_worth_it(sink).await?;
        Ok(true)
    }

    /// Durably marks `paths` as being removed from disk, in one append: from now on they do
    /// not count as present, and a restart lists them in [`PresenceIndex::deleting`]. Call it
    /// before unlinking them. Not cancellation-safe (like [`PresenceIndex::insert`]).
    pub async fn mark_deleting(
        &mut self,
        sink: &FileSink,
        paths: &[String],
    ) -> Result<(), PresenceError> {
        self.append_all(
            sink,
            paths
                .iter()
                .map(|path| PresenceRecord::Deleting { path: path.clone() }),
        )
        .await
    }

    /// Durably forgets `paths` (present or being deleted), in one append. Call it once their
    /// files are durably gone from disk. Not cancellation-safe.
    pub async fn forget(&mut self, sink: &FileSink, paths: &[String]) -> Result<(), PresenceError> {
        let known: Vec<String> = paths
            .iter()
            .filter(|path| {
                self.entries.contains_key(*path)
                    || self.deleting.contains(*path)
                    || self.damaged.contains_key(*path)
            })
            .cloned()
            .collect();
        self.append_all(
            sink,
            known
                .into_iter()
                .map(|path| PresenceRecord::Remove { path }),
        )
        .await
    }

    async fn append_all(
        &mut self,
        sink: &FileSink,
        records: impl Iterator<Item = PresenceRecord>,
    ) -> Result<(), PresenceError> {
        let mut bytes = Vec::new();
        let mut noted = Vec::new();
        for record in records {
            let frame = encode_frame(&record)?;
            noted.push((record, frame.len() as u64));
            bytes.extend_from_slice(&frame);
        }
        if noted.is_empty() {
            return Ok(());
        }
        sink.append_durable(&self.log_path, bytes).await?;
        for (record, frame_bytes) in noted {
            self.log_bytes += frame_bytes;
            self.note(record, frame_bytes);
        }
        self.compact_if_worth_it(sink).await
    }

    fn note(&mut self, record: PresenceRecord, frame_bytes: u64) {
        match record {
            PresenceRecord::Insert(entry) => {
                let old = self.live_bytes.insert(entry.path.clone(), frame_bytes);
                self.live_bytes_total += frame_bytes;
                self.live_bytes_total -= old.unwrap_or(0);
                self.deleting.remove(&entry.path);
                self.damaged.remove(&entry.path);
                self.entries.insert(entry.path.clone(), entry);
            }
            PresenceRecord::Remove { path } => {
                self.live_bytes_total -= self.live_bytes.remove(&path).unwrap_or(0);
                self.entries.remove(&path);
                self.deleting.remove(&path);
                self.damaged.remove(&path);
            }
            PresenceRecord::Deleting { path } => {
                let old = self.live_bytes.insert(path.clone(), frame_bytes);
                self.live_bytes_total += frame_bytes;
                self.live_bytes_total -= old.unwrap_or(0);
                self.entries.remove(&path);
                self.damaged.remove(&path);
                self.deleting.insert(path);
            }
            PresenceRecord::Damaged(damage) => {
                let old = self.live_bytes.insert(damage.path.clone(), frame_bytes);
                self.live_bytes_total += frame_bytes;
                self.live_bytes_total -= old.unwrap_or(0);
                self.entries.remove(&damage.path);
                self.deleting.remove(&damage.path);
                self.damaged.insert(damage.path.clone(), damage);
            }
        }
    }

    async fn compact_if_worth_it(&mut self, sink: &FileSink) -> Result<(), PresenceError> {
        let dead = self.log_bytes - self.live_bytes_total;
        if self.log_bytes < COMPACT_BYTES_MIN || dead < self.live_bytes_total {
            return Ok(());
        }
        let mut image = Vec::new();
        let mut live_bytes = BTreeMap::new();
        for entry in self.entries.values() {
            let frame = encode_frame(&PresenceRecord::Insert(entry.clone()))?;
            live_bytes.insert(entry.path.clone(), frame.len() as u64);
            image.extend_from_slice(&frame);
        }
        for path in &self.deleting {
            let frame = encode_frame(&PresenceRecord::Deleting { path: path.clone() })?;
            live_bytes.insert(path.clone(), frame.len() as u64);
            image.extend_from_slice(&frame);
        }
        for damage in self.damaged.values() {
            let frame = encode_frame(&PresenceRecord::Damaged(damage.clone()))?;
            live_bytes.insert(damage.path.clone(), frame.len() as u64);
            image.extend_from_slice(&frame);
        }
        let image_bytes = image.len() as u64;
        sink.replace(&self.log_path, image).await?;
        tracing::debug!(
            path = %self.log_path.display(),
            before_bytes = self.log_bytes,
            after_bytes = image_bytes,
            "compacted presence log"
        );
        self.log_bytes = image_bytes;
        self.live_bytes_total = image_bytes;
        self.live_bytes = live_bytes;
        Ok(())
    }

    /// Replays the whole file and returns the length of its valid prefix.
    fn replay(&mut self, bytes: &[u8]) -> Result<usize, PresenceError> {
        let log_path = self.log_path.clone();
        let corrupt = |offset: usize, reason: String| PresenceError::Corrupt {
            path: log_path.clone(),
            offset: offset as u64,
            reason,
        };
        let stop = frame::scan(bytes, 0, FRAME_LIMITS, |frame| {
            let payload = frame.payload;
            if payload[0] != PRESENCE_FORMAT_VERSION {
                return Err(Reject::Refuse(corrupt(
                    frame.offset,
                    format!("unknown format version {}", payload[0]),
                )));
            }
            let record: PresenceRecord = serde_json::from_slice(&payload[1..]).map_err(|e| {
                Reject::Refuse(corrupt(frame.offset, format!("decode record: {e}")))
            })?;
            self.note(record, frame.frame_bytes() as u64);
            self.log_bytes = frame.end() as u64;
            Ok(())
        })?;
        if let Some(fault) = &stop.fault {
            if !frame::is_torn_tail(bytes, fault, TailRule::ZeroesFollow, |_| false) {
                return Err(corrupt(fault.offset(), fault.to_string()));
            }
        }
        Ok(stop.valid_end)
    }
}

fn encode_frame(record: &PresenceRecord) -> Result<Vec<u8>, PresenceError> {
    let mut frame = Vec::new();
    let start = frame::begin(&mut frame);
    frame.push(PRESENCE_FORMAT_VERSION);
    serde_json::to_writer(&mut frame, record).map_err(|e| PresenceError::Encode(e.to_string()))?;
    frame::finish(&mut frame, start, FRAME_LIMITS)
        .map_err(|error| PresenceError::Encode(error.to_string()))?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A presence log holding `payloads` (JSON records) as version-1 frames.
    fn log_of(dir: &Path, payloads: &[&str]) {
        let mut bytes = Vec::new();
        for payload in payloads {
            let start = frame::begin(&mut bytes);
            bytes.push(PRESENCE_FORMAT_VERSION);
            bytes.extend_from_slice(payload.as_bytes());
            frame::finish(&mut bytes, start, FRAME_LIMITS).unwrap();
        }
        std::fs::write(dir.join(PRESENCE_LOG_NAME), bytes).unwrap();
    }

    // Stored samples of every record kind still decode: an insert, a damaged record that a
    // later insert (the repair) replaces, and a damaged record still open, written as the
    // node writes them today.
    #[test]
    fn stored_records_decode_and_damage_is_replaced_by_the_repair() {
        let dir = tempfile::tempdir().unwrap();
        log_of(
            dir.path(),
            &[
                r#"{"Insert":{"path":"db/m/a","size_bytes":10,"blake3_hex":"aa","verified_at_ms":1}}"#,
                r#"{"Damaged":{"path":"db/m/a","finding":{"kind":"corrupt","found_blake3":"bb"},"expected_blake3":"aa","found_at_ms":2,"quarantined_as":"_system/quarantine/2/db/m/a","lost":false}}"#,
                r#"{"Insert":{"path":"db/m/a","size_bytes":10,"blake3_hex":"aa","verified_at_ms":3}}"#,
                r#"{"Insert":{"path":"db/m/b","size_bytes":20,"blake3_hex":"cc","verified_at_ms":1}}"#,
                r#"{"Damaged":{"path":"db/m/b","finding":{"kind":"missing"},"expected_blake3":"cc","found_at_ms":4,"quarantined_as":null}}"#,
                r#"{"Deleting":{"path":"db/m/c"}}"#,
            ],
        );
        let index = PresenceIndex::open(dir.path()).unwrap();
        assert!(index.contains("db/m/a", "aa"));
        assert_eq!(index.get("db/m/a").unwrap().verified_at_ms, 3);
        assert!(!index.contains("db/m/b", "cc"));
        let damaged: Vec<&Damage> = index.damaged().collect();
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].path, "db/m/b");
        assert_eq!(damaged[0].finding, crate::files::holdings::Finding::Missing);
        assert!(!damaged[0].lost);
        assert_eq!(index.deleting().collect::<Vec<_>>(), ["db/m/c"]);
    }
}
