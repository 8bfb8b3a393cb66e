//! The manifest service: the control thread that hosts openraft, and the client handle every
//! other thread uses to propose commands and read the applied manifest.
//!
//! Threads: [`ManifestService`] owns the `shale-control` thread, a tokio current-thread runtime
//! running the Raft core, its state-machine task and one task per proposal (so a slow proposal
//! never blocks the loop). The Raft log's disk writes run on the log store's own writer thread.
//! [`ManifestClient`] is the only way in: plain flume channels and an `ArcSwap`, so glommio
//! shards and std threads use it without touching tokio or the Raft handle.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use openraft::error::ClientWriteError;
use openraft::error::Fatal;
use openraft::error::RaftError;
use openraft::RaftMetrics;
use openraft::RaftNetworkFactory;
use openraft::SnapshotPolicy;

use crate::log_store::LogStore;
use crate::log_store::LogStoreError;
use crate::manifest::ManifestCommand;
use crate::manifest::ManifestResponse;
use crate::manifest::Rejection;
use crate::network::UnreachableNetwork;
use crate::raft_types::ClusterNode;
use crate::raft_types::NodeId;
use crate::raft_types::Raft;
use crate::raft_types::TypeConfig;
use crate::state_machine::ManifestStateMachine;
use crate::state_machine::SnapshotError;
use crate::version::ManifestVersion;
use crate::version::Published;

/// Configuration of the manifest service. All limits carry their unit in the name.
#[derive(Debug, Clone)]
pub struct ManifestConfig {
    /// Holds `raft-log` and `snapshot-<term>-<index>.json`.
    pub dir: PathBuf,
    pub node_id: NodeId,
    /// This node as the membership records it (addresses peers and clients dial).
    pub node: ClusterNode,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs_since_last_max: u64,
    /// Entries kept in the log behind a snapshot, so lagging peers catch up without a snapshot.
    pub snapshot_logs_kept_max: u64,
    /// Proposals waiting for the control thread; `propose` waits while the queue is full.
    pub request_queue_depth_max: usize,
    /// Proposals the control thread has in Raft at once.
    pub proposals_in_flight_max: usize,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    pub heartbeat_interval_ms: u64,
    /// Bound on `start`: opening Raft and, for a standalone node, becoming leader and applying
    /// the whole log.
    pub start_timeout_ms_max: u64,
    /// Rewrite the Raft log file once dead records exceed this many bytes (and the live ones).
    pub log_rewrite_garbage_bytes_min: u64,
    /// Initialize a one-voter group of this node when the storage is fresh: a standalone node
    /// and a cluster's bootstrap node do; a node joining a cluster waits to be added.
    pub initialize_if_fresh: bool,
}

