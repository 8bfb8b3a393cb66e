//! Starting and stopping a node: the control thread (Raft manifest), one shard per core, signal
//! handling, and the order in which they come up and go down.
//!
//! Threads: the caller's thread waits for a stop event; `shale-control` hosts openraft;
//! `shale-shard-<i>` run glommio executors; `shale-signals` turns SIGINT/SIGTERM into an event.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use shale_io::runtime::{self, LocalSignal, RuntimeConfig, ShardPlacement};
use shale_replication::{ManifestClient, ManifestService};

use crate::api::Api;
use crate::config::{Config, Placement};
use crate::metrics::NodeMetrics;
use crate::query::engine::{QueryClient, QueryEngine};
use crate::query::snapshot::SnapshotRequest;
use crate::shard::{system_dir, Shard};

/// State every shard of a node can read.
pub struct NodeShared {
    pub config: Arc<Config>,
    pub metrics: NodeMetrics,
    pub manifest: ManifestClient,
    pub query: QueryClient,
    shard_count: usize,
    ready_shards: AtomicUsize,
    stopping: AtomicBool,
}

impl NodeShared {
    /// Ready once every shard has finished WAL recovery.
    pub fn is_ready(&self) -> bool {
        self.ready_shards() == self.shard_count && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn ready_shards(&self) -> usize {
        self.ready_shards.load(Ordering::Relaxed)
    }
}

/// Why the node stops.
enum StopEvent {
    Signal(i32),
    Fatal { shard: usize, message: String },
}

/// Runs a node until SIGINT/SIGTERM or a fatal shard error. Returns an error for the latter,
/// so the process exits non-zero with the reason.
pub fn run(mut config: Config) -> anyhow::Result<()> {
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

    let (manifest_service, manifest) = ManifestService::start(shale_replication::ManifestConfig {
        dir: system_dir(data_dir).join("raft"),
        node_id: config.node.id,
        node_addr: config.http.addr.to_string(),
        snapshot_logs_since_last_max: config.manifest.snapshot_logs_since_last_max,
        request_queue_depth_max: config.manifest.request_queue_depth_max,
        ..shale_replication::ManifestConfig::new(
            system_dir(data_dir).join("raft"),
            config.node.id,
            config.http.addr.to_string(),
        )
    })
    .context("start the manifest (Raft) service")?;

    let shard_count = config.shard_count();
    let (snapshot_senders, snapshot_receivers): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| flume::bounded::<SnapshotRequest>(64))
        .unzip();
    let (query_engine, query) =
        QueryEngine::start(config.query.clone(), data_dir, snapshot_senders)
            .context("start the query engine")?;
    let shared = Arc::new(NodeShared {
        config: config.clone(),
        metrics: NodeMetrics::new(shard_count),
        manifest,
        query,
        shard_count,
        ready_shards: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
    });
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
            .collect::<Vec<_>>(),
    ));
    let handles = {
        let shared = shared.clone();
        let events = events.clone();
        runtime::spawn_shards(&runtime_config, move |shard| {
            let (shutdown, snapshots) = receivers.lock().expect("not poisoned")[shard].clone();
            run_shard(shared.clone(), shard, shutdown, snapshots, events.clone())
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
        Ok(StopEvent::Fatal { shard, message }) => {
            tracing::error!(shard_id = shard, error = %message, "fatal shard error; shutting down");
            Err(anyhow::anyhow!("shard {shard}: {message}"))
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

/// One shard's life: serve HTTP at once (so `/ready` can answer 503 during recovery), recover,
/// flush in the background, and on shutdown stop HTTP, flush everything and close the WAL.
async fn run_shard(
    shared: Arc<NodeShared>,
    shard_index: usize,
    shutdown_requests: flume::Receiver<()>,
    snapshot_requests: flume::Receiver<SnapshotRequest>,
    events: flume::Sender<StopEvent>,
) {
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
    let shard = Shard::new(
        shard_index as u32,
        config.clone(),
        shared.metrics.shards[shard_index].clone(),
        shared.manifest.clone(),
    );
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
            let _ = events.try_send(StopEvent::Fatal {
                shard: shard_index,
                message: format!("bind {}: {error}", config.http.addr),
            });
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
        let _ = events.try_send(StopEvent::Fatal {
            shard: shard_index,
            message: format!("prepare direct I/O: {error}"),
        });
    }
    let recovered = futures_lite::future::or(async { Some(shard.recover().await) }, async {
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
            let _ = events.try_send(StopEvent::Fatal {
                shard: shard_index,
                message: format!("{error:#}"),
            });
            shutdown.wait().await;
            http.await;
        }
        None => http.await,
    }
    shard.close().await;
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
