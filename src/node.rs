//! Starting and stopping a node: the control thread (Raft manifest), one shard per core, signal
//! handling, and the order in which they come up and go down.
//!
//! Threads: the caller's thread waits for a stop event; `shale-control` hosts openraft;
//! `shale-shard-<i>` run glommio executors; `shale-signals` turns SIGINT/SIGTERM into an event;
//! `shale-monitor` watches shard heartbeats and the manifest service.
//!
//! Fail-stop: a panic on any thread ends the process at once (exit code 101) after logging
//! it, and an unrecoverable error (a WAL write or sync failure, Raft stopping by itself) stops
//! the node with a non-zero exit. A half-alive node (a dead shard behind a live port) is worse
//! than a restart, which runs recovery.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use shale_io::runtime::{self, LocalSignal, RuntimeConfig, ShardPlacement};
use shale_replication::{ManifestClient, ManifestService};

use crate::api::Api;
use crate::config::{Config, Placement};
use crate::metrics::NodeMetrics;
use crate::query::engine::{QueryClient, QueryEngine};
use crate::query::snapshot::SnapshotRequest;
use crate::shard::{system_dir, Shard, ShardReplication};
use crate::wal_replication::{AckBoard, ReplicaRequest};

/// State every shard of a node can read.
pub struct NodeShared {
    pub config: Arc<Config>,
    pub metrics: NodeMetrics,
    pub manifest: ManifestClient,
    pub query: QueryClient,
    shard_count: usize,
    ready_shards: AtomicUsize,
    stopping: AtomicBool,
    started: Instant,
    fatal: FatalReporter,
    pub identity: crate::identity::Identity,
    /// The cluster's control plane views (file replication lag); `None` when standalone.
    pub cluster: Option<shale_replication::cluster::ClusterView>,
    /// Peer health view and lifecycle operations (drain, transfer, leave) of a cluster node.
    pub ops: crate::cluster_ops::OpsState,
    /// What this node's queries see of each WAL (own and replicated), and its replica logs'
    /// durable positions.
    pub positions: Arc<crate::shard::Positions>,
}

impl NodeShared {
    /// Ready once every shard has finished WAL recovery, while the node is healthy.
    pub fn is_ready(&self) -> bool {
        self.ready_shards() == self.shard_count
            && !self.stopping.load(Ordering::Relaxed)
            && self.health().is_ok()
            && self.has_leader()
    }

    /// A cluster node without a Raft leader (no quorum, or not yet added) cannot register
    /// anything: it stays not ready, and keeps trying, until it has one.
    pub fn has_leader(&self) -> bool {
        !self.config.cluster.enabled
            || self
                .manifest
                .raft_metrics()
                .is_some_and(|metrics| metrics.current_leader.is_some())
    }

    /// `Err` names what is wrong: a shard whose executor has not run its heartbeat for
    /// `runtime.shard_stall_ms_max`, or a manifest service that stopped by itself.
    pub fn health(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let now_ms = self.elapsed_ms();
        let stall_ms_max = self.config.runtime.shard_stall_ms_max;
        for (shard, metrics) in self.metrics.shards.iter().enumerate() {
            let silent_ms = now_ms.saturating_sub(metrics.heartbeat_ms.get());
            if silent_ms > stall_ms_max {
                problems.push(format!("shard {shard} has not run for {silent_ms} ms"));
            }
        }
        if let Some(failure) = self.manifest.failure() {
            problems.push(format!("manifest service failed: {failure}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Milliseconds since the node started (the clock of shard heartbeats).
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Stops the node with an error: for failures a restart must recover from.
    pub fn fatal(&self) -> FatalReporter {
        self.fatal.clone()
    }

    pub fn ready_shards(&self) -> usize {
        self.ready_shards.load(Ordering::Relaxed)
    }

    /// Whether the node is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// Why the node stops.
enum StopEvent {
    Signal(i32),
    Fatal { source: String, message: String },
}

/// Hands an unrecoverable error to the node's main thread, which stops the node and exits
/// non-zero. Any thread may hold one.
#[derive(Clone)]
pub struct FatalReporter(flume::Sender<StopEvent>);

impl FatalReporter {
    pub fn report(&self, source: impl Into<String>, message: impl Into<String>) {
        let _ = self.0.try_send(StopEvent::Fatal {
            source: source.into(),
            message: message.into(),
        });
    }
}

/// Exit code of a process ended by a panic (as Rust's own runtime uses).
const PANIC_EXIT_CODE: i32 = 101;

/// Makes every panic, on any thread, end the process after it is logged. Without this a
/// panicking shard would leave its executor dead while the process and the other shards
/// keep the port open: `/ready` would hang and requests would fail forever.
fn install_fail_stop_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            let thread = std::thread::current();
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                location = %info.location().map(|l| l.to_string()).unwrap_or_default(),
                panic = message,
                "panic; stopping the process so a restart recovers the node"
            );
            // `_exit`, not `exit`: other threads (DuckDB's among them) keep running, and
            // running static destructors under them could hang or crash instead of exiting.
            // SAFETY: `_exit` only ends the process; nothing is touched afterwards.
            unsafe { libc::_exit(PANIC_EXIT_CODE) };
        }));
    });
}

