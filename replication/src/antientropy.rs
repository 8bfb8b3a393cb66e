//! The anti-entropy walker: proves, continuously, that this node holds every file of the
//! manifest byte for byte, and has what it does not hold repaired.
//!
//! Three tasks on the control thread's tokio runtime share one [`Shared`]:
//!
//! - The cheap pass: pages through the current manifest (a copied list of `page_files` paths
//!   per step, the version looked up afresh for each page, never pinned for a pass), and for each
//!   file the presence index records as held checks that the file is on disk with the manifest's
//!   size (the stats run on tokio's blocking pool). Then it lists the data directory for
//!   orphans: files no manifest version references. An orphan is reported at once and deleted
//!   only after `orphan_grace` when it is still unreferenced and every version pinned since it
//!   was first seen is newer than that moment; `_system`, partial fetches, publish temporaries,
//!   files named by a pending flush journal, files the presence index records (the replicator
//!   removes those) and files younger than the grace are never orphans. Passes are separated
//!   by a fixed delay (`cheap_pass_interval`), not run at a fixed rate.
//! - The deep scrub: re-reads every held file with blake3 on the `shale-fetch` glommio thread
//!   (O_DIRECT, so the bytes come from the disk), at a rate that finishes a cycle in
//!   `scrub_cycle_target` but never above `scrub_bytes_per_second`.
//! - The repairer: hands damaged files to the replicator ([`RepairJob`]), at most
//!   `repair_concurrency` at once; the replicator records the damage in [`Holdings`], moves the
//!   copy to `_system/quarantine`, and fetches the file through the replication path from a
//!   peer whose copy matches the manifest (the fetch verifies size and blake3). Whether a file
//!   is lost is decided by asking every other member about its copy ([`CheckRequest`], which
//!   makes the member deep-check that copy at once): only when every member answers and none
//!   holds a good copy is the file reported lost (ERROR log, metric, status). The question is
//!   asked again every `lost_recheck` while the file stays damaged.
//!
//! A peer that served bytes not matching the manifest is told at once (the replicator's
//! bad-source hook sends it a deep [`CheckRequest`]), and deep-checks its own copy.
//!
//! Pausing stops the passes and the scrub at their next step; repairs already handed over
//! finish, and checks asked by peers are still answered.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::ops::Bound;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::SystemTime;

use serde::Deserialize;
use serde::Serialize;
use shale_io::sink::FileSink;
use tokio::time::Instant;

use crate::files::fetch::BoxFuture;
use crate::files::holdings::Damage;
use crate::files::holdings::Finding;
use crate::files::holdings::Holdings;
use crate::files::replicator::ManifestWatch;
use crate::files::replicator::PeerList;
use crate::files::replicator::RepairJob;
use crate::files::NodeId;
use crate::files::PARTIAL_SUFFIX;
use crate::manifest::FileEntry;

/// Settings of the walker (the node's `[antientropy]` section).
#[derive(Clone, Debug)]
pub struct WalkerConfig {
    pub paused: bool,
    pub cheap_pass_interval: Duration,
    pub page_files: usize,
    /// The deep scrub's read bandwidth cap.
    pub scrub_bytes_per_second: u64,
    pub scrub_cycle_target: Duration,
    pub repair_concurrency: usize,
    pub orphan_grace: Duration,
    pub lost_recheck: Duration,
    /// How long a peer's answer to a check may take.
    pub check_timeout: Duration,
}

impl Default for WalkerConfig {
    fn default() -> Self {
        WalkerConfig {
            paused: false,
            cheap_pass_interval: Duration::from_secs(60),
            page_files: 1000,
            scrub_bytes_per_second: 50_000_000,
            scrub_cycle_target: Duration::from_secs(7 * 24 * 3600),
            repair_concurrency: 2,
            orphan_grace: Duration::from_secs(24 * 3600),
            lost_recheck: Duration::from_secs(30),
            check_timeout: Duration::from_secs(30),
        }
    }
}

/// A question to a member about its copy of a file. With `deep`, the member re-hashes its
/// copy before answering (and has it repaired if it is damaged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub path: String,
    pub blake3_hex: String,
    pub deep: bool,
}

/// A member's answer about its copy of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CheckAnswer {
    /// Held, on disk, with the manifest's size (and, deep, its blake3).
    Good,
    /// Not held here (never fetched, or set aside).
    Missing,
    /// Held but found damaged now, or damaged and waiting for a repair.
    Damaged { finding: Finding },
    /// The member's manifest has no such file with this blake3.
    NotInManifest,
    /// The member could not check.
    Failed { error: String },
}

