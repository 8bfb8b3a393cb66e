//! The I/O of verification: the server that answers `Verify` calls from this node's holdings
//! and disk, the coordinator that asks every member and builds the report, and the handle the
//! HTTP API uses to reach the coordinator.
//!
//! Threads: the server and the coordinator run on the control thread's tokio runtime. Stats run
//! on tokio's blocking pool (one task per page), deep re-hashing on the `shale-fetch` glommio
//! thread (the file sink), so the control thread never waits for the disk. The handle works
//! from any executor (a glommio shard awaits a flume reply).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use shale_io::sink::FileSink;

use super::build_report;
use super::compare_digests;
use super::database_exists;
use super::digest_page;
use super::expected_partitions;
use super::file_page;
use super::found_cached;
use super::found_hashed;
use super::plan_digest_page;
use super::plan_file_page;
use super::protocol;
use super::protocol::Found;
use super::protocol::Page;
use super::protocol::Query;
use super::protocol::VerifyAnswer;
use super::protocol::VerifyRequest;
use super::Expected;
use super::NodeFindings;
use super::PageLimits;
use super::PagePlan;
use super::VerifyReport;
use crate::files::holdings::Holdings;
use crate::raft_types::ClusterNode;
use crate::raft_types::NodeId;
use crate::raft_types::Raft;
use crate::transport::raft_network::node_quic_addr;
use crate::transport::CallHandler;
use crate::transport::StreamKind;
use crate::transport::Transport;
use crate::version::ManifestVersion;
use crate::version::Published;

/// Bounds and timings of verification.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// How long a node whose applied index is below the coordinator's waits for it before
    /// answering as behind.
    pub behind_wait: Duration,
    /// Bound on one page's call (the node's work included).
    pub call_timeout: Duration,
    /// Bound on one deep page's call: the node re-hashes up to `page.deep_bytes_max` for it.
    pub deep_call_timeout: Duration,
    pub page: PageLimits,
    /// Partitions named in one file request (the request's size bound).
    pub partitions_per_request: usize,
    /// Verifications running at once on this node; more wait in the queue.
    pub concurrent_max: usize,
    /// Verifications waiting; a request beyond them is refused as busy.
    pub queue_depth: usize,
}

impl Default for VerifyConfig {
    fn default() -> VerifyConfig {
        VerifyConfig {
            behind_wait: Duration::from_secs(2),
            call_timeout: Duration::from_secs(30),
            deep_call_timeout: Duration::from_secs(120),
            page: PageLimits::default(),
            partitions_per_request: 1_000,
            concurrent_max: 2,
            queue_depth: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("database {0} does not exist (no files in the manifest and no declared table)")]
    UnknownDatabase(String),
    #[error("too many verifications are queued on this node; try again later")]
    Busy,
    #[error("the verification service stopped")]
    Stopped,
}

/// What the verification service needs besides the plane's transport, Raft and manifest.
pub struct VerifyParts {
    pub holdings: Holdings,
    /// Re-hashes files for deep verification.
    pub sink: FileSink,
    pub data_dir: PathBuf,
    pub config: VerifyConfig,
}

/// Serves `Verify` calls with `parts` and starts the coordinator; answers its handle. Must run
/// on the control thread's runtime.
pub fn start(
    transport: &Transport,
    raft: Raft,
    published: Arc<Published>,
    parts: VerifyParts,
) -> VerifyHandle {
    let config = Arc::new(parts.config);
    let server = Arc::new(VerifyServer {
        published: published.clone(),
        holdings: parts.holdings,
        sink: parts.sink,
        data_dir: parts.data_dir,
        config: config.clone(),
    });
    transport.set_call_handler(StreamKind::Verify, Arc::new(VerifyCalls(server.clone())));
    let coordinator = Arc::new(Coordinator {
        local: transport.node_id(),
        server,
        transport: transport.clone(),
        raft,
        published,
        config: config.clone(),
    });
    let (jobs, queue) = flume::bounded::<Job>(config.queue_depth.max(1));
    let permits = Arc::new(tokio::sync::Semaphore::new(config.concurrent_max.max(1)));
    tokio::spawn(async move {
        while let Ok(job) = queue.recv_async().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                let result = coordinator.verify(&job.database, job.deep).await;
                let _ = job.reply.send(result);
                drop(permit);
            });
        }
    });
    VerifyHandle { jobs }
}

