//! The replication driver: runs on the control thread's tokio runtime, watches the published
//! manifest, plans fetches for the files this node lacks, runs them (bounded concurrency, one
//! bandwidth cap per node), records what arrived in the presence index, and publishes the
//! newest manifest version whose files are all present, which is what queries should pin.
//!
//! Planning is incremental ([`Planner`]): a new manifest version costs the files it
//! changed, not the files it has. A full pass happens only at start-up (and when a snapshot
//! install leaves nothing shared between versions).
//!
//! Present version: every manifest version the driver observes becomes a candidate with the set
//! of its files missing at that time (an O(1) copy of the planner's persistent map); a fetched
//! file is struck from every candidate's set; the newest candidate with an empty set is
//! published and older candidates are dropped. Fetch completions cost O(candidates x log n).
//! Candidates are bounded: on overflow the second newest is dropped, so the oldest (which fill
//! first) and the newest stay.
//!
//! Deletes: a path that a new version no longer lists (a `Delete` or a `Batch` removal) stops
//! being fetched at once (a fetch in flight is aborted), and its local copy waits in a queue
//! with the index of the version that removed it. It is removed once no version older than that
//! index is pinned anywhere ([`ManifestWatch::oldest_pinned_index`]: queries, the present
//! version, this driver's candidates), so a query never loses a file under its feet. Removal is
//! durable and crash-safe: the presence index first records the path as being deleted (it stops
//! counting as present), then the file and its partial are unlinked and their directory synced,
//! then the presence entry is forgotten; a restart finishes removals it finds half done, and
//! presence entries for paths the manifest no longer lists are queued for removal at start-up.
//!
//! Files already on disk under their final path (this node's own flushes, or a fetch that was
//! renamed but not yet recorded when the node stopped) are adopted after hashing them on the
//! sink thread, never trusted by name.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::SystemTime;

use shale_io::sink::FileSink;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::control::ManifestClient;
use crate::files::blake3_hex;
use crate::files::fetch::fetch_file;
use crate::files::fetch::BoxFuture;
use crate::files::fetch::ExpectedFile;
use crate::files::fetch::FetchError;
use crate::files::fetch::FileSource;
use crate::files::holdings::Damage;
use crate::files::holdings::Finding;
use crate::files::holdings::HeldFile;
use crate::files::holdings::Holdings;
use crate::files::parse_blake3_hex;

use crate::files::partial_path;
use crate::files::planner::FetchTask;
use crate::files::planner::PeerInfo;
use crate::files::planner::PlanInput;
use crate::files::planner::Planner;
use crate::files::planner::PlannerConfig;
use crate::files::planner::Settled;
use crate::files::presence::PresenceEntry;
use crate::files::presence::PresenceError;
use crate::files::presence::PresenceIndex;
use crate::files::throttle::Throttle;
use crate::files::NodeId;
use crate::manifest::FileMap;
use crate::manifest::Manifest;
use crate::version::ManifestVersion;

/// Limits of the driver; belongs in the node's `[cluster]` config.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Files fetched at once (from different peers where possible).
    pub concurrency: usize,
    /// Bytes per second over all fetches of this node; 0 means unlimited.
    pub bandwidth_bytes_per_second: u64,
    /// Bytes the bandwidth cap lets through at once after an idle spell.
    pub bandwidth_burst_bytes: u64,
    /// Wait before a failed file is tried again (every source failed).
    pub retry_ms: u64,
    /// How long a source that served bad bytes for a file is skipped for that file.
    pub bad_source_forget_ms: u64,
    /// Manifest versions tracked as present-version candidates.
    pub versions_tracked_max: usize,
    /// While deleted files wait for pinned versions to be released, how often the pins are
    /// looked at again.
    pub delete_check_ms: u64,
    /// Files removed from disk in one durable step (one presence append, one unlink pass).
    pub delete_batch_max: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            concurrency: 4,
            bandwidth_bytes_per_second: 0,
            bandwidth_burst_bytes: 8 << 20,
            retry_ms: 1_000,
            bad_source_forget_ms: 600_000,
            versions_tracked_max: 64,
            delete_check_ms: 200,
            delete_batch_max: 1_000,
        }
    }
}

