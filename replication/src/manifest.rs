//! The manifest state machine core: which Parquet files exist, and what each node's state is.
//!
//! Sans-IO: [`Manifest::apply`] takes a committed command and returns a response; it never touches
//! the disk, the clock or the network, so every rule is tested here without Raft. Every command is
//! validated completely before anything changes: a command with one bad item changes nothing.
//!
//! A [`Manifest`] is cheap to clone (its maps are persistent maps that share structure), which is
//! how immutable versions are published to readers. A change after a publish copies only the
//! tree nodes on the changed keys' paths, O(log n) per changed file, never the whole manifest, so
//! a reader pinning an old version costs the apply path nothing at millions of files.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde::Deserialize;
use serde::Serialize;

/// Items (files or paths) one command may carry. Bounds the size of a Raft log entry.
pub const COMMAND_ITEMS_MAX: usize = 10_000;

/// Bytes in a file path. Paths are relative to the data directory.
pub const PATH_BYTES_MAX: usize = 1024;

/// One immutable data file, as registered by the node that flushed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the data directory, e.g. `metrics/cpu/2026/11/22/01/n1-s0-...-0.parquet`.
    pub path: String,
    pub size_bytes: u64,
    /// blake3 of the file's bytes, 64 lowercase hex digits.
    pub blake3_hex: String,
    pub rows: u64,
    pub time_min_us: i64,
    pub time_max_us: i64,
    pub database: String,
    pub measurement: String,
    pub origin_node: u64,
    pub shard: u32,
    /// WAL LSN range (inclusive) of the rows in this file, on `origin_node`'s `shard`.
    pub lsn_first: u64,
    pub lsn_last: u64,
    pub created_at_ms: i64,
    /// Names the file's set of columns with their types: files of one table with the same
    /// non-zero fingerprint have the same columns and can be scanned as one schema. 0 means
    /// unknown (entries written before the field existed).
    #[serde(default)]
    pub columns_fingerprint: u64,
    /// Set on files a survivor wrote from a dead node's replicated WAL records (a takeover):
    /// the node that wrote them, which must be the taker of the origin shard's [`Fence`]. The
    /// file still carries the origin's node, shard and LSN range, so the exactly-once rule
    /// treats its rows as the origin's.
    #[serde(default)]
    pub taken_by: Option<u64>,
}

/// A dead node's shard handed over to a survivor: the origin's rows up to `through_lsn` are
/// flushed by `taker` (from its replica of the origin's WAL), and the manifest refuses the
/// origin's own files that start at or below it. It only ever rises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub through_lsn: u64,
    pub taker: u64,
}

/// Lifecycle state of a cluster node, as recorded through Raft. `Joining` until the node is a
/// voter (or a caught-up replica-only learner), then `Active`; `Draining` and `Leaving` are an
/// operator's intent; `Dead` is committed by the leader after `cluster.dead_after_ms` without
/// contact. `Unhealthy` is never committed: healthy/unhealthy is each node's local view (the
/// variant stays so logs that might hold it still decode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Joining,
    Active,
    Draining,
    Leaving,
    Unhealthy,
    Dead,
}

impl NodeState {
    /// The lowercase name the cluster API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Leaving => "leaving",
            NodeState::Unhealthy => "unhealthy",
            NodeState::Dead => "dead",
        }
    }

    /// Draining and leaving nodes take no writes and hold no unflushed rows.
    pub fn is_draining(self) -> bool {
        matches!(self, NodeState::Draining | NodeState::Leaving)
    }
}

/// A change to the manifest. Each command is atomic: all of it applies, or none of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestCommand {
    /// Files produced by one flush.
    Register {
        files: Vec<FileEntry>,
    },
    /// Files removed (retention, operator). Missing paths are ignored.
    Delete {
        paths: Vec<String>,
    },
    /// Compaction: add the outputs and remove the inputs in one step. Missing removals are ignored.
    Batch {
        add: Vec<FileEntry>,
        remove: Vec<String>,
    },
    SetNodeState {
        node_id: u64,
        state: NodeState,
    },
    /// Fixes the kind of columns of one table, cluster-wide, before data using them is
    /// acknowledged. A column's kind never changes once declared; redeclaring the same kind is
    /// a no-op. The kinds are opaque strings here (the node uses "tag", "float", ...).
    DeclareColumns {
        database: String,
        measurement: String,
        columns: Vec<ColumnDeclaration>,
    },
    /// Changes nothing. A node that commits one and sees it applied knows its manifest holds
    /// every command committed before (a read barrier): a restarting node needs that before it
    /// replays its WAL, or it could miss a fence committed while it was down.
    Barrier {
        node_id: u64,
    },
    /// Hands `origin`'s `shard` over to `taker` through `through_lsn` (see [`Fence`]).
    /// Re-committing the same fence is a no-op; a lower `through_lsn` is refused; the same
    /// one with another taker replaces a taker that died before it finished.
    Fence {
        origin: u64,
        shard: u32,
        through_lsn: u64,
        taker: u64,
    },
}

/// One column of a [`ManifestCommand::DeclareColumns`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDeclaration {
    pub name: String,
    pub kind: String,
}

/// The outcome of applying one committed command (or a Raft-internal entry, which changes nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestResponse {
    /// The command was applied; identical re-registrations and missing deletions count as zero.
    Applied {
        files_added: u64,
        files_removed: u64,
    },
    /// The command was refused as a whole and the manifest is unchanged.
    Rejected(Rejection),
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("path {path} is already registered with different content")]
    Conflict { path: String },
    #[error("file entry {path:?} is invalid: {reason}")]
    InvalidEntry { path: String, reason: String },
    #[error("path {path} appears more than once in the command")]
    DuplicatePath { path: String },
    #[error("path {path} is both added and removed by the batch")]
    AddedAndRemoved { path: String },
    #[error("column \"{column}\" of {database}.{measurement} is {existing}, not {requested}")]
    ColumnKind {
        database: String,
        measurement: String,
        column: String,
        existing: String,
        requested: String,
    },
    #[error("column declaration is invalid: {reason}")]
    InvalidColumns { reason: String },
    #[error("command carries {count} items, more than the limit of {limit}")]
    TooManyItems { count: usize, limit: usize },
    #[error(
        "{path} starts at lsn {lsn_first} of node {origin} shard {shard}, which is fenced \
         through lsn {through_lsn} (taken over by node {taker})"
    )]
    Fenced {
        path: String,
        origin: u64,
        shard: u32,
        lsn_first: u64,
        through_lsn: u64,
        taker: u64,
    },
    #[error("{path} names node {taker} as its taker, but node {origin} shard {shard} is not fenced for it through lsn {lsn_last}")]
    NotTaker {
        path: String,
        origin: u64,
        shard: u32,
        lsn_last: u64,
        taker: u64,
    },
    #[error("node {origin} shard {shard} is fenced through lsn {existing}; a fence never moves back (asked {requested})")]
    FenceBackwards {
        origin: u64,
        shard: u32,
        existing: u64,
        requested: u64,
    },
    #[error("a node cannot take over its own shard (node {origin})")]
    SelfFence { origin: u64 },
}

