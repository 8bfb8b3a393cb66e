//! The manifest's Raft state machine: applies committed entries to the [`Manifest`], publishes
//! an immutable [`ManifestVersion`](crate::ManifestVersion) after every batch, and keeps the
//! latest snapshot on disk.
//!
//! The state machine itself is not persisted; the snapshot is. Start-up loads the newest
//! `snapshot-<term>-<index>.snap` (or `.json`, written by format version 1) and openraft
//! re-applies the committed log after it. The same bytes are what a leader sends to a follower.
//!
//! Snapshot format version 2 (written): the 8 bytes `SHALESNP`, the version byte 2, the length of
//! the meta as a little-endian u32, the meta (openraft `SnapshotMeta`) as JSON, then one zstd
//! frame holding the [`ManifestImage`] as MessagePack with structs as arrays: about a fifth of
//! the JSON's size and several times faster to encode and decode at millions of files. Version 1
//! (read only): JSON `{"format_version": 1, "meta": <SnapshotMeta>, "manifest": <ManifestImage>}`.
//!
//! Threads: owned by openraft's state-machine task on the control thread. Snapshot encoding,
//! decoding and file I/O run on tokio's blocking pool so they never stall the control thread:
//! building one serializes a frozen clone of the manifest, which costs O(1) to take.

use std::fs;
use std::io;
use std::io::Cursor;
use std::io::Read;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::storage::RaftStateMachine;
use openraft::AnyError;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::StorageIOError;
use serde::Deserialize;

use crate::durable;
use crate::manifest::Manifest;
use crate::manifest::ManifestImage;
use crate::manifest::ManifestResponse;
use crate::raft_types::Entry;
use crate::raft_types::LogId;
use crate::raft_types::Snapshot;
use crate::raft_types::SnapshotMeta;
use crate::raft_types::StorageError;
use crate::raft_types::StoredMembership;
use crate::raft_types::TypeConfig;
use crate::version::Published;

/// Version of the snapshot format written now. Version 1 is still read.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 2;

/// Leads every snapshot from version 2 on; a version-1 snapshot is JSON and starts with `{`.
const SNAPSHOT_MAGIC: &[u8; 8] = b"SHALESNP";

/// zstd level of the image: the fastest levels already shrink the repetitive image several
/// times, and snapshot building competes with the node for the CPU.
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;

const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
/// The suffix of snapshots written by format version 1, still loaded at start-up.
const SNAPSHOT_SUFFIX_V1: &str = ".json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("snapshot {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("encode snapshot: {0}")]
    Encode(String),
    #[error("snapshot task failed: {0}")]
    Task(String),
}

/// A format-version-1 snapshot file.
#[derive(Deserialize)]
struct SnapshotFileV1 {
    format_version: u8,
    meta: SnapshotMeta,
    manifest: ManifestImage,
}

/// Encodes a snapshot of `manifest` as of `meta`: the bytes stored on disk and sent to followers.
/// Serializes straight from the manifest's maps into the compressor, without an intermediate copy
/// of the entries.
pub fn encode_snapshot(meta: &SnapshotMeta, manifest: &Manifest) -> Result<Vec<u8>, SnapshotError> {
    let encode = |e: &dyn std::fmt::Display| SnapshotError::Encode(e.to_string());
    let meta_json = serde_json::to_vec(meta).map_err(|e| encode(&e))?;
    let meta_len = u32::try_from(meta_json.len()).map_err(|e| encode(&e))?;
    let mut bytes = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 5 + meta_json.len());
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.push(SNAPSHOT_FORMAT_VERSION);
    bytes.extend_from_slice(&meta_len.to_le_bytes());
    bytes.extend_from_slice(&meta_json);
    let mut encoder =
        zstd::stream::Encoder::new(bytes, SNAPSHOT_ZSTD_LEVEL).map_err(|e| encode(&e))?;
    // A damaged snapshot file must fail to load, not load a different manifest.
    encoder.include_checksum(true).map_err(|e| encode(&e))?;
    // MessagePack writes each field separately; the buffer hands zstd large blocks instead.
    let mut buffered = io::BufWriter::with_capacity(1 << 16, encoder);
    rmp_serde::encode::write(&mut buffered, &manifest.image_ref()).map_err(|e| encode(&e))?;
    let encoder = buffered.into_inner().map_err(|e| encode(e.error()))?;
    encoder.finish().map_err(|e| encode(&e))
}

