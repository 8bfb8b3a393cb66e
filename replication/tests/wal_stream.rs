//! Integration tests of WAL streaming over real QUIC endpoints on 127.0.0.1, with certificates
//! from a fresh cluster CA. The origin runs on the test's current-thread runtime (like the
//! control thread); each replica runs on its own thread and runtime, so killing it drops its
//! endpoint. The replica log and the origin's WAL on disk are in-memory doubles (the real ones
//! live in the node and are tested there): the sink records every group it is handed, so the
//! tests can check exactly what arrived, how often and in which order.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use bytes::BytesMut;
use shale_replication::raft_types::NodeId;
use shale_replication::transport::tls;
use shale_replication::transport::tls::CaMaterial;
use shale_replication::transport::CallHandler;
use shale_replication::transport::ClusterTls;
use shale_replication::transport::StreamKind;
use shale_replication::transport::Transport;
use shale_replication::transport::TransportConfig;
use shale_replication::wal_stream;
use shale_replication::wal_stream::protocol;
use shale_replication::wal_stream::protocol::Decoded;
use shale_replication::wal_stream::protocol::Message;
use shale_replication::wal_stream::BoxFuture;
use shale_replication::wal_stream::GroupBatch;
use shale_replication::wal_stream::GroupSource;
use shale_replication::wal_stream::ReplicaAppendError;
use shale_replication::wal_stream::ReplicaSink;
use shale_replication::wal_stream::ShippedGroup;
use shale_replication::wal_stream::WalOutbox;
use shale_replication::wal_stream::WalReplicationParts;
use shale_replication::wal_stream::WalShipConfig;
use shale_replication::wal_stream::WalStreamHandle;

const CLUSTER: &str = "alpha";
const WAIT_MAX: Duration = Duration::from_secs(30);
const ORIGIN: NodeId = 1;
const REPLICA: NodeId = 2;

fn node_tls(ca: &CaMaterial, node_id: NodeId) -> ClusterTls {
    let node = tls::issue_node_cert(ca, CLUSTER, node_id, &[], &[]).unwrap();
    ClusterTls::new(CLUSTER, node_id, ca.cert_pem.clone(), node).unwrap()
}

fn transport_config() -> TransportConfig {
    // A killed replica sends nothing; a short idle timeout lets the origin notice soon.
    TransportConfig {
        idle_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_millis(500),
        ..TransportConfig::default()
    }
}

fn bind(tls: ClusterTls, addr: SocketAddr, admit: &[NodeId]) -> Transport {
    bind_with(tls, addr, admit, transport_config())
}

fn bind_with(
    tls: ClusterTls,
    addr: SocketAddr,
    admit: &[NodeId],
    config: TransportConfig,
) -> Transport {
    let ids: BTreeSet<NodeId> = admit.iter().copied().collect();
    let admit: tls::Admit = Arc::new(move |id| ids.contains(&id));
    Transport::bind(addr, tls, admit, config).unwrap()
}

/// Windows small enough that a few stalled streams use up a whole connection's credit.
fn small_windows() -> TransportConfig {
    TransportConfig {
        stream_window_bytes: 1 << 20,
        connection_window_bytes: 2 << 20,
        ..transport_config()
    }
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ship_config() -> WalShipConfig {
    WalShipConfig {
        reconnect_backoff_min_ms: 50,
        reconnect_backoff_max_ms: 500,
        ..WalShipConfig::default()
    }
}

/// The origin's WAL on disk: every group written, and an oldest LSN below which records are
/// "in files" and no longer readable.
#[derive(Default)]
struct MemorySource {
    groups: Mutex<BTreeMap<u32, Vec<ShippedGroup>>>,
    oldest_lsn: Mutex<BTreeMap<u32, u64>>,
    reads: AtomicU64,
}

impl MemorySource {
    fn all(&self, shard: u32) -> Vec<ShippedGroup> {
        self.groups
            .lock()
            .unwrap()
            .get(&shard)
            .cloned()
            .unwrap_or_default()
    }
}

impl GroupSource for MemorySource {
    fn read(
        &self,
        shard: u32,
        from_lsn: u64,
        bytes_max: usize,
    ) -> BoxFuture<'static, Result<GroupBatch, String>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let oldest = self.oldest_lsn.lock().unwrap().get(&shard).copied();
        let groups = self.all(shard);
        let held: Vec<ShippedGroup> = groups
            .into_iter()
            .filter(|g| oldest.is_none_or(|oldest| g.first_lsn >= oldest))
            .collect();
        let oldest_lsn = held.first().map(|g| g.first_lsn).or(oldest);
        let mut batch = GroupBatch {
            groups: Vec::new(),
            oldest_lsn,
            end_lsn: from_lsn,
        };
        let mut bytes = 0;
        for group in held.into_iter().filter(|g| g.last_lsn >= from_lsn) {
            if !batch.groups.is_empty() && bytes + group.bytes.len() > bytes_max {
                break;
            }
            bytes += group.bytes.len();
            batch.end_lsn = group.last_lsn + 1;
            batch.groups.push(group);
        }
        Box::pin(async move { Ok(batch) })
    }
}