/// Asks another member about its copy of a file (a `FileCheck` call over the transport).
pub trait PeerCheck: Send + Sync {
    fn check(
        &self,
        node: NodeId,
        request: CheckRequest,
    ) -> BoxFuture<'_, Result<CheckAnswer, String>>;
}

/// What a scrub read found: the file's size and blake3, or `None` when there is no file.
pub type Scrubbed = Result<Option<(u64, [u8; 32])>, String>;

/// Reads a file's size and blake3 at a bandwidth limit (bytes per second, 0 unlimited): the
/// deep scrub's read. `None` when the file does not exist.
pub trait ScrubRead: Send + Sync {
    fn scrub(&self, path: PathBuf, bytes_per_second: u64) -> BoxFuture<'_, Scrubbed>;
}

impl ScrubRead for FileSink {
    fn scrub(&self, path: PathBuf, bytes_per_second: u64) -> BoxFuture<'_, Scrubbed> {
        Box::pin(async move {
            let written = FileSink::scrub(self, &path, bytes_per_second)
                .await
                .map_err(|e| e.to_string())?;
            Ok(written.map(|w| (w.size_bytes, w.blake3)))
        })
    }
}

/// Counters and gauges of the walker, for `GET /api/v1/cluster` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WalkerStatus {
    pub paused: bool,
    pub cheap_passes_total: u64,
    /// Duration of the last complete cheap pass.
    pub cheap_pass_last_ms: u64,
    /// Manifest files looked at by cheap passes and the scrub.
    pub files_walked_total: u64,
    pub files_missing_total: u64,
    pub files_wrong_size_total: u64,
    pub files_corrupt_total: u64,
    pub files_quarantined_total: u64,
    pub files_repaired_total: u64,
    pub files_lost_total: u64,
    /// Files damaged here now, and those of them no member holds a good copy of.
    pub files_damaged: u64,
    pub files_lost: u64,
    /// Damaged files waiting for a repair slot or being repaired.
    pub repair_queue_depth: u64,
    pub scrub_cycles_total: u64,
    pub scrub_files_total: u64,
    pub bytes_verified_total: u64,
    /// The rate the scrub runs at in its current cycle.
    pub scrub_bytes_per_second: u64,
    /// Age of the oldest verification of a held file: how far the current deep-scrub cycle is
    /// from having proved every file.
    pub oldest_unverified_age_s: u64,
    pub orphans: u64,
    pub orphans_deleted_total: u64,
    /// Peers told they served bad bytes, and checks answered for peers.
    pub bad_sources_told_total: u64,
    pub checks_answered_total: u64,
    /// The damaged files (up to 100) and orphans (up to 100).
    pub damaged: Vec<Damage>,
    pub orphan_paths: Vec<String>,
}

/// Read side and controls of the walker. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct WalkerHandle {
    shared: Arc<Shared>,
}

impl WalkerHandle {
    pub fn status(&self) -> WalkerStatus {
        let mut status = self
            .shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let holdings = &self.shared.parts.holdings;
        let counters = holdings.counters();
        status.paused = self.shared.paused.load(Ordering::Relaxed);
        status.checks_answered_total = self.shared.checks_answered.load(Ordering::Relaxed);
        status.files_quarantined_total = counters.quarantined_total.load(Ordering::Relaxed);
        status.files_repaired_total = counters.repaired_total.load(Ordering::Relaxed);
        status.files_lost_total = counters.lost_total.load(Ordering::Relaxed);
        status.files_missing_total = counters.missing_total.load(Ordering::Relaxed);
        status.files_wrong_size_total = counters.wrong_size_total.load(Ordering::Relaxed);
        status.files_corrupt_total = counters.corrupt_total.load(Ordering::Relaxed);
        let damaged = holdings.damage_list();
        status.files_damaged = damaged.len() as u64;
        status.files_lost = damaged.iter().filter(|d| d.lost).count() as u64;
        status.damaged = damaged.into_iter().take(100).collect();
        status.oldest_unverified_age_s = holdings.oldest_verified_ms().map_or(0, |oldest| {
            (now_ms().saturating_sub(oldest).max(0) / 1000) as u64
        });
        status
    }

    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Relaxed);
        tracing::info!("anti-entropy walker paused");
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Relaxed);
        self.shared.resumed.notify_waiters();
        tracing::info!("anti-entropy walker resumed");
    }

    /// Answers a member's question about this node's copy of a file (see [`CheckRequest`]).
    pub async fn answer_check(&self, request: CheckRequest) -> CheckAnswer {
        self.shared.checks_answered.fetch_add(1, Ordering::Relaxed);
        self.shared.check_local(&request).await
    }
}