/// Decodes and checks snapshot bytes of format version 2 or 1; `origin` names them in errors.
pub fn decode_snapshot(
    bytes: &[u8],
    origin: &Path,
) -> Result<(SnapshotMeta, Manifest), SnapshotError> {
    let invalid = |reason: String| SnapshotError::Invalid {
        path: origin.to_path_buf(),
        reason,
    };
    let (meta, image) = match bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) {
        Some(rest) => decode_v2(rest).map_err(invalid)?,
        None => {
            let file: SnapshotFileV1 =
                serde_json::from_slice(bytes).map_err(|e| invalid(format!("decode: {e}")))?;
            if file.format_version != 1 {
                return Err(invalid(format!(
                    "unknown format version {}",
                    file.format_version
                )));
            }
            (file.meta, file.manifest)
        }
    };
    let meta_index = meta.last_log_id.map_or(0, |id| id.index);
    if image.applied_index != meta_index {
        return Err(invalid(format!(
            "manifest applied index {} differs from snapshot index {meta_index}",
            image.applied_index
        )));
    }
    let manifest = Manifest::from_image(image).map_err(|e| invalid(e.to_string()))?;
    Ok((meta, manifest))
}

/// Decodes what follows the magic of a version-2 snapshot.
fn decode_v2(bytes: &[u8]) -> Result<(SnapshotMeta, ManifestImage), String> {
    let (&version, rest) = bytes.split_first().ok_or("truncated before the version")?;
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let (length, rest) = rest
        .split_first_chunk::<4>()
        .ok_or("truncated in the meta length")?;
    let length = u32::from_le_bytes(*length) as usize;
    if rest.len() < length {
        return Err(format!("truncated in the meta: {length} bytes announced"));
    }
    let (meta, image) = rest.split_at(length);
    let meta: SnapshotMeta =
        serde_json::from_slice(meta).map_err(|e| format!("decode meta: {e}"))?;
    // MessagePack reads each field separately; the buffer asks zstd for large blocks instead.
    let mut decoder = io::BufReader::with_capacity(
        1 << 16,
        zstd::stream::Decoder::new(image).map_err(|e| format!("decompress: {e}"))?,
    );
    let image = ManifestImage::deserialize(&mut rmp_serde::Deserializer::new(&mut decoder))
        .map_err(|e| format!("decode manifest: {e}"))?;
    // The frame must end right after the image; reading on checks its checksum.
    match decoder.read(&mut [0u8; 1]) {
        Ok(0) => Ok((meta, image)),
        Ok(_) => Err("bytes after the manifest".to_owned()),
        Err(e) => Err(format!("decompress: {e}")),
    }
}

fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    let id = meta.last_log_id.unwrap_or_default();
    format!(
        "{SNAPSHOT_PREFIX}{}-{}{SNAPSHOT_SUFFIX}",
        id.leader_id.term, id.index
    )
}

/// Parses `snapshot-<term>-<index>.snap` (or `.json`, format version 1) into `(index, term)` for
/// ordering.
fn parse_snapshot_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(SNAPSHOT_PREFIX)?;
    let middle = rest
        .strip_suffix(SNAPSHOT_SUFFIX)
        .or_else(|| rest.strip_suffix(SNAPSHOT_SUFFIX_V1))?;
    let (term, index) = middle.split_once('-')?;
    Some((index.parse().ok()?, term.parse().ok()?))
}

/// The snapshot files of one directory and which one is current.
#[derive(Debug)]
struct SnapshotStore {
    dir: PathBuf,
    /// Held while a snapshot file is replaced or read, so readers never see one vanish.
    current: Mutex<Option<SnapshotMeta>>,
}