impl ManifestConfig {
    /// Defaults for everything but the identity.
    pub fn new(
        dir: impl Into<PathBuf>,
        node_id: NodeId,
        http_addr: impl Into<String>,
    ) -> ManifestConfig {
        ManifestConfig {
            dir: dir.into(),
            node_id,
            node: ClusterNode::new("", "", http_addr),
            snapshot_logs_since_last_max: 1000,
            snapshot_logs_kept_max: 100,
            request_queue_depth_max: 1024,
            proposals_in_flight_max: 256,
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_interval_ms: 50,
            start_timeout_ms_max: 10_000,
            log_rewrite_garbage_bytes_min: 16 << 20,
            initialize_if_fresh: true,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, ManifestError> {
        if self.request_queue_depth_max == 0 || self.proposals_in_flight_max == 0 {
            return Err(ManifestError::Config(
                "request_queue_depth_max and proposals_in_flight_max must be positive".to_owned(),
            ));
        }
        if self.snapshot_logs_since_last_max == 0 {
            return Err(ManifestError::Config(
                "snapshot_logs_since_last_max must be positive".to_owned(),
            ));
        }
        openraft::Config {
            cluster_name: "shale-manifest".to_owned(),
            election_timeout_min: self.election_timeout_ms_min,
            election_timeout_max: self.election_timeout_ms_max,
            heartbeat_interval: self.heartbeat_interval_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last_max),
            max_in_snapshot_log_to_keep: self.snapshot_logs_kept_max,
            // Snapshots travel to peers in chunks; each chunk has this long.
            install_snapshot_timeout: 10_000,
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ManifestError::Config(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest service is shut down")]
    Shutdown,
    #[error("this node is not the manifest leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("manifest command rejected: {0}")]
    Rejected(Rejection),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid manifest config: {0}")]
    Config(String),
    #[error("open raft log: {0}")]
    LogStore(#[from] LogStoreError),
    #[error("open manifest snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("start control thread: {0}")]
    Thread(std::io::Error),
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout { what: &'static str, timeout_ms: u64 },
}

/// A committed proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReceipt {
    /// Raft log index of the command; `wait_applied(log_index)` gives read-your-writes.
    pub log_index: u64,
    /// Always [`ManifestResponse::Applied`]; rejections come back as [`ManifestError::Rejected`].
    pub response: ManifestResponse,
}

/// Plain numbers for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestMetrics {
    /// Proposals committed and applied.
    pub commits_total: u64,
    /// Proposals refused, before proposing or when applied; the manifest did not change.
    pub rejections_total: u64,
    /// Proposals that failed without a decision (not leader, Raft stopped or failed).
    pub commit_errors_total: u64,
    pub applied_index: u64,
    pub files: u64,
    pub current_leader: Option<NodeId>,
    pub is_leader: bool,
    pub current_term: u64,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub requests_queued: u64,
    pub proposals_in_flight: u64,
}

/// Counters shared by the control thread (writer) and clients (readers).
#[derive(Debug)]
struct Counters {
    commits_total: AtomicU64,
    rejections_total: AtomicU64,
    commit_errors_total: AtomicU64,
    proposals_in_flight: AtomicU64,
    /// Raft metrics mirrored as atomics; `NONE` stands for `None`.
    current_leader: AtomicU64,
    current_term: AtomicU64,
    last_log_index: AtomicU64,
    snapshot_index: AtomicU64,
    purged_index: AtomicU64,
    /// Why Raft stopped on its own (a storage or internal error), once it did. A requested
    /// shutdown is not a failure.
    failure: std::sync::OnceLock<String>,
    /// The latest Raft metrics as a whole (membership, replication progress), for the cluster
    /// API; replaced on every change.
    raft: arc_swap::ArcSwapOption<RaftMetrics<NodeId, ClusterNode>>,
    /// While `true`, new proposals wait before they reach Raft (a leadership transfer holds
    /// them, so the target's log can equal the leader's when it asks for votes).
    paused: tokio::sync::watch::Sender<bool>,
}

const NONE: u64 = u64::MAX;

fn load_option(value: &AtomicU64) -> Option<u64> {
    Some(value.load(Ordering::Relaxed)).filter(|v| *v != NONE)
}

impl Counters {
    fn new() -> Counters {
        let counters = Counters {
            commits_total: AtomicU64::new(0),
            rejections_total: AtomicU64::new(0),
            commit_errors_total: AtomicU64::new(0),
            proposals_in_flight: AtomicU64::new(0),
            current_leader: AtomicU64::new(0),
            current_term: AtomicU64::new(0),
            last_log_index: AtomicU64::new(0),
            snapshot_index: AtomicU64::new(0),
            purged_index: AtomicU64::new(0),
            failure: std::sync::OnceLock::new(),
            raft: arc_swap::ArcSwapOption::empty(),
            paused: tokio::sync::watch::Sender::new(false),
        };
        for value in [
            &counters.current_leader,
            &counters.last_log_index,
            &counters.snapshot_index,
            &counters.purged_index,
        ] {
            value.store(NONE, Ordering::Relaxed);
        }
        counters
    }

    fn mirror(&self, metrics: &RaftMetrics<NodeId, ClusterNode>) {
        let store =
            |value: &AtomicU64, v: Option<u64>| value.store(v.unwrap_or(NONE), Ordering::Relaxed);
        store(&self.current_leader, metrics.current_leader);
        self.current_term
            .store(metrics.current_term, Ordering::Relaxed);
        store(&self.last_log_index, metrics.last_log_index);
        store(&self.snapshot_index, metrics.snapshot.map(|id| id.index));
        store(&self.purged_index, metrics.purged.map(|id| id.index));
        self.raft.store(Some(Arc::new(metrics.clone())));
    }

    fn count(&self, result: &Result<CommitReceipt, ManifestError>) {
        let counter = match result {
            Ok(_) => &self.commits_total,
            Err(ManifestError::Rejected(_)) => &self.rejections_total,
            Err(_) => &self.commit_errors_total,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Proposal {
    command: ManifestCommand,
    reply: flume::Sender<Result<CommitReceipt, ManifestError>>,
}

/// Work for the control thread that needs the Raft handle (membership changes, elections):
/// run as a task of its own on the control runtime.
type AdminJob = Box<dyn FnOnce(Raft) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A boxed future that may move between tasks of the control runtime.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a cluster adds to the control thread. Both calls run on the control thread inside its
/// tokio runtime (so a QUIC endpoint can be created there): `network` before Raft starts,
/// `started` once it runs, to spawn what needs the Raft handle (the peers' RPC server, file
/// replication). A standalone node uses [`NoPeers`].
pub trait ControlPlane: Send + 'static {
    type Network: RaftNetworkFactory<TypeConfig>;

    fn network(&mut self) -> Result<Self::Network, ManifestError>;

    /// Returns how to forward a proposal to the leader when this node is not the leader.
    fn started(self, raft: Raft, published: Arc<Published>) -> Option<Arc<dyn Forward>>;
}

/// Sends a proposal to the leader and returns the leader's receipt (the committed log index).
pub trait Forward: Send + Sync {
    fn forward(
        &self,
        leader: NodeId,
        leader_node: Option<ClusterNode>,
        command: ManifestCommand,
    ) -> BoxFuture<Result<CommitReceipt, ManifestError>>;
}

/// The control plane of a standalone node: no peers, nothing to forward.
pub struct NoPeers<F>(pub F);

impl<N, F> ControlPlane for NoPeers<F>
where
    N: RaftNetworkFactory<TypeConfig>,
    F: FnMut() -> N + Send + 'static,
{
    type Network = N;

    fn network(&mut self) -> Result<N, ManifestError> {
        Ok((self.0)())
    }

    fn started(self, _raft: Raft, _published: Arc<Published>) -> Option<Arc<dyn Forward>> {
        None
    }
}

/// Handle to the manifest for any thread and any async runtime. Cheap to clone.
#[derive(Clone)]
pub struct ManifestClient {
    node_id: NodeId,
    requests: flume::Sender<Proposal>,
    admin: flume::Sender<AdminJob>,
    published: Arc<Published>,
    counters: Arc<Counters>,
    /// Membership changes of this node run one at a time: openraft refuses a change while
    /// another is still in joint consensus, and two nodes joining at once must both end as
    /// voters, not one of them left a learner by a refused second step.
    membership: Arc<tokio::sync::Mutex<()>>,
}

impl ManifestClient {
    /// Proposes `command` and waits until it is committed and applied.
    ///
    /// Not cancellation-safe: once the command is queued, dropping the future does not withdraw
    /// it, and it may still commit. Proposers retry with the same command, which is idempotent.
    pub async fn propose(&self, command: ManifestCommand) -> Result<CommitReceipt, ManifestError> {
        let (proposal, reply) = self.prepare(command)?;
        self.requests
            .send_async(proposal)
            .await
            .map_err(|_| ManifestError::Shutdown)?;
        reply
            .recv_async()
            .await
            .map_err(|_| ManifestError::Shutdown)?
    }

    /// [`Self::propose`] for std threads; blocks the calling thread. Never call it on a glommio
    /// shard or inside an async runtime.
    pub fn propose_blocking(
        &self,
        command: ManifestCommand,
    ) -> Result<CommitReceipt, ManifestError> {
        let (proposal, reply) = self.prepare(command)?;
        self.requests
            .send(proposal)
            .map_err(|_| ManifestError::Shutdown)?;
        reply.recv().map_err(|_| ManifestError::Shutdown)?
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        command: ManifestCommand,
    ) -> Result<
        (
            Proposal,
            flume::Receiver<Result<CommitReceipt, ManifestError>>,
        ),
        ManifestError,
    > {
        // Refuse what can be refused without the manifest's state before it costs a log entry.
        if let Err(rejection) = command.check() {
            self.counters
                .rejections_total
                .fetch_add(1, Ordering::Relaxed);
            return Err(ManifestError::Rejected(rejection));
        }
        let (reply, receiver) = flume::bounded(1);
        Ok((Proposal { command, reply }, receiver))
    }

    /// The latest applied manifest. One atomic load; hold the `Arc` to pin the version.
    pub fn current(&self) -> Arc<ManifestVersion> {
        self.published.current()
    }

    /// The index of the oldest manifest version any reader still holds (the file replicator
    /// removes a deleted file only once no version older than its deletion is held).
    pub fn oldest_pinned_index(&self) -> u64 {
        self.published.oldest_pinned_index()
    }

    /// Waits until the manifest version is at least `index` (e.g. a [`CommitReceipt::log_index`]).
    /// Cancellation-safe. Fails with `Shutdown` if the service stops first.
    pub async fn wait_applied(&self, index: u64) -> Result<(), ManifestError> {
        match self.published.wait_for(index) {
            None => Ok(()),
            Some(applied) => applied
                .recv_async()
                .await
                .map_err(|_| ManifestError::Shutdown),
        }
    }

    /// [`Self::wait_applied`] for std threads, bounded by `timeout`.
    pub fn wait_applied_blocking(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<(), ManifestError> {
        let Some(applied) = self.published.wait_for(index) else {
            return Ok(());
        };
        applied.recv_timeout(timeout).map_err(|error| match error {
            flume::RecvTimeoutError::Timeout => ManifestError::Timeout {
                what: "applied index",
                timeout_ms: timeout.as_millis() as u64,
            },
            flume::RecvTimeoutError::Disconnected => ManifestError::Shutdown,
        })
    }

    /// The latest Raft metrics (leader, term, indexes, membership, per-peer replication on
    /// the leader); `None` before Raft started.
    pub fn raft_metrics(&self) -> Option<Arc<RaftMetrics<NodeId, ClusterNode>>> {
        self.counters.raft.load_full()
    }

    /// Runs `job` with the Raft handle on the control thread and returns its result. For
    /// membership and leadership operations; never call it from a glommio shard's hot path.
    pub async fn with_raft<T, F, Fut>(&self, job: F) -> Result<T, ManifestError>
    where
        T: Send + 'static,
        F: FnOnce(Raft) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ManifestError>> + Send + 'static,
    {
        let (reply, answer) = flume::bounded(1);
        let job: AdminJob = Box::new(move |raft| {
            Box::pin(async move {
                let _ = reply.send(job(raft).await);
            })
        });
        self.admin
            .send_async(job)
            .await
            .map_err(|_| ManifestError::Shutdown)?;
        answer
            .recv_async()
            .await
            .map_err(|_| ManifestError::Shutdown)?
    }

    /// Adds `node` as a learner and waits until it has caught up with the log (the leader
    /// only; elsewhere `NotLeader`). Idempotent: adding a present learner updates its addresses.
    pub async fn add_learner(&self, id: NodeId, node: ClusterNode) -> Result<(), ManifestError> {
        let _one_at_a_time = self.membership.lock().await;
        self.with_raft(move |raft| async move {
            retry_in_progress(|| {
                let (raft, node) = (raft.clone(), node.clone());
                async move { raft.add_learner(id, node, true).await.map(|_| ()) }
            })
            .await
        })
        .await
    }

    /// Makes learners voters (`add`) or voters learners (`remove`), through joint consensus.
    pub async fn change_voters(
        &self,
        add: std::collections::BTreeSet<NodeId>,
        remove: std::collections::BTreeSet<NodeId>,
    ) -> Result<(), ManifestError> {
        let _one_at_a_time = self.membership.lock().await;
        self.with_raft(move |raft| async move {
            if !add.is_empty() {
                retry_in_progress(|| {
                    let (raft, add) = (raft.clone(), add.clone());
                    async move {
                        raft.change_membership(openraft::ChangeMembers::AddVoterIds(add), true)
                            .await
                            .map(|_| ())
                    }
                })
                .await?;
            }
            if !remove.is_empty() {
                retry_in_progress(|| {
                    let (raft, remove) = (raft.clone(), remove.clone());
                    async move {
                        raft.change_membership(openraft::ChangeMembers::RemoveVoters(remove), true)
                            .await
                            .map(|_| ())
                    }
                })
                .await?;
            }
            Ok(())
        })
        .await
    }

    /// Removes a node from the membership entirely (it stops receiving the log and files).
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ManifestError> {
        let _one_at_a_time = self.membership.lock().await;
        self.with_raft(move |raft| async move {
            let voters: std::collections::BTreeSet<NodeId> = raft
                .with_raft_state(|state| state.membership_state.effective().voter_ids().collect())
                .await
                .map_err(|e| ManifestError::Raft(e.to_string()))?;
            if voters.contains(&id) {
                let remaining: std::collections::BTreeSet<NodeId> =
                    voters.iter().copied().filter(|v| *v != id).collect();
                if remaining.is_empty() {
                    return Err(ManifestError::Config(
                        "cannot remove the last voter".to_owned(),
                    ));
                }
                raft.change_membership(
                    openraft::ChangeMembers::RemoveVoters(std::collections::BTreeSet::from([id])),
                    false,
                )
                .await
                .map_err(client_write_error)?;
            }
            raft.change_membership(
                openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id])),
                false,
            )
            .await
            .map_err(client_write_error)?;
            Ok(())
        })
        .await
    }

    /// Asks this node to start an election now.
    pub async fn trigger_election(&self) -> Result<(), ManifestError> {
        self.with_raft(|raft| async move {
            raft.trigger()
                .elect()
                .await
                .map_err(|e| ManifestError::Raft(e.to_string()))
        })
        .await
    }

    /// Turns this node's leader heartbeats on or off (openraft's runtime switch). A leadership
    /// transfer turns them off so followers' leader leases run out and they grant the target
    /// their votes; it always turns them back on.
    pub async fn set_heartbeat(&self, enabled: bool) -> Result<(), ManifestError> {
        self.with_raft(move |raft| async move {
            raft.runtime_config().heartbeat(enabled);
            Ok(())
        })
        .await
    }

    /// Lets this node start elections on its own (the default) or not: a draining or leaving
    /// node must not take the leadership back. It still votes, and an explicit
    /// [`Self::trigger_election`] still runs.
    pub async fn set_elect(&self, enabled: bool) -> Result<(), ManifestError> {
        self.with_raft(move |raft| async move {
            raft.runtime_config().elect(enabled);
            Ok(())
        })
        .await
    }

    /// Holds new proposals (local and forwarded ones) before they reach Raft until the
    /// returned guard is dropped. Proposals already in Raft go on. For a leadership transfer:
    /// with nothing new appended, the target's log can become equal to the leader's.
    pub fn pause_proposals(&self) -> ProposalPause {
        self.counters.paused.send_replace(true);
        ProposalPause {
            paused: self.counters.paused.clone(),
        }
    }

    /// The leader this node knows of now (cheap: one atomic load).
    pub fn leader(&self) -> Option<NodeId> {
        load_option(&self.counters.current_leader)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Why Raft stopped by itself, if it did: the node cannot commit anything any more and
    /// should stop (fail-stop), so a restart recovers it.
    pub fn failure(&self) -> Option<String> {
        self.counters.failure.get().cloned()
    }

    pub fn metrics(&self) -> ManifestMetrics {
        let counters = &self.counters;
        let current = self.current();
        let current_leader = load_option(&counters.current_leader);
        ManifestMetrics {
            commits_total: counters.commits_total.load(Ordering::Relaxed),
            rejections_total: counters.rejections_total.load(Ordering::Relaxed),
            commit_errors_total: counters.commit_errors_total.load(Ordering::Relaxed),
            applied_index: current.index,
            files: current.manifest.files().len() as u64,
            current_leader,
            is_leader: current_leader == Some(self.node_id),
            current_term: counters.current_term.load(Ordering::Relaxed),
            last_log_index: load_option(&counters.last_log_index),
            snapshot_index: load_option(&counters.snapshot_index),
            purged_index: load_option(&counters.purged_index),
            requests_queued: self.requests.len() as u64,
            proposals_in_flight: counters.proposals_in_flight.load(Ordering::Relaxed),
        }
    }
}

/// Proposals wait while this guard lives; see [`ManifestClient::pause_proposals`].
#[must_use = "proposals resume when the guard is dropped"]
pub struct ProposalPause {
    paused: tokio::sync::watch::Sender<bool>,
}

impl Drop for ProposalPause {
    fn drop(&mut self) {
        self.paused.send_replace(false);
    }
}

thread_local! {
    /// The pause switch of the Raft this control thread runs. Proposals reach `propose` both
    /// from the control loop and from the cluster plane's forward server, which only holds
    /// the Raft handle; both run on this thread's current-thread runtime, so the switch
    /// lives here rather than in every caller's signature.
    static PAUSED: std::cell::RefCell<Option<tokio::sync::watch::Receiver<bool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Waits while proposals are paused on this control thread.
async fn wait_unpaused() {
    let Some(mut paused) = PAUSED.with(|p| p.borrow().clone()) else {
        return;
    };
    // An error means the sender is gone (the service stops): nothing to wait for then.
    let _ = paused.wait_for(|paused| !*paused).await;
}

/// Owns the control thread. Dropping it shuts the service down like [`Self::shutdown`].
pub struct ManifestService {
    stop: Option<flume::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ManifestError>>>,
    published: Arc<Published>,
}

impl ManifestService {
    /// Starts a node without peer transport (a standalone node).
    pub fn start(
        config: ManifestConfig,
    ) -> Result<(ManifestService, ManifestClient), ManifestError> {
        Self::start_with_network(config, || UnreachableNetwork)
    }

    /// Opens the storage in `config.dir`, starts Raft on a new control thread (building the
    /// network there, inside its runtime, with `make_network`), initializes a one-voter cluster
    /// if the storage is fresh, and returns once the node is ready: for a standalone node, once
    /// it leads and has applied its whole log. Bounded by `start_timeout_ms_max`.
    pub fn start_with_network<N, F>(
        config: ManifestConfig,
        make_network: F,
    ) -> Result<(ManifestService, ManifestClient), ManifestError>
    where
        N: RaftNetworkFactory<TypeConfig>,
        F: FnOnce() -> N + Send + 'static,
    {
        let mut make_network = Some(make_network);
        Self::start_with_plane(
            config,
            NoPeers(move || (make_network.take().expect("the network is made once"))()),
        )
    }

    /// Like [`Self::start_with_network`], with a cluster's control plane.
    pub fn start_with_plane<P: ControlPlane>(
        config: ManifestConfig,
        plane: P,
    ) -> Result<(ManifestService, ManifestClient), ManifestError> {
        let started = Instant::now();
        let raft_config = config.raft_config()?;
        let log_store = LogStore::open(&config.dir, config.log_rewrite_garbage_bytes_min)?;
        let state_machine = ManifestStateMachine::open(&config.dir)?;
        let published = state_machine.published();
        let counters = Arc::new(Counters::new());
        let (requests, request_queue) = flume::bounded(config.request_queue_depth_max);
        let (admin, admin_queue) = flume::bounded(64);
        let (stop, stop_signal) = flume::bounded(1);
        let (ready, ready_signal) = flume::bounded(1);

        let control = Control {
            config: config.clone(),
            raft_config,
            request_queue,
            admin_queue,
            stop_signal,
            counters: counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("shale-control".to_owned())
            .spawn(move || control.run(log_store, state_machine, plane, ready))
            .map_err(ManifestError::Thread)?;
        let mut service = ManifestService {
            stop: Some(stop),
            thread: Some(thread),
            published: published.clone(),
        };

        // The control thread bounds its own start-up; the margin covers a wedged thread.
        let timeout_ms = config.start_timeout_ms_max + 5_000;
        let outcome = match ready_signal.recv_timeout(Duration::from_millis(timeout_ms)) {
            Ok(outcome) => outcome,
            Err(flume::RecvTimeoutError::Disconnected) => {
                service.stop().and(Err(ManifestError::Shutdown))
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                // Do not join a wedged thread: signal it and leave.
                service.thread = None;
                Err(ManifestError::Timeout {
                    what: "manifest control thread to start",
                    timeout_ms,
                })
            }
        };
        if let Err(error) = outcome {
            let _ = service.stop();
            return Err(error);
        }
        tracing::info!(
            node_id = config.node_id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            applied_index = published.current().index,
            "manifest service started"
        );
        let client = ManifestClient {
            node_id: config.node_id,
            requests,
            admin,
            published,
            counters,
            membership: Arc::new(tokio::sync::Mutex::new(())),
        };
        Ok((service, client))
    }

    /// Stops Raft and joins the control thread. Queued and in-flight proposals fail with
    /// `Shutdown` (an in-flight one may still have committed).
    pub fn shutdown(mut self) -> Result<(), ManifestError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ManifestError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(ManifestError::Raft("control thread panicked".to_owned()))),
            None => Ok(()),
        };
        self.published.close();
        result
    }
}

impl Drop for ManifestService {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::error!(%error, "manifest service stopped with an error");
        }
    }
}

/// What the control thread owns besides the storage it is handed.
struct Control {
    config: ManifestConfig,
    raft_config: openraft::Config,
    request_queue: flume::Receiver<Proposal>,
    admin_queue: flume::Receiver<AdminJob>,
    stop_signal: flume::Receiver<()>,
    counters: Arc<Counters>,
}

impl Control {
    /// The body of the `shale-control` thread.
    fn run<P: ControlPlane>(
        self,
        log_store: LogStore,
        state_machine: ManifestStateMachine,
        mut plane: P,
        ready: flume::Sender<Result<(), ManifestError>>,
    ) -> Result<(), ManifestError> {
        let published = state_machine.published();
        PAUSED.with(|p| *p.borrow_mut() = Some(self.counters.paused.subscribe()));
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = ready.send(Err(ManifestError::Thread(error)));
                return Ok(());
            }
        };
        // Dropping the runtime at the end of this function cancels what is left of the Raft
        // tasks, which drops the log store and joins its writer thread.
        runtime.block_on(async move {
            let timeout_ms = self.config.start_timeout_ms_max;
            let network = match plane.network() {
                Ok(network) => network,
                Err(error) => {
                    let _ = ready.send(Err(error));
                    return Ok(());
                }
            };
            let boot = self.boot(log_store, state_machine, network);
            let raft = match tokio::time::timeout(Duration::from_millis(timeout_ms), boot).await {
                Ok(Ok(raft)) => raft,
                Ok(Err(error)) => {
                    let _ = ready.send(Err(error));
                    return Ok(());
                }
                Err(_) => {
                    let _ = ready.send(Err(ManifestError::Timeout {
                        what: "manifest raft to become ready",
                        timeout_ms,
                    }));
                    return Ok(());
                }
            };
            // Mirror once before answering, so metrics are right from the first call.
            self.counters.mirror(&raft.metrics().borrow());
            let forward = plane.started(raft.clone(), published);
            let _ = ready.send(Ok(()));
            self.serve(raft, forward).await
        })
    }