/// Runs a node until SIGINT/SIGTERM or a fatal shard error. Returns an error for the latter,
/// so the process exits non-zero with the reason.
pub fn run(mut config: Config) -> anyhow::Result<()> {
    install_fail_stop_panic_hook();
    let memlock = runtime::raise_memlock_limit();
    tracing::debug!(memlock_bytes = memlock, "memlock limit");
    std::fs::create_dir_all(system_dir(&config.node.data_dir))
        .with_context(|| format!("create data directory {}", config.node.data_dir.display()))?;
    // io_uring opens resolve relative paths differently from the process; use absolute ones.
    config.node.data_dir = std::fs::canonicalize(&config.node.data_dir)
        .with_context(|| format!("resolve data directory {}", config.node.data_dir.display()))?;
    let config = Arc::new(config);
    let data_dir = &config.node.data_dir;
    // Two processes on one data directory would corrupt the WAL and the Raft log.
    let _lock = lock_data_dir(data_dir)?;
    let has_data = system_dir(data_dir).join("raft").exists();
    let identity = crate::identity::load_or_create(&system_dir(data_dir), &config, has_data)
        .context("check the node's identity")?;
    tracing::debug!(node_id = identity.node_id, cluster_id = ?identity.cluster_id, "identity");
    let removed = shale_io::publish::remove_stale_temporaries(data_dir)
        .context("remove temporaries left by a crash")?;
    if removed > 0 {
        tracing::info!(
            removed,
            "removed temporary files left by an interrupted flush"
        );
    }

    // Shards share the port through SO_REUSEPORT, which would also let a second process on the
    // same port silently take half of the connections: refuse to start if anyone listens. (A
    // probe connection, not a bind: after a kill -9 the dead process's connections still hold
    // the port for a plain bind, though nothing listens.)
    refuse_if_listening(config.http.addr)?;

    // Signals are blocked before any thread starts so every thread inherits the mask and only
    // the signal thread receives them.
    let signals = block_stop_signals();
    let (events, stop) = flume::bounded::<StopEvent>(16);
    spawn_signal_thread(signals, events.clone())?;

    let shard_count = config.shard_count();
    // WAL replication: every shard's ties to the control thread (unused when standalone).
    let positions: Arc<crate::shard::Positions> = Arc::default();
    positions
        .keys
        .set_window_ms(config.cluster.idempotency_window_ms);
    let (ack_boards, ack_wakes): (Vec<_>, Vec<_>) =
        (0..shard_count).map(|_| AckBoard::new()).unzip();
    let (replica_senders, replica_receivers): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::unbounded::<ReplicaRequest>())
        .unzip();
    let ship_defaults = shale_replication::wal_stream::WalShipConfig::default();
    let ship_config = shale_replication::wal_stream::WalShipConfig {
        ring_bytes_per_shard: config.cluster.wal_ship_ring_bytes,
        // A group is one record at most this large (or write_bytes_max of smaller ones).
        message_bytes_max: ship_defaults.message_bytes_max.max(
            (config.wal.record_bytes_max as usize).max(config.wal.write_bytes_max) + (1 << 20),
        ),
        ..ship_defaults
    };
    let (outbox, outbox_receiver) = shale_replication::wal_stream::outbox(&ship_config);
    let replication: Vec<ShardReplication> = ack_boards
        .iter()
        .map(|acks| ShardReplication {
            outbox: config.cluster.enabled.then(|| outbox.clone()),
            acks: acks.clone(),
            positions: positions.clone(),
        })
        .collect();
    let (manifest_service, manifest, cluster_view) = if config.cluster.enabled {
        let boards = ack_boards.clone();
        let wal = shale_replication::wal_stream::WalReplicationParts {
            outbox: outbox_receiver,
            source: Arc::new(crate::wal_replication::SegmentSource {
                data_dir: data_dir.to_path_buf(),
                node_id: config.node.id,
                positions: positions.clone(),
            }),
            acks: Arc::new(move |peer, shard, lsn| {
                if let Some(board) = boards.get(shard as usize) {
                    board.ack(peer, lsn);
                }
            }),
            replicas: Arc::new(crate::wal_replication::ShardReplicaSink {
                shards: replica_senders,
            }),
            config: ship_config,
            shards: shard_count as u32,
        };
        let (plane, view) = cluster_plane(&config, wal)?;
        let (service, client) = ManifestService::start_with_plane(manifest_config(&config), plane)
            .context("start the manifest (Raft) service and the QUIC endpoint")?;
        (service, client, Some(view))
    } else {
        let (service, client) = ManifestService::start(manifest_config(&config))
            .context("start the manifest (Raft) service")?;
        (service, client, None)
    };

    let retired = retired_shards(data_dir, shard_count)?;
    if !retired.is_empty() {
        tracing::info!(
            shards = shard_count,
            retired = ?retired,
            "data from a larger shard count: its WALs and journals are recovered and flushed"
        );
    }
    let (snapshot_senders, snapshot_receivers): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::bounded::<SnapshotRequest>(64))
        .unzip();
    let (query_engine, query) = QueryEngine::start(
        config.query.clone(),
        data_dir,
        cluster_view
            .as_ref()
            .map(|view| view.holdings().clone())
            .unwrap_or_default(),
        snapshot_senders,
    )
    .context("start the query engine")?;
    let shared = Arc::new(NodeShared {
        config: config.clone(),
        metrics: NodeMetrics::new(shard_count),
        manifest,
        query,
        shard_count,
        ready_shards: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        started: Instant::now(),
        fatal: FatalReporter(events.clone()),
        identity,
        cluster: cluster_view,
        ops: Default::default(),
        positions: positions.clone(),
    });
    spawn_monitor_thread(shared.clone())?;
    if config.cluster.enabled && !config.cluster.bootstrap {
        spawn_join_thread(shared.clone(), manifest_config(&config).node)?;
    }
    if config.cluster.enabled {
        crate::cluster_ops::spawn_health_thread(shared.clone())?;
    }
    let mut shutdown_senders = Vec::with_capacity(shard_count);
    let mut shutdown_receivers = Vec::with_capacity(shard_count);
    for _ in 0..shard_count {
        let (sender, receiver) = flume::bounded::<()>(1);
        shutdown_senders.push(sender);
        shutdown_receivers.push(receiver);
    }
    let runtime_config = RuntimeConfig {
        shard_count,
        placement: match config.runtime.placement {
            Placement::Pinned => ShardPlacement::Pinned,
            Placement::Unbound => ShardPlacement::Unbound,
        },
        io_memory_bytes: config.runtime.io_memory_bytes,
        ring_depth: config.runtime.ring_depth,
        thread_name_prefix: "shale-shard".into(),
    };
    let receivers = Arc::new(std::sync::Mutex::new(
        shutdown_receivers
            .into_iter()
            .zip(snapshot_receivers)
            .zip(replication)
            .zip(ack_wakes.into_iter().zip(replica_receivers))
            .map(
                |(((shutdown, snapshots), replication), (acks, replicas))| ShardChannels {
                    shutdown,
                    snapshots,
                    replication,
                    acks,
                    replicas,
                },
            )
            .collect::<Vec<_>>(),
    ));
    let handles = {
        let shared = shared.clone();
        runtime::spawn_shards(&runtime_config, move |shard| {
            let channels = receivers.lock().expect("not poisoned")[shard].clone();
            // Retired shard j is recovered by shard j mod n.
            let adopted: Vec<u32> = retired
                .iter()
                .copied()
                .filter(|&j| j as usize % shard_count == shard)
                .collect();
            run_shard(shared.clone(), shard, adopted, channels)
        })
        .context("start shards")?
    };
    tracing::info!(
        node_id = config.node.id,
        addr = %config.http.addr,
        shards = shard_count,
        data_dir = %data_dir.display(),
        fsync = config.wal.fsync,
        "shale node starting"
    );

    let outcome = match stop.recv() {
        Ok(StopEvent::Signal(signal)) => {
            tracing::info!(signal, "stop requested; flushing and shutting down");
            Ok(())
        }
        Ok(StopEvent::Fatal { source, message }) => {
            tracing::error!(source, error = %message, "fatal error; shutting down");
            Err(anyhow::anyhow!("{source}: {message}"))
        }
        Err(_) => Err(anyhow::anyhow!("every shard stopped unexpectedly")),
    };
    shared.stopping.store(true, Ordering::Relaxed);
    for sender in &shutdown_senders {
        let _ = sender.try_send(());
    }
    let joined = runtime::join_shards(handles);
    query_engine.shutdown();
    manifest_service
        .shutdown()
        .context("stop the manifest service")?;
    joined.context("join shards")?;
    tracing::info!("shale node stopped");
    outcome
}