/// Everything the walker needs.
pub struct WalkerParts {
    pub local: NodeId,
    pub data_dir: PathBuf,
    pub holdings: Holdings,
    pub watch: Arc<dyn ManifestWatch>,
    pub scrub: Arc<dyn ScrubRead>,
    pub repairs: tokio::sync::mpsc::UnboundedSender<RepairJob>,
    pub peers: PeerList,
    pub checker: Arc<dyn PeerCheck>,
    pub config: WalkerConfig,
}

struct Shared {
    parts: WalkerParts,
    paused: AtomicBool,
    resumed: tokio::sync::Notify,
    status: Mutex<WalkerStatus>,
    /// Damaged files waiting for a repair slot, in order found.
    queue: Mutex<VecDeque<RepairJob>>,
    queued: tokio::sync::Notify,
    checks_answered: AtomicU64,
}

/// Starts the walker's tasks on the current tokio runtime.
pub fn start(parts: WalkerParts) -> WalkerHandle {
    let paused = parts.config.paused;
    let shared = Arc::new(Shared {
        parts,
        paused: AtomicBool::new(paused),
        resumed: tokio::sync::Notify::new(),
        status: Mutex::new(WalkerStatus::default()),
        queue: Mutex::new(VecDeque::new()),
        queued: tokio::sync::Notify::new(),
        checks_answered: AtomicU64::new(0),
    });
    tokio::spawn(cheap_passes(shared.clone()));
    tokio::spawn(deep_scrub(shared.clone()));
    tokio::spawn(repairer(shared.clone()));
    if paused {
        tracing::info!("anti-entropy walker starts paused");
    }
    WalkerHandle { shared }
}

/// Tells `node` that it served bytes of `path` not matching `blake3_hex`, so that it
/// deep-checks its copy at once. Fire and forget.
pub fn tell_bad_source(handle: &WalkerHandle, node: NodeId, path: &str, blake3_hex: &str) {
    let shared = handle.shared.clone();
    let request = CheckRequest {
        path: path.to_owned(),
        blake3_hex: blake3_hex.to_owned(),
        deep: true,
    };
    shared.status().bad_sources_told_total += 1;
    tokio::spawn(async move {
        let answer = tokio::time::timeout(
            shared.parts.config.check_timeout,
            shared.parts.checker.check(node, request.clone()),
        )
        .await;
        tracing::info!(node, path = %request.path, answer = ?answer, "told source it served bad bytes");
    });
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, WalkerStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Waits while the walker is paused.
    async fn wait_resumed(&self) {
        while self.paused() {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.paused() {
                return;
            }
            resumed.await;
        }
    }

    /// The manifest's entry for `path` if it still names `blake3_hex` and the presence index
    /// still records the file held (so a finding about it is not a race with a delete or a
    /// fetch).
    fn still_expected(&self, path: &str, blake3_hex: &str) -> Option<Arc<FileEntry>> {
        let version = self.parts.watch.current();
        let entry = version.manifest.files().get(path)?.clone();
        let held = self.parts.holdings.held(path)?;
        (entry.blake3_hex == blake3_hex && *held.blake3_hex == *blake3_hex).then_some(entry)
    }

    /// Records a finding about a held file and queues its repair, unless the file changed
    /// meanwhile or is damaged already.
    fn report(&self, path: &str, blake3_hex: &str, finding: Finding) -> bool {
        if self.parts.holdings.damaged(path).is_some()
            || self.still_expected(path, blake3_hex).is_none()
        {
            return false;
        }
        // Recorded at once, so a second finding of the same damage (the scrub and a peer's
        // check can meet) is not counted twice, and queries wait from this moment on.
        self.parts.holdings.set_damaged(Damage {
            path: path.to_owned(),
            finding: finding.clone(),
            expected_blake3: blake3_hex.to_owned(),
            found_at_ms: now_ms(),
            quarantined_as: None,
            lost: false,
        });
        self.parts.holdings.counters().found(&finding);
        tracing::warn!(path = %path, finding = %finding, "anti-entropy found a damaged file");
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if !queue.iter().any(|job| job.path == path) {
            queue.push_back(RepairJob {
                path: path.to_owned(),
                expected_blake3: blake3_hex.to_owned(),
                finding,
            });
        }
        drop(queue);
        self.queued.notify_one();
        true
    }

    /// Checks one local file now: the manifest, the presence index, the disk (and its bytes,
    /// deep). A damaged copy found here is reported for repair.
    async fn check_local(&self, request: &CheckRequest) -> CheckAnswer {
        let version = self.parts.watch.current();
        let Some(entry) = version.manifest.file(&request.path).cloned() else {
            return CheckAnswer::NotInManifest;
        };
        if entry.blake3_hex != request.blake3_hex {
            return CheckAnswer::NotInManifest;
        }
        if let Some(damage) = self.parts.holdings.damaged(&request.path) {
            return CheckAnswer::Damaged {
                finding: damage.finding,
            };
        }
        if self.parts.holdings.held(&request.path).is_none() {
            return CheckAnswer::Missing;
        }
        let file = self.parts.data_dir.join(&request.path);
        let finding = if request.deep {
            match self.parts.scrub.scrub(file, 0).await {
                Err(error) => return CheckAnswer::Failed { error },
                Ok(found) => {
                    if let Some((size, _)) = found {
                        self.status().bytes_verified_total += size;
                    }
                    judge(&entry, found)
                }
            }
        } else {
            let size =
                tokio::task::spawn_blocking(move || std::fs::metadata(file).map(|m| m.len()).ok())
                    .await
                    .unwrap_or(None);
            match size {
                None => Some(Finding::Missing),
                Some(size) if size != entry.size_bytes => {
                    Some(Finding::WrongSize { found_bytes: size })
                }
                Some(_) => None,
            }
        };
        match finding {
            None => {
                if request.deep {
                    self.parts.holdings.set_verified(&request.path, now_ms());
                }
                CheckAnswer::Good
            }
            Some(finding) => {
                self.report(&request.path, &request.blake3_hex, finding.clone());
                CheckAnswer::Damaged { finding }
            }
        }
    }
}