struct Job {
    database: String,
    deep: bool,
    reply: flume::Sender<Result<VerifyReport, VerifyError>>,
}

/// Reaches the coordinator on the control thread from any thread or executor. Cheap to clone.
#[derive(Clone)]
pub struct VerifyHandle {
    jobs: flume::Sender<Job>,
}

impl std::fmt::Debug for VerifyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyHandle").finish_non_exhaustive()
    }
}

impl VerifyHandle {
    /// Verifies `database` on every member. Dropping the future abandons the answer, not the
    /// verification, which runs to its end.
    pub async fn verify(&self, database: &str, deep: bool) -> Result<VerifyReport, VerifyError> {
        let (reply, answer) = flume::bounded(1);
        let job = Job {
            database: database.to_owned(),
            deep,
            reply,
        };
        self.jobs.try_send(job).map_err(|error| match error {
            flume::TrySendError::Full(_) => VerifyError::Busy,
            flume::TrySendError::Disconnected(_) => VerifyError::Stopped,
        })?;
        answer
            .recv_async()
            .await
            .map_err(|_| VerifyError::Stopped)?
    }
}

/// Answers verification pages from this node's holdings and disk.
struct VerifyServer {
    published: Arc<Published>,
    holdings: Holdings,
    sink: FileSink,
    data_dir: PathBuf,
    config: Arc<VerifyConfig>,
}

impl VerifyServer {
    /// Answers at this node's applied index, after waiting briefly for the request's.
    async fn answer(&self, request: &VerifyRequest) -> VerifyAnswer {
        let version = self.version_at_least(request.index).await;
        let behind = version.index < request.index;
        let manifest = &version.manifest;
        let limits = &self.config.page;
        match &request.query {
            Query::Digests { after, limit } => {
                let plan = plan_digest_page(
                    manifest,
                    &request.database,
                    after.as_deref(),
                    *limit as usize,
                    request.deep,
                    limits,
                );
                let found = self.examine(&plan, request.deep).await;
                VerifyAnswer {
                    index: version.index,
                    behind,
                    page: Page::Digests(digest_page(&plan, &found)),
                    next: plan.next,
                }
            }
            Query::Files {
                partitions,
                after,
                limit,
            } => {
                let plan = plan_file_page(
                    manifest,
                    &request.database,
                    partitions,
                    after.as_deref(),
                    *limit as usize,
                    request.deep,
                    limits,
                );
                let found = self.examine(&plan, request.deep).await;
                VerifyAnswer {
                    index: version.index,
                    behind,
                    page: Page::Files(file_page(&plan, found)),
                    next: plan.next.clone(),
                }
            }
        }
    }

    async fn version_at_least(&self, index: u64) -> Arc<ManifestVersion> {
        if let Some(applied) = self.published.wait_for(index) {
            // Still behind after the wait: the answer says so instead of waiting longer.
            let _ = tokio::time::timeout(self.config.behind_wait, applied.recv_async()).await;
        }
        self.published.current()
    }