/// The manifest as the driver sees it: the current version, a wake-up when it changes, and the
/// oldest version still pinned.
pub trait ManifestWatch: Send + Sync {
    fn current(&self) -> Arc<ManifestVersion>;
    /// Resolves with `true` once a version with an index above `index` is published, with
    /// `false` when no version will ever come (shutdown). Cancellation-safe.
    fn changed(&self, index: u64) -> BoxFuture<'_, bool>;
    /// The index of the oldest version anyone still holds (see [`crate::version::PinRegistry`]).
    /// A file removed at index `i` is deleted from disk only once this is at least `i`.
    fn oldest_pinned_index(&self) -> u64;
}

impl ManifestWatch for ManifestClient {
    fn current(&self) -> Arc<ManifestVersion> {
        ManifestClient::current(self)
    }

    fn changed(&self, index: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.wait_applied(index + 1).await.is_ok() })
    }

    fn oldest_pinned_index(&self) -> u64 {
        ManifestClient::oldest_pinned_index(self)
    }
}

/// The peers that may serve files right now (members other than this node that are up).
pub type PeerList = Arc<dyn Fn() -> Vec<PeerInfo> + Send + Sync>;

/// Counters and gauges of the driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationMetrics {
    /// Index of the newest manifest version observed.
    pub latest_index: u64,
    /// Index of the published present version, if any.
    pub present_index: Option<u64>,
    /// Lag: files of the latest version not present here, and their bytes.
    pub files_missing: u64,
    pub bytes_missing: u64,
    /// Missing files whose latest plan found no usable source.
    pub files_unsourced: u64,
    pub files_in_flight: u64,
    pub files_fetched_total: u64,
    pub bytes_fetched_total: u64,
    pub files_adopted_total: u64,
    pub fetch_failures_total: u64,
    pub bad_source_total: u64,
    /// Fetches stopped because a new version removed their file.
    pub fetches_cancelled_total: u64,
    /// Removed files waiting for older pinned versions to be released.
    pub files_delete_pending: u64,
    /// Local copies removed from disk and from the presence index.
    pub files_deleted_total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error("presence index: {0}")]
    Presence(#[from] PresenceError),
}

/// Read side for other threads (queries, the cluster API). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReplicatorHandle {
    present: tokio::sync::watch::Receiver<Option<Arc<ManifestVersion>>>,
    metrics: Arc<Mutex<ReplicationMetrics>>,
}

impl ReplicatorHandle {
    /// The newest manifest version whose files are all present on this node, or `None` before
    /// any observed version was complete. Queries pin this one so they never open an absent
    /// file. Holding the `Arc` pins it.
    pub fn present_version(&self) -> Option<Arc<ManifestVersion>> {
        self.present.borrow().clone()
    }

    pub fn metrics(&self) -> ReplicationMetrics {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the present version reaches `index`; `false` if the driver stopped first.
    /// Cancellation-safe.
    pub async fn wait_present(&self, index: u64) -> bool {
        let mut present = self.present.clone();
        let reached = present
            .wait_for(|version| version.as_ref().is_some_and(|v| v.index >= index))
            .await
            .is_ok();
        reached
    }
}

/// Everything the driver needs; see the module documentation.
pub struct ReplicatorParts {
    pub local: NodeId,
    pub data_dir: PathBuf,
    pub presence: PresenceIndex,
    pub sink: FileSink,
    pub source: Arc<dyn FileSource>,
    pub watch: Arc<dyn ManifestWatch>,
    pub peers: PeerList,
    pub config: FetchConfig,
    /// The shared view of what is held, kept equal to the presence index.
    pub holdings: Holdings,
    /// Damaged local copies to set aside and fetch again (from the anti-entropy walker).
    pub repairs: Option<tokio::sync::mpsc::UnboundedReceiver<RepairJob>>,
    /// Told when a source served bytes that contradict the manifest, so that the source checks
    /// its own copy at once.
    pub on_bad_source: Option<BadSourceHook>,
}

/// A local copy found damaged: the replicator records the damage, moves the copy (if any) to
/// `_system/quarantine`, forgets it in the presence index and fetches the file again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairJob {
    pub path: String,
    /// The manifest's blake3 when the damage was found; a job for other bytes is stale.
    pub expected_blake3: String,
    pub finding: Finding,
}

