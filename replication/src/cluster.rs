//! A cluster node's control plane: the QUIC transport, the Raft network and RPC server over
//! it, proposal forwarding to the leader, peer file replication (serving and fetching) and WAL
//! streaming (shipping and receiving).
//!
//! Threads: everything here runs on the control thread's tokio runtime (`shale-control`); file
//! bytes are written on the `shale-fetch` glommio thread (the sink) and served from tokio's
//! blocking pool. Built by the node when `[cluster] enabled`; a standalone node uses
//! [`crate::control::NoPeers`] instead.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Deserialize;
use serde::Serialize;
use shale_io::sink::FileSink;

use crate::antientropy::CheckAnswer;
use crate::antientropy::CheckRequest;
use crate::antientropy::PeerCheck;
use crate::antientropy::WalkerHandle;
use crate::antientropy::WalkerParts;
use crate::control::BoxFuture;
use crate::control::CommitReceipt;
use crate::control::ControlPlane;
use crate::control::Forward;
use crate::control::ManifestError;
use crate::files::fetch::Connector;
use crate::files::fetch::FetchError;
use crate::files::fetch::StreamPair;
use crate::files::fetch::StreamSource;
use crate::files::holdings::Holdings;
use crate::files::planner::PeerInfo;
use crate::files::presence::PresenceIndex;
use crate::files::replicator::FetchConfig;
use crate::files::replicator::ManifestWatch;
use crate::files::replicator::Replicator;
use crate::files::replicator::ReplicatorHandle;
use crate::files::replicator::ReplicatorParts;
use crate::files::serve::FetchServer;
use crate::files::serve::ServeConfig;
use crate::manifest::ManifestCommand;
use crate::manifest::ManifestResponse;
use crate::manifest::Rejection;
use crate::raft_types::ClusterNode;
use crate::raft_types::NodeId;
use crate::raft_types::Raft;
use crate::transport::raft_network::node_quic_addr;
use crate::transport::raft_network::QuicNetwork;
use crate::transport::raft_network::RaftServer;
use crate::transport::tls::Admit;
use crate::transport::tls::ClusterTls;
use crate::transport::CallHandler;
use crate::transport::StreamHandler;
use crate::transport::StreamKind;
use crate::transport::Transport;
use crate::transport::TransportConfig;
use crate::version::ManifestVersion;
use crate::version::Published;
use crate::wal_stream::WalReplicationParts;
use crate::wal_stream::WalStreamHandle;

/// How long a forwarded proposal may take on the leader, commit included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a cluster node's control plane needs, decided by the node's configuration.
pub struct ClusterSettings {
    /// This node as the membership should record it.
    pub node: ClusterNode,
    pub data_dir: PathBuf,
    pub quic_addr: SocketAddr,
    pub tls: ClusterTls,
    pub transport: TransportConfig,
    pub fetch: FetchConfig,
    pub serve: ServeConfig,
    /// Writes fetched files; started by the node before the control thread.
    pub sink: FileSink,
    pub presence: PresenceIndex,
    /// What this node holds and what is damaged; shared with queries and the node's API.
    pub holdings: Holdings,
    /// The anti-entropy walker's settings; `None` runs no walker.
    pub walker: Option<crate::antientropy::WalkerConfig>,
    /// WAL streaming to and from every peer; `None` leaves WAL streams unserved.
    pub wal: Option<WalReplicationParts>,
}

/// Shared views of the running plane, for the node's API and metrics.
#[derive(Clone, Default)]
pub struct ClusterView {
    holdings: Holdings,
    replication: Arc<OnceLock<ReplicatorHandle>>,
    walker: Arc<OnceLock<WalkerHandle>>,
    wal_stream: Arc<OnceLock<WalStreamHandle>>,
    verify: Arc<OnceLock<crate::verify::service::VerifyHandle>>,
}

impl ClusterView {
    /// What this node holds and what is damaged (see [`Holdings`]).
    pub fn holdings(&self) -> &Holdings {
        &self.holdings
    }

