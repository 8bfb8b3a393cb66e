//! WAL streaming: every shard's group commits shipped, unchanged and in order, to every peer
//! node, and the peers' durable positions reported back, so a write can be acknowledged after
//! several durable copies.
//!
//! Pieces: [`ring`] (the outbox shard threads offer groups into, one bounded ring per shard),
//! [`protocol`] (the sans-IO WalStream wire format), [`shipper`] (the origin: one session per
//! peer and shard over its own QUIC stream) and [`receiver`] (the replica: the `WalStream`
//! handler, pipelined appends into a [`ReplicaSink`]).
//!
//! Invariant: a group's bytes are opaque here; only its `shard, first_lsn, last_lsn` are read.
//! A replica appends groups in LSN order and acknowledges only what its sink reports durable;
//! every resend after an error starts from the replica's own durable position, so it is
//! idempotent. The origin's identity is the peer's TLS identity, never a field of a message.
//!
//! Threads: [`WalOutbox::offer`] runs on shard threads and never blocks; sessions and the
//! receiver run on the control thread's tokio runtime and never block it (the node's
//! [`GroupSource`] and [`ReplicaSink`] do their disk work elsewhere).

pub mod protocol;
pub mod receiver;
pub mod ring;
pub mod shipper;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

pub use crate::files::fetch::BoxFuture;
use crate::raft_types::NodeId;
use crate::transport::StreamKind;
use crate::transport::Transport;
pub use ring::outbox;
pub use ring::OutboxReceiver;
pub use ring::WalOutbox;

/// One group commit of a shard's WAL as it is shipped: opaque bytes covering
/// `first_lsn..=last_lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShippedGroup {
    pub shard: u32,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub bytes: Bytes,
}

/// Groups read back from a shard's WAL on disk.
#[derive(Clone, Debug, Default)]
pub struct GroupBatch {
    /// Contiguous groups from the one containing the asked LSN (or from `oldest_lsn` when the
    /// asked LSN is gone), up to about the asked byte count; empty when nothing that new is on
    /// disk.
    pub groups: Vec<ShippedGroup>,
    /// The first LSN still on disk, if any.
    pub oldest_lsn: Option<u64>,
    /// The LSN after what was read.
    pub end_lsn: u64,
}

/// Origin side: older groups of a local shard's WAL from disk (the node implements it with a
/// blocking read of its segments, off the control thread).
pub trait GroupSource: Send + Sync {
    fn read(
        &self,
        shard: u32,
        from_lsn: u64,
        bytes_max: usize,
    ) -> BoxFuture<'static, Result<GroupBatch, String>>;
}

/// Origin side: called on the control thread each time a peer's durable position for one of
/// this node's shards advances, with `(peer, shard, durable lsn)`.
pub type AckSink = Arc<dyn Fn(NodeId, u32, u64) + Send + Sync>;

/// Why a replica did not append a group.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaAppendError {
    /// The group starts after the next LSN the replica log expects.
    #[error("gap: the replica log expects lsn {expected}")]
    Gap { expected: u64 },
    #[error("replica append failed: {0}")]
    Failed(String),
}

/// Replica side, implemented by the node: it routes to the shard that owns the replica log of
/// (origin, shard).
pub trait ReplicaSink: Send + Sync {
    /// Highest LSN of (origin, shard) durable here; 0 if none.
    fn position(&self, origin: NodeId, shard: u32) -> BoxFuture<'static, Result<u64, String>>;
    /// Appends one group; resolves with the durable LSN once the replica's fdatasync returned.
    /// A fully duplicate group is `Ok`. Called in LSN order and several may be in flight, and
    /// their futures are polled concurrently: an implementation takes the group's place in its
    /// order in `append` itself (for example by sending it to the owning shard's queue), not
    /// in the returned future.
    fn append(
        &self,
        origin: NodeId,
        group: ShippedGroup,
    ) -> BoxFuture<'static, Result<u64, ReplicaAppendError>>;
    /// The origin no longer has records below `lsn` (they are in files): restart the replica
    /// log at `lsn`.
    fn reset(&self, origin: NodeId, shard: u32, lsn: u64)
        -> BoxFuture<'static, Result<(), String>>;
}