/// Called with (source node, path, manifest blake3) when a source served bad bytes.
pub type BadSourceHook = Arc<dyn Fn(NodeId, &str, &str) + Send + Sync>;

/// Directory below the data directory where damaged copies are moved.
pub const QUARANTINE_DIR: &str = "_system/quarantine";

/// The driver. Build it with [`Replicator::new`], then spawn [`Replicator::run`] on the
/// control thread's runtime.
pub struct Replicator {
    parts: ReplicatorParts,
    throttle: Throttle,
    present: tokio::sync::watch::Sender<Option<Arc<ManifestVersion>>>,
    metrics: Arc<Mutex<ReplicationMetrics>>,
}

struct Candidate {
    version: Arc<ManifestVersion>,
    missing: FileMap,
}

enum Got {
    Fetched { node: NodeId, bytes: u64 },
    Adopted,
}

struct Outcome {
    task: FetchTask,
    got: Option<Got>,
    bad_sources: Vec<NodeId>,
    failures: u64,
}

/// Fetch tasks running, by task id and by path (a path's task is aborted when its file is
/// removed from the manifest).
#[derive(Default)]
struct Running {
    by_id: HashMap<tokio::task::Id, (String, tokio::task::AbortHandle)>,
    by_path: HashMap<String, tokio::task::Id>,
}

impl Running {
    fn insert(&mut self, path: String, abort: tokio::task::AbortHandle) {
        self.by_path.insert(path.clone(), abort.id());
        self.by_id.insert(abort.id(), (path, abort));
    }

    /// Forgets the task of `id`; answers its path.
    fn finished(&mut self, id: tokio::task::Id) -> Option<String> {
        let (path, _) = self.by_id.remove(&id)?;
        self.by_path.remove(&path);
        Some(path)
    }

    /// Aborts the task fetching `path`, if one runs; answers whether one did.
    fn cancel(&mut self, path: &str) -> bool {
        let Some(id) = self.by_path.remove(path) else {
            return false;
        };
        if let Some((_, abort)) = self.by_id.remove(&id) {
            abort.abort();
        }
        true
    }
}

