//! The replication driver: runs on the control thread's tokio runtime, watches the published
//! manifest, plans fetches for the files this node lacks, runs them (bounded concurrency, one
//! bandwidth cap per node), records what arrived in the presence index, and publishes the
//! newest manifest version whose files are all present, which is what queries should pin.
//!
//! Present version: every manifest version the driver observes becomes a candidate with the set
//! of its files missing at that time; a fetched file is struck from every candidate's set; the
//! newest candidate with an empty set is published and older candidates are dropped. Observing
//! a version scans its files once (O(files)); fetch completions cost O(candidates). Candidates
//! are bounded: on overflow the second newest is dropped, so the oldest (which fill first) and
//! the newest stay.
//!
//! Files already on disk under their final path (this node's own flushes, or a fetch that was
//! renamed but not yet recorded when the node stopped) are adopted after hashing them on the
//! sink thread, never trusted by name.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
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
use crate::files::parse_blake3_hex;
use crate::files::planner;
use crate::files::planner::FetchTask;
use crate::files::planner::PeerInfo;
use crate::files::planner::PlanInput;
use crate::files::presence::PresenceEntry;
use crate::files::presence::PresenceError;
use crate::files::presence::PresenceIndex;
use crate::files::throttle::Throttle;
use crate::files::NodeId;
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
        }
    }
}

/// The manifest as the driver sees it: the current version and a wake-up when it changes.
pub trait ManifestWatch: Send + Sync {
    fn current(&self) -> Arc<ManifestVersion>;
    /// Resolves with `true` once a version with an index above `index` is published, with
    /// `false` when no version will ever come (shutdown). Cancellation-safe.
    fn changed(&self, index: u64) -> BoxFuture<'_, bool>;
}

impl ManifestWatch for ManifestClient {
    fn current(&self) -> Arc<ManifestVersion> {
        ManifestClient::current(self)
    }