/// One shard's life: serve HTTP at once (so `/ready` can answer 503 during recovery), recover
/// (its own WAL, then those of retired shards it adopted), flush in the background, and on
/// shutdown stop HTTP, flush everything and close the WAL.
/// What connects one shard to the rest of the node.
#[derive(Clone)]
struct ShardChannels {
    shutdown: flume::Receiver<()>,
    snapshots: flume::Receiver<SnapshotRequest>,
    replication: ShardReplication,
    /// Wakes when peers acknowledged more of this shard's WAL.
    acks: flume::Receiver<()>,
    /// Replica log requests from the WAL stream receiver.
    replicas: flume::Receiver<ReplicaRequest>,
}

async fn run_shard(
    shared: Arc<NodeShared>,
    shard_index: usize,
    adopted: Vec<u32>,
    channels: ShardChannels,
) {
    let ShardChannels {
        shutdown: shutdown_requests,
        snapshots: snapshot_requests,
        replication,
        acks,
        replicas,
    } = channels;
    let shutdown = LocalSignal::new();
    glommio::spawn_local({
        let shutdown = shutdown.clone();
        async move {
            let _ = shutdown_requests.recv_async().await;
            shutdown.raise();
        }
    })
    .detach();
    let config = shared.config.clone();
    let metrics = shared.metrics.shards[shard_index].clone();
    // The heartbeat proves this executor still runs tasks; `/health` watches its age.
    glommio::spawn_local({
        let shared = shared.clone();
        let metrics = metrics.clone();
        let interval = Duration::from_millis((config.runtime.shard_stall_ms_max / 5).max(10));
        async move {
            loop {
                metrics.heartbeat_ms.set(shared.elapsed_ms());
                glommio::timer::sleep(interval).await;
            }
        }
    })
    .detach();
    let fatal = shared.fatal();
    let source = format!("shard {shard_index}");
    let shard = Shard::new(
        shard_index as u32,
        config.clone(),
        metrics.clone(),
        shared.manifest.clone(),
        fatal.clone(),
        replication.clone(),
    );
    // Wakes from the control thread (peers' acks, replicated groups) must not wait behind a
    // busy default queue: measured at ~95 ms mean there, so they get a latency-sensitive one.
    let replication_queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "replication",
    );
    let spawned = glommio::spawn_local_into(
        {
            let shard = shard.clone();
            async move {
                while acks.recv_async().await.is_ok() {
                    shard.note_acks();
                }
            }
        },
        replication_queue,
    )
    .map(|task| task.detach())
    .and_then(|_| {
        glommio::spawn_local_into(
            crate::wal_replication::serve_replica_requests(shard.clone(), replicas),
            replication_queue,
        )
        .map(|task| task.detach())
    });
    if let Err(error) = spawned {
        fatal.report(
            source.clone(),
            format!("start the replication tasks: {error}"),
        );
        return;
    }
    glommio::spawn_local({
        let shard = shard.clone();
        async move {
            while let Ok(request) = snapshot_requests.recv_async().await {
                let _ = request.reply.send(shard.snapshot(&request.tables));
            }
        }
    })
    .detach();
    let listener = match shale_io::http::bind(config.http.addr) {
        Ok(listener) => listener,
        Err(error) => {
            fatal.report(source, format!("bind {}: {error}", config.http.addr));
            return;
        }
    };
    let http = glommio::spawn_local(shale_io::http::serve(
        listener,
        Api::new(shard.clone(), shared.clone()),
        shale_io::http::HttpServerConfig {
            connections_max: config.http.connections_max_per_shard,
            shutdown_grace_ms: config.http.shutdown_grace_ms,
            header_read_timeout_ms: config.http.header_read_timeout_ms,
        },
        shutdown.clone(),
    ));

    // glommio decides per thread, on the first read-write direct-I/O file it opens, whether
    // io_uring polling works; prime it with a non-empty file so later direct reads work.
    if let Err(error) = shale_io::wal::prime_direct_io_probe(&config.node.data_dir).await {
        fatal.report(source.clone(), format!("prepare direct I/O: {error}"));
    }
    let recovery = async {
        shard.recover().await?;
        for &retired in &adopted {
            let retired_shard = Shard::new(
                retired,
                config.clone(),
                metrics.clone(),
                shared.manifest.clone(),
                fatal.clone(),
                ShardReplication::standalone(),
            );
            retired_shard
                .drain_retired()
                .await
                .map_err(|error| error.context(format!("recover retired shard {retired}'s WAL")))?;
        }
        anyhow::Ok(())
    };
    let recovered = futures_lite::future::or(async { Some(recovery.await) }, async {
        shutdown.wait().await;
        None
    })
    .await;
    match recovered {
        Some(Ok(())) => {
            shared.ready_shards.fetch_add(1, Ordering::Relaxed);
            let flusher = glommio::spawn_local(shard.clone().flush_loop(shutdown.clone()));
            shutdown.wait().await;
            http.await;
            // The flush loop sees the raised signal, flushes every buffer and returns.
            flusher.await;
        }
        Some(Err(error)) => {
            fatal.report(source, format!("{error:#}"));
            shutdown.wait().await;
            http.await;
        }
        None => http.await,
    }
    shard.close().await;
}