impl FileEntry {
    /// Checks the entry on its own, without looking at the manifest.
    pub fn check(&self) -> Result<(), Rejection> {
        let invalid = |reason: &str| {
            Err(Rejection::InvalidEntry {
                path: self.path.clone(),
                reason: reason.to_owned(),
            })
        };
        if let Err(reason) = check_path(&self.path) {
            return invalid(reason);
        }
        if self.blake3_hex.len() != 64
            || !self
                .blake3_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return invalid("blake3_hex is not 64 lowercase hex digits");
        }
        if self.database.is_empty() || self.measurement.is_empty() {
            return invalid("database and measurement must not be empty");
        }
        if self.time_min_us > self.time_max_us {
            return invalid("time_min_us is after time_max_us");
        }
        if self.lsn_first > self.lsn_last {
            return invalid("lsn_first is after lsn_last");
        }
        Ok(())
    }

    fn stream_key(&self) -> StreamKey {
        (
            self.origin_node,
            self.shard,
            self.database.clone(),
            self.measurement.clone(),
        )
    }
}

/// A relative path made of plain components: no leading `/`, no `.`/`..`, no empty component.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > PATH_BYTES_MAX {
        return Err("path is empty or too long");
    }
    if path.contains('\\') || path.contains('\0') {
        return Err("path contains a backslash or NUL");
    }
    if path
        .split('/')
        .any(|component| component.is_empty() || component == "." || component == "..")
    {
        return Err("path is not a plain relative path");
    }
    Ok(())
}

impl ManifestCommand {
    /// Checks everything that does not depend on the manifest's state. The control thread calls
    /// this before proposing, so an obviously bad command never reaches the Raft log.
    pub fn check(&self) -> Result<(), Rejection> {
        let (add, remove): (&[FileEntry], &[String]) = match self {
            ManifestCommand::Register { files } => (files, &[]),
            ManifestCommand::Delete { paths } => (&[], paths),
            ManifestCommand::Batch { add, remove } => (add, remove),
            ManifestCommand::SetNodeState { .. } => return Ok(()),
            ManifestCommand::DeclareColumns {
                database,
                measurement,
                columns,
            } => return check_declaration(database, measurement, columns),
            ManifestCommand::Barrier { .. } => return Ok(()),
            ManifestCommand::Fence { origin, taker, .. } => {
                return if origin == taker {
                    Err(Rejection::SelfFence { origin: *origin })
                } else {
                    Ok(())
                };
            }
        };
        let count = add.len() + remove.len();
        if count > COMMAND_ITEMS_MAX {
            return Err(Rejection::TooManyItems {
                count,
                limit: COMMAND_ITEMS_MAX,
            });
        }
        let mut added = BTreeSet::new();
        for file in add {
            file.check()?;
            if !added.insert(file.path.as_str()) {
                return Err(Rejection::DuplicatePath {
                    path: file.path.clone(),
                });
            }
        }
        let mut removed = BTreeSet::new();
        for path in remove {
            if !removed.insert(path.as_str()) {
                return Err(Rejection::DuplicatePath { path: path.clone() });
            }
            if added.contains(path.as_str()) {
                return Err(Rejection::AddedAndRemoved { path: path.clone() });
            }
        }
        Ok(())
    }
}

fn check_declaration(
    database: &str,
    measurement: &str,
    columns: &[ColumnDeclaration],
) -> Result<(), Rejection> {
    let invalid = |reason: String| Err(Rejection::InvalidColumns { reason });
    if database.is_empty() || measurement.is_empty() {
        return invalid("database and measurement must not be empty".into());
    }
    if columns.len() > COMMAND_ITEMS_MAX {
        return Err(Rejection::TooManyItems {
            count: columns.len(),
            limit: COMMAND_ITEMS_MAX,
        });
    }
    let mut seen = BTreeMap::new();
    // Folded name -> first spelling: one pass, not a scan per column.
    let mut spellings: BTreeMap<String, &str> = BTreeMap::new();
    for column in columns {
        if column.name.is_empty() || column.kind.is_empty() {
            return invalid("column names and kinds must not be empty".into());
        }
        let spelling = *spellings
            .entry(column.name.to_ascii_lowercase())
            .or_insert(column.name.as_str());
        if spelling != column.name {
            return invalid(format!(
                "columns \"{}\" and \"{}\" differ only in case",
                spelling, column.name
            ));
        }
        if let Some(previous) = seen.insert(column.name.as_str(), column.kind.as_str()) {
            if previous != column.kind {
                return Err(Rejection::ColumnKind {
                    database: database.to_owned(),
                    measurement: measurement.to_owned(),
                    column: column.name.clone(),
                    existing: previous.to_owned(),
                    requested: column.kind.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Declared column kinds of one table, by column name.
pub type TableColumns = BTreeMap<String, String>;

/// Every registered file, by path. A persistent map: cloning it is O(1), and a change to a clone
/// copies only the O(log n) nodes on the changed paths, so a pinned version never makes an apply
/// copy the whole manifest.
pub type FileMap = OrdMap<Arc<str>, Arc<FileEntry>>;

/// Declared column kinds by (database, measurement).
pub type TableMap = OrdMap<(String, String), Arc<TableColumns>>;

/// (origin node, shard, database, measurement): the WAL stream a file's rows came from.
type StreamKey = (u64, u32, String, String);

/// For each WAL stream, its files by (`lsn_last`, path). One flush of a table writes one file
/// per hour with the same LSN range, so several files may share an end.
type StreamMap = OrdMap<StreamKey, OrdSet<(u64, Arc<str>)>>;

/// A stream's (`lsn_last`, path) pairs while an image is rebuilt.
type StreamEnds = Vec<(u64, Arc<str>)>;

/// The files of one table, indexed for query planning. Derived from [`Manifest::files`]; every
/// map shares the entries (and path keys) with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TableFiles {
    /// By path: the order `files_for` and `files_in` return.
    by_path: OrdMap<Arc<str>, Arc<FileEntry>>,
    /// By (time_min_us, path): the files that may overlap a time range are one key range.
    by_start: OrdMap<(i64, Arc<str>), Arc<FileEntry>>,
    /// How many files cover each time span (`time_max_us - time_min_us`). The longest span
    /// bounds how long before a range's start a file that overlaps the range can begin; kept as
    /// counts so that removing a file keeps it exact.
    spans: OrdMap<u64, u32>,
}

/// The manifest state. Owned by the Raft state machine on the control thread; published to
/// readers as immutable clones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    applied_index: u64,
    files: FileMap,
    /// Derived index: the files of each (database, measurement).
    by_table: OrdMap<(String, String), TableFiles>,
    /// Derived index: for each WAL stream, its files by (`lsn_last`, path); the last key's LSN
    /// is the stream's flushed-through LSN.
    streams: StreamMap,
    /// A handful of nodes: copying it on a change costs nothing worth sharing structure for.
    node_states: Arc<BTreeMap<u64, NodeState>>,
    /// Declared column kinds by (database, measurement).
    tables: TableMap,
    /// Takeovers: the fence of each (origin node, shard) ever handed over.
    fences: OrdMap<(u64, u32), Fence>,
}

/// The serialized form of a [`Manifest`] (snapshots). The stream index is derived, not stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestImage {
    pub applied_index: u64,
    pub files: Vec<FileEntry>,
    pub node_states: BTreeMap<u64, NodeState>,
    /// Absent in images written before column declarations existed.
    #[serde(default)]
    pub tables: Vec<TableImage>,
    /// Absent in images written before takeovers existed.
    #[serde(default)]
    pub fences: Vec<(u64, u32, Fence)>,
}

/// One table's declared columns in a [`ManifestImage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableImage {
    pub database: String,
    pub measurement: String,
    pub columns: TableColumns,
}

/// A [`ManifestImage`] borrowed from a manifest: serializes to the same form without copying
/// every entry first, so a snapshot of millions of files needs no second copy of them in memory.
#[derive(Serialize)]
pub struct ManifestImageRef<'a> {
    applied_index: u64,
    #[serde(serialize_with = "serialize_files")]
    files: &'a FileMap,
    node_states: &'a BTreeMap<u64, NodeState>,
    #[serde(serialize_with = "serialize_tables")]
    tables: &'a TableMap,
    #[serde(serialize_with = "serialize_fences")]
    fences: &'a OrdMap<(u64, u32), Fence>,
}

fn serialize_fences<S: serde::Serializer>(
    fences: &OrdMap<(u64, u32), Fence>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        fences
            .iter()
            .map(|((origin, shard), fence)| (*origin, *shard, *fence)),
    )
}