/// The origin's shards: each write goes to the WAL "on disk" first, then to the outbox, as the
/// node does after its fdatasync.
struct Wal {
    outbox: WalOutbox,
    source: Arc<MemorySource>,
    next_lsn: BTreeMap<u32, u64>,
}

impl Wal {
    fn write(&mut self, shard: u32, records: u64, bytes: usize) {
        let first_lsn = *self.next_lsn.entry(shard).or_insert(1);
        let last_lsn = first_lsn + records - 1;
        let mut content = Vec::with_capacity(bytes);
        while content.len() < bytes {
            content.extend_from_slice(&first_lsn.to_le_bytes());
        }
        content.truncate(bytes);
        let group = ShippedGroup {
            shard,
            first_lsn,
            last_lsn,
            bytes: Bytes::from(content),
        };
        self.source
            .groups
            .lock()
            .unwrap()
            .entry(shard)
            .or_default()
            .push(group.clone());
        self.outbox.offer(group);
        self.next_lsn.insert(shard, last_lsn + 1);
    }
}

#[derive(Default)]
struct ReplicaLog {
    durable_lsn: u64,
    groups: Vec<ShippedGroup>,
}

/// A replica log per (origin, shard) in memory, "durable" once an append's future resolves.
/// It refuses gaps like the real one, counts duplicates, and can be told to lose its tail once
/// (to make a Gap happen).
#[derive(Default)]
struct MemorySink {
    logs: Mutex<BTreeMap<(NodeId, u32), ReplicaLog>>,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    resets: Mutex<Vec<(NodeId, u32, u64)>>,
    positions_asked: Mutex<Vec<(NodeId, u32)>>,
    /// When a group starting at `.0` arrives: drop everything from `.1` on and answer Gap.
    lose_tail: Mutex<Option<(u64, u64)>>,
    /// While set, appends do not complete until the watch turns true (a stalled disk).
    hold: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
}

impl MemorySink {
    fn groups(&self, origin: NodeId, shard: u32) -> Vec<ShippedGroup> {
        self.logs
            .lock()
            .unwrap()
            .get(&(origin, shard))
            .map(|log| log.groups.clone())
            .unwrap_or_default()
    }

    fn durable_lsn(&self, origin: NodeId, shard: u32) -> u64 {
        self.logs
            .lock()
            .unwrap()
            .get(&(origin, shard))
            .map_or(0, |log| log.durable_lsn)
    }
}

impl ReplicaSink for MemorySink {
    fn position(&self, origin: NodeId, shard: u32) -> BoxFuture<'static, Result<u64, String>> {
        self.positions_asked.lock().unwrap().push((origin, shard));
        let position = self.durable_lsn(origin, shard);
        Box::pin(async move { Ok(position) })
    }

    fn append(
        &self,
        origin: NodeId,
        group: ShippedGroup,
    ) -> BoxFuture<'static, Result<u64, ReplicaAppendError>> {
        // The order is taken here, at the call, as the contract asks; the "fdatasync" is the
        // future resolving after a yield.
        let result = (|| {
            let mut logs = self.logs.lock().unwrap();
            let log = logs.entry((origin, group.shard)).or_default();
            let mut lose = self.lose_tail.lock().unwrap();
            if let Some((trigger, from_lsn)) = *lose {
                if group.first_lsn == trigger {
                    *lose = None;
                    log.groups.retain(|g| g.last_lsn < from_lsn);
                    log.durable_lsn = from_lsn - 1;
                    self.gaps.fetch_add(1, Ordering::Relaxed);
                    return Err(ReplicaAppendError::Gap { expected: from_lsn });
                }
            }
            if group.last_lsn <= log.durable_lsn {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(log.durable_lsn);
            }
            if group.first_lsn > log.durable_lsn + 1 {
                self.gaps.fetch_add(1, Ordering::Relaxed);
                return Err(ReplicaAppendError::Gap {
                    expected: log.durable_lsn + 1,
                });
            }
            log.durable_lsn = group.last_lsn;
            log.groups.push(group);
            Ok(log.durable_lsn)
        })();
        let hold = self.hold.lock().unwrap().clone();
        Box::pin(async move {
            if let Some(mut hold) = hold {
                let _ = hold.wait_for(|released| *released).await;
            }
            tokio::task::yield_now().await;
            result
        })
    }

    fn reset(
        &self,
        origin: NodeId,
        shard: u32,
        lsn: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        self.resets.lock().unwrap().push((origin, shard, lsn));
        let mut logs = self.logs.lock().unwrap();
        let log = logs.entry((origin, shard)).or_default();
        log.groups.clear();
        log.durable_lsn = lsn - 1;
        Box::pin(async { Ok(()) })
    }
}