    /// The file replicator's handle once it runs (lag, present version).
    pub fn replication(&self) -> Option<&ReplicatorHandle> {
        self.replication.get()
    }

    /// The anti-entropy walker's handle once it runs (status, pause, resume).
    pub fn walker(&self) -> Option<&WalkerHandle> {
        self.walker.get()
    }

    /// WAL streaming's handle once it runs (positions and lag per peer, origin and shard).
    pub fn wal_stream(&self) -> Option<&WalStreamHandle> {
        self.wal_stream.get()
    }

    /// Verification across peers once the plane runs (see [`crate::verify`]).
    pub fn verify(&self) -> Option<&crate::verify::service::VerifyHandle> {
        self.verify.get()
    }
}

/// The [`ControlPlane`] of a cluster node.
pub struct ClusterPlane {
    settings: Option<ClusterSettings>,
    transport: Option<Transport>,
    /// Ids that may connect: the membership's voters and learners. `None` until this node
    /// knows a membership (not initialized yet: it is being added), when any certificate of
    /// the cluster is admitted so the leader can reach it.
    members: Arc<ArcSwapOption<BTreeSet<NodeId>>>,
    view: ClusterView,
}

impl ClusterPlane {
    pub fn new(settings: ClusterSettings) -> (ClusterPlane, ClusterView) {
        let view = ClusterView {
            holdings: settings.holdings.clone(),
            ..ClusterView::default()
        };
        let plane = ClusterPlane {
            settings: Some(settings),
            transport: None,
            members: Arc::new(ArcSwapOption::empty()),
            view: view.clone(),
        };
        (plane, view)
    }
}

impl ControlPlane for ClusterPlane {
    type Network = QuicNetwork;

    fn network(&mut self) -> Result<QuicNetwork, ManifestError> {
        let settings = self
            .settings
            .as_ref()
            .expect("network is built once, first");
        let members = self.members.clone();
        let admit: Admit = Arc::new(move |peer| match members.load().as_ref() {
            None => true,
            Some(members) => members.contains(&peer),
        });
        let transport = Transport::bind(
            settings.quic_addr,
            settings.tls.clone(),
            admit,
            settings.transport.clone(),
        )
        .map_err(|e| ManifestError::Config(format!("start the QUIC endpoint: {e}")))?;
        self.transport = Some(transport.clone());
        Ok(QuicNetwork::new(transport))
    }

    fn started(mut self, raft: Raft, published: Arc<Published>) -> Option<Arc<dyn Forward>> {
        let transport = self
            .transport
            .take()
            .expect("network() ran before started()");
        let settings = self.settings.take().expect("started once");
        let local = transport.node_id();

        tokio::spawn(track_members(raft.clone(), self.members.clone()));
        tokio::spawn(keep_own_entry(raft.clone(), local, settings.node.clone()));
        RaftServer::new(raft.clone()).register(&transport);
        transport.set_call_handler(
            StreamKind::RaftForward,
            Arc::new(ForwardServer { raft: raft.clone() }),
        );

        let current: Arc<dyn Fn() -> Arc<ManifestVersion> + Send + Sync> = {
            let published = published.clone();
            Arc::new(move || published.current())
        };
        match FetchServer::new(&settings.data_dir, current, settings.serve.clone()) {
            Ok(server) => transport.set_handler(
                StreamKind::FileFetch,
                Arc::new(FetchHandler {
                    server: Arc::new(server.refusing_damaged(settings.holdings.clone())),
                }),
            ),
            Err(error) => {
                tracing::error!(%error, "file server not started; peers cannot fetch from this node")
            }
        }

        let peers = {
            let raft = raft.clone();
            Arc::new(move || {
                let metrics = raft.metrics().borrow().clone();
                metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(id, _)| **id != local)
                    .map(|(id, _)| PeerInfo { node_id: *id })
                    .collect::<Vec<_>>()
            })
        };
        if let Some(parts) = settings.wal {
            let (peers, watch) = tokio::sync::watch::channel(BTreeMap::new());
            tokio::spawn(track_wal_peers(raft.clone(), local, peers));
            let handle = crate::wal_stream::start(&transport, parts, watch);
            let _ = self.view.wal_stream.set(handle);
        }