/// What a read of a file says about it against its manifest entry.
fn judge(entry: &FileEntry, found: Option<(u64, [u8; 32])>) -> Option<Finding> {
    match found {
        None => Some(Finding::Missing),
        Some((size, _)) if size != entry.size_bytes => {
            Some(Finding::WrongSize { found_bytes: size })
        }
        Some((_, hash)) => {
            let found = crate::files::blake3_hex(&hash);
            (found != entry.blake3_hex).then_some(Finding::Corrupt {
                found_blake3: found,
            })
        }
    }
}

/// The manifest files after `cursor` (all from the start when `None`), up to `count`: a copied
/// page of the version current now.
fn manifest_page(
    watch: &dyn ManifestWatch,
    cursor: Option<&str>,
    count: usize,
) -> Vec<Arc<FileEntry>> {
    let version = watch.current();
    let files = version.manifest.files();
    let range = match cursor {
        None => files.range::<_, str>(..),
        Some(cursor) => files.range::<_, str>((Bound::Excluded(cursor), Bound::Unbounded)),
    };
    range
        .take(count.max(1))
        .map(|(_, entry)| entry.clone())
        .collect()
}

async fn cheap_passes(shared: Arc<Shared>) {
    let mut orphans: BTreeMap<String, OrphanSeen> = BTreeMap::new();
    loop {
        shared.wait_resumed().await;
        let started = Instant::now();
        let mut cursor: Option<String> = None;
        let mut walked = 0u64;
        loop {
            shared.wait_resumed().await;
            // Suspects reported by readers first: they found a held file absent.
            check_suspects(&shared).await;
            let page = manifest_page(
                shared.parts.watch.as_ref(),
                cursor.as_deref(),
                shared.parts.config.page_files,
            );
            let Some(last) = page.last() else { break };
            cursor = Some(last.path.clone());
            walked += page.len() as u64;
            check_sizes(&shared, page).await;
        }
        if let Err(error) = find_orphans(&shared, &mut orphans).await {
            tracing::warn!(%error, "orphan scan failed");
        }
        {
            let mut status = shared.status();
            status.cheap_passes_total += 1;
            status.cheap_pass_last_ms = started.elapsed().as_millis() as u64;
            status.files_walked_total += walked;
            status.orphans = orphans.len() as u64;
            status.orphan_paths = orphans.keys().take(100).cloned().collect();
        }
        tracing::debug!(
            files = walked,
            took_ms = started.elapsed().as_millis() as u64,
            "cheap pass done"
        );
        // A fixed delay between passes; a reader's suspect cuts it short.
        tokio::select! {
            () = tokio::time::sleep(shared.parts.config.cheap_pass_interval) => {}
            () = shared.parts.holdings.suspect_reported() => {}
        }
    }
}