/// Every (peer, shard, lsn) the origin's AckSink heard, checked to only advance.
#[derive(Default)]
struct Acks(Mutex<BTreeMap<(NodeId, u32), u64>>);

impl Acks {
    fn sink(self: &Arc<Self>) -> wal_stream::AckSink {
        let acks = self.clone();
        Arc::new(move |peer, shard, lsn| {
            let mut map = acks.0.lock().unwrap();
            let previous = map.insert((peer, shard), lsn).unwrap_or(0);
            assert!(
                lsn > previous,
                "ack for {peer}/{shard} went from {previous} to {lsn}"
            );
        })
    }

    fn get(&self, peer: NodeId, shard: u32) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&(peer, shard))
            .copied()
            .unwrap_or(0)
    }
}

/// A sink for nodes that only ship, and a source for nodes that only receive.
fn parts(
    config: &WalShipConfig,
    source: Arc<MemorySource>,
    replicas: Arc<MemorySink>,
    acks: wal_stream::AckSink,
    shards: u32,
) -> (WalOutbox, WalReplicationParts) {
    let (outbox, receiver) = wal_stream::outbox(config);
    let parts = WalReplicationParts {
        outbox: receiver,
        source,
        acks,
        replicas,
        config: config.clone(),
        shards,
    };
    (outbox, parts)
}

/// A replica node on its own thread and runtime. Stopping it drops its endpoint without a
/// goodbye, like a killed process.
struct ReplicaNode {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ReplicaNode {
    fn start(
        ca: &CaMaterial,
        addr: SocketAddr,
        sink: Arc<MemorySink>,
        call_handler: Option<Arc<dyn CallHandler>>,
    ) -> ReplicaNode {
        ReplicaNode::start_with(
            ca,
            addr,
            sink,
            transport_config(),
            ship_config(),
            move |transport| {
                if let Some(handler) = call_handler {
                    transport.set_call_handler(StreamKind::RaftAppend, handler);
                }
            },
        )
    }

    fn start_with(
        ca: &CaMaterial,
        addr: SocketAddr,
        sink: Arc<MemorySink>,
        transport_config: TransportConfig,
        config: WalShipConfig,
        setup: impl FnOnce(&Transport) + Send + 'static,
    ) -> ReplicaNode {
        let tls = node_tls(ca, REPLICA);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started, bound) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let transport = bind_with(tls, addr, &[ORIGIN], transport_config);
                let (_outbox, parts) =
                    parts(&config, Arc::default(), sink, Arc::new(|_, _, _| {}), 0);
                let (_peers, watch) = tokio::sync::watch::channel(BTreeMap::new());
                wal_stream::start(&transport, parts, watch);
                setup(&transport);
                started.send(transport.local_addr().unwrap()).unwrap();
                let _ = stopped.await;
            })
        });
        let addr = bound.recv_timeout(WAIT_MAX).expect("replica to start");
        ReplicaNode {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("replica thread panicked");
        }
    }
}

impl Drop for ReplicaNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The origin node: its transport, WAL, AckSink record and the peer watch the shipper follows.
struct OriginNode {
    transport: Transport,
    wal: Wal,
    acks: Arc<Acks>,
    handle: WalStreamHandle,
    peers: tokio::sync::watch::Sender<BTreeMap<NodeId, SocketAddr>>,
}