        // A clone of the sink stays here for deep verification; the replicator takes the sink.
        let verify = crate::verify::service::start(
            &transport,
            raft.clone(),
            published.clone(),
            crate::verify::service::VerifyParts {
                holdings: settings.holdings.clone(),
                sink: settings.sink.clone(),
                data_dir: settings.data_dir.clone(),
                config: Default::default(),
            },
        );
        let _ = self.view.verify.set(verify);

        let (repairs, repair_jobs) = tokio::sync::mpsc::unbounded_channel();
        let walker_cell = self.view.walker.clone();
        let on_bad_source: crate::files::replicator::BadSourceHook =
            Arc::new(move |node, path: &str, blake3_hex: &str| {
                if let Some(walker) = walker_cell.get() {
                    crate::antientropy::tell_bad_source(walker, node, path, blake3_hex);
                }
            });
        let sink = settings.sink.clone();
        let watch: Arc<dyn ManifestWatch> = Arc::new(PublishedWatch(published.clone()));
        let (replicator, handle) = Replicator::new(ReplicatorParts {
            local,
            data_dir: settings.data_dir.clone(),
            presence: settings.presence,
            sink: settings.sink,
            source: Arc::new(StreamSource::new(
                QuicConnector {
                    transport: transport.clone(),
                    raft: raft.clone(),
                },
                1 << 20,
            )),
            watch: watch.clone(),
            peers: peers.clone(),
            config: settings.fetch,
            holdings: settings.holdings.clone(),
            repairs: Some(repair_jobs),
            on_bad_source: Some(on_bad_source),
        });
        let _ = self.view.replication.set(handle);
        tokio::spawn(async move {
            if let Err(error) = replicator.run(std::future::pending()).await {
                tracing::error!(%error, "file replication stopped");
            }
        });
        if let Some(config) = settings.walker {
            let walker = crate::antientropy::start(WalkerParts {
                local,
                data_dir: settings.data_dir.clone(),
                holdings: settings.holdings.clone(),
                watch,
                scrub: Arc::new(sink),
                repairs,
                peers,
                checker: Arc::new(QuicCheck {
                    transport: transport.clone(),
                    raft: raft.clone(),
                }),
                config,
            });
            transport.set_call_handler(
                StreamKind::FileCheck,
                Arc::new(CheckServer {
                    walker: walker.clone(),
                }),
            );
            let _ = self.view.walker.set(walker);
        }
        Some(Arc::new(QuicForward { transport }))
    }
}

/// Answers members' questions about this node's copy of a file.
struct CheckServer {
    walker: WalkerHandle,
}

impl CallHandler for CheckServer {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let walker = self.walker.clone();
        Box::pin(async move {
            let request: CheckRequest = serde_json::from_slice(&request)
                .map_err(|e| format!("file check from node {peer}: {e}"))?;
            if let Err(why) = crate::files::protocol::check_relative_path(&request.path) {
                return Err(format!("file check from node {peer}: {why}"));
            }
            let answer = walker.answer_check(request).await;
            serde_json::to_vec(&answer).map_err(|e| format!("encode file check answer: {e}"))
        })
    }
}

/// Asks members about their copies over `FileCheck` calls.
struct QuicCheck {
    transport: Transport,
    raft: Raft,
}