#[derive(Serialize)]
struct TableImageRef<'a> {
    database: &'a str,
    measurement: &'a str,
    columns: &'a TableColumns,
}

fn serialize_files<S: serde::Serializer>(
    files: &&FileMap,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(files.values().map(|file| &**file))
}

fn serialize_tables<S: serde::Serializer>(
    tables: &&TableMap,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        tables
            .iter()
            .map(|((database, measurement), columns)| TableImageRef {
                database,
                measurement,
                columns,
            }),
    )
}

impl Manifest {
    /// The Raft log index of the last entry applied (0 before anything but the initial entry).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// All files, by path.
    pub fn files(&self) -> &FileMap {
        &self.files
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.get(path).map(|file| &**file)
    }

    fn table_files(&self, database: &str, measurement: &str) -> Option<&TableFiles> {
        self.by_table
            .get(&(database.to_owned(), measurement.to_owned()))
    }

    /// Files of one table, by path. An index lookup, then only the table's files.
    pub fn files_for<'a>(
        &'a self,
        database: &'a str,
        measurement: &'a str,
    ) -> impl Iterator<Item = &'a FileEntry> + 'a {
        self.table_files(database, measurement)
            .into_iter()
            .flat_map(|table| table.by_path.values())
            .map(|file| &**file)
    }

    /// How many files one table has.
    pub fn file_count_for(&self, database: &str, measurement: &str) -> usize {
        self.table_files(database, measurement)
            .map_or(0, |table| table.by_path.len())
    }

    /// Files of one table whose time range overlaps `[time_min_us, time_max_us]` (both
    /// inclusive): `time_max_us >= time_min_us(range)` and `time_min_us <= time_max_us(range)`,
    /// by path. Reads only the files that start between the range's start minus the table's
    /// longest file span and the range's end, not every file of the table.
    pub fn files_in(
        &self,
        database: &str,
        measurement: &str,
        time_min_us: i64,
        time_max_us: i64,
    ) -> Vec<&FileEntry> {
        let Some(table) = self.table_files(database, measurement) else {
            return Vec::new();
        };
        let longest = table.spans.get_max().map_or(0, |(span, _)| *span);
        // A file that starts before this ends before `time_min_us`: it cannot overlap.
        let earliest_start = (i128::from(time_min_us) - i128::from(longest))
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        if earliest_start > time_max_us {
            return Vec::new();
        }
        let from = (earliest_start, Arc::<str>::from(""));
        let candidates = match time_max_us.checked_add(1) {
            Some(end) => table.by_start.range(from..(end, Arc::<str>::from(""))),
            None => table.by_start.range(from..),
        };
        let mut found: Vec<&FileEntry> = candidates
            .map(|(_, file)| &**file)
            .filter(|file| file.time_max_us >= time_min_us && file.time_min_us <= time_max_us)
            .collect();
        found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        found
    }

    /// The highest WAL LSN of `origin_node`'s `shard` that is in a registered file for this table,
    /// or `None` if no file of that stream is registered. WAL replay skips records at or below it.
    /// The highest LSN any committed file of (origin node, shard) reaches, over all tables:
    /// that WAL's LSNs must continue above it, whatever happened to the WAL's files.
    pub fn shard_flushed_through(&self, origin_node: u64, shard: u32) -> Option<u64> {
        self.streams
            .range((origin_node, shard, String::new(), String::new())..)
            .take_while(|(key, _)| key.0 == origin_node && key.1 == shard)
            .filter_map(|(_, ends)| ends.get_max().map(|(lsn, _)| *lsn))
            .max()
    }

    pub fn flushed_through(
        &self,
        origin_node: u64,
        shard: u32,
        database: &str,
        measurement: &str,
    ) -> Option<u64> {
        let key = (
            origin_node,
            shard,
            database.to_owned(),
            measurement.to_owned(),
        );
        self.streams
            .get(&key)
            .and_then(|ends| ends.get_max().map(|(lsn, _)| *lsn))
    }

    /// The files of one WAL stream whose `lsn_last` is above `after`, as (`lsn_last`, path) in
    /// LSN order. A replica uses it to learn which of its buffered rows are in files it holds:
    /// the rows of a table with an LSN in `(previous end, lsn_last]` are in the files ending
    /// at `lsn_last` (one per hour of those rows).
    pub fn stream_files_after(
        &self,
        origin_node: u64,
        shard: u32,
        database: &str,
        measurement: &str,
        after: u64,
    ) -> impl Iterator<Item = (u64, &str)> + '_ {
        let key = (
            origin_node,
            shard,
            database.to_owned(),
            measurement.to_owned(),
        );
        let start: (u64, Arc<str>) = (after.saturating_add(1), Arc::from(""));
        self.streams
            .get(&key)
            .into_iter()
            .flat_map(move |ends| ends.range(start.clone()..))
            .map(|(lsn, path)| (*lsn, &**path))
    }

    /// Every table with registered files from `origin_node`'s `shard`, with its flushed-through
    /// LSN. A shard combines this with its unflushed buffers to decide which WAL segments to drop.
    pub fn flushed_streams(
        &self,
        origin_node: u64,
        shard: u32,
    ) -> impl Iterator<Item = (&str, &str, u64)> + '_ {
        let start = (origin_node, shard, String::new(), String::new());
        self.streams
            .range(start..)
            .take_while(move |((node, s, _, _), _)| *node == origin_node && *s == shard)
            .filter_map(|((_, _, database, measurement), ends)| {
                let (lsn, _) = ends.get_max()?;
                Some((database.as_str(), measurement.as_str(), *lsn))
            })
    }

    /// The lowest flushed-through LSN over the tables of `origin_node`'s `shard`.
    pub fn lowest_flushed_through(&self, origin_node: u64, shard: u32) -> Option<u64> {
        self.flushed_streams(origin_node, shard)
            .map(|(_, _, lsn)| lsn)
            .min()
    }

    /// The declared column kinds of a table, if any column was declared.
    pub fn table_columns(&self, database: &str, measurement: &str) -> Option<&TableColumns> {
        self.tables
            .get(&(database.to_owned(), measurement.to_owned()))
            .map(|columns| &**columns)
    }

    /// Every table with declared columns.
    pub fn tables(&self) -> &TableMap {
        &self.tables
    }

    pub fn node_state(&self, node_id: u64) -> Option<NodeState> {
        self.node_states.get(&node_id).copied()
    }

    pub fn node_states(&self) -> &BTreeMap<u64, NodeState> {
        &self.node_states
    }

    /// Records that the Raft entry at `index` was applied without a command (blank or membership
    /// entries), so the applied index matches Raft's.
    pub fn note_applied(&mut self, index: u64) {
        debug_assert!(
            index >= self.applied_index,
            "applied index went back from {} to {index}",
            self.applied_index
        );
        self.applied_index = index;
    }

    /// Applies the committed command at Raft log `index`. Deterministic: every replica returns the
    /// same response and reaches the same state.
    pub fn apply(&mut self, index: u64, command: &ManifestCommand) -> ManifestResponse {
        self.note_applied(index);
        if let Err(rejection) = command.check() {
            return ManifestResponse::Rejected(rejection);
        }
        let (add, remove): (&[FileEntry], &[String]) = match command {
            ManifestCommand::Register { files } => (files, &[]),
            ManifestCommand::Delete { paths } => (&[], paths),
            ManifestCommand::Batch { add, remove } => (add, remove),
            ManifestCommand::SetNodeState { node_id, state } => {
                Arc::make_mut(&mut self.node_states).insert(*node_id, *state);
                return ManifestResponse::Applied {
                    files_added: 0,
                    files_removed: 0,
                };
            }
            ManifestCommand::DeclareColumns {
                database,
                measurement,
                columns,
            } => return self.declare_columns(database, measurement, columns),
            ManifestCommand::Fence {
                origin,
                shard,
                through_lsn,
                taker,
            } => return self.fence(*origin, *shard, *through_lsn, *taker),
            ManifestCommand::Barrier { .. } => {
                return ManifestResponse::Applied {
                    files_added: 0,
                    files_removed: 0,
                }
            }
        };

        // Plan against the current state first; nothing changes unless the whole plan is valid.
        let mut to_add = Vec::with_capacity(add.len());
        for file in add {
            if let Err(rejection) = self.check_fence(file) {
                return ManifestResponse::Rejected(rejection);
            }
            match self.files.get(file.path.as_str()) {
                None => to_add.push(file),
                Some(existing) if **existing == *file => {}
                Some(_) => {
                    return ManifestResponse::Rejected(Rejection::Conflict {
                        path: file.path.clone(),
                    })
                }
            }
        }
        let to_remove: Vec<&String> = remove
            .iter()
            .filter(|path| self.files.contains_key(path.as_str()))
            .collect();

        for path in &to_remove {
            self.remove_file(path);
        }
        for file in &to_add {
            self.add_file(Arc::new((*file).clone()));
        }
        ManifestResponse::Applied {
            files_added: to_add.len() as u64,
            files_removed: to_remove.len() as u64,
        }
    }

    /// Refuses a file of a fenced origin shard that starts at or below the fence, unless the
    /// fence's taker wrote it; and a taker's file outside its fence.
    fn check_fence(&self, file: &FileEntry) -> Result<(), Rejection> {
        let fence = self.fences.get(&(file.origin_node, file.shard));
        match (file.taken_by, fence) {
            (None, Some(fence)) if file.lsn_first <= fence.through_lsn => Err(Rejection::Fenced {
                path: file.path.clone(),
                origin: file.origin_node,
                shard: file.shard,
                lsn_first: file.lsn_first,
                through_lsn: fence.through_lsn,
                taker: fence.taker,
            }),
            (Some(taker), fence)
                if fence.is_none_or(|f| f.taker != taker || file.lsn_last > f.through_lsn) =>
            {
                Err(Rejection::NotTaker {
                    path: file.path.clone(),
                    origin: file.origin_node,
                    shard: file.shard,
                    lsn_last: file.lsn_last,
                    taker,
                })
            }
            _ => Ok(()),
        }
    }

    fn fence(&mut self, origin: u64, shard: u32, through_lsn: u64, taker: u64) -> ManifestResponse {
        let applied = ManifestResponse::Applied {
            files_added: 0,
            files_removed: 0,
        };
        match self.fences.get(&(origin, shard)) {
            Some(existing) if existing.through_lsn > through_lsn => {
                ManifestResponse::Rejected(Rejection::FenceBackwards {
                    origin,
                    shard,
                    existing: existing.through_lsn,
                    requested: through_lsn,
                })
            }
            Some(existing) if *existing == (Fence { through_lsn, taker }) => applied,
            _ => {
                self.fences
                    .insert((origin, shard), Fence { through_lsn, taker });
                applied
            }
        }
    }

    /// The fence of `origin`'s `shard`, if a takeover ever fenced it.
    pub fn fence_of(&self, origin: u64, shard: u32) -> Option<Fence> {
        self.fences.get(&(origin, shard)).copied()
    }

    /// Every fence, by (origin node, shard).
    pub fn fences(&self) -> impl Iterator<Item = ((u64, u32), Fence)> + '_ {
        self.fences.iter().map(|(key, fence)| (*key, *fence))
    }

    fn declare_columns(
        &mut self,
        database: &str,
        measurement: &str,
        columns: &[ColumnDeclaration],
    ) -> ManifestResponse {
        let key = (database.to_owned(), measurement.to_owned());
        let existing = self.tables.get(&key).map(|table| &**table);
        // SQL engines fold identifier case, so `Host` and `host` would be one column. Folded
        // names of the table once per command, not a scan per declared column.
        let folded_existing: HashMap<String, &str> = match existing {
            Some(table) if columns.iter().any(|c| !table.contains_key(&c.name)) => table
                .keys()
                .map(|name| (name.to_ascii_lowercase(), name.as_str()))
                .collect(),
            _ => HashMap::new(),
        };
        let mut new = Vec::new();
        for column in columns {
            let folded = folded_existing
                .get(&column.name.to_ascii_lowercase())
                .filter(|name| **name != column.name);
            if let Some(name) = folded {
                return ManifestResponse::Rejected(Rejection::InvalidColumns {
                    reason: format!(
                        "column \"{}\" differs only in case from the existing column \"{name}\" of {database}.{measurement}",
                        column.name
                    ),
                });
            }
            match existing.and_then(|table| table.get(&column.name)) {
                Some(kind) if *kind == column.kind => {}
                Some(kind) => {
                    return ManifestResponse::Rejected(Rejection::ColumnKind {
                        database: database.to_owned(),
                        measurement: measurement.to_owned(),
                        column: column.name.clone(),
                        existing: kind.clone(),
                        requested: column.kind.clone(),
                    })
                }
                None => new.push(column),
            }
        }
        if !new.is_empty() {
            // Copies this table's columns if a pinned version shares them; other tables stay
            // shared.
            let table = Arc::make_mut(self.tables.entry(key).or_default());
            for column in new {
                table.insert(column.name.clone(), column.kind.clone());
            }
        }
        ManifestResponse::Applied {
            files_added: 0,
            files_removed: 0,
        }
    }

    pub fn to_image(&self) -> ManifestImage {
        ManifestImage {
            applied_index: self.applied_index,
            files: self.files.values().map(|file| (**file).clone()).collect(),
            node_states: (*self.node_states).clone(),
            tables: self
                .tables
                .iter()
                .map(|((database, measurement), columns)| TableImage {
                    database: database.clone(),
                    measurement: measurement.clone(),
                    columns: (**columns).clone(),
                })
                .collect(),
            fences: self.fences().map(|((o, s), f)| (o, s, f)).collect(),
        }
    }

    /// The image of this manifest, borrowed: what snapshots serialize.
    pub fn image_ref(&self) -> ManifestImageRef<'_> {
        ManifestImageRef {
            applied_index: self.applied_index,
            files: &self.files,
            node_states: &self.node_states,
            tables: &self.tables,
            fences: &self.fences,
        }
    }

    /// Rebuilds a manifest from its image, checking every entry as a registration would.
    ///
    /// Builds in bulk rather than file by file: the entries are sorted by path once (a snapshot
    /// writes them in path order, so the stable sort is one linear pass), grouped by table and
    /// by stream with borrowed keys in std maps, and each persistent map is then filled once
    /// from its final contents. That avoids cloning the table and stream names of every file
    /// and updating the nested per-table maps through the outer map a million times.
    pub fn from_image(image: ManifestImage) -> Result<Manifest, Rejection> {
        let mut files = Vec::with_capacity(image.files.len());
        for file in image.files {
            file.check()?;
            files.push(Arc::new(file));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(pair) = files.windows(2).find(|pair| pair[0].path == pair[1].path) {
            return Err(Rejection::DuplicatePath {
                path: pair[0].path.clone(),
            });
        }
        let paths: Vec<Arc<str>> = files
            .iter()
            .map(|file| Arc::from(file.path.as_str()))
            .collect();

        // Files of each table, in path order, and the end LSNs of each stream.
        let mut tables: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        let mut streams: BTreeMap<(u64, u32, &str, &str), StreamEnds> = BTreeMap::new();
        for (index, file) in files.iter().enumerate() {
            let (database, measurement) = (file.database.as_str(), file.measurement.as_str());
            tables
                .entry((database, measurement))
                .or_default()
                .push(index);
            streams
                .entry((file.origin_node, file.shard, database, measurement))
                .or_default()
                .push((file.lsn_last, paths[index].clone()));
        }

        let mut by_table = OrdMap::new();
        for ((database, measurement), members) in tables {
            let by_path = members
                .iter()
                .map(|&index| (paths[index].clone(), files[index].clone()))
                .collect();
            // Inserted in key order (stable on a path-ordered list, so ties stay in path
            // order), which keeps every insert on the tree's right edge.
            let mut starts: Vec<usize> = members.clone();
            starts.sort_by_key(|&index| files[index].time_min_us);
            let by_start = starts
                .iter()
                .map(|&index| {
                    let file = &files[index];
                    ((file.time_min_us, paths[index].clone()), file.clone())
                })
                .collect();
            let mut spans: BTreeMap<u64, u32> = BTreeMap::new();
            for &index in &members {
                *spans.entry(span(&files[index])).or_default() += 1;
            }
            by_table.insert(
                (database.to_owned(), measurement.to_owned()),
                TableFiles {
                    by_path,
                    by_start,
                    spans: spans.into_iter().collect(),
                },
            );
        }
        let streams = streams
            .into_iter()
            .map(|((origin_node, shard, database, measurement), ends)| {
                let key = (
                    origin_node,
                    shard,
                    database.to_owned(),
                    measurement.to_owned(),
                );
                (key, ends.into_iter().collect::<OrdSet<(u64, Arc<str>)>>())
            })
            .collect();
        let files = paths.into_iter().zip(files).collect();

        let mut manifest = Manifest {
            applied_index: image.applied_index,
            files,
            by_table,
            streams,
            node_states: Arc::new(image.node_states),
            tables: TableMap::default(),
            fences: image
                .fences
                .into_iter()
                .map(|(origin, shard, fence)| ((origin, shard), fence))
                .collect(),
        };
        for table in image.tables {
            let declarations: Vec<ColumnDeclaration> = table
                .columns
                .iter()
                .map(|(name, kind)| ColumnDeclaration {
                    name: name.clone(),
                    kind: kind.clone(),
                })
                .collect();
            check_declaration(&table.database, &table.measurement, &declarations)?;
            manifest
                .tables
                .insert((table.database, table.measurement), Arc::new(table.columns));
        }
        Ok(manifest)
    }

    /// Adds a file that is not registered yet to the file map and every derived index.
    fn add_file(&mut self, file: Arc<FileEntry>) {
        let path: Arc<str> = Arc::from(file.path.as_str());
        stream_add(&mut self.streams, &file, path.clone());
        let table = self
            .by_table
            .entry((file.database.clone(), file.measurement.clone()))
            .or_default();
        table.by_path.insert(path.clone(), file.clone());
        table
            .by_start
            .insert((file.time_min_us, path.clone()), file.clone());
        *table.spans.entry(span(&file)).or_default() += 1;
        self.files.insert(path, file);
    }

    /// Removes a registered file from the file map and every derived index.
    fn remove_file(&mut self, path: &str) {
        let Some((path, file)) = self.files.remove_with_key(path) else {
            return;
        };
        stream_remove(&mut self.streams, &file);
        let key = (file.database.clone(), file.measurement.clone());
        let Some(table) = self.by_table.get_mut(&key) else {
            unreachable!("table index lost the table of {}", file.path);
        };
        table.by_path.remove(&path);
        table.by_start.remove(&(file.time_min_us, path));
        let span = span(&file);
        let Some(count) = table.spans.get_mut(&span) else {
            unreachable!("table index lost the time span of {}", file.path);
        };
        *count -= 1;
        if *count == 0 {
            table.spans.remove(&span);
        }
        if table.by_path.is_empty() {
            self.by_table.remove(&key);
        }
    }
}