impl SnapshotStore {
    fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io {
            action,
            path,
            source,
        }
    }

    /// Loads the newest snapshot in `dir`, if any. Blocking.
    fn open(dir: &Path) -> Result<(SnapshotStore, Option<Manifest>), SnapshotError> {
        fs::create_dir_all(dir).map_err(Self::io_error("create snapshot directory", dir))?;
        durable::remove_temporaries(dir).map_err(Self::io_error("remove temporaries in", dir))?;
        let mut newest: Option<((u64, u64), PathBuf)> = None;
        for entry in fs::read_dir(dir).map_err(Self::io_error("list snapshots in", dir))? {
            let entry = entry.map_err(Self::io_error("list snapshots in", dir))?;
            let name = entry.file_name();
            if let Some(order) = parse_snapshot_file_name(&name.to_string_lossy()) {
                if newest.as_ref().is_none_or(|(newest, _)| order > *newest) {
                    newest = Some((order, entry.path()));
                }
            }
        }
        let Some((_, path)) = newest else {
            return Ok((
                SnapshotStore {
                    dir: dir.to_path_buf(),
                    current: Mutex::new(None),
                },
                None,
            ));
        };
        let bytes = fs::read(&path).map_err(Self::io_error("read snapshot", &path))?;
        let (meta, manifest) = decode_snapshot(&bytes, &path)?;
        tracing::info!(
            path = %path.display(),
            index = manifest.applied_index(),
            files = manifest.files().len(),
            "loaded manifest snapshot"
        );
        Ok((
            SnapshotStore {
                dir: dir.to_path_buf(),
                current: Mutex::new(Some(meta)),
            },
            Some(manifest),
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SnapshotMeta>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durably stores `bytes` as the snapshot for `meta` and removes older snapshot files.
    /// A built snapshot older than the current one is dropped (`replace_newer == false`); an
    /// installed one always wins, since the leader decided the follower needs it. Blocking.
    fn store(
        &self,
        meta: &SnapshotMeta,
        bytes: &[u8],
        replace_newer: bool,
    ) -> Result<(), SnapshotError> {
        let mut current = self.lock();
        if !replace_newer
            && current
                .as_ref()
                .is_some_and(|current| current.last_log_id > meta.last_log_id)
        {
            return Ok(());
        }
        let name = snapshot_file_name(meta);
        durable::replace_file(&self.dir, &name, bytes)
            .map_err(Self::io_error("write snapshot", &self.dir.join(&name)))?;
        *current = Some(meta.clone());
        // Older snapshots are garbage now; failing to remove one only costs disk space.
        if let Ok(listing) = fs::read_dir(&self.dir) {
            for entry in listing.flatten() {
                let other = entry.file_name().to_string_lossy().into_owned();
                if other != name && parse_snapshot_file_name(&other).is_some() {
                    if let Err(error) = fs::remove_file(entry.path()) {
                        tracing::warn!(path = %entry.path().display(), %error, "remove old snapshot");
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the current snapshot's bytes. Blocking.
    fn read_current(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, SnapshotError> {
        let current = self.lock();
        let Some(meta) = current.as_ref() else {
            return Ok(None);
        };
        let path = self.dir.join(snapshot_file_name(meta));
        let bytes = fs::read(&path).map_err(Self::io_error("read snapshot", &path))?;
        Ok(Some((meta.clone(), bytes)))
    }
}

/// Runs blocking snapshot work off the control thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SnapshotError::Task(e.to_string()))?
}

/// Openraft's state machine for the manifest group.
pub struct ManifestStateMachine {
    manifest: Manifest,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotStore>,
    published: Arc<Published>,
}

impl ManifestStateMachine {
    /// Opens the state machine on `dir`, loading the newest snapshot. Blocking.
    pub fn open(dir: &Path) -> Result<ManifestStateMachine, SnapshotError> {
        let (snapshots, manifest) = SnapshotStore::open(dir)?;
        let meta = snapshots.lock().clone().unwrap_or_default();
        let manifest = manifest.unwrap_or_default();
        Ok(ManifestStateMachine {
            published: Arc::new(Published::new(manifest.clone())),
            manifest,
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership,
            snapshots: Arc::new(snapshots),
        })
    }

    /// The cell readers load versions from.
    pub(crate) fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    fn publish(&self) {
        self.published.publish(self.manifest.clone());
    }
}

/// Builds a snapshot from a frozen clone of the manifest while applies continue.
pub struct ManifestSnapshotBuilder {
    manifest: Manifest,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotStore>,
}

impl RaftSnapshotBuilder<TypeConfig> for ManifestSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let id = self.last_applied.unwrap_or_default();
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: format!("{}-{}", id.leader_id.term, id.index),
        };
        let manifest = self.manifest.clone();
        let snapshots = self.snapshots.clone();
        let task_meta = meta.clone();
        let bytes = blocking(move || {
            let bytes = encode_snapshot(&task_meta, &manifest)?;
            snapshots.store(&task_meta, &bytes, false)?;
            Ok(bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::info!(
            index = id.index,
            bytes = bytes.len(),
            "built manifest snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ManifestStateMachine {
    type SnapshotBuilder = ManifestSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ManifestResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let nothing = ManifestResponse::Applied {
            files_added: 0,
            files_removed: 0,
        };
        let mut responses = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Blank => {
                    self.manifest.note_applied(index);
                    nothing.clone()
                }
                EntryPayload::Normal(command) => {
                    let response = self.manifest.apply(index, &command);
                    if let ManifestResponse::Rejected(rejection) = &response {
                        tracing::debug!(index, %rejection, "manifest command rejected");
                    }
                    response
                }
                EntryPayload::Membership(membership) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    self.manifest.note_applied(index);
                    nothing.clone()
                }
            };
            self.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        if !responses.is_empty() {
            self.publish();
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> ManifestSnapshotBuilder {
        ManifestSnapshotBuilder {
            manifest: self.manifest.clone(),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let write_error = |e: SnapshotError| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        };
        let bytes = snapshot.into_inner();
        let snapshots = self.snapshots.clone();
        let task_meta = meta.clone();
        // Decoding millions of entries takes a while: off the control thread, with the store.
        let manifest = blocking(move || {
            let origin = PathBuf::from(format!("received {}", task_meta.snapshot_id));
            let (received_meta, manifest) = decode_snapshot(&bytes, &origin)?;
            if received_meta.last_log_id != task_meta.last_log_id {
                let reason = format!(
                    "carries last log id {:?}, expected {:?}",
                    received_meta.last_log_id, task_meta.last_log_id
                );
                return Err(SnapshotError::Invalid {
                    path: origin,
                    reason,
                });
            }
            snapshots.store(&task_meta, &bytes, true)?;
            Ok(manifest)
        })
        .await
        .map_err(write_error)?;
        tracing::info!(
            index = manifest.applied_index(),
            files = manifest.files().len(),
            "installed manifest snapshot"
        );
        self.manifest = manifest;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let snapshots = self.snapshots.clone();
        let current = blocking(move || snapshots.read_current())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(current.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::testing::StoreBuilder;
    use openraft::testing::Suite;
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::log_store::LogStore;
    use crate::manifest::tests::file;
    use crate::manifest::NodeState;
    use crate::manifest::{FileEntry, ManifestCommand};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, ManifestStateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, ManifestStateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = LogStore::open(dir.path(), 1 << 20).expect("open log store");
            let sm = ManifestStateMachine::open(dir.path()).expect("open state machine");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        // openraft's own conformance suite for v2 storage: log state, purge, truncate, vote,
        // committed re-apply at start-up, membership tracking and snapshot transfer.
        Suite::test_all(Builder).expect("storage suite");
    }

    fn entry(index: u64, command: ManifestCommand) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[test]
    fn snapshot_survives_reopen_and_transfers() {
        // Restart = load the newest snapshot file; a follower installing the same bytes must end
        // up with an identical manifest and version.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let leader_dir = tempfile::tempdir().expect("temp dir");
        let follower_dir = tempfile::tempdir().expect("temp dir");
        runtime.block_on(async {
            let mut sm = ManifestStateMachine::open(leader_dir.path()).expect("open");
            sm.apply([
                entry(
                    1,
                    ManifestCommand::Register {
                        files: vec![file("a", 1, 5)],
                    },
                ),
                entry(
                    2,
                    ManifestCommand::SetNodeState {
                        node_id: 1,
                        state: NodeState::Active,
                    },
                ),
            ])
            .await
            .expect("apply");
            let first = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("build");
            sm.apply([entry(
                3,
                ManifestCommand::Register {
                    files: vec![file("b", 6, 9)],
                },
            )])
            .await
            .expect("apply");
            let second = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("build");
            assert_ne!(first.meta, second.meta);

            let mut follower = ManifestStateMachine::open(follower_dir.path()).expect("open");
            let current = sm
                .get_current_snapshot()
                .await
                .expect("read")
                .expect("current snapshot");
            follower
                .install_snapshot(&current.meta, current.snapshot)
                .await
                .expect("install");
            assert_eq!(follower.published().current(), sm.published().current());
        });

        let names: Vec<String> = fs::read_dir(leader_dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["snapshot-1-3.snap".to_owned()],
            "old snapshot removed"
        );

        let reopened = ManifestStateMachine::open(leader_dir.path()).expect("reopen");
        let version = reopened.published().current();
        assert_eq!(version.index, 3);
        assert_eq!(
            version
                .manifest
                .files()
                .keys()
                .map(|k| &**k)
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(version.manifest.node_state(1), Some(NodeState::Active));
    }

    #[test]
    fn corrupt_snapshot_is_refused() {
        // A damaged snapshot would silently lose files from the manifest; start-up must stop.
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(
            dir.path().join("snapshot-1-9.json"),
            b"{\"format_version\":1,",
        )
        .expect("write");
        let error = ManifestStateMachine::open(dir.path())
            .err()
            .expect("must refuse");
        assert!(
            matches!(&error, SnapshotError::Invalid { path, .. } if path.ends_with("snapshot-1-9.json")),
            "{error}"
        );
    }

    // Upgrade: a node whose newest snapshot is a format-1 JSON file loads it at start-up, and
    // its next snapshot is written in format 2 and replaces the JSON file. Every truncation of
    // the format-2 bytes is refused with an error instead of loading a partial manifest.
    #[test]
    fn v1_snapshot_file_loads_and_is_replaced_by_v2() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("snapshot-2-4.json"), SNAPSHOT_V1_SAMPLE).expect("write");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let built = runtime.block_on(async {
            let mut sm = ManifestStateMachine::open(dir.path()).expect("open v1");
            assert_eq!(sm.published().current().index, 4);
            assert!(sm.published().current().manifest.file("a").is_some());
            sm.apply([Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), 5),
                payload: EntryPayload::Normal(ManifestCommand::Register {
                    files: vec![file("b", 6, 9)],
                }),
            }])
            .await
            .expect("apply");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("build")
        });
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["snapshot-2-5.snap".to_owned()]);
        let bytes = built.snapshot.into_inner();
        assert!(bytes.starts_with(SNAPSHOT_MAGIC));
        assert_eq!(bytes[SNAPSHOT_MAGIC.len()], 2);

        let reopened = ManifestStateMachine::open(dir.path()).expect("reopen v2");
        let version = reopened.published().current();
        assert_eq!(version.index, 5);
        assert_eq!(version.manifest.file("b"), Some(&file("b", 6, 9)));
        assert_eq!(version.manifest.node_state(1), Some(NodeState::Active));
        assert_eq!(version.manifest.flushed_through(1, 0, "db", "cpu"), Some(9));

        for length in 0..bytes.len() {
            assert!(
                decode_snapshot(&bytes[..length], Path::new("cut")).is_err(),
                "a snapshot cut at {length} of {} bytes decoded",
                bytes.len()
            );
        }
    }

    #[test]
    fn stored_sample_decodes() {
        // Compatibility: a snapshot written by format version 1 must keep loading.
        let (meta, manifest) =
            decode_snapshot(SNAPSHOT_V1_SAMPLE.as_bytes(), Path::new("sample")).expect("decode");
        assert_eq!(meta.last_log_id.map(|id| id.index), Some(4));
        assert_eq!(manifest.applied_index(), 4);
        // The sample predates `columns_fingerprint`: it reads as 0, "columns unknown".
        let expected = FileEntry {
            columns_fingerprint: 0,
            ..file("a", 1, 5)
        };
        assert_eq!(manifest.file("a"), Some(&expected));
        assert_eq!(
            manifest.node_states(),
            &BTreeMap::from([(1, NodeState::Active)])
        );
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(5));
    }

    const SNAPSHOT_V1_SAMPLE: &str = r#"{"format_version":1,
        "meta":{"last_log_id":{"leader_id":{"term":2,"node_id":1},"index":4},
            "last_membership":{"log_id":{"leader_id":{"term":1,"node_id":1},"index":0},
                "membership":{"configs":[[1]],"nodes":{"1":{"addr":"127.0.0.1:7000"}}}},
            "snapshot_id":"2-4"},
        "manifest":{"applied_index":4,
            "files":[{"path":"a","size_bytes":4096,
                "blake3_hex":"abababababababababababababababababababababababababababababababab",
                "rows":100,"time_min_us":1000,"time_max_us":2000,"database":"db",
                "measurement":"cpu","origin_node":1,"shard":0,"lsn_first":1,"lsn_last":5,
                "created_at_ms":1700000000000}],
            "node_states":{"1":"Active"}}}"#;
}