    /// What this node finds for each file of the plan, in the plan's order.
    async fn examine(&self, plan: &PagePlan, deep: bool) -> Vec<Found> {
        let candidates: Vec<_> = plan.candidates().collect();
        let targets: Vec<Result<PathBuf, String>> = candidates
            .iter()
            .map(|candidate| {
                crate::files::protocol::check_relative_path(&candidate.path)
                    .map(|()| self.data_dir.join(&candidate.path))
                    .map_err(|why| format!("manifest path is {why}"))
            })
            .collect();
        if deep {
            let mut found = Vec::with_capacity(candidates.len());
            for (candidate, target) in candidates.iter().zip(targets) {
                let hashed = match target {
                    Err(error) => Err(error),
                    Ok(target) => self
                        .sink
                        .hash(&target)
                        .await
                        .map(|written| {
                            written.map(|w| (w.size_bytes, crate::files::blake3_hex(&w.blake3)))
                        })
                        .map_err(|e| e.to_string()),
                };
                found.push(found_hashed(candidate, hashed));
            }
            return found;
        }
        let held: Vec<Option<Arc<str>>> = candidates
            .iter()
            .map(|candidate| {
                self.holdings
                    .held(&candidate.path)
                    .map(|file| file.blake3_hex)
            })
            .collect();
        let sizes = tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .map(|target| target.and_then(|target| size_on_disk(&target)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|error| {
            let message = format!("stat task failed: {error}");
            vec![Err(message); candidates.len()]
        });
        candidates
            .iter()
            .zip(held)
            .zip(sizes)
            .map(|((candidate, held), size)| found_cached(candidate, held.as_deref(), size))
            .collect()
    }
}

/// The size of the regular file at `path`, `None` if there is none. A symlink or a directory
/// where a data file should be is reported, not followed.
fn size_on_disk(path: &std::path::Path) -> Result<Option<u64>, String> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
        Ok(_) => Err("not a regular file".to_owned()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// The `Verify` call handler.
struct VerifyCalls(Arc<VerifyServer>);

impl CallHandler for VerifyCalls {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let server = self.0.clone();
        Box::pin(async move {
            let request: VerifyRequest = protocol::decode(&request)
                .map_err(|e| format!("verify request from node {peer}: {e}"))?;
            let answer = server.answer(&request).await;
            protocol::encode(&answer).map_err(|e| e.to_string())
        })
    }
}

/// Asks every member and builds the report.
struct Coordinator {
    local: NodeId,
    server: Arc<VerifyServer>,
    transport: Transport,
    raft: Raft,
    published: Arc<Published>,
    config: Arc<VerifyConfig>,
}

/// What one verification asks every node, shared by the node tasks.
struct Round {
    database: String,
    index: u64,
    deep: bool,
    expected: BTreeMap<String, Expected>,
    bytes_exchanged: AtomicU64,
}

impl Coordinator {
    async fn verify(
        self: &Arc<Self>,
        database: &str,
        deep: bool,
    ) -> Result<VerifyReport, VerifyError> {
        let started = Instant::now();
        let version = self.published.current();
        if !database_exists(&version.manifest, database) {
            return Err(VerifyError::UnknownDatabase(database.to_owned()));
        }
        let round = Arc::new(Round {
            database: database.to_owned(),
            index: version.index,
            deep,
            expected: expected_partitions(&version.manifest, database),
            bytes_exchanged: AtomicU64::new(0),
        });
        let members: Vec<(NodeId, ClusterNode)> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (position, (node_id, node)) in members.into_iter().enumerate() {
            let coordinator = self.clone();
            let round = round.clone();
            tasks.spawn(async move {
                let findings = coordinator.verify_node(node_id, node, &round).await;
                (position, findings)
            });
        }
        let mut findings: Vec<(usize, NodeFindings)> = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(found) => findings.push(found),
                Err(error) => tracing::error!(%error, "verify node task failed"),
            }
        }
        findings.sort_by_key(|(position, _)| *position);
        let findings: Vec<NodeFindings> = findings.into_iter().map(|(_, f)| f).collect();
        let mut report = build_report(database, &version.manifest, deep, &findings);
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        report.bytes_exchanged = round.bytes_exchanged.load(Ordering::Relaxed);
        tracing::info!(
            database,
            deep,
            manifest_index = report.manifest_index,
            status = report.status.as_str(),
            elapsed_ms = report.elapsed_ms,
            bytes_exchanged = report.bytes_exchanged,
            "verified database across peers"
        );
        Ok(report)
    }

    async fn verify_node(&self, node_id: NodeId, node: ClusterNode, round: &Round) -> NodeFindings {
        let mut findings = NodeFindings {
            node_id,
            name: node.name.clone(),
            ..NodeFindings::default()
        };
        let target = if node_id == self.local {
            None
        } else {
            match node_quic_addr(&node) {
                Ok(addr) => Some(addr),
                Err(error) => {
                    findings.error = Some(error);
                    return findings;
                }
            }
        };
        if let Err(error) = self.gather(&mut findings, target, round).await {
            tracing::warn!(node_id, database = %round.database, %error, "verify incomplete for a node");
            findings.error = Some(error);
        }
        findings
    }

    /// Phase 1 (digests of every partition), then phase 2 (files of the partitions whose
    /// digest differs from the manifest's), each paged.
    async fn gather(
        &self,
        findings: &mut NodeFindings,
        target: Option<SocketAddr>,
        round: &Round,
    ) -> Result<(), String> {
        let limit = self.config.page.entries_max as u32;
        let mut digests = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let query = Query::Digests {
                after: after.clone(),
                limit,
            };
            let answer = self.ask(findings.node_id, target, round, query).await?;
            findings.index.get_or_insert(answer.index);
            findings.behind |= answer.behind;
            let Page::Digests(page) = answer.page else {
                return Err("answered a digest request with files".to_owned());
            };
            digests.extend(page.into_iter().map(|d| (d.partition.clone(), d)));
            after = advance(after, answer.next)?;
            if after.is_none() {
                break;
            }
        }
        findings.digests = compare_digests(&round.expected, &digests);
        let differing = findings.digests.differing.clone();
        for partitions in differing.chunks(self.config.partitions_per_request.max(1)) {
            let mut after: Option<String> = None;
            loop {
                let query = Query::Files {
                    partitions: partitions.to_vec(),
                    after: after.clone(),
                    limit,
                };
                let answer = self.ask(findings.node_id, target, round, query).await?;
                findings.behind |= answer.behind;
                let Page::Files(page) = answer.page else {
                    return Err("answered a file request with digests".to_owned());
                };
                findings
                    .files
                    .extend(page.into_iter().map(|f| (f.path, f.found)));
                after = advance(after, answer.next)?;
                if after.is_none() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One page from a node: this node's own server directly, a peer over the transport.
    async fn ask(
        &self,
        node_id: NodeId,
        target: Option<SocketAddr>,
        round: &Round,
        query: Query,
    ) -> Result<VerifyAnswer, String> {
        let request = VerifyRequest {
            database: round.database.clone(),
            index: round.index,
            deep: round.deep,
            query,
        };
        let Some(addr) = target else {
            return Ok(self.server.answer(&request).await);
        };
        let encoded = protocol::encode(&request).map_err(|e| e.to_string())?;
        // The transport's two header bytes and two status bytes travel too.
        let sent = encoded.len() as u64 + 2;
        let timeout = if round.deep {
            self.config.deep_call_timeout
        } else {
            self.config.call_timeout
        };
        let answer = self
            .transport
            .call(node_id, addr, StreamKind::Verify, encoded, timeout)
            .await
            .map_err(|e| e.to_string())?;
        round
            .bytes_exchanged
            .fetch_add(sent + answer.len() as u64 + 2, Ordering::Relaxed);
        protocol::decode(&answer).map_err(|e| e.to_string())
    }
}

/// The next page's start; refuses a continuation that does not move forward, which would
/// otherwise ask for the same page forever.
fn advance(after: Option<String>, next: Option<String>) -> Result<Option<String>, String> {
    match (after, next) {
        (_, None) => Ok(None),
        (Some(after), Some(next)) if next <= after => Err(format!(
            "page continuation {next:?} does not advance past {after:?}"
        )),
        (_, Some(next)) => Ok(Some(next)),
    }
}