/// The length of a file's time range; its type holds any valid range.
fn span(file: &FileEntry) -> u64 {
    file.time_max_us.abs_diff(file.time_min_us)
}

fn stream_add(streams: &mut StreamMap, file: &FileEntry, path: Arc<str>) {
    streams
        .entry(file.stream_key())
        .or_default()
        .insert((file.lsn_last, path));
}

fn stream_remove(streams: &mut StreamMap, file: &FileEntry) {
    let key = file.stream_key();
    let Some(ends) = streams.get_mut(&key) else {
        unreachable!("stream index lost the stream of {}", file.path);
    };
    let end = (file.lsn_last, Arc::from(file.path.as_str()));
    if ends.remove(&end).is_none() {
        unreachable!("stream index lost the end lsn of {}", file.path);
    }
    if ends.is_empty() {
        streams.remove(&key);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid entry for `path` in table `db.cpu`, from node 1 shard 0, covering `lsn_first..=lsn_last`.
    pub(crate) fn file(path: &str, lsn_first: u64, lsn_last: u64) -> FileEntry {
        FileEntry {
            path: path.to_owned(),
            size_bytes: 4096,
            blake3_hex: "ab".repeat(32),
            rows: 100,
            time_min_us: 1_000,
            time_max_us: 2_000,
            database: "db".to_owned(),
            measurement: "cpu".to_owned(),
            origin_node: 1,
            shard: 0,
            lsn_first,
            lsn_last,
            created_at_ms: 1_700_000_000_000,
            columns_fingerprint: 7,
            taken_by: None,
        }
    }

    fn register(files: Vec<FileEntry>) -> ManifestCommand {
        ManifestCommand::Register { files }
    }

    fn applied(files_added: u64, files_removed: u64) -> ManifestResponse {
        ManifestResponse::Applied {
            files_added,
            files_removed,
        }
    }

    #[test]
    fn register_adds_files_and_advances_applied_index() {
        // A flush registers several files atomically; all become visible at the command's index.
        let mut manifest = Manifest::default();
        let response = manifest.apply(3, &register(vec![file("a", 1, 5), file("b", 6, 9)]));
        assert_eq!(response, applied(2, 0));
        assert_eq!(manifest.applied_index(), 3);
        assert_eq!(manifest.files().len(), 2);
        assert_eq!(manifest.file("b"), Some(&file("b", 6, 9)));
    }

    #[test]
    fn identical_registration_is_idempotent() {
        // A flush retried after a lost reply re-registers the same entry: accepted, no change.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5)]));
        let before = manifest.clone();
        let response = manifest.apply(2, &register(vec![file("a", 1, 5)]));
        assert_eq!(response, applied(0, 0));
        assert_eq!(manifest.files(), before.files());
        assert_eq!(manifest.applied_index(), 2);
    }

    #[test]
    fn different_entry_at_same_path_conflicts_and_changes_nothing() {
        // A different file under an existing name must never replace it (files are immutable),
        // and the other files of the same command must not be registered either.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5)]));
        let before = manifest.clone();
        let mut changed = file("a", 1, 5);
        changed.size_bytes += 1;
        let response = manifest.apply(2, &register(vec![file("b", 6, 9), changed]));
        assert_eq!(
            response,
            ManifestResponse::Rejected(Rejection::Conflict {
                path: "a".to_owned()
            })
        );
        assert_eq!(manifest.files(), before.files());
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(5));
    }

    #[test]
    fn delete_removes_present_and_ignores_missing_paths() {
        // Deleting a path that is already gone is a no-op, so retention can retry freely.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5), file("b", 6, 9)]));
        let response = manifest.apply(
            2,
            &ManifestCommand::Delete {
                paths: vec!["a".to_owned(), "missing".to_owned()],
            },
        );
        assert_eq!(response, applied(0, 1));
        assert!(manifest.file("a").is_none());
        assert!(manifest.file("b").is_some());
        let response = manifest.apply(
            3,
            &ManifestCommand::Delete {
                paths: vec!["a".to_owned()],
            },
        );
        assert_eq!(response, applied(0, 0));
    }

    #[test]
    fn batch_adds_and_removes_atomically() {
        // Compaction swaps inputs for an output in one step: readers never see both or neither.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5), file("b", 6, 9)]));
        let response = manifest.apply(
            2,
            &ManifestCommand::Batch {
                add: vec![file("ab", 1, 9)],
                remove: vec!["a".to_owned(), "b".to_owned()],
            },
        );
        assert_eq!(response, applied(1, 2));
        assert_eq!(
            manifest.files().keys().map(|k| &**k).collect::<Vec<_>>(),
            vec!["ab"]
        );
    }

    #[test]
    fn batch_with_one_bad_item_changes_nothing() {
        // Validation is complete before any change: an invalid output or a conflicting output
        // leaves the inputs registered.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5), file("b", 6, 9)]));
        let before = manifest.clone();

        let mut invalid = file("c", 1, 9);
        invalid.lsn_first = 10;
        let response = manifest.apply(
            2,
            &ManifestCommand::Batch {
                add: vec![file("ab", 1, 9), invalid],
                remove: vec!["a".to_owned()],
            },
        );
        assert!(matches!(
            response,
            ManifestResponse::Rejected(Rejection::InvalidEntry { .. })
        ));

        let mut conflicting = file("b", 6, 9);
        conflicting.rows = 1;
        let response = manifest.apply(
            3,
            &ManifestCommand::Batch {
                add: vec![file("ab", 1, 9), conflicting],
                remove: vec!["a".to_owned()],
            },
        );
        assert!(matches!(
            response,
            ManifestResponse::Rejected(Rejection::Conflict { .. })
        ));
        assert_eq!(manifest.files(), before.files());
        assert_eq!(manifest.applied_index(), 3);
    }

    #[test]
    fn batch_may_not_add_and_remove_the_same_path() {
        // Adding and removing one path in a batch has no sensible order, so it is refused.
        let command = ManifestCommand::Batch {
            add: vec![file("a", 1, 5)],
            remove: vec!["a".to_owned()],
        };
        assert_eq!(
            command.check(),
            Err(Rejection::AddedAndRemoved {
                path: "a".to_owned()
            })
        );
    }

    #[test]
    fn duplicate_paths_within_a_command_are_refused() {
        // A command names each path once; duplicates point at a bug in the proposer.
        let command = register(vec![file("a", 1, 5), file("a", 1, 5)]);
        assert_eq!(
            command.check(),
            Err(Rejection::DuplicatePath {
                path: "a".to_owned()
            })
        );
        let command = ManifestCommand::Delete {
            paths: vec!["a".to_owned(), "a".to_owned()],
        };
        assert!(matches!(
            command.check(),
            Err(Rejection::DuplicatePath { .. })
        ));
    }

    #[test]
    fn entry_checks_reject_bad_fields() {
        // Entries are checked right before they are committed, so a bad path or range never
        // becomes part of the truth every replica agrees on.
        type Mutation = fn(&mut FileEntry);
        let cases: Vec<(&str, Mutation)> = vec![
            ("absolute path", |f| f.path = "/etc/passwd".into()),
            ("parent component", |f| f.path = "db/../x".into()),
            ("empty component", |f| f.path = "db//x".into()),
            ("empty path", |f| f.path = String::new()),
            ("short hash", |f| f.blake3_hex = "abc".into()),
            ("upper hash", |f| f.blake3_hex = "AB".repeat(32)),
            ("time range", |f| f.time_min_us = f.time_max_us + 1),
            ("lsn range", |f| f.lsn_first = f.lsn_last + 1),
            ("no database", |f| f.database.clear()),
        ];
        for (name, mutate) in cases {
            let mut entry = file("db/cpu/x.parquet", 1, 5);
            mutate(&mut entry);
            assert!(
                matches!(entry.check(), Err(Rejection::InvalidEntry { .. })),
                "{name} must be rejected"
            );
        }
        assert_eq!(file("db/cpu/x.parquet", 1, 5).check(), Ok(()));
    }

    #[test]
    fn command_item_count_is_limited() {
        // A bounded command keeps every Raft log entry and its apply time bounded.
        let paths = (0..=COMMAND_ITEMS_MAX).map(|i| format!("p{i}")).collect();
        assert!(matches!(
            ManifestCommand::Delete { paths }.check(),
            Err(Rejection::TooManyItems { .. })
        ));
    }

    #[test]
    fn a_fence_hands_a_shard_over_and_refuses_the_origins_files_below_it() {
        // Takeover is exact only if, once node 1 shard 0 is fenced through lsn 10 for node 2,
        // node 1 can never register a file starting at or below 10 (it would double rows the
        // taker flushed), only the taker may register files there, the fence never moves
        // back, and all of it survives a snapshot image.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 4)]));
        let fence = |through_lsn, taker| ManifestCommand::Fence {
            origin: 1,
            shard: 0,
            through_lsn,
            taker,
        };
        assert_eq!(manifest.apply(2, &fence(10, 2)), applied(0, 0));
        assert_eq!(
            manifest.fence_of(1, 0),
            Some(Fence {
                through_lsn: 10,
                taker: 2
            })
        );
        // The origin's own file straddling the fence is refused; one above it is fine.
        let refused = manifest.apply(3, &register(vec![file("late", 5, 12)]));
        assert!(
            matches!(
                refused,
                ManifestResponse::Rejected(Rejection::Fenced {
                    through_lsn: 10,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(
            manifest.apply(4, &register(vec![file("after", 11, 12)])),
            applied(1, 0)
        );
        // The taker's file below the fence is accepted; another node's, or one past the fence, not.
        let mut taken = file("taken", 5, 10);
        taken.taken_by = Some(2);
        let mut stranger = file("stranger", 5, 10);
        stranger.taken_by = Some(3);
        let mut beyond = file("beyond", 5, 11);
        beyond.taken_by = Some(2);
        for bad in [stranger, beyond] {
            let response = manifest.apply(5, &register(vec![bad]));
            assert!(
                matches!(
                    response,
                    ManifestResponse::Rejected(Rejection::NotTaker { .. })
                ),
                "{response:?}"
            );
        }
        assert_eq!(manifest.apply(6, &register(vec![taken])), applied(1, 0));
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(12));
        // Same fence again: a no-op; lower: refused; higher: moves up.
        assert_eq!(manifest.apply(7, &fence(10, 2)), applied(0, 0));
        assert!(matches!(
            manifest.apply(8, &fence(9, 3)),
            ManifestResponse::Rejected(Rejection::FenceBackwards { existing: 10, .. })
        ));
        assert_eq!(manifest.apply(9, &fence(20, 3)), applied(0, 0));
        assert_eq!(manifest.fence_of(1, 0).map(|f| f.taker), Some(3));
        assert!(matches!(
            ManifestCommand::Fence {
                origin: 4,
                shard: 0,
                through_lsn: 1,
                taker: 4
            }
            .check(),
            Err(Rejection::SelfFence { origin: 4 })
        ));
        let rebuilt = Manifest::from_image(manifest.to_image()).unwrap();
        assert_eq!(rebuilt, manifest);
    }

    #[test]
    fn stream_files_after_lists_a_streams_files_by_end_lsn() {
        // A replica drops buffered rows only once the files holding them are on its disk; it
        // finds those files through this index, so it must list exactly the stream's files
        // above an LSN, every file of a flush that wrote several hours, in LSN order.
        let mut manifest = Manifest::default();
        let mut other_shard = file("s1", 1, 50);
        other_shard.shard = 1;
        manifest.apply(
            1,
            &register(vec![
                file("a", 1, 5),
                file("b1", 6, 9),
                file("b2", 6, 9),
                file("c", 10, 12),
                other_shard,
            ]),
        );
        let after = |manifest: &Manifest, lsn| {
            manifest
                .stream_files_after(1, 0, "db", "cpu", lsn)
                .map(|(end, path)| (end, path.to_owned()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            after(&manifest, 0),
            vec![
                (5, "a".to_owned()),
                (9, "b1".to_owned()),
                (9, "b2".to_owned()),
                (12, "c".to_owned())
            ]
        );
        assert_eq!(
            after(&manifest, 5),
            vec![
                (9, "b1".to_owned()),
                (9, "b2".to_owned()),
                (12, "c".to_owned())
            ]
        );
        assert_eq!(after(&manifest, 9), vec![(12, "c".to_owned())]);
        assert!(after(&manifest, 12).is_empty());
        assert!(manifest
            .stream_files_after(2, 0, "db", "cpu", 0)
            .next()
            .is_none());
        manifest.apply(
            2,
            &ManifestCommand::Delete {
                paths: vec!["b1".to_owned()],
            },
        );
        assert_eq!(
            after(&manifest, 5),
            vec![(9, "b2".to_owned()), (12, "c".to_owned())]
        );
    }

    #[test]
    fn flushed_through_tracks_max_lsn_per_stream_across_removals() {
        // WAL replay skips rows at or below flushed_through, so it must follow registrations and
        // removals exactly, per (origin node, shard, database, measurement).
        let mut manifest = Manifest::default();
        let mut other_shard = file("s1", 1, 50);
        other_shard.shard = 1;
        let mut other_table = file("mem", 1, 70);
        other_table.measurement = "mem".to_owned();
        manifest.apply(
            1,
            &register(vec![
                file("a", 1, 5),
                file("b", 6, 9),
                other_shard,
                other_table,
            ]),
        );
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(9));
        assert_eq!(manifest.flushed_through(1, 1, "db", "cpu"), Some(50));
        assert_eq!(manifest.flushed_through(1, 0, "db", "mem"), Some(70));
        assert_eq!(manifest.flushed_through(2, 0, "db", "cpu"), None);
        assert_eq!(manifest.lowest_flushed_through(1, 0), Some(9));
        assert_eq!(
            manifest.flushed_streams(1, 0).collect::<Vec<_>>(),
            vec![("db", "cpu", 9), ("db", "mem", 70)]
        );

        // Compaction keeps the max; deleting the newest file lowers it; deleting all clears it.
        manifest.apply(
            2,
            &ManifestCommand::Batch {
                add: vec![file("ab", 1, 9)],
                remove: vec!["a".into(), "b".into()],
            },
        );
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(9));
        manifest.apply(3, &register(vec![file("c", 10, 12)]));
        manifest.apply(
            4,
            &ManifestCommand::Delete {
                paths: vec!["c".into()],
            },
        );
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), Some(9));
        manifest.apply(
            5,
            &ManifestCommand::Delete {
                paths: vec!["ab".into()],
            },
        );
        assert_eq!(manifest.flushed_through(1, 0, "db", "cpu"), None);
    }

    #[test]
    fn files_for_selects_one_table() {
        // Queries plan from files_for; files of other tables must not leak in.
        let mut manifest = Manifest::default();
        let mut mem = file("m", 1, 2);
        mem.measurement = "mem".to_owned();
        manifest.apply(1, &register(vec![file("a", 1, 5), mem]));
        let paths: Vec<_> = manifest
            .files_for("db", "cpu")
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(paths, vec!["a"]);
    }

    /// A small deterministic generator (xorshift), so the index test needs no extra crate.
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % bound
        }
    }

    /// The files of `db.measurement` overlapping `[lower, upper]`, by path, from a scan of every
    /// file: what query planning did before the table and time index existed.
    fn scanned<'a>(
        manifest: &'a Manifest,
        measurement: &str,
        lower: i64,
        upper: i64,
    ) -> Vec<&'a str> {
        manifest
            .files()
            .values()
            .filter(|f| f.database == "db" && f.measurement == measurement)
            .filter(|f| f.time_max_us >= lower && f.time_min_us <= upper)
            .map(|f| f.path.as_str())
            .collect()
    }

    // The time index must select exactly the files a scan would, in path order, for any range
    // (also inverted and unbounded ones), as files of different spans come and go: the longest
    // span bounds the index range, and removing the longest file must shrink it without losing
    // files.
    #[test]
    fn files_in_matches_a_scan_of_the_table() {
        let mut random = Xorshift(0x2545_f491_4f6c_dd1d);
        let mut manifest = Manifest::default();
        let mut files = Vec::new();
        for i in 0..400u64 {
            let mut entry = file(&format!("f{:03}", random.below(1000)), i + 1, i + 1);
            if files.iter().any(|f: &FileEntry| f.path == entry.path) {
                continue;
            }
            entry.measurement = if i % 3 == 0 { "mem" } else { "cpu" }.to_owned();
            entry.time_min_us = random.below(10_000) as i64 - 5_000;
            let span = if i % 50 == 0 {
                random.below(8_000)
            } else {
                random.below(100)
            };
            entry.time_max_us = entry.time_min_us + span as i64;
            files.push(entry);
        }
        let mut everything = file("all-time", 1, 1);
        everything.time_min_us = i64::MIN;
        everything.time_max_us = i64::MAX;
        files.push(everything);
        manifest.apply(1, &register(files.clone()));

        let check = |manifest: &Manifest, random: &mut Xorshift| {
            let mut ranges = vec![
                (i64::MIN, i64::MAX),
                (i64::MIN, -4_000),
                (4_000, i64::MAX),
                (i64::MAX, i64::MAX),
                (i64::MIN, i64::MIN),
                (300, 200),
            ];
            for _ in 0..300 {
                let lower = random.below(14_000) as i64 - 7_000;
                let upper = lower + random.below(2_000) as i64 - 100;
                ranges.push((lower, upper));
            }
            for (lower, upper) in ranges {
                for measurement in ["cpu", "mem", "none"] {
                    let found: Vec<&str> = manifest
                        .files_in("db", measurement, lower, upper)
                        .iter()
                        .map(|f| f.path.as_str())
                        .collect();
                    assert_eq!(
                        found,
                        scanned(manifest, measurement, lower, upper),
                        "{measurement} [{lower}, {upper}]"
                    );
                }
            }
            for measurement in ["cpu", "mem"] {
                let all = scanned(manifest, measurement, i64::MIN, i64::MAX);
                assert_eq!(manifest.file_count_for("db", measurement), all.len());
                let by_path: Vec<&str> = manifest
                    .files_for("db", measurement)
                    .map(|f| f.path.as_str())
                    .collect();
                assert_eq!(by_path, all);
            }
        };
        check(&manifest, &mut random);

        // Remove the file covering all time and every long file: the bound shrinks.
        let long: Vec<String> = files
            .iter()
            .filter(|f| f.time_max_us.abs_diff(f.time_min_us) >= 100)
            .map(|f| f.path.clone())
            .collect();
        assert!(long.len() > 3, "the test needs long files");
        manifest.apply(2, &ManifestCommand::Delete { paths: long });
        check(&manifest, &mut random);

        // Compaction of half the rest into one long file, then every remaining file removed.
        let half: Vec<String> = manifest
            .files_for("db", "cpu")
            .step_by(2)
            .map(|f| f.path.clone())
            .collect();
        let mut merged = file("merged", 1, 1);
        merged.time_min_us = -6_000;
        merged.time_max_us = 6_000;
        manifest.apply(
            3,
            &ManifestCommand::Batch {
                add: vec![merged],
                remove: half,
            },
        );
        check(&manifest, &mut random);
        let rest: Vec<String> = manifest.files().keys().map(|k| k.to_string()).collect();
        manifest.apply(4, &ManifestCommand::Delete { paths: rest });
        check(&manifest, &mut random);
        assert_eq!(
            manifest,
            Manifest {
                applied_index: 4,
                ..Manifest::default()
            }
        );
    }

    // Applying under a pinned version must not copy the manifest: the new version shares every
    // unchanged file entry and table declaration with the pinned one (the same allocation), which
    // is what keeps an apply O(log n) at millions of files instead of a copy of every entry.
    #[test]
    fn apply_under_a_pinned_version_shares_unchanged_entries() {
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5)]));
        manifest.apply(2, &declare(&[("host", "tag")]));
        let pinned = manifest.clone();
        manifest.apply(3, &register(vec![file("b", 6, 9)]));
        let mut mem = declare(&[("free", "float")]);
        if let ManifestCommand::DeclareColumns { measurement, .. } = &mut mem {
            *measurement = "mem".to_owned();
        }
        manifest.apply(4, &mem);

        assert!(pinned.file("b").is_none());
        assert!(pinned.table_columns("db", "mem").is_none());
        let shared_file = std::ptr::eq(
            pinned.file("a").expect("pinned a"),
            manifest.file("a").expect("current a"),
        );
        assert!(shared_file, "the entry of an unchanged file was copied");
        let shared_table = std::ptr::eq(
            pinned.table_columns("db", "cpu").expect("pinned cpu"),
            manifest.table_columns("db", "cpu").expect("current cpu"),
        );
        assert!(
            shared_table,
            "the columns of an unchanged table were copied"
        );
    }

    #[test]
    fn node_state_is_recorded() {
        // Node states go through Raft so every node agrees on who is draining or dead.
        let mut manifest = Manifest::default();
        let response = manifest.apply(
            1,
            &ManifestCommand::SetNodeState {
                node_id: 7,
                state: NodeState::Draining,
            },
        );
        assert_eq!(response, applied(0, 0));
        assert_eq!(manifest.node_state(7), Some(NodeState::Draining));
        assert_eq!(manifest.node_state(8), None);
    }

    #[test]
    fn published_clone_is_unaffected_by_later_changes() {
        // Readers pin a version by holding a clone; later applies must not change what they see.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5)]));
        let pinned = manifest.clone();
        manifest.apply(
            2,
            &ManifestCommand::Delete {
                paths: vec!["a".into()],
            },
        );
        assert!(pinned.file("a").is_some());
        assert_eq!(pinned.applied_index(), 1);
        assert!(manifest.file("a").is_none());
    }

    #[test]
    fn image_round_trips_and_rebuilds_the_stream_index() {
        // Snapshots store the image; the derived index must come back identical after a restart.
        let mut manifest = Manifest::default();
        manifest.apply(1, &register(vec![file("a", 1, 5), file("b", 6, 9)]));
        manifest.apply(
            2,
            &ManifestCommand::SetNodeState {
                node_id: 1,
                state: NodeState::Active,
            },
        );
        let restored = Manifest::from_image(manifest.to_image()).expect("valid image");
        assert_eq!(restored, manifest);
    }

    // The bulk rebuild must produce exactly the maps and indexes that applying the files one by
    // one does, whatever order the image lists them in: several tables and streams, shared start
    // times (the time index orders ties by path), shared end LSNs and spans. A path listed twice
    // is refused, as a registration would refuse it.
    #[test]
    fn image_in_any_order_rebuilds_what_apply_builds() {
        let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut files = Vec::new();
        for i in 0..300u64 {
            let mut entry = file(&format!("p{i:03}"), 1, random.below(20) + 1);
            entry.measurement = ["cpu", "mem", "disk"][(i % 3) as usize].to_owned();
            entry.origin_node = random.below(2) + 1;
            entry.shard = random.below(2) as u32;
            entry.time_min_us = random.below(10) as i64 * 100;
            entry.time_max_us = entry.time_min_us + random.below(4) as i64 * 50;
            files.push(entry);
        }
        let mut applied = Manifest::default();
        applied.apply(1, &register(files.clone()));
        let mut image = applied.to_image();
        for i in (1..image.files.len()).rev() {
            image.files.swap(i, random.below(i as u64 + 1) as usize);
        }
        let restored = Manifest::from_image(image.clone()).expect("valid image");
        assert_eq!(restored, applied);
        assert_eq!(
            restored.files_in("db", "mem", 200, 300),
            applied.files_in("db", "mem", 200, 300)
        );

        let duplicate = image.files[7].clone();
        image.files.push(duplicate.clone());
        assert_eq!(
            Manifest::from_image(image),
            Err(Rejection::DuplicatePath {
                path: duplicate.path
            })
        );
    }

    fn declare(columns: &[(&str, &str)]) -> ManifestCommand {
        ManifestCommand::DeclareColumns {
            database: "db".to_owned(),
            measurement: "cpu".to_owned(),
            columns: columns
                .iter()
                .map(|(name, kind)| ColumnDeclaration {
                    name: (*name).to_owned(),
                    kind: (*kind).to_owned(),
                })
                .collect(),
        }
    }

    // A column's kind is fixed by its first declaration: the same kind again is a no-op, a
    // different kind is refused as a whole (no column of that command is added), and the
    // declarations survive an image round trip (snapshots).
    #[test]
    fn column_kinds_are_declared_once() {
        let mut manifest = Manifest::default();
        assert_eq!(
            manifest.apply(1, &declare(&[("host", "tag"), ("usage", "float")])),
            applied(0, 0)
        );
        assert_eq!(
            manifest.apply(2, &declare(&[("usage", "float"), ("idle", "float")])),
            applied(0, 0)
        );
        let response = manifest.apply(3, &declare(&[("extra", "integer"), ("usage", "integer")]));
        assert!(
            matches!(&response, ManifestResponse::Rejected(Rejection::ColumnKind { column, existing, .. }) if column == "usage" && existing == "float"),
            "{response:?}"
        );
        let table = manifest.table_columns("db", "cpu").expect("declared");
        assert_eq!(table.len(), 3);
        assert!(!table.contains_key("extra"));
        assert!(matches!(
            declare(&[("a", "tag"), ("a", "float")]).check(),
            Err(Rejection::ColumnKind { .. })
        ));
        let restored = Manifest::from_image(manifest.to_image()).expect("valid image");
        assert_eq!(restored, manifest);
        // Names that differ only in case would be one column to SQL.
        assert!(matches!(
            manifest.apply(4, &declare(&[("Host", "tag")])),
            ManifestResponse::Rejected(Rejection::InvalidColumns { .. })
        ));
        assert!(matches!(
            declare(&[("a", "tag"), ("A", "tag")]).check(),
            Err(Rejection::InvalidColumns { .. })
        ));
    }
}