    async fn boot<N: RaftNetworkFactory<TypeConfig>>(
        &self,
        log_store: LogStore,
        state_machine: ManifestStateMachine,
        network: N,
    ) -> Result<Raft, ManifestError> {
        let node_id = self.config.node_id;
        let raft = Raft::new(
            node_id,
            Arc::new(self.raft_config.clone()),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ManifestError::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| ManifestError::Raft(e.to_string()))?;
        if !initialized && self.config.initialize_if_fresh {
            tracing::info!(node_id, "initializing one-voter manifest cluster");
            let members = BTreeMap::from([(node_id, self.config.node.clone())]);
            raft.initialize(members)
                .await
                .map_err(|e| ManifestError::Raft(e.to_string()))?;
        }
        let voters: Vec<NodeId> = raft
            .with_raft_state(|state| state.membership_state.effective().voter_ids().collect())
            .await
            .map_err(|e| ManifestError::Raft(e.to_string()))?;
        if voters == [node_id] {
            // A standalone node leads at once; wait for that and for the whole log to be applied,
            // so `current()` covers everything acknowledged before a restart.
            raft.wait(None)
                .metrics(
                    |m| {
                        m.current_leader == Some(node_id)
                            && m.last_applied.map(|id| id.index) >= m.last_log_index
                    },
                    "standalone leader applied its log",
                )
                .await
                .map_err(|e| ManifestError::Raft(e.to_string()))?;
        }
        Ok(raft)
    }