/// Limits and timings of WAL streaming. Sizes are bytes.
#[derive(Clone, Debug)]
pub struct WalShipConfig {
    /// Recent groups the origin keeps in memory per shard; older ones are read from disk.
    pub ring_bytes_per_shard: usize,
    /// Group bytes a session may have sent and not yet had acknowledged.
    pub window_bytes: usize,
    /// Largest message payload either side accepts (a group's bytes plus 16). A larger group
    /// cannot be shipped.
    pub message_bytes_max: usize,
    /// Bytes asked of the `GroupSource` per read.
    pub read_bytes_max: usize,
    /// Reconnect delay after a failed session: doubles from min to max, back to min once a
    /// session reaches its replica's position.
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Bound on the exchange of Hello and Position.
    pub hello_timeout_ms: u64,
    /// Replica: appends in flight per stream, and their bytes. While either bound is reached
    /// the replica reads nothing more from the stream, and QUIC flow control holds the origin.
    pub appends_in_flight_max: usize,
    pub append_bytes_in_flight_max: usize,
    /// Replica: completed appends folded into one Ack at most. Acks are never delayed by a
    /// timer: the appends already complete when one completes share its Ack.
    pub ack_coalesce_appends_max: usize,
}

impl Default for WalShipConfig {
    fn default() -> WalShipConfig {
        WalShipConfig {
            ring_bytes_per_shard: 32 << 20,
            window_bytes: 8 << 20,
            message_bytes_max: 16 << 20,
            read_bytes_max: 4 << 20,
            reconnect_backoff_min_ms: 250,
            reconnect_backoff_max_ms: 2_000,
            hello_timeout_ms: 10_000,
            appends_in_flight_max: 64,
            append_bytes_in_flight_max: 16 << 20,
            ack_coalesce_appends_max: 64,
        }
    }
}

/// What a node hands the control plane to stream its WAL and receive its peers'.
pub struct WalReplicationParts {
    pub outbox: OutboxReceiver,
    pub source: Arc<dyn GroupSource>,
    pub acks: AckSink,
    pub replicas: Arc<dyn ReplicaSink>,
    pub config: WalShipConfig,
    /// This node's shard count: one session per peer and shard.
    pub shards: u32,
}

/// The peers to ship to and their QUIC addresses: every member but this node.
pub type Peers = tokio::sync::watch::Receiver<BTreeMap<NodeId, SocketAddr>>;

/// One (peer, shard) stream as this node ships it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShippingStatus {
    pub peer: NodeId,
    pub shard: u32,
    /// The peer's durable position for this shard (0 before it answered).
    pub acked_lsn: u64,
    /// The newest LSN this shard offered.
    pub offered_lsn: u64,
    pub lag_records: u64,
    /// Bytes of offered groups above `acked_lsn` still in the ring; a lower bound when the
    /// peer is behind the ring.
    pub lag_bytes: u64,
    pub last_ack_age_ms: Option<u64>,
    /// Whether a stream to the peer is open and past its Hello.
    pub connected: bool,
}

/// One (origin, shard) stream as this node receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReceivingStatus {
    pub origin: NodeId,
    pub shard: u32,
    pub durable_lsn: u64,
    pub last_group_age_ms: Option<u64>,
    pub groups_received: u64,
    pub bytes_received: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WalStreamStatus {
    pub shipping: Vec<ShippingStatus>,
    pub receiving: Vec<ReceivingStatus>,
}

#[derive(Clone, Debug, Default)]
struct ShipStat {
    acked_lsn: u64,
    last_ack: Option<Instant>,
    connected: bool,
}

#[derive(Debug, Default)]
struct ReceiveStat {
    durable_lsn: u64,
    last_group: Option<Instant>,
    groups_received: u64,
    bytes_received: u64,
}