/// Shard ids with a WAL directory or a pending journal in `data_dir` but at or above
/// `shard_count`: left by a run with more shards. Their acknowledged rows must not be hidden.
fn retired_shards(data_dir: &std::path::Path, shard_count: usize) -> anyhow::Result<Vec<u32>> {
    let mut retired = std::collections::BTreeSet::new();
    for folder in ["wal", "pending"] {
        let path = system_dir(data_dir).join(folder);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("list {}", path.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("list {}", path.display()))?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_prefix("shard-"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(id) = id.filter(|&id| id as usize >= shard_count) {
                if entry.path().is_dir() {
                    retired.insert(id);
                }
            }
        }
    }
    Ok(retired.into_iter().collect())
}

/// A node that is not the cluster's bootstrap node asks its peers to add it (through the
/// cluster API, with the admin token) until the membership it receives names it. Requests to
/// a follower are answered with the leader's address, which is tried next.
fn spawn_join_thread(
    shared: Arc<NodeShared>,
    me: shale_replication::raft_types::ClusterNode,
) -> anyhow::Result<()> {
    let peers = shared.config.cluster.peer_addresses()?;
    let token = shared.config.cluster.admin_token.expose().to_string();
    std::thread::Builder::new()
        .name("shale-join".into())
        .spawn(move || {
            let id = shared.manifest.node_id();
            let body = serde_json::json!({
                "id": id,
                "name": me.name,
                "quic_addr": me.quic_addr,
                "http_addr": me.http_addr,
                "role": me.role,
            })
            .to_string();
            // Joined means in the membership as what the role asks for: a node left a learner
            // (its promotion refused by a concurrent change) asks again until it is a voter.
            let voter = me.role != "replica-only";
            let member = || {
                shared.manifest.raft_metrics().is_some_and(|m| {
                    let membership = m.membership_config.membership();
                    if voter {
                        membership.voter_ids().any(|v| v == id)
                    } else {
                        membership.get_node(&id).is_some()
                    }
                })
            };
            let mut backoff = Duration::from_millis(500);
            while !shared.stopping.load(Ordering::Relaxed) && !member() {
                let mut targets: Vec<String> = peers.iter().map(|p| p.http_addr.to_string()).collect();
                while let Some(target) = targets.pop() {
                    let target_api = crate::cluster_cli::Target {
                        url: format!("http://{target}"),
                        token: Some(token.clone()),
                    };
                    match target_api.call_raw("POST", "/api/v1/cluster/peer", body.as_bytes()) {
                        Ok((200, _)) => {
                            tracing::info!(node_id = id, via = %target, "joined the cluster");
                            break;
                        }
                        Ok((status, answer)) => {
                            tracing::info!(
                                node_id = id,
                                via = %target,
                                status,
                                error = answer["error"].as_str().unwrap_or(""),
                                "join attempt refused"
                            );
                            // A follower names the leader: try it next.
                            if let Some(leader) = answer["leader_http_addr"].as_str() {
                                if leader != target {
                                    targets.push(leader.to_string());
                                }
                            }
                        }
                        Err(error) => {
                            tracing::info!(node_id = id, via = %target, error = %format!("{error:#}"), "join attempt failed");
                        }
                    }
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        })
        .context("start the join thread")?;
    Ok(())
}

/// Watches what no request may be around to notice: the manifest service failing by itself
/// (fail-stop), and shards whose heartbeat stops (logged once per stall; `/health` reports it).
fn spawn_monitor_thread(shared: Arc<NodeShared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("shale-monitor".into())
        .spawn(move || {
            let interval =
                Duration::from_millis((shared.config.runtime.shard_stall_ms_max / 5).max(10));
            let mut stalled = vec![false; shared.shard_count];
            loop {
                std::thread::sleep(interval);
                if shared.stopping.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(failure) = shared.manifest.failure() {
                    shared.fatal().report("manifest", failure);
                    return;
                }
                let now_ms = shared.elapsed_ms();
                let stall_ms_max = shared.config.runtime.shard_stall_ms_max;
                for (shard, metrics) in shared.metrics.shards.iter().enumerate() {
                    let silent_ms = now_ms.saturating_sub(metrics.heartbeat_ms.get());
                    let now_stalled = silent_ms > stall_ms_max;
                    if now_stalled && !stalled[shard] {
                        tracing::error!(shard_id = shard, silent_ms, "shard executor is stuck");
                    } else if !now_stalled && stalled[shard] {
                        tracing::warn!(shard_id = shard, "shard executor runs again");
                    }
                    stalled[shard] = now_stalled;
                }
            }
        })
        .context("start the monitor thread")?;
    Ok(())
}

/// The control plane of a cluster node: TLS material from `cluster.tls_dir`, the file sink
/// thread and the presence index.
fn cluster_plane(
    config: &Config,
    wal: shale_replication::wal_stream::WalReplicationParts,
) -> anyhow::Result<(
    shale_replication::cluster::ClusterPlane,
    shale_replication::cluster::ClusterView,
)> {
    use shale_replication::cluster::{ClusterPlane, ClusterSettings};
    let cluster = &config.cluster;
    let tls = shale_replication::transport::tls::ClusterTls::load(
        &cluster.tls_dir,
        &cluster.cluster_id,
        config.node.id,
    )
    .with_context(|| {
        format!(
            "load cluster certificates from {} (shale cluster init-ca / issue-cert make them)",
            cluster.tls_dir.display()
        )
    })?;
    let sink = shale_io::sink::FileSink::start(shale_io::sink::SinkConfig::default())
        .context("start the file sink thread")?;
    let presence = shale_replication::files::presence::PresenceIndex::open(
        &system_dir(&config.node.data_dir).join("presence"),
    )
    .context("open the presence index")?;
    Ok(ClusterPlane::new(ClusterSettings {
        node: manifest_config(config).node,
        data_dir: config.node.data_dir.clone(),
        quic_addr: cluster.quic_addr,
        tls,
        transport: Default::default(),
        fetch: Default::default(),
        serve: Default::default(),
        sink,
        presence,
        holdings: Default::default(),
        walker: Some(walker_config(&config.antientropy)),
        wal: Some(wal),
    }))
}

/// The anti-entropy walker's settings from the `[antientropy]` section.
fn walker_config(
    config: &crate::config::AntiEntropyConfig,
) -> shale_replication::antientropy::WalkerConfig {
    shale_replication::antientropy::WalkerConfig {
        paused: config.paused,
        cheap_pass_interval: Duration::from_millis(config.cheap_pass_interval_ms),
        page_files: config.page_files,
        scrub_bytes_per_second: config.scrub_mb_per_s.saturating_mul(1_000_000),
        scrub_cycle_target: Duration::from_secs(config.scrub_cycle_target_s),
        repair_concurrency: config.repair_concurrency,
        orphan_grace: Duration::from_millis(config.orphan_grace_ms),
        lost_recheck: Duration::from_millis(config.lost_recheck_ms),
        ..Default::default()
    }
}

/// The manifest service's settings: this node as the membership records it, Raft timings.
fn manifest_config(config: &Config) -> shale_replication::ManifestConfig {
    let cluster = &config.cluster;
    let dir = system_dir(&config.node.data_dir).join("raft");
    let mut manifest =
        shale_replication::ManifestConfig::new(dir, config.node.id, config.http.addr.to_string());
    manifest.snapshot_logs_since_last_max = config.manifest.snapshot_logs_since_last_max;
    manifest.request_queue_depth_max = config.manifest.request_queue_depth_max;
    if cluster.enabled {
        let or = |advertised: &str, fallback: String| {
            if advertised.is_empty() {
                fallback
            } else {
                advertised.to_string()
            }
        };
        manifest.node = shale_replication::raft_types::ClusterNode::new(
            or(&cluster.name, format!("node-{}", config.node.id)),
            or(&cluster.advertise_quic_addr, cluster.quic_addr.to_string()),
            or(&cluster.advertise_http_addr, config.http.addr.to_string()),
        );
        manifest.node.role = match cluster.role {
            crate::config::NodeRole::Writer => "writer",
            crate::config::NodeRole::Reader => "reader",
            crate::config::NodeRole::ReplicaOnly => "replica-only",
        }
        .to_string();
        manifest.initialize_if_fresh = cluster.bootstrap;
        manifest.heartbeat_interval_ms = cluster.heartbeat_ms;
        manifest.election_timeout_ms_min = cluster.election_timeout_ms_min;
        manifest.election_timeout_ms_max = cluster.election_timeout_ms_max;
    }
    manifest
}

fn refuse_if_listening(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut probe = addr;
    if addr.ip().is_unspecified() {
        probe.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    match std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_millis(500)) {
        Ok(_) => anyhow::bail!(
            "listen on {addr}: the address is in use (another shale or other server is listening)"
        ),
        Err(_) => Ok(()),
    }
}

/// Takes an exclusive advisory lock on the data directory for the life of the returned file.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = system_dir(data_dir).join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "data directory {} is in use by another shale process",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("lock {}", path.display()))
        }
    }
}

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a zeroed set owned here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn spawn_signal_thread(
    set: libc::sigset_t,
    events: flume::Sender<StopEvent>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("shale-signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: `set` holds SIGINT and SIGTERM, blocked in every thread of the process.
            let result = unsafe { libc::sigwait(&set, &mut signal) };
            if result == 0 && events.send(StopEvent::Signal(signal)).is_err() {
                return;
            }
        })
        .context("start the signal thread")?;
    Ok(())
}