    async fn serve(
        self,
        raft: Raft,
        forward: Option<Arc<dyn Forward>>,
    ) -> Result<(), ManifestError> {
        let metrics = tokio::spawn(mirror_metrics(raft.clone(), self.counters.clone()));
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.config.proposals_in_flight_max,
        ));
        let admin_jobs = {
            let raft = raft.clone();
            let admin_queue = self.admin_queue.clone();
            tokio::spawn(async move {
                while let Ok(job) = admin_queue.recv_async().await {
                    tokio::spawn(job(raft.clone()));
                }
            })
        };
        loop {
            let permit = tokio::select! {
                biased;
                _ = self.stop_signal.recv_async() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => unreachable!("the proposal semaphore is never closed"),
                },
            };
            let proposal = tokio::select! {
                biased;
                _ = self.stop_signal.recv_async() => break,
                proposal = self.request_queue.recv_async() => match proposal {
                    Ok(proposal) => proposal,
                    Err(_) => {
                        // Every client is gone; nothing more can arrive. Wait to be stopped.
                        let _ = self.stop_signal.recv_async().await;
                        break;
                    }
                },
            };
            let raft = raft.clone();
            let counters = self.counters.clone();
            let forward = forward.clone();
            counters.proposals_in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let result = propose_or_forward(&raft, forward.as_deref(), proposal.command).await;
                counters.count(&result);
                counters.proposals_in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                let _ = proposal.reply.send(result);
            });
        }
        tracing::info!(node_id = self.config.node_id, "manifest service stopping");
        let result = raft
            .shutdown()
            .await
            .map_err(|e| ManifestError::Raft(e.to_string()));
        metrics.abort();
        admin_jobs.abort();
        result
    }
}