    fn changed(&self, index: u64) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.wait_applied(index + 1).await.is_ok() })
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
    /// Missing files no usable source can serve now.
    pub files_unsourced: u64,
    pub files_in_flight: u64,
    pub files_fetched_total: u64,
    pub bytes_fetched_total: u64,
    pub files_adopted_total: u64,
    pub fetch_failures_total: u64,
    pub bad_source_total: u64,
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
}

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
    missing: BTreeSet<String>,
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

    /// Runs until `shutdown` resolves or the manifest shuts down. Fetches in flight are
    /// abandoned at shutdown; their partials stay for the next start. Fails only when the
    /// presence index cannot be written (the disk is failing).
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ReplicatorError> {
        tokio::pin!(shutdown);
        let config = self.parts.config.clone();
        let retry = Duration::from_millis(config.retry_ms);
        let forget = Duration::from_millis(config.bad_source_forget_ms);
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut in_flight: BTreeSet<String> = BTreeSet::new();
        let mut deferred: BTreeMap<String, Instant> = BTreeMap::new();
        let mut bad: BTreeMap<String, BTreeMap<NodeId, Instant>> = BTreeMap::new();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut seen_index: Option<u64> = None;
        let result = loop {
            let version = self.parts.watch.current();
            let now = Instant::now();
            deferred.retain(|_, until| *until > now);
            for sources in bad.values_mut() {
                sources.retain(|_, until| *until > now);
            }
            bad.retain(|_, sources| !sources.is_empty());

            if seen_index != Some(version.index) {
                seen_index = Some(version.index);
                self.observe(&mut candidates, version.clone());
            }

            let peers = (self.parts.peers)();
            let busy: BTreeSet<String> = in_flight.iter().chain(deferred.keys()).cloned().collect();
            let bad_view: BTreeMap<String, BTreeSet<NodeId>> = bad
                .iter()
                .map(|(path, sources)| (path.clone(), sources.keys().copied().collect()))
                .collect();
            let plan = planner::plan(
                &version.manifest,
                &self.parts.presence,
                PlanInput {
                    local: self.parts.local,
                    peers: &peers,
                    busy: &busy,
                    bad_sources: &bad_view,
                    tasks_max: config.concurrency.max(1).saturating_sub(in_flight.len()),
                },
            );
            for task in plan.tasks {
                in_flight.insert(task.path.clone());
                tasks.spawn(self.fetch_task(task));
            }
            {
                let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                metrics.latest_index = version.index;
                metrics.files_missing = plan.missing_files;
                metrics.bytes_missing = plan.missing_bytes;
                metrics.files_unsourced = plan.unsourced_files;
                metrics.files_in_flight = in_flight.len() as u64;
            }

            // Wake for the next retry, the next forgotten bad source, or (with files no source
            // can serve) a fresh look at the peers.
            let mut wake = deferred.values().min().copied();
            let forgotten = bad.values().flat_map(|s| s.values()).min().copied();
            wake = [wake, forgotten].into_iter().flatten().min();
            if plan.unsourced_files > 0 {
                wake = Some(wake.map_or(now + retry, |w| w.min(now + retry)));
            }
            let sleep = tokio::time::sleep_until(wake.unwrap_or(now + Duration::from_secs(3600)));

            tokio::select! {
                () = &mut shutdown => break Ok(()),
                alive = self.parts.watch.changed(version.index) => {
                    if !alive {
                        break Ok(());
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok(outcome) = joined else {
                        continue; // A panicked fetch task; its path is retried below.
                    };
                    in_flight.remove(&outcome.task.path);
                    if let Err(error) = self
                        .settle(outcome, &mut candidates, &mut deferred, &mut bad, retry, forget)
                        .await
                    {
                        break Err(error);
                    }
                }
                () = sleep, if wake.is_some() => {}
            }
        };
        tasks.shutdown().await;
        result
    }

    /// Adds `version` as a present-version candidate and publishes the newest complete one.
    fn observe(&self, candidates: &mut Vec<Candidate>, version: Arc<ManifestVersion>) {
        let missing: BTreeSet<String> = version
            .manifest
            .files()
            .iter()
            .filter(|(path, entry)| !self.parts.presence.contains(path, &entry.blake3_hex))
            .map(|(path, _)| path.to_string())
            .collect();
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
            self.metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .present_index = Some(index);
            tracing::debug!(index, "present manifest version advanced");
        }
    }

    async fn settle(
        &mut self,
        outcome: Outcome,
        candidates: &mut Vec<Candidate>,
        deferred: &mut BTreeMap<String, Instant>,
        bad: &mut BTreeMap<String, BTreeMap<NodeId, Instant>>,
        retry: Duration,
        forget: Duration,
    ) -> Result<(), ReplicatorError> {
        let now = Instant::now();
        let path = outcome.task.path.clone();
        for node in &outcome.bad_sources {
            bad.entry(path.clone())
                .or_default()
                .insert(*node, now + forget);
        }
        {
            let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
            metrics.fetch_failures_total += outcome.failures;
            metrics.bad_source_total += outcome.bad_sources.len() as u64;
        }
        let Some(got) = outcome.got else {
            deferred.insert(path, now + retry);
            return Ok(());
        };
        if let Got::Fetched { node, bytes } = &got {
            tracing::debug!(path = %path, node, bytes, "fetched file");
        }
        let verified_at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.parts
            .presence
            .insert(
                &self.parts.sink,
                PresenceEntry {
                    path: path.clone(),
                    size_bytes: outcome.task.size_bytes,
                    blake3_hex: outcome.task.blake3_hex.clone(),
                    verified_at_ms,
                },
            )
            .await?;
        {
            // Counted once the file is recorded, so a reader of the metrics that sees the file
            // counted also finds it in the presence index.
            let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
            match got {
                Got::Fetched { bytes, .. } => {
                    metrics.files_fetched_total += 1;
                    metrics.bytes_fetched_total += bytes;
                }
                Got::Adopted => metrics.files_adopted_total += 1,
            }
        }
        bad.remove(&path);
        for candidate in candidates.iter_mut() {
            let same = candidate
                .version
                .manifest
                .file(&path)
                .is_some_and(|entry| entry.blake3_hex == outcome.task.blake3_hex);
            if same {
                candidate.missing.remove(&path);
            }
        }
        self.publish_present(candidates);
        Ok(())
    }

    /// One file: adopt the copy already on disk if it is right, else try the sources in order
    /// until one delivers.
    fn fetch_task(&self, task: FetchTask) -> impl Future<Output = Outcome> + Send + 'static {
        let sink = self.parts.sink.clone();
        let source = self.parts.source.clone();
        let throttle = self.throttle.clone();
        let data_dir = self.parts.data_dir.clone();
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