async fn check_suspects(shared: &Arc<Shared>) {
    let suspects = shared.parts.holdings.take_suspects();
    if suspects.is_empty() {
        return;
    }
    let version = shared.parts.watch.current();
    let page: Vec<Arc<FileEntry>> = suspects
        .iter()
        .filter_map(|path| version.manifest.files().get(path.as_str()).cloned())
        .collect();
    check_sizes(shared, page).await;
}

/// The cheap check of one page: every held file on disk with the manifest's size.
async fn check_sizes(shared: &Arc<Shared>, page: Vec<Arc<FileEntry>>) {
    let held: Vec<Arc<FileEntry>> = page
        .into_iter()
        .filter(|entry| {
            shared
                .parts
                .holdings
                .held(&entry.path)
                .is_some_and(|held| *held.blake3_hex == *entry.blake3_hex)
                && shared.parts.holdings.damaged(&entry.path).is_none()
        })
        .collect();
    if held.is_empty() {
        return;
    }
    let data_dir = shared.parts.data_dir.clone();
    let sizes = tokio::task::spawn_blocking(move || {
        held.into_iter()
            .map(|entry| {
                let size = std::fs::metadata(data_dir.join(&entry.path))
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len());
                (entry, size)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (entry, size) in sizes {
        let finding = match size {
            None => Finding::Missing,
            Some(size) if size != entry.size_bytes => Finding::WrongSize { found_bytes: size },
            Some(_) => continue,
        };
        shared.report(&entry.path, &entry.blake3_hex, finding);
    }
}

/// When an orphan was first seen, and the manifest index then.
#[derive(Clone, Copy, Debug)]
struct OrphanSeen {
    at: Instant,
    index: u64,
}

/// Lists the data directory for files no manifest version references; reports them and
/// deletes those unreferenced for the grace period (see the module documentation).
async fn find_orphans(
    shared: &Arc<Shared>,
    orphans: &mut BTreeMap<String, OrphanSeen>,
) -> std::io::Result<()> {
    let data_dir = shared.parts.data_dir.clone();
    let grace = shared.parts.config.orphan_grace;
    let listed = tokio::task::spawn_blocking(move || list_orphan_candidates(&data_dir, grace))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    let version = shared.parts.watch.current();
    let now = Instant::now();
    let mut seen_now = BTreeSet::new();
    for path in listed {
        if version.manifest.file(&path).is_some() || shared.parts.holdings.held(&path).is_some() {
            continue;
        }
        seen_now.insert(path.clone());
        orphans.entry(path.clone()).or_insert_with(|| {
            tracing::warn!(path = %path, "orphan file: on disk but in no manifest version; deleted after the grace period");
            OrphanSeen { at: now, index: version.index }
        });
    }
    orphans.retain(|path, _| seen_now.contains(path));
    let oldest_pinned = shared.parts.watch.oldest_pinned_index();
    let due: Vec<String> = orphans
        .iter()
        .filter(|(_, seen)| now.duration_since(seen.at) >= grace && oldest_pinned >= seen.index)
        .map(|(path, _)| path.clone())
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    let current = shared.parts.watch.current();
    let data_dir = shared.parts.data_dir.clone();
    let mut removed = 0u64;
    for path in due {
        // Looked up once more right before the unlink: registered meanwhile means not an orphan.
        if current.manifest.file(&path).is_some() {
            orphans.remove(&path);
            continue;
        }
        let target = data_dir.join(&path);
        let result = tokio::task::spawn_blocking(move || {
            std::fs::remove_file(&target)?;
            if let Some(parent) = target.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        match result {
            Ok(()) => {
                tracing::warn!(path = %path, "deleted orphan file after its grace period");
                removed += 1;
            }
            Err(error) => tracing::warn!(path = %path, %error, "delete orphan file"),
        }
        orphans.remove(&path);
    }
    shared.status().orphans_deleted_total += removed;
    Ok(())
}

/// Visits every regular file below `root` (a missing directory has none), descending into the
/// directories `descend` accepts; `visit` gets each file's entry.
fn for_each_file(
    root: &Path,
    descend: &dyn Fn(&Path) -> bool,
    visit: &mut dyn FnMut(&std::fs::DirEntry) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if descend(&entry.path()) {
                    stack.push(entry.path());
                }
            } else if kind.is_file() {
                visit(&entry)?;
            }
        }
    }
    Ok(())
}

/// Regular files under the data directory, outside `_system`, that are not partial fetches,
/// publish temporaries, journaled, or younger than `grace`; relative paths.
fn list_orphan_candidates(data_dir: &Path, grace: Duration) -> std::io::Result<Vec<String>> {
    let journaled = journaled_paths(data_dir)?;
    // The node's own state, and what fsck recovers on a data directory that is a file
    // system's root (an operator's to look at, never ours to delete).
    let skipped = [data_dir.join("_system"), data_dir.join("lost+found")];
    let mut found = Vec::new();
    let now = SystemTime::now();
    for_each_file(
        data_dir,
        &|dir| !skipped.iter().any(|skip| skip == dir),
        &mut |entry| {
            let path = entry.path();
            let Some(relative) = path.strip_prefix(data_dir).ok().and_then(Path::to_str) else {
                return Ok(());
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(PARTIAL_SUFFIX)
                || (name.starts_with('.') && name.ends_with(shale_io::publish::TEMPORARY_SUFFIX))
                || journaled.contains(relative)
            {
                return Ok(());
            }
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|modified| now.duration_since(modified).unwrap_or_default() < grace)
                .unwrap_or(true);
            if !young {
                found.push(relative.to_owned());
            }
            Ok(())
        },
    )?;
    Ok(found)
}

/// Paths named by the shards' pending flush journals (`_system/pending/**`, set-aside ones
/// included). A journal that cannot be read fails the scan: deleting nothing beats deleting a
/// file a journal still names.
fn journaled_paths(data_dir: &Path) -> std::io::Result<BTreeSet<String>> {
    #[derive(Deserialize)]
    struct Named {
        path: String,
    }
    let mut paths = BTreeSet::new();
    for_each_file(
        &data_dir.join("_system").join("pending"),
        &|_| true,
        &mut |entry| {
            // A journal being published is a temporary (`.<name>.tmp`) until its rename; the
            // files it names are young then.
            if entry.file_name().to_string_lossy().starts_with('.') {
                return Ok(());
            }
            let bytes = std::fs::read(entry.path())?;
            if bytes.is_empty() {
                return Ok(());
            }
            let named: Vec<Named> = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!("pending journal {}: {e}", entry.path().display()))
            })?;
            paths.extend(named.into_iter().map(|n| n.path));
            Ok(())
        },
    )?;
    Ok(paths)
}