/// Proposes on this node; when another node leads and a forwarder is installed, sends the
/// command to the leader and then waits until the committed entry is applied here too, so a
/// caller that treats the command as done also sees it in `current()` (the exactly-once rule
/// of flushes needs the registration in the local version).
///
/// A forward is abandoned as soon as this node learns of another leader, and sent again to
/// the new one: a dead leader's connection would otherwise hold the proposal until the
/// transport's idle timeout. Sending again is safe because every command is idempotent (an
/// identical registration is success), so an entry the old leader did commit is not doubled.
async fn propose_or_forward(
    raft: &Raft,
    forward: Option<&dyn Forward>,
    command: ManifestCommand,
) -> Result<CommitReceipt, ManifestError> {
    // Wait here, before choosing where to send it: a paused leader may not lead any more
    // when the pause ends.
    wait_unpaused().await;
    let Some(forward) = forward else {
        return propose(raft, command).await;
    };
    let local = raft.metrics().borrow().id;
    // Leaders seen by this proposal; bounded so a flapping cluster returns an error to the
    // caller (who retries with back-off) instead of looping here.
    for _ in 0..FORWARD_LEADERS_MAX {
        let mut leader = raft.current_leader().await;
        if leader.is_none() {
            // An election is under way (or there is no quorum): wait a moment for its outcome
            // rather than send the caller into its back-off just before a leader appears.
            let mut metrics = raft.metrics();
            let elected = async {
                metrics
                    .wait_for(|m| m.current_leader.is_some())
                    .await
                    .ok()
                    .and_then(|m| m.current_leader)
            };
            leader = tokio::time::timeout(LEADERLESS_WAIT, elected)
                .await
                .ok()
                .flatten();
        }
        let leader = match leader {
            None => return Err(ManifestError::NotLeader { leader: None }),
            Some(leader) if leader == local => return propose(raft, command).await,
            Some(leader) => leader,
        };
        let mut metrics = raft.metrics();
        let leader_node = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned();
        let receipt = tokio::select! {
            receipt = forward.forward(leader, leader_node, command.clone()) => receipt?,
            moved = metrics.wait_for(|m| m.current_leader != Some(leader)) => {
                if moved.is_err() {
                    return Err(ManifestError::Shutdown);
                }
                tracing::info!(leader, "leader changed while forwarding a proposal: sending it again");
                continue;
            }
        };
        raft.wait(Some(Duration::from_secs(60)))
            .applied_index_at_least(Some(receipt.log_index), "forwarded entry applied")
            .await
            .map_err(|e| ManifestError::Raft(e.to_string()))?;
        return Ok(receipt);
    }
    Err(ManifestError::NotLeader { leader: None })
}