impl Replicator {
    pub fn new(parts: ReplicatorParts) -> (Replicator, ReplicatorHandle) {
        let (present, receiver) = tokio::sync::watch::channel(None);
        let metrics = Arc::new(Mutex::new(ReplicationMetrics::default()));
        let throttle = Throttle::new(
            parts.config.bandwidth_bytes_per_second,
            parts.config.bandwidth_burst_bytes,
        );
        let handle = ReplicatorHandle {
            present: receiver,
            metrics: metrics.clone(),
        };
        (
            Replicator {
                parts,
                throttle,
                present,
                metrics,
            },
            handle,
        )
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, ReplicationMetrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `shutdown` resolves or the manifest shuts down. Fetches in flight are
    /// abandoned at shutdown; their partials stay for the next start. Fails only when the
    /// presence index cannot be written (the disk is failing).
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ReplicatorError> {
        tokio::pin!(shutdown);
        let config = self.parts.config.clone();
        let clock_start = Instant::now();
        let mut planner = Planner::new(PlannerConfig {
            retry: Duration::from_millis(config.retry_ms),
            bad_source_forget: Duration::from_millis(config.bad_source_forget_ms),
        });
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut running = Running::default();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut previous: Option<Arc<ManifestVersion>> = None;
        // Paths removed from the manifest, with the index of the version that removed them, in
        // index order.
        let mut deletes: VecDeque<(u64, String)> = VecDeque::new();

        for entry in self.parts.presence.iter() {
            self.parts.holdings.set_held(&entry.path, held_file(entry));
        }
        // Damage found before a restart and not repaired yet: queries keep waiting for it, and
        // the planner fetches it like any missing file.
        for damage in self.parts.presence.damaged() {
            self.parts.holdings.set_damaged(damage.clone());
        }
        let result = 'run: {
            if let Err(error) = self.finish_interrupted_deletes().await {
                break 'run Err(error);
            }
            loop {
                let version = self.parts.watch.current();
                if previous.as_ref().map(|v| v.index) != Some(version.index) {
                    let observed = planner.observe(
                        previous.as_ref().map(|v| &v.manifest),
                        &version.manifest,
                        &self.parts.presence,
                    );
                    if previous.is_none() {
                        // Start-up: files this node holds that the manifest no longer lists
                        // (deleted while it was down) are queued like fresh removals.
                        for entry in self.parts.presence.iter() {
                            if version.manifest.file(&entry.path).is_none() {
                                deletes.push_back((version.index, entry.path.clone()));
                            }
                        }
                        // Damaged files the manifest dropped while the node was down.
                        let dropped: Vec<Damage> = self
                            .parts
                            .presence
                            .damaged()
                            .filter(|damage| version.manifest.file(&damage.path).is_none())
                            .cloned()
                            .collect();
                        if let Err(error) = self.forget_damage(dropped).await {
                            break 'run Err(error);
                        }
                    }
                    for path in &observed.cancelled {
                        if running.cancel(path) {
                            self.metrics().fetches_cancelled_total += 1;
                            tracing::debug!(path = %path, "fetch cancelled: file removed from the manifest");
                        }
                    }
                    let mut dropped = Vec::new();
                    for path in observed.removed {
                        dropped.extend(self.parts.holdings.damaged(&path));
                        deletes.push_back((version.index, path.to_string()));
                    }
                    if let Err(error) = self.forget_damage(dropped).await {
                        break 'run Err(error);
                    }
                    self.observe(&mut candidates, version.clone(), planner.missing());
                    previous = Some(version.clone());
                }

                if let Err(error) = self.delete_released(&mut deletes, &version.manifest).await {
                    break 'run Err(error);
                }

                let now = Instant::now();
                let peers = (self.parts.peers)();
                let planned = planner.next_tasks(PlanInput {
                    local: self.parts.local,
                    peers: &peers,
                    concurrency: config.concurrency,
                    now: now - clock_start,
                });
                for task in planned {
                    let path = task.path.clone();
                    let abort = tasks.spawn(self.fetch_task(task));
                    running.insert(path, abort);
                }
                {
                    let mut metrics = self.metrics();
                    metrics.latest_index = version.index;
                    metrics.files_missing = planner.missing_files();
                    metrics.bytes_missing = planner.missing_bytes();
                    metrics.files_unsourced = planner.unsourced_files();
                    metrics.files_in_flight = planner.in_flight_files();
                    metrics.files_delete_pending = deletes.len() as u64;
                }

                // Wake for the next retry, or to look at the pins again while deletions wait.
                let mut wake = planner.wake_at().map(|at| clock_start + at);
                if !deletes.is_empty() {
                    let check = now + Duration::from_millis(config.delete_check_ms.max(1));
                    wake = Some(wake.map_or(check, |w| w.min(check)));
                }
                let sleep =
                    tokio::time::sleep_until(wake.unwrap_or(now + Duration::from_secs(3600)));

                tokio::select! {
                    () = &mut shutdown => break 'run Ok(()),
                    alive = self.parts.watch.changed(version.index) => {
                        if !alive {
                            break 'run Ok(());
                        }
                    }
                    Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                        let settled_at = Instant::now() - clock_start;
                        match joined {
                            Ok((id, outcome)) => {
                                if running.finished(id).is_none() {
                                    continue; // Cancelled after it finished: its file is gone.
                                }
                                if let Err(error) = self
                                    .settle(outcome, &mut planner, &mut candidates, settled_at)
                                    .await
                                {
                                    break 'run Err(error);
                                }
                            }
                            Err(error) => {
                                // A panicked task is retried like a failed one; an aborted one
                                // was cancelled and is forgotten already.
                                if let Some(path) = running.finished(error.id()) {
                                    tracing::warn!(path = %path, %error, "fetch task failed");
                                    let blake3_hex = version
                                        .manifest
                                        .file(&path)
                                        .map(|entry| entry.blake3_hex.clone())
                                        .unwrap_or_default();
                                    planner.settle(
                                        &path,
                                        &blake3_hex,
                                        Settled::Failed { bad_sources: Vec::new() },
                                        settled_at,
                                    );
                                }
                            }
                        }
                    }
                    Some(job) = next_repair(&mut self.parts.repairs) => {
                        if let Err(error) = self.repair(job, &mut planner).await {
                            break 'run Err(error);
                        }
                    }
                    () = sleep, if wake.is_some() => {}
                }
            }
        };
        tasks.shutdown().await;
        result
    }

    /// Sets a damaged local copy aside and makes the file missing again, so the planner fetches
    /// it from a peer through the same path as any missing file. The damage is recorded in
    /// [`Holdings`] before the copy moves, so a query waits for the repair instead of silently
    /// skipping the file. The copy is moved, never deleted: it may be the last one anywhere.
    async fn repair(
        &mut self,
        job: RepairJob,
        planner: &mut Planner,
    ) -> Result<(), ReplicatorError> {
        let version = self.parts.watch.current();
        let Some((path, entry)) = version
            .manifest
            .files()
            .get_key_value(job.path.as_str())
            .map(|(path, entry)| (path.clone(), entry.clone()))
        else {
            // Deleted from the manifest meanwhile: nothing to repair.
            self.parts.holdings.clear_damaged(&job.path);
            return Ok(());
        };
        if entry.blake3_hex != job.expected_blake3 {
            // Registered again with other bytes: the finding was about a file that is gone.
            self.parts.holdings.clear_damaged(&job.path);
            return Ok(());
        }
        if planner.is_missing(&job.path) {
            // Being fetched already; its arrival clears the damage.
            return Ok(());
        }
        let found_at_ms = now_ms();
        // The walker recorded the finding already, and may have found the file lost since:
        // keep what it decided.
        let known = self.parts.holdings.damaged(&job.path);
        let mut damage = Damage {
            path: job.path.clone(),
            finding: job.finding.clone(),
            expected_blake3: entry.blake3_hex.clone(),
            found_at_ms: known.as_ref().map_or(found_at_ms, |d| d.found_at_ms),
            quarantined_as: None,
            lost: known.is_some_and(|d| d.lost),
        };
        self.parts.holdings.set_damaged(damage.clone());
        if job.finding != Finding::Missing {
            let data_dir = self.parts.data_dir.clone();
            let relative = job.path.clone();
            let moved =
                tokio::task::spawn_blocking(move || quarantine(&data_dir, &relative, found_at_ms))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match moved {
                Ok(Some(quarantined)) => {
                    self.parts
                        .holdings
                        .counters()
                        .quarantined_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(path = %job.path, finding = %job.finding, quarantined_as = %quarantined, "damaged file moved to quarantine; fetching it again");
                    damage.quarantined_as = Some(quarantined);
                }
                Ok(None) => {}
                // The copy stays in place: it is not served (the fetch server refuses damaged
                // paths) and a verified fetch replaces it.
                Err(error) => {
                    tracing::error!(path = %job.path, %error, "could not move damaged file to quarantine; fetching it again over it")
                }
            }
        }
        // Durable, so a restart before the repair still knows the file was here and lost.
        self.parts
            .presence
            .mark_damaged(&self.parts.sink, damage.clone())
            .await?;
        self.parts.holdings.unset_held([job.path.as_str()]);
        // Only where the copy went: the walker may have decided "lost" meanwhile.
        if !self
            .parts
            .holdings
            .set_quarantined(&job.path, damage.quarantined_as)
        {
            return Ok(());
        }
        planner.mark_missing(&path, &entry);
        Ok(())
    }

    /// Forgets damaged files the manifest no longer lists: they need no repair, and their
    /// quarantined copies hold no file of the manifest any more.
    async fn forget_damage(&mut self, dropped: Vec<Damage>) -> Result<(), ReplicatorError> {
        if dropped.is_empty() {
            return Ok(());
        }
        let mut copies = Vec::new();
        let mut paths = Vec::new();
        for damage in dropped {
            tracing::info!(path = %damage.path, "damaged file removed from the manifest; repair abandoned");
            self.parts.holdings.clear_damaged(&damage.path);
            copies.extend(damage.quarantined_as.map(|q| self.parts.data_dir.join(q)));
            paths.push(damage.path);
        }
        if let Err(error) = self.parts.sink.remove_durable(copies).await {
            tracing::warn!(%error, "remove quarantined copies of removed files");
        }
        self.parts.presence.forget(&self.parts.sink, &paths).await?;
        Ok(())
    }

    /// Finishes removals a previous run started but may not have completed (a crash between
    /// marking and forgetting).
    async fn finish_interrupted_deletes(&mut self) -> Result<(), ReplicatorError> {
        let paths: Vec<String> = self.parts.presence.deleting().map(str::to_owned).collect();
        if paths.is_empty() {
            return Ok(());
        }
        tracing::info!(files = paths.len(), "finishing interrupted file removals");
        self.remove_files(paths).await
    }

    /// Removes the queued files whose removing version is not newer than the oldest pinned
    /// version, i.e. no pinned version still lists them.
    async fn delete_released(
        &mut self,
        deletes: &mut VecDeque<(u64, String)>,
        latest: &Manifest,
    ) -> Result<(), ReplicatorError> {
        if deletes.is_empty() {
            return Ok(());
        }
        let oldest_pinned = self.parts.watch.oldest_pinned_index();
        while deletes
            .front()
            .is_some_and(|(index, _)| *index <= oldest_pinned)
        {
            let mut batch = Vec::new();
            while batch.len() < self.parts.config.delete_batch_max.max(1) {
                match deletes.front() {
                    Some((index, _)) if *index <= oldest_pinned => {}
                    _ => break,
                }
                let Some((_, path)) = deletes.pop_front() else {
                    break;
                };
                // Registered again since (files are immutable, so only with the same bytes): it
                // is a current file, not a deleted one.
                if latest.file(&path).is_none() {
                    batch.push(path);
                }
            }
            if !batch.is_empty() {
                self.remove_files(batch).await?;
            }
        }
        Ok(())
    }

    /// Removes `paths` (and their partials) from disk and from the presence index, in the
    /// crash-safe order of the module documentation.
    async fn remove_files(&mut self, paths: Vec<String>) -> Result<(), ReplicatorError> {
        let recorded: Vec<String> = paths
            .iter()
            .filter(|path| self.parts.presence.get(path).is_some())
            .cloned()
            .collect();
        self.parts
            .presence
            .mark_deleting(&self.parts.sink, &recorded)
            .await?;
        self.parts
            .holdings
            .unset_held(recorded.iter().map(String::as_str));
        let mut files = Vec::with_capacity(paths.len() * 2);
        for path in &paths {
            if crate::files::protocol::check_relative_path(path).is_err() {
                tracing::warn!(path = %path, "removed manifest path is not a plain relative path; not unlinked");
                continue;
            }
            let target = self.parts.data_dir.join(path);
            files.push(partial_path(&target));
            files.push(target);
        }
        match self.parts.sink.remove_durable(files).await {
            Ok(_) => {}
            Err(error) => {
                // The paths stay marked as being deleted: not present, and the next start tries
                // again.
                tracing::warn!(%error, files = paths.len(), "remove deleted files");
                return Ok(());
            }
        }
        self.parts.presence.forget(&self.parts.sink, &paths).await?;
        self.metrics().files_deleted_total += paths.len() as u64;
        tracing::debug!(files = paths.len(), "removed deleted files");
        Ok(())
    }

    /// Adds `version` (with the files it lacks here) as a present-version candidate and
    /// publishes the newest complete one.
    fn observe(
        &self,
        candidates: &mut Vec<Candidate>,
        version: Arc<ManifestVersion>,
        missing: FileMap,
    ) {
        candidates.push(Candidate { version, missing });
        if candidates.len() > self.parts.config.versions_tracked_max.max(2) {
            let second_newest = candidates.len() - 2;
            candidates.remove(second_newest);
        }
        self.publish_present(candidates);
    }

    fn publish_present(&self, candidates: &mut Vec<Candidate>) {
        let Some(newest_complete) = candidates.iter().rposition(|c| c.missing.is_empty()) else {
            return;
        };
        candidates.drain(..newest_complete);
        let version = candidates[0].version.clone();
        let index = version.index;
        let advanced = self
            .present
            .borrow()
            .as_ref()
            .is_none_or(|current| current.index < index);
        if advanced {
            self.present.send_replace(Some(version));
            self.metrics().present_index = Some(index);
            tracing::debug!(index, "present manifest version advanced");
        }
    }

    async fn settle(
        &mut self,
        outcome: Outcome,
        planner: &mut Planner,
        candidates: &mut Vec<Candidate>,
        now: Duration,
    ) -> Result<(), ReplicatorError> {
        let path = outcome.task.path.clone();
        {
            let mut metrics = self.metrics();
            metrics.fetch_failures_total += outcome.failures;
            metrics.bad_source_total += outcome.bad_sources.len() as u64;
        }
        let Some(got) = outcome.got else {
            planner.settle(
                &path,
                &outcome.task.blake3_hex,
                Settled::Failed {
                    bad_sources: outcome.bad_sources,
                },
                now,
            );
            return Ok(());
        };
        if let Got::Fetched { node, bytes } = &got {
            tracing::debug!(path = %path, node, bytes, "fetched file");
        }
        let verified_at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let entry = PresenceEntry {
            path: path.clone(),
            size_bytes: outcome.task.size_bytes,
            blake3_hex: outcome.task.blake3_hex.clone(),
            verified_at_ms,
        };
        self.parts
            .presence
            .insert(&self.parts.sink, entry.clone())
            .await?;
        self.parts.holdings.set_held(&path, held_file(&entry));
        {
            // Counted once the file is recorded, so a reader of the metrics that sees the file
            // counted also finds it in the presence index.
            let mut metrics = self.metrics();
            match got {
                Got::Fetched { bytes, .. } => {
                    metrics.files_fetched_total += 1;
                    metrics.bytes_fetched_total += bytes;
                }
                Got::Adopted => metrics.files_adopted_total += 1,
            }
        }
        planner.settle(&path, &outcome.task.blake3_hex, Settled::Present, now);
        if let Some(damage) = self.parts.holdings.clear_damaged(&path) {
            self.parts
                .holdings
                .counters()
                .repaired_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let took_ms = now_ms().saturating_sub(damage.found_at_ms);
            tracing::info!(path = %path, finding = %damage.finding, took_ms, "repaired damaged file");
            if let Some(quarantined) = damage.quarantined_as {
                // A verified copy is back, so the damaged one holds nothing the cluster lacks.
                let target = self.parts.data_dir.join(&quarantined);
                if let Err(error) = self.parts.sink.remove_durable(vec![target]).await {
                    tracing::warn!(path = %quarantined, %error, "remove repaired file's quarantined copy");
                }
            }
        }
        let mut struck = false;
        for candidate in candidates.iter_mut() {
            let same = candidate
                .missing
                .get(path.as_str())
                .is_some_and(|entry| entry.blake3_hex == outcome.task.blake3_hex);
            if same {
                candidate.missing.remove(path.as_str());
                struck = true;
            }
        }
        if struck {
            self.publish_present(candidates);
        }
        Ok(())
    }

    /// One file: adopt the copy already on disk if it is right, else try the sources in order
    /// until one delivers.
    fn fetch_task(&self, task: FetchTask) -> impl Future<Output = Outcome> + Send + 'static {
        let sink = self.parts.sink.clone();
        let source = self.parts.source.clone();
        let throttle = self.throttle.clone();
        let data_dir = self.parts.data_dir.clone();
        let on_bad_source = self.parts.on_bad_source.clone();
        async move {
            let mut outcome = Outcome {
                task,
                got: None,
                bad_sources: Vec::new(),
                failures: 0,
            };
            let Some(blake3) = parse_blake3_hex(&outcome.task.blake3_hex) else {
                tracing::warn!(path = %outcome.task.path, "manifest blake3 is not hex; not fetched");
                outcome.failures += 1;
                return outcome;
            };
            let expected = ExpectedFile {
                path: outcome.task.path.clone(),
                size_bytes: outcome.task.size_bytes,
                blake3,
            };
            if crate::files::protocol::check_relative_path(&expected.path).is_ok() {
                match sink.hash(&data_dir.join(&expected.path)).await {
                    Ok(Some(written))
                        if written.size_bytes == expected.size_bytes
                            && written.blake3 == expected.blake3 =>
                    {
                        outcome.got = Some(Got::Adopted);
                        return outcome;
                    }
                    Ok(Some(written)) => tracing::warn!(
                        path = %expected.path,
                        size_bytes = written.size_bytes,
                        blake3 = %blake3_hex(&written.blake3),
                        "local copy differs from the manifest; fetching it again"
                    ),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(path = %expected.path, %error, "hash local copy");
                    }
                }
            }
            for &node in &outcome.task.sources.clone() {
                match fetch_file(
                    &sink,
                    &data_dir,
                    &expected,
                    source.as_ref(),
                    node,
                    &throttle,
                )
                .await
                {
                    Ok(fetched) => {
                        outcome.got = Some(Got::Fetched {
                            node,
                            bytes: fetched.transferred_bytes,
                        });
                        return outcome;
                    }
                    Err(error) => {
                        outcome.failures += 1;
                        if error.is_bad_source() {
                            tracing::warn!(path = %expected.path, node, %error, "source served bad bytes; skipped for this file");
                            outcome.bad_sources.push(node);
                            if let Some(hook) = &on_bad_source {
                                hook(node, &expected.path, &outcome.task.blake3_hex);
                            }
                        } else if matches!(error, FetchError::Sink(_) | FetchError::BadPath { .. })
                        {
                            tracing::warn!(path = %expected.path, %error, "fetch failed locally");
                            return outcome;
                        } else {
                            tracing::debug!(path = %expected.path, node, %error, "fetch failed; trying the next source");
                        }
                    }
                }
            }
            outcome
        }
    }
}