async fn deep_scrub(shared: Arc<Shared>) {
    loop {
        shared.wait_resumed().await;
        let cycle_started = Instant::now();
        let target = shared.parts.config.scrub_cycle_target;
        let cap = shared.parts.config.scrub_bytes_per_second;
        // Slow enough to spread the cycle over its target, never faster than the cap; at least
        // 1 MB/s so a small data set is not read at a crawl.
        let needed =
            (shared.parts.holdings.held_bytes() as f64 / target.as_secs_f64().max(1.0)) as u64;
        let rate = needed.max(1_000_000).min(cap);
        shared.status().scrub_bytes_per_second = rate;
        let mut cursor: Option<String> = None;
        loop {
            shared.wait_resumed().await;
            let page = manifest_page(
                shared.parts.watch.as_ref(),
                cursor.as_deref(),
                shared.parts.config.page_files,
            );
            let Some(last) = page.last() else { break };
            cursor = Some(last.path.clone());
            for entry in page {
                shared.wait_resumed().await;
                let held = shared
                    .parts
                    .holdings
                    .held(&entry.path)
                    .is_some_and(|held| *held.blake3_hex == *entry.blake3_hex);
                if !held || shared.parts.holdings.damaged(&entry.path).is_some() {
                    continue;
                }
                let found = match shared
                    .parts
                    .scrub
                    .scrub(shared.parts.data_dir.join(&entry.path), rate)
                    .await
                {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::warn!(path = %entry.path, %error, "scrub read failed");
                        continue;
                    }
                };
                {
                    let mut status = shared.status();
                    status.scrub_files_total += 1;
                    status.files_walked_total += 1;
                    status.bytes_verified_total += found.map_or(0, |(size, _)| size);
                }
                match judge(&entry, found) {
                    None => shared.parts.holdings.set_verified(&entry.path, now_ms()),
                    Some(finding) => {
                        shared.report(&entry.path, &entry.blake3_hex, finding);
                    }
                }
            }
        }
        shared.status().scrub_cycles_total += 1;
        tracing::debug!(
            took_ms = cycle_started.elapsed().as_millis() as u64,
            "deep scrub cycle done"
        );
        let next =
            (cycle_started + target).max(Instant::now() + shared.parts.config.cheap_pass_interval);
        tokio::time::sleep_until(next).await;
    }
}