/// How many leaders one forwarded proposal follows before it gives up.
const FORWARD_LEADERS_MAX: usize = 4;

/// How long a proposal waits for an election to end before it reports that there is no leader.
const LEADERLESS_WAIT: Duration = Duration::from_secs(2);

/// Maps a failed membership change or write to the service's error.
fn client_write_error(
    error: RaftError<NodeId, ClientWriteError<NodeId, ClusterNode>>,
) -> ManifestError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ManifestError::NotLeader {
                leader: forward.leader_id,
            }
        }
        RaftError::APIError(error) => ManifestError::Raft(error.to_string()),
        RaftError::Fatal(Fatal::Stopped) => ManifestError::Shutdown,
        RaftError::Fatal(fatal) => ManifestError::Raft(fatal.to_string()),
    }
}

/// Runs a membership change again while openraft reports another change still in progress
/// (a change this node's lock cannot see: one begun before a restart or by an earlier leader's
/// entry), for up to ten seconds; any other outcome is returned as it is.
async fn retry_in_progress<F, Fut>(mut change: F) -> Result<(), ManifestError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), RaftError<NodeId, ClientWriteError<NodeId, ClusterNode>>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(20);
    loop {
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            outcome => return outcome.map_err(client_write_error),
        }
    }
}

/// Proposes on this node's Raft (the leader's side of a forwarded proposal).
pub(crate) async fn propose_here(
    raft: &Raft,
    command: ManifestCommand,
) -> Result<CommitReceipt, ManifestError> {
    propose(raft, command).await
}