struct Shared {
    rings: Arc<ring::Rings>,
    shipping: Mutex<BTreeMap<(NodeId, u32), ShipStat>>,
    receiving: Mutex<BTreeMap<(NodeId, u32), ReceiveStat>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters only; a panicking holder leaves nothing half-done that matters.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The read side of WAL streaming for the API and metrics. Cheap to clone.
#[derive(Clone)]
pub struct WalStreamHandle {
    shared: Arc<Shared>,
}

impl WalStreamHandle {
    fn new(rings: Arc<ring::Rings>) -> WalStreamHandle {
        WalStreamHandle {
            shared: Arc::new(Shared {
                rings,
                shipping: Mutex::new(BTreeMap::new()),
                receiving: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn status(&self) -> WalStreamStatus {
        let now = Instant::now();
        let age = |at: Option<Instant>| at.map(|at| now.duration_since(at).as_millis() as u64);
        // Copied out first, so the rings are never locked while the stats are.
        let shipping: Vec<((NodeId, u32), ShipStat)> = lock(&self.shared.shipping)
            .iter()
            .map(|(key, stat)| (*key, stat.clone()))
            .collect();
        let shipping = shipping
            .into_iter()
            .map(|((peer, shard), stat)| {
                let ShipStat {
                    acked_lsn,
                    last_ack,
                    connected,
                } = stat;
                let (offered_lsn, lag_bytes) = {
                    let shard_ring = self.shared.rings.shard(shard);
                    let ring = shard_ring.lock();
                    (ring.offered_lsn(), ring.bytes_above(acked_lsn))
                };
                ShippingStatus {
                    peer,
                    shard,
                    acked_lsn,
                    offered_lsn,
                    lag_records: offered_lsn.saturating_sub(acked_lsn),
                    lag_bytes,
                    last_ack_age_ms: age(last_ack),
                    connected,
                }
            })
            .collect();
        let receiving = lock(&self.shared.receiving)
            .iter()
            .map(|(&(origin, shard), stat)| ReceivingStatus {
                origin,
                shard,
                durable_lsn: stat.durable_lsn,
                last_group_age_ms: age(stat.last_group),
                groups_received: stat.groups_received,
                bytes_received: stat.bytes_received,
            })
            .collect();
        WalStreamStatus {
            shipping,
            receiving,
        }
    }

    fn update_shipping(&self, peer: NodeId, shard: u32, update: impl FnOnce(&mut ShipStat)) {
        update(
            lock(&self.shared.shipping)
                .entry((peer, shard))
                .or_default(),
        );
    }

    fn forget_peer(&self, peer: NodeId) {
        lock(&self.shared.shipping).retain(|(id, _), _| *id != peer);
    }

    fn update_receiving(&self, origin: NodeId, shard: u32, update: impl FnOnce(&mut ReceiveStat)) {
        update(
            lock(&self.shared.receiving)
                .entry((origin, shard))
                .or_default(),
        );
    }
}

/// Why a WAL stream ended, on either side.
#[derive(Debug, thiserror::Error)]
pub enum WalStreamError {
    #[error("open wal stream: {0}")]
    Open(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("wal stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("wal stream ended by the peer")]
    Ended,
    #[error("refused by the replica: {0}")]
    Refused(String),
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    #[error("no {0} within {1} ms")]
    Timeout(&'static str, u64),
    #[error("read wal groups from disk: {0}")]
    Source(String),
    #[error("wal group {first_lsn}..={last_lsn} of {bytes} bytes exceeds message_bytes_max")]
    GroupTooLarge {
        first_lsn: u64,
        last_lsn: u64,
        bytes: usize,
    },
    #[error("replica sink: {0}")]
    Sink(String),
}

/// Reads messages off a stream into one buffer that never grows past the largest message the
/// limit admits.
pub(crate) struct MessageReader<R> {
    recv: R,
    buffer: bytes::BytesMut,
    payload_limit: usize,
}

/// Bytes a reader asks the stream for at most at once while a message's length is unknown.
const READ_BYTES: usize = 64 << 10;

impl<R: tokio::io::AsyncRead + Unpin> MessageReader<R> {
    pub(crate) fn new(recv: R, payload_limit: usize) -> MessageReader<R> {
        MessageReader {
            recv,
            buffer: bytes::BytesMut::new(),
            payload_limit,
        }
    }

    /// The next message, or `None` at a clean end of the stream. Cancel-safe: bytes read stay
    /// in the buffer for the next call.
    pub(crate) async fn next(&mut self) -> Result<Option<protocol::Message>, WalStreamError> {
        use tokio::io::AsyncReadExt;
        loop {
            let missing = match protocol::decode(&mut self.buffer, self.payload_limit)? {
                protocol::Decoded::Message(message) => return Ok(Some(message)),
                protocol::Decoded::Need(missing) => missing,
            };
            // `missing` passed the header's limit check, so reserving it is bounded.
            self.buffer.reserve(missing.max(READ_BYTES));
            if self.recv.read_buf(&mut self.buffer).await? == 0 {
                return match self.buffer.is_empty() {
                    true => Ok(None),
                    false => Err(WalStreamError::Ended),
                };
            }
        }
    }
}

/// Starts WAL streaming on `transport`: serves `WalStream` streams from peers into
/// `parts.replicas`, and spawns the shipper, which keeps one session per peer of `peers` and
/// shard. Must run inside the control thread's tokio runtime.
pub fn start(transport: &Transport, parts: WalReplicationParts, peers: Peers) -> WalStreamHandle {
    let handle = WalStreamHandle::new(parts.outbox.rings.clone());
    transport.set_handler(
        StreamKind::WalStream,
        Arc::new(receiver::WalReceiver::new(
            parts.replicas.clone(),
            parts.config.clone(),
            handle.clone(),
        )),
    );
    let shipper = shipper::Shipper::new(transport.clone(), parts, peers, handle.clone());
    tokio::spawn(shipper.run());
    handle
}