fn start_origin(ca: &CaMaterial, config: WalShipConfig, shards: u32) -> OriginNode {
    start_origin_with(ca, config, shards, transport_config())
}

fn start_origin_with(
    ca: &CaMaterial,
    config: WalShipConfig,
    shards: u32,
    transport_config: TransportConfig,
) -> OriginNode {
    let transport = bind_with(
        node_tls(ca, ORIGIN),
        any_addr(),
        &[REPLICA],
        transport_config,
    );
    let source = Arc::new(MemorySource::default());
    let acks = Arc::new(Acks::default());
    let (outbox, parts) = parts(&config, source.clone(), Arc::default(), acks.sink(), shards);
    let (peers, watch) = tokio::sync::watch::channel(BTreeMap::new());
    let handle = wal_stream::start(&transport, parts, watch);
    OriginNode {
        transport,
        wal: Wal {
            outbox,
            source,
            next_lsn: BTreeMap::new(),
        },
        acks,
        handle,
        peers,
    }
}

impl OriginNode {
    fn ship_to(&self, replica: &ReplicaNode) {
        self.peers
            .send_replace(BTreeMap::from([(REPLICA, replica.addr)]));
    }

    /// Waits until the replica holds every group written on `shard` and the origin heard it.
    async fn converged(&self, sink: &MemorySink, shard: u32) {
        let expected = self.wal.source.all(shard);
        let last = expected.last().map_or(0, |g| g.last_lsn);
        wait_until(
            &format!("shard {shard} at lsn {last} on the replica"),
            || sink.durable_lsn(ORIGIN, shard) >= last && self.acks.get(REPLICA, shard) >= last,
        )
        .await;
    }
}

fn lsns(groups: &[ShippedGroup]) -> Vec<(u64, u64)> {
    groups.iter().map(|g| (g.first_lsn, g.last_lsn)).collect()
}

#[test]
fn groups_reach_the_replica_once_in_order_and_acks_reach_the_origin() {
    // The basic promise: every group of every shard arrives at the replica exactly once, in
    // order and byte for byte, while writes go on; the origin's AckSink hears every shard's
    // durable position advance to the end, and the status shows no lag. A small window keeps
    // many groups unacknowledged at once, so acks and sends interleave.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    runtime().block_on(async {
        let config = WalShipConfig {
            window_bytes: 64 << 10,
            ..ship_config()
        };
        let mut origin = start_origin(&ca, config, 2);
        origin.ship_to(&replica);
        for round in 0..300u64 {
            origin
                .wal
                .write((round % 2) as u32, 1 + round % 5, 1000 + round as usize * 7);
            if round % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for shard in 0..2 {
            origin.converged(&sink, shard).await;
            let expected = origin.wal.source.all(shard);
            assert_eq!(sink.groups(ORIGIN, shard), expected, "shard {shard}");
        }
        assert_eq!(sink.duplicates.load(Ordering::Relaxed), 0);
        assert_eq!(sink.gaps.load(Ordering::Relaxed), 0);
        let status = origin.handle.status();
        assert_eq!(status.shipping.len(), 2, "{status:?}");
        for shipping in &status.shipping {
            assert_eq!(shipping.lag_records, 0, "{shipping:?}");
            assert_eq!(shipping.lag_bytes, 0, "{shipping:?}");
            assert!(shipping.connected && shipping.last_ack_age_ms.is_some());
        }
        origin.transport.shutdown().await;
    });
}

#[test]
fn a_restarted_replica_gets_exactly_the_missing_groups() {
    // A replica killed mid-stream (its endpoint dropped without a goodbye) and restarted with
    // its stored log must receive exactly what it lacks: the origin reconnects, asks for the
    // position again and resends from there, so no group is appended twice or skipped.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let mut replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    let addr = replica.addr;
    runtime().block_on(async {
        let mut origin = start_origin(&ca, ship_config(), 1);
        origin.ship_to(&replica);
        for _ in 0..200 {
            origin.wal.write(0, 3, 4096);
        }
        wait_until("part of the stream on the replica", || {
            sink.durable_lsn(ORIGIN, 0) >= 30
        })
        .await;
        replica.kill();
        let at_kill = sink.durable_lsn(ORIGIN, 0);
        for _ in 0..100 {
            origin.wal.write(0, 2, 4096);
        }
        let mut restarted = ReplicaNode::start(&ca, addr, sink.clone(), None);
        origin.converged(&sink, 0).await;
        assert_eq!(
            lsns(&sink.groups(ORIGIN, 0)),
            lsns(&origin.wal.source.all(0))
        );
        assert_eq!(sink.groups(ORIGIN, 0), origin.wal.source.all(0));
        assert_eq!(sink.duplicates.load(Ordering::Relaxed), 0);
        assert_eq!(sink.gaps.load(Ordering::Relaxed), 0);
        // The restarted replica was asked for its position again.
        assert!(sink.positions_asked.lock().unwrap().len() >= 2);
        eprintln!("killed at lsn {at_kill}");
        restarted.kill();
        origin.transport.shutdown().await;
    });
}