async fn next_repair(
    repairs: &mut Option<tokio::sync::mpsc::UnboundedReceiver<RepairJob>>,
) -> Option<RepairJob> {
    match repairs {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Moves `<data dir>/<path>` to `<data dir>/_system/quarantine/<at_ms>/<path>` durably (both
/// directories synced); answers the new relative path, or `None` when there was no file.
fn quarantine(
    data_dir: &std::path::Path,
    path: &str,
    at_ms: i64,
) -> std::io::Result<Option<String>> {
    crate::files::protocol::check_relative_path(path).map_err(std::io::Error::other)?;
    let source = data_dir.join(path);
    if std::fs::symlink_metadata(&source).is_err() {
        return Ok(None);
    }
    let relative = format!("{QUARANTINE_DIR}/{at_ms}/{path}");
    let target = data_dir.join(&relative);
    let parent = target
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent"))?;
    std::fs::create_dir_all(parent)?;
    match std::fs::rename(&source, &target) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    }
    // The new name first: a crash after it leaves the file in quarantine, never nowhere.
    std::fs::File::open(parent)?.sync_all()?;
    if let Some(old_parent) = source.parent() {
        std::fs::File::open(old_parent)?.sync_all()?;
    }
    // The directories created below the quarantine root.
    let mut dir = parent.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == data_dir.join("_system") || d == data_dir {
            break;
        }
        dir = d.parent();
    }
    Ok(Some(relative))
}

fn held_file(entry: &PresenceEntry) -> HeldFile {
    HeldFile {
        size_bytes: entry.size_bytes,
        blake3_hex: Arc::from(entry.blake3_hex.as_str()),
        verified_at_ms: entry.verified_at_ms,
    }
}