/// Hands queued damage to the replicator within the repair concurrency, follows what is being
/// repaired, and decides (by asking every member) whether an unrepaired file is lost.
async fn repairer(shared: Arc<Shared>) {
    let mut in_repair: BTreeSet<String> = BTreeSet::new();
    let mut asked_at: HashMap<String, Instant> = HashMap::new();
    loop {
        // Repaired (or dropped from the manifest): the replicator cleared the damage.
        in_repair.retain(|path| shared.parts.holdings.damaged(path).is_some());
        asked_at.retain(|path, _| shared.parts.holdings.damaged(path).is_some());
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while in_repair.len() < shared.parts.config.repair_concurrency.max(1) {
                let Some(job) = queue.pop_front() else { break };
                in_repair.insert(job.path.clone());
                if shared.parts.repairs.send(job).is_err() {
                    return; // The replicator stopped.
                }
            }
            shared.status().repair_queue_depth = (queue.len() + in_repair.len()) as u64;
        }
        // Lost or not: asked for each damaged file when first seen here, then every recheck.
        let now = Instant::now();
        let due: Vec<Damage> = shared
            .parts
            .holdings
            .damage_list()
            .into_iter()
            .filter(|damage| {
                asked_at
                    .get(&damage.path)
                    .is_none_or(|at| now.duration_since(*at) >= shared.parts.config.lost_recheck)
            })
            .collect();
        for damage in due {
            // The first question makes every member re-hash its copy (and set it aside if it
            // is damaged too); later ones only ask, since a copy found damaged is gone by then.
            let deep = asked_at.insert(damage.path.clone(), now).is_none();
            let shared = shared.clone();
            tokio::spawn(async move { decide_lost(&shared, damage, deep).await });
        }
        tokio::select! {
            () = shared.queued.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Asks every other member about its copy of a damaged file (`deep`: re-hashing it): lost
/// only when every member answered and none holds a good copy.
async fn decide_lost(shared: &Arc<Shared>, damage: Damage, deep: bool) {
    let peers = (shared.parts.peers)();
    let request = CheckRequest {
        path: damage.path.clone(),
        blake3_hex: damage.expected_blake3.clone(),
        deep,
    };
    let mut asks = tokio::task::JoinSet::new();
    for peer in peers {
        let shared = shared.clone();
        let request = request.clone();
        asks.spawn(async move {
            let answer = tokio::time::timeout(
                shared.parts.config.check_timeout,
                shared.parts.checker.check(peer.node_id, request),
            )
            .await;
            (
                peer.node_id,
                answer.map_err(|_| "timed out".to_string()).and_then(|a| a),
            )
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = asks.join_next().await {
        if let Ok(answer) = joined {
            answers.push(answer);
        }
    }
    let holdings = &shared.parts.holdings;
    let Some(current) = holdings.damaged(&damage.path) else {
        return;
    };
    match verdict(&answers) {
        Verdict::Held { good } => {
            if current.lost {
                holdings.set_lost(&damage.path, false);
                tracing::warn!(path = %damage.path, good = ?good, "file no longer lost: a member holds a good copy");
            }
        }
        Verdict::Lost { asked } => {
            if !current.lost {
                holdings.set_lost(&damage.path, true);
                holdings
                    .counters()
                    .lost_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    path = %damage.path,
                    expected_blake3 = %damage.expected_blake3,
                    finding = %damage.finding,
                    members_asked = asked,
                    quarantined_as = ?damage.quarantined_as,
                    "file lost: no member holds a copy matching the manifest; the damaged copy is kept in quarantine"
                );
            }
        }
        Verdict::Unknown {
            unanswered,
            without,
        } => {
            tracing::warn!(path = %damage.path, unanswered = ?unanswered, without = ?without, "damaged file has no good copy among the members that answered");
        }
    }
}

/// What the members' answers about a damaged file say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// These members hold a good copy: the repair can fetch it.
    Held { good: Vec<NodeId> },
    /// Every member answered and none holds a good copy (`asked` members; none is lost when
    /// the node is alone, since nobody else could hold it).
    Lost { asked: usize },
    /// No member that answered holds a good copy, but some did not answer (or answered from
    /// another manifest version): not lost, not repairable yet.
    Unknown {
        unanswered: Vec<NodeId>,
        without: Vec<NodeId>,
    },
}

/// The sans-IO core of the lost decision: "lost" only from a complete set of answers.
pub fn verdict(answers: &[(NodeId, Result<CheckAnswer, String>)]) -> Verdict {
    let mut good = Vec::new();
    let mut unanswered = Vec::new();
    let mut without = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(CheckAnswer::Good) => good.push(*node),
            Ok(CheckAnswer::Missing | CheckAnswer::Damaged { .. }) => without.push(*node),
            // A member whose manifest differs (behind or ahead) cannot settle the question.
            Ok(CheckAnswer::NotInManifest | CheckAnswer::Failed { .. }) | Err(_) => {
                unanswered.push(*node)
            }
        }
    }
    if !good.is_empty() {
        Verdict::Held { good }
    } else if unanswered.is_empty() {
        Verdict::Lost {
            asked: without.len(),
        }
    } else {
        Verdict::Unknown {
            unanswered,
            without,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size_bytes: u64, bytes: &[u8]) -> FileEntry {
        FileEntry {
            path: "db/m/2026/01/01/00/f.parquet".into(),
            size_bytes,
            blake3_hex: blake3::hash(bytes).to_hex().to_string(),
            rows: 1,
            time_min_us: 0,
            time_max_us: 0,
            database: "db".into(),
            measurement: "m".into(),
            origin_node: 1,
            shard: 0,
            lsn_first: 1,
            lsn_last: 1,
            created_at_ms: 0,
            columns_fingerprint: 0,
            taken_by: None,
        }
    }

    // A read is judged against the manifest: absent, another size, another hash, or good.
    #[test]
    fn judging_a_read_against_the_manifest() {
        let bytes = b"parquet bytes";
        let file = entry(bytes.len() as u64, bytes);
        let hash = *blake3::hash(bytes).as_bytes();
        assert_eq!(judge(&file, Some((bytes.len() as u64, hash))), None);
        assert_eq!(judge(&file, None), Some(Finding::Missing));
        assert_eq!(
            judge(&file, Some((3, hash))),
            Some(Finding::WrongSize { found_bytes: 3 })
        );
        let other = *blake3::hash(b"parquet bytez").as_bytes();
        assert_eq!(
            judge(&file, Some((bytes.len() as u64, other))),
            Some(Finding::Corrupt {
                found_blake3: crate::files::blake3_hex(&other)
            })
        );
    }

    // "Lost" needs every member's answer: one good copy anywhere means repairable, and a
    // member that did not answer (or answered from another manifest) keeps it undecided.
    #[test]
    fn a_file_is_lost_only_when_every_member_answered_without_a_good_copy() {
        let damaged = || {
            Ok(CheckAnswer::Damaged {
                finding: Finding::Missing,
            })
        };
        assert_eq!(
            verdict(&[(2, damaged()), (3, Ok(CheckAnswer::Good))]),
            Verdict::Held { good: vec![3] }
        );
        assert_eq!(
            verdict(&[(2, damaged()), (3, Ok(CheckAnswer::Missing))]),
            Verdict::Lost { asked: 2 }
        );
        assert_eq!(
            verdict(&[(2, damaged()), (3, Err("timed out".into()))]),
            Verdict::Unknown {
                unanswered: vec![3],
                without: vec![2]
            }
        );
        assert_eq!(
            verdict(&[(2, Ok(CheckAnswer::NotInManifest)), (3, damaged())]),
            Verdict::Unknown {
                unanswered: vec![2],
                without: vec![3]
            }
        );
        assert_eq!(verdict(&[]), Verdict::Lost { asked: 0 });
    }

    // The check wire format is JSON with a status tag: a stored sample still decodes.
    #[test]
    fn check_messages_decode_from_stored_samples() {
        let request: CheckRequest = serde_json::from_str(
            r#"{"path":"db/m/2026/01/01/00/f.parquet","blake3_hex":"ab","deep":true}"#,
        )
        .unwrap();
        assert!(request.deep);
        let answer: CheckAnswer = serde_json::from_str(
            r#"{"status":"damaged","finding":{"kind":"wrong_size","found_bytes":7}}"#,
        )
        .unwrap();
        assert_eq!(
            answer,
            CheckAnswer::Damaged {
                finding: Finding::WrongSize { found_bytes: 7 }
            }
        );
    }
}