#[test]
fn a_session_behind_the_ring_reads_from_the_group_source() {
    // A peer that joins after the ring has dropped its oldest groups (a small ring, many
    // writes) must get them from the WAL on disk, then follow the ring: the shard never waited
    // for it, and nothing is missing or doubled.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    runtime().block_on(async {
        let config = WalShipConfig {
            ring_bytes_per_shard: 16 << 10,
            read_bytes_max: 32 << 10,
            ..ship_config()
        };
        let mut origin = start_origin(&ca, config, 1);
        for _ in 0..100 {
            origin.wal.write(0, 2, 4096);
        }
        assert_eq!(origin.wal.source.reads.load(Ordering::Relaxed), 0);
        origin.ship_to(&replica);
        origin.converged(&sink, 0).await;
        // More writes after catching up come from the ring.
        for _ in 0..20 {
            origin.wal.write(0, 1, 512);
        }
        origin.converged(&sink, 0).await;
        assert_eq!(sink.groups(ORIGIN, 0), origin.wal.source.all(0));
        assert_eq!(sink.duplicates.load(Ordering::Relaxed), 0);
        let reads = origin.wal.source.reads.load(Ordering::Relaxed);
        assert!(reads >= 100 * 4096 / (32 << 10), "only {reads} disk reads");
        origin.transport.shutdown().await;
    });
}

#[test]
fn a_replica_behind_the_oldest_record_on_disk_is_reset_then_fed() {
    // When the origin's WAL no longer holds the records after the replica's position (they
    // were flushed into files and the segments removed), the session must send Reset with the
    // oldest LSN still on disk before any group, and then everything from there on.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    runtime().block_on(async {
        let config = WalShipConfig {
            ring_bytes_per_shard: 4 << 10,
            ..ship_config()
        };
        let mut origin = start_origin(&ca, config, 1);
        for _ in 0..50 {
            origin.wal.write(0, 1, 1024);
        }
        origin.wal.source.oldest_lsn.lock().unwrap().insert(0, 21);
        origin.ship_to(&replica);
        let last = 50;
        wait_until("the replica at the newest lsn", || {
            sink.durable_lsn(ORIGIN, 0) >= last && origin.acks.get(REPLICA, 0) >= last
        })
        .await;
        assert_eq!(*sink.resets.lock().unwrap(), vec![(ORIGIN, 0, 21)]);
        let expected: Vec<ShippedGroup> = origin
            .wal
            .source
            .all(0)
            .into_iter()
            .filter(|g| g.first_lsn >= 21)
            .collect();
        assert_eq!(sink.groups(ORIGIN, 0), expected);
        origin.transport.shutdown().await;
    });
}

#[test]
fn a_gap_in_the_replica_log_triggers_resync_and_converges() {
    // A replica log that reports a Gap (here it loses its tail from LSN 41 when the group at
    // 101 arrives, with many groups in flight behind it) must make the origin resend from the
    // replica's durable position on the same stream (no reconnect: the position is asked
    // once), although the appends already in flight behind the gap fail too, and the log
    // converges to exactly the origin's WAL.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    *sink.lose_tail.lock().unwrap() = Some((101, 41));
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    runtime().block_on(async {
        let mut origin = start_origin(&ca, ship_config(), 1);
        for _ in 0..300 {
            origin.wal.write(0, 1, 2048);
        }
        origin.ship_to(&replica);
        origin.converged(&sink, 0).await;
        assert!(
            sink.lose_tail.lock().unwrap().is_none(),
            "the gap never happened"
        );
        assert_eq!(sink.groups(ORIGIN, 0), origin.wal.source.all(0));
        let gaps = sink.gaps.load(Ordering::Relaxed);
        assert!(gaps >= 1, "{gaps}");
        // One stream carried it all: a Resync, not a reconnect.
        assert_eq!(sink.positions_asked.lock().unwrap().len(), 1);
        origin.transport.shutdown().await;
    });
}