impl PeerCheck for QuicCheck {
    fn check(
        &self,
        node: NodeId,
        request: CheckRequest,
    ) -> crate::files::fetch::BoxFuture<'_, Result<CheckAnswer, String>> {
        Box::pin(async move {
            let member = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&node)
                .cloned()
                .ok_or_else(|| format!("node {node} is not a member"))?;
            let addr = node_quic_addr(&member)?;
            let bytes = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            let answer = self
                .transport
                .call(
                    node,
                    addr,
                    StreamKind::FileCheck,
                    bytes,
                    Duration::from_secs(60),
                )
                .await
                .map_err(|e| e.to_string())?;
            serde_json::from_slice(&answer).map_err(|e| format!("decode file check answer: {e}"))
        })
    }
}

/// Keeps the admitted ids equal to the membership's voters and learners.
async fn track_members(raft: Raft, members: Arc<ArcSwapOption<BTreeSet<NodeId>>>) {
    let mut metrics = raft.metrics();
    loop {
        let ids: BTreeSet<NodeId> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        members.store((!ids.is_empty()).then(|| Arc::new(ids)));
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the WAL shipper's peers equal to the membership's voters and learners other than this
/// node, at their recorded QUIC addresses. A member whose address does not resolve is left out
/// (and logged) until the membership changes again.
async fn track_wal_peers(
    raft: Raft,
    local: NodeId,
    peers: tokio::sync::watch::Sender<BTreeMap<NodeId, SocketAddr>>,
) {
    let mut metrics = raft.metrics();
    let mut known: Option<Vec<(NodeId, ClusterNode)>> = None;
    loop {
        let members: Vec<(NodeId, ClusterNode)> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != local)
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        // Metrics change with every heartbeat; resolve addresses only when members change.
        if known.as_ref() == Some(&members) {
            if metrics.changed().await.is_err() {
                return;
            }
            continue;
        }
        known = Some(members.clone());
        let mut current = BTreeMap::new();
        for (id, node) in members {
            match node_quic_addr(&node) {
                Ok(addr) => {
                    current.insert(id, addr);
                }
                Err(error) => {
                    tracing::warn!(peer = id, %error, "member not shipped wal: no quic address")
                }
            }
        }
        peers.send_if_modified(|known| {
            let changed = *known != current;
            *known = std::mem::take(&mut current);
            changed
        });
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// While this node leads, keeps its membership entry equal to its configuration: a standalone
/// node that becomes a cluster's first node was recorded without a QUIC address, and a node
/// may move to new addresses.
async fn keep_own_entry(raft: Raft, local: NodeId, node: ClusterNode) {
    let mut metrics = raft.metrics();
    loop {
        let stale = {
            let current = metrics.borrow_and_update();
            current.current_leader == Some(local)
                && current
                    .membership_config
                    .membership()
                    .get_node(&local)
                    .is_some_and(|recorded| *recorded != node)
        };
        if stale {
            let nodes = std::collections::BTreeMap::from([(local, node.clone())]);
            match raft
                .change_membership(openraft::ChangeMembers::SetNodes(nodes), true)
                .await
            {
                Ok(_) => tracing::info!(node_id = local, "updated this node's membership entry"),
                Err(error) => {
                    tracing::warn!(node_id = local, %error, "membership entry not updated; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The answer to a forwarded proposal, as it travels back to the follower.
#[derive(Debug, Serialize, Deserialize)]
enum ForwardReply {
    Committed {
        log_index: u64,
        response: ManifestResponse,
    },
    Rejected(Rejection),
    NotLeader {
        leader: Option<NodeId>,
    },
    Failed(String),
}

/// The leader's side of forwarding: proposes the command as if it were its own.
struct ForwardServer {
    raft: Raft,
}

impl CallHandler for ForwardServer {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let raft = self.raft.clone();
        Box::pin(async move {
            let command: ManifestCommand = serde_json::from_slice(&request)
                .map_err(|e| format!("forwarded command from node {peer}: {e}"))?;
            let reply = match command.check() {
                Err(rejection) => ForwardReply::Rejected(rejection),
                Ok(()) => match crate::control::propose_here(&raft, command).await {
                    Ok(receipt) => ForwardReply::Committed {
                        log_index: receipt.log_index,
                        response: receipt.response,
                    },
                    Err(ManifestError::Rejected(rejection)) => ForwardReply::Rejected(rejection),
                    Err(ManifestError::NotLeader { leader }) => ForwardReply::NotLeader { leader },
                    Err(error) => ForwardReply::Failed(error.to_string()),
                },
            };
            serde_json::to_vec(&reply).map_err(|e| format!("encode forward reply: {e}"))
        })
    }
}

/// The follower's side of forwarding.
struct QuicForward {
    transport: Transport,
}

impl Forward for QuicForward {
    fn forward(
        &self,
        leader: NodeId,
        leader_node: Option<ClusterNode>,
        command: ManifestCommand,
    ) -> BoxFuture<Result<CommitReceipt, ManifestError>> {
        let transport = self.transport.clone();
        Box::pin(async move {
            let node = leader_node.ok_or(ManifestError::NotLeader {
                leader: Some(leader),
            })?;
            let addr = node_quic_addr(&node).map_err(ManifestError::Raft)?;
            let request = serde_json::to_vec(&command)
                .map_err(|e| ManifestError::Raft(format!("encode forwarded command: {e}")))?;
            let answer = transport
                .call(
                    leader,
                    addr,
                    StreamKind::RaftForward,
                    request,
                    FORWARD_TIMEOUT,
                )
                .await
                .map_err(|e| ManifestError::Raft(format!("forward to leader {leader}: {e}")))?;
            let reply: ForwardReply = serde_json::from_slice(&answer)
                .map_err(|e| ManifestError::Raft(format!("decode forward reply: {e}")))?;
            match reply {
                ForwardReply::Committed {
                    log_index,
                    response,
                } => Ok(CommitReceipt {
                    log_index,
                    response,
                }),
                ForwardReply::Rejected(rejection) => Err(ManifestError::Rejected(rejection)),
                ForwardReply::NotLeader { leader } => Err(ManifestError::NotLeader { leader }),
                ForwardReply::Failed(error) => Err(ManifestError::Raft(error)),
            }
        })
    }
}

/// Serves `FileFetch` streams from this node's copies.
struct FetchHandler {
    server: Arc<FetchServer>,
}

impl StreamHandler for FetchHandler {
    fn handle(
        &self,
        peer: NodeId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let server = self.server.clone();
        Box::pin(async move {
            if let Err(error) = server.serve(recv, send).await {
                tracing::debug!(peer, %error, "file fetch not served");
            }
        })
    }
}

/// Opens `FileFetch` streams to members at their membership QUIC address.
struct QuicConnector {
    transport: Transport,
    raft: Raft,
}

impl Connector for QuicConnector {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;

    fn connect(
        &self,
        node: NodeId,
    ) -> crate::files::fetch::BoxFuture<'_, Result<StreamPair<Self>, FetchError>> {
        Box::pin(async move {
            let member = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&node)
                .cloned();
            let connect = |message: String| FetchError::Connect { node, message };
            let member = member.ok_or_else(|| connect("not a member".to_string()))?;
            let addr = node_quic_addr(&member).map_err(connect)?;
            self.transport
                .open(node, addr, StreamKind::FileFetch)
                .await
                .map_err(|e| connect(e.to_string()))
        })
    }
}

/// The published manifest as the replicator watches it.
struct PublishedWatch(Arc<Published>);

impl ManifestWatch for PublishedWatch {
    fn current(&self) -> Arc<ManifestVersion> {
        self.0.current()
    }

    fn oldest_pinned_index(&self) -> u64 {
        self.0.oldest_pinned_index()
    }

    fn changed(&self, index: u64) -> crate::files::fetch::BoxFuture<'_, bool> {
        Box::pin(async move {
            match self.0.wait_for(index + 1) {
                None => true,
                Some(applied) => applied.recv_async().await.is_ok(),
            }
        })
    }
}