async fn propose(raft: &Raft, command: ManifestCommand) -> Result<CommitReceipt, ManifestError> {
    wait_unpaused().await;
    match raft.client_write(command).await {
        Ok(written) => match written.data {
            ManifestResponse::Rejected(rejection) => Err(ManifestError::Rejected(rejection)),
            response => Ok(CommitReceipt {
                log_index: written.log_id.index,
                response,
            }),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(ManifestError::NotLeader {
                leader: forward.leader_id,
            })
        }
        Err(RaftError::APIError(error)) => Err(ManifestError::Raft(error.to_string())),
        Err(RaftError::Fatal(Fatal::Stopped)) => Err(ManifestError::Shutdown),
        Err(RaftError::Fatal(fatal)) => Err(ManifestError::Raft(fatal.to_string())),
    }
}

/// Mirrors Raft metrics into the shared counters, and logs leadership changes and failures.
async fn mirror_metrics(raft: Raft, counters: Arc<Counters>) {
    let mut metrics = raft.metrics();
    let mut leader = None;
    let mut failed = false;
    loop {
        {
            let current = metrics.borrow_and_update();
            counters.mirror(&current);
            if current.current_leader != leader {
                leader = current.current_leader;
                tracing::info!(node_id = current.id, leader = ?leader, term = current.current_term, "manifest leader changed");
            }
            match (&current.running_state, failed) {
                // The state a requested shutdown leaves: not an error.
                (Err(Fatal::Stopped), _) => {}
                (Err(error), false) => {
                    failed = true;
                    let _ = counters.failure.set(error.to_string());
                    tracing::error!(node_id = current.id, %error, "manifest raft stopped with an error");
                }
                _ => {}
            }
        }
        if metrics.changed().await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::drop_committed_records;
    use crate::log_store::LOG_FILE_NAME;
    use crate::manifest::tests::file;

    #[test]
    fn start_applies_entries_whose_commit_was_not_recorded() {
        // The committed id is written without waiting for fdatasync, so kill -9 can lose it while
        // the entries themselves are durable. Start-up must still apply every acknowledged entry
        // before it returns, or `current()` would briefly miss files.
        let dir = tempfile::tempdir().expect("temp dir");
        let config = ManifestConfig::new(dir.path(), 1, "127.0.0.1:7100");
        let (service, client) = ManifestService::start(config.clone()).expect("start");
        for index in 0..5 {
            client
                .propose_blocking(ManifestCommand::Register {
                    files: vec![file(&format!("f{index}"), index, index)],
                })
                .expect("propose");
        }
        let before = client.current();
        service.shutdown().expect("shutdown");

        drop_committed_records(&dir.path().join(LOG_FILE_NAME));
        let (service, client) = ManifestService::start(config).expect("restart");
        assert_eq!(client.current().manifest.files(), before.manifest.files());
        assert!(client.current().index >= before.index);
        service.shutdown().expect("shutdown");
    }

    #[test]
    fn invalid_config_is_refused() {
        // Limits of zero would deadlock the control loop; refuse them at start.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ManifestConfig::new(dir.path(), 1, "127.0.0.1:7100");
        config.proposals_in_flight_max = 0;
        assert!(matches!(
            ManifestService::start(config),
            Err(ManifestError::Config(_))
        ));
    }
}