#[test]
fn a_hello_naming_another_origin_than_the_tls_peer_is_refused() {
    // The origin of a stream is the peer's certificate, never a field of the message: node 1
    // claiming to ship node 3's WAL must be refused before the sink is asked anything, or one
    // node could overwrite another's replica logs.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), None);
    runtime().block_on(async {
        let origin = bind(node_tls(&ca, ORIGIN), any_addr(), &[REPLICA]);
        let (mut send, mut recv) = origin
            .open(REPLICA, replica.addr, StreamKind::WalStream)
            .await
            .unwrap();
        let mut hello = BytesMut::new();
        protocol::encode(
            &Message::Hello {
                version: protocol::WAL_PROTOCOL_VERSION,
                origin: 3,
                shard: 0,
            },
            &mut hello,
        );
        send.write_all(&hello).await.unwrap();
        let answer = recv.read_to_end(4096).await.unwrap();
        let mut answer = BytesMut::from(&answer[..]);
        match protocol::decode(&mut answer, 4096).unwrap() {
            Decoded::Message(Message::Refused { reason }) => {
                assert!(reason.contains("origin 3"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(sink.positions_asked.lock().unwrap().is_empty());
        origin.shutdown().await;
    });
}

/// Answers a call with its request.
struct Echo;

impl CallHandler for Echo {
    fn call(
        &self,
        _peer: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> {
        Box::pin(async move { Ok(request) })
    }
}

#[test]
fn raft_calls_stay_prompt_while_a_wal_stream_runs_at_full_speed() {
    // WAL streams have a connection of their own: while 64 MiB of groups stream as fast as
    // the replica takes them, Raft-sized calls to the same peer on the control lane, made from
    // the same runtime as the shipper (the control thread), keep a p99 far below an election
    // timeout. The numbers are printed for the record.
    const GROUPS: usize = 1024;
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start(&ca, any_addr(), sink.clone(), Some(Arc::new(Echo)));
    runtime().block_on(async {
        let mut origin = start_origin(&ca, ship_config(), 1);
        for _ in 0..GROUPS {
            origin.wal.write(0, 8, 64 << 10);
        }
        let last = GROUPS as u64 * 8;
        // Warm up the control connection so the first sample is not a handshake.
        origin
            .transport
            .call(
                REPLICA,
                replica.addr,
                StreamKind::RaftAppend,
                vec![1; 64],
                WAIT_MAX,
            )
            .await
            .unwrap();
        let started = Instant::now();
        origin.ship_to(&replica);
        let mut latencies = Vec::new();
        while sink.durable_lsn(ORIGIN, 0) < last {
            assert!(started.elapsed() < WAIT_MAX * 2, "stream did not finish");
            let sent = Instant::now();
            let answer = origin
                .transport
                .call(
                    REPLICA,
                    replica.addr,
                    StreamKind::RaftAppend,
                    vec![1; 256],
                    WAIT_MAX,
                )
                .await
                .unwrap();
            assert_eq!(answer.len(), 256);
            latencies.push(sent.elapsed());
        }
        let elapsed = started.elapsed();
        origin.converged(&sink, 0).await;
        assert_eq!(sink.groups(ORIGIN, 0).len(), GROUPS);
        latencies.sort();
        let percentile = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        let (p50, p99) = (percentile(0.5), percentile(0.99));
        eprintln!(
            "wal stream of 64 MiB in {:.2} s; {} calls during it: p50 {p50:?} p99 {p99:?} max {:?}",
            elapsed.as_secs_f64(),
            latencies.len(),
            latencies.last().unwrap()
        );
        assert!(latencies.len() >= 10, "too few calls during the stream");
        assert!(
            p99 < Duration::from_millis(200),
            "call p99 {p99:?} during the wal stream"
        );
        origin.transport.shutdown().await;
    });
}

#[test]
fn raft_calls_answer_while_wal_appends_stall() {
    // A replica whose disk stalls stops reading its WAL streams, which then fill their receive
    // windows. With four shards that is more than the whole connection's credit; if WAL
    // streams shared the Raft connection, Raft calls could not send a byte and the cluster
    // would hold elections because one replica's disk is slow. They must still answer.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let (release, hold) = tokio::sync::watch::channel(false);
    *sink.hold.lock().unwrap() = Some(hold);
    let replica_config = WalShipConfig {
        appends_in_flight_max: 2,
        ..ship_config()
    };
    let replica = ReplicaNode::start_with(
        &ca,
        any_addr(),
        sink.clone(),
        small_windows(),
        replica_config,
        |transport| transport.set_call_handler(StreamKind::RaftAppend, Arc::new(Echo)),
    );
    runtime().block_on(async {
        let config = WalShipConfig {
            window_bytes: 64 << 20,
            ..ship_config()
        };
        let mut origin = start_origin_with(&ca, config, 4, small_windows());
        for _ in 0..64 {
            for shard in 0..4 {
                origin.wal.write(shard, 1, 64 << 10);
            }
        }
        origin.ship_to(&replica);
        // Two streams at the replica's bound of two appends in flight hold their whole stream
        // windows, 2 x 1 MiB: the connection's credit. The other streams cannot even send.
        wait_until("the wal streams to stall", || {
            replica_received(&sink, 4) >= 4
        })
        .await;
        for round in 0..20 {
            let answer = origin
                .transport
                .call(
                    REPLICA,
                    replica.addr,
                    StreamKind::RaftAppend,
                    vec![1; 256],
                    Duration::from_secs(2),
                )
                .await;
            assert!(
                answer.is_ok(),
                "call {round} during stalled wal appends: {answer:?}"
            );
        }
        release.send_replace(true);
        for shard in 0..4 {
            origin.converged(&sink, shard).await;
            assert_eq!(sink.groups(ORIGIN, shard), origin.wal.source.all(shard));
        }
        origin.transport.shutdown().await;
    });
}

/// Appends the replica's sink was handed on `shards` shards of the origin (stalled or not).
fn replica_received(sink: &MemorySink, shards: u32) -> usize {
    (0..shards)
        .map(|shard| sink.groups(ORIGIN, shard).len())
        .sum()
}

/// Serves a file fetch stream with endless bytes once the client sends a byte, as a peer
/// serving a multi-gigabyte file.
struct Endless;

impl shale_replication::transport::StreamHandler for Endless {
    fn handle(
        &self,
        _peer: NodeId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut go = [0u8; 1];
            if recv.read_exact(&mut go).await.is_err() {
                return;
            }
            let chunk = Bytes::from(vec![0x5a; 64 << 10]);
            while send.write_chunk(chunk.clone()).await.is_ok() {}
        })
    }
}

#[test]
fn wal_streams_flow_while_file_fetches_stall_the_bulk_lane() {
    // File fetches whose reader stalls (a slow sink) fill the bulk connection's receive credit
    // on the origin. Acknowledged writes wait for WAL acks, so WAL streams must not share that
    // connection: here every ack would queue behind the stuck fetch bytes and the origin's
    // window would never open again. The stream must still deliver everything.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let sink = Arc::new(MemorySink::default());
    let replica = ReplicaNode::start_with(
        &ca,
        any_addr(),
        sink.clone(),
        small_windows(),
        ship_config(),
        |transport| transport.set_handler(StreamKind::FileFetch, Arc::new(Endless)),
    );
    runtime().block_on(async {
        let config = WalShipConfig {
            window_bytes: 256 << 10,
            ..ship_config()
        };
        let mut origin = start_origin_with(&ca, config, 1, small_windows());
        // Four fetches never read: 4 MiB offered against 2 MiB of connection credit.
        let mut stalled = Vec::new();
        for _ in 0..4 {
            stalled.push(
                origin
                    .transport
                    .open(REPLICA, replica.addr, StreamKind::FileFetch)
                    .await
                    .unwrap(),
            );
        }
        for (send, _) in &mut stalled {
            send.write_all(&[1]).await.unwrap();
        }
        for _ in 0..200 {
            origin.wal.write(0, 1, 16 << 10);
        }
        origin.ship_to(&replica);
        origin.converged(&sink, 0).await;
        assert_eq!(sink.groups(ORIGIN, 0), origin.wal.source.all(0));
        drop(stalled);
        origin.transport.shutdown().await;
    });
}
