//! The node's side of WAL replication: what connects the shards (glommio) to the WAL streams
//! on the control thread (tokio, `shale_replication::wal_stream`).
//!
//! - Origin: each shard's WAL hands every durable group to the [`WalOutbox`]; the control
//!   thread ships it to every member. Peers' acknowledgements land on the shard's [`AckBoard`],
//!   which wakes the writes waiting for `majority` or `all`.
//! - Replica: groups from a peer are routed to the shard that owns their (origin, shard) log
//!   ([`owner`]) as [`ReplicaRequest`]s, stored there (`crate::replica_log`), and answered
//!   once durable.
//! - Catch-up: a peer behind the in-memory ring reads groups from this node's WAL segments
//!   ([`SegmentSource`], a blocking read on the control runtime's blocking pool).
//!
//! Both channels into a shard are served by tasks in a `Latency::Matters` task queue, so a
//! wake from the control thread runs within about a millisecond even while the shard is busy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_lite::future::Boxed;
use shale_replication::wal_stream::{
    GroupBatch, GroupSource, ReplicaAppendError, ReplicaSink, ShippedGroup,
};

use crate::replica_log::ReplicaError;

/// The shard of this node that keeps the replica log of `origin`'s `shard`.
pub fn owner(origin: u64, shard: u32, shard_count: usize) -> usize {
    let mixed = origin
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(shard));
    (mixed % shard_count.max(1) as u64) as usize
}

/// A request from the control thread to the shard owning a replica log.
pub enum ReplicaRequest {
    Position {
        origin: u64,
        shard: u32,
        reply: flume::Sender<Result<u64, String>>,
    },
    Append {
        origin: u64,
        group: ShippedGroup,
        reply: flume::Sender<Result<u64, ReplicaAppendError>>,
    },
    Reset {
        origin: u64,
        shard: u32,
        lsn: u64,
        reply: flume::Sender<Result<(), String>>,
    },
}

/// Routes the WAL stream receiver's calls to the owning shards.
pub struct ShardReplicaSink {
    pub shards: Vec<flume::Sender<ReplicaRequest>>,
}

fn stopped<T, E: From<String>>() -> Result<T, E> {
    Err(E::from(
        "the shard owning this replica log stopped".to_owned(),
    ))
}

impl ShardReplicaSink {
    fn shard_for(&self, origin: u64, shard: u32) -> &flume::Sender<ReplicaRequest> {
        &self.shards[owner(origin, shard, self.shards.len())]
    }
}

impl ReplicaSink for ShardReplicaSink {
    fn position(&self, origin: u64, shard: u32) -> Boxed<Result<u64, String>> {
        let (reply, answer) = flume::bounded(1);
        let sent = self
            .shard_for(origin, shard)
            .send(ReplicaRequest::Position {
                origin,
                shard,
                reply,
            });
        Box::pin(async move {
            if sent.is_err() {
                return stopped();
            }
            answer.recv_async().await.unwrap_or_else(|_| stopped())
        })
    }

    fn append(&self, origin: u64, group: ShippedGroup) -> Boxed<Result<u64, ReplicaAppendError>> {
        let (reply, answer) = flume::bounded(1);
        // Sent here, not in the future: the order of calls is the order of the log.
        let sent = self
            .shard_for(origin, group.shard)
            .send(ReplicaRequest::Append {
                origin,
                group,
                reply,
            });
        Box::pin(async move {
            let failed =
                || ReplicaAppendError::Failed("the shard owning this replica log stopped".into());
            if sent.is_err() {
                return Err(failed());
            }
            answer.recv_async().await.unwrap_or_else(|_| Err(failed()))
        })
    }

    fn reset(&self, origin: u64, shard: u32, lsn: u64) -> Boxed<Result<(), String>> {
        let (reply, answer) = flume::bounded(1);
        let sent = self.shard_for(origin, shard).send(ReplicaRequest::Reset {
            origin,
            shard,
            lsn,
            reply,
        });
        Box::pin(async move {
            if sent.is_err() {
                return stopped();
            }
            answer.recv_async().await.unwrap_or_else(|_| stopped())
        })
    }
}

impl From<ReplicaError> for ReplicaAppendError {
    fn from(error: ReplicaError) -> Self {
        match error {
            ReplicaError::Gap { expected, .. } => ReplicaAppendError::Gap { expected },
            ReplicaError::Failed(reason) => ReplicaAppendError::Failed(reason),
        }
    }
}

/// Reads groups of this node's own shard WALs from disk for a peer that is behind the ring.
pub struct SegmentSource {
    pub data_dir: PathBuf,
    pub node_id: u64,
    /// Each shard's durable LSN: a group complete on disk but not yet synced is never sent
    /// (a power cut could still take it back and its LSNs be reused).
    pub positions: Arc<crate::shard::Positions>,
}

impl GroupSource for SegmentSource {
    fn read(
        &self,
        shard: u32,
        from_lsn: u64,
        bytes_max: usize,
    ) -> Boxed<Result<GroupBatch, String>> {
        let dir = crate::shard::wal_dir(&self.data_dir, shard);
        let node = self.node_id;
        let durable = self.positions.get(node, shard);
        Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                shale_io::wal::read_groups(&dir, node, shard, from_lsn, durable, bytes_max)
            })
            .await
            .map_err(|e| format!("wal read task: {e}"))?
            .map_err(|e| format!("read wal of shard {shard}: {e}"))?;
            Ok(GroupBatch {
                groups: read
                    .groups
                    .into_iter()
                    .map(|group| ShippedGroup {
                        shard,
                        first_lsn: group.first_lsn,
                        last_lsn: group.last_lsn,
                        bytes: group.bytes,
                    })
                    .collect(),
                oldest_lsn: read.oldest_lsn,
                end_lsn: read.end_lsn,
            })
        })
    }
}

/// The durable positions peers acknowledged for one shard's WAL. Written by the control
/// thread, read by the shard; `changed` wakes the shard's ack task (coalesced).
pub struct AckBoard {
    acked: Mutex<HashMap<u64, u64>>,
    changed: flume::Sender<()>,
}

impl AckBoard {
    pub fn new() -> (Arc<AckBoard>, flume::Receiver<()>) {
        let (changed, wake) = flume::bounded(1);
        (
            Arc::new(AckBoard {
                acked: Mutex::new(HashMap::new()),
                changed,
            }),
            wake,
        )
    }

    /// Records that `peer` holds this shard's log durably through `lsn`.
    pub fn ack(&self, peer: u64, lsn: u64) {
        {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            let entry = acked.entry(peer).or_insert(0);
            if lsn <= *entry {
                return;
            }
            *entry = lsn;
        }
        let _ = self.changed.try_send(());
    }

    /// The LSN through which `peer` holds this shard's log (0 before its first ack).
    pub fn acked(&self, peer: u64) -> u64 {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.get(&peer).copied().unwrap_or(0)
    }

    /// How many of `peers` hold the log through `lsn`.
    pub fn copies(&self, peers: impl Iterator<Item = u64>, lsn: u64) -> usize {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .filter(|peer| acked.get(peer).is_some_and(|&held| held >= lsn))
            .count()
    }
}

/// Serves the replica log requests routed to `shard`, in order, until the channel closes.
/// Opens the replica logs this shard owns on disk first, so their rows are queryable after a
/// restart before any peer connects. A group's rows are buffered before the next request is
/// taken (that keeps each log in order); its durable answer is sent by a task of its own, so
/// groups of several streams share fdatasyncs.
pub async fn serve_replica_requests(
    shard: std::rc::Rc<crate::shard::Shard>,
    requests: flume::Receiver<ReplicaRequest>,
) {
    let data_dir = shard.data_dir().to_path_buf();
    let shard_count = shard.shard_count();
    match crate::replica_log::ReplicaLogs::on_disk(&data_dir) {
        Ok(found) => {
            for (origin, origin_shard) in found {
                if owner(origin, origin_shard, shard_count) != shard.shard_id as usize {
                    continue;
                }
                if let Err(error) = shard.replicas.open(origin, origin_shard).await {
                    shard.report_fatal(format!("open replica log: {error}"));
                    return;
                }
            }
        }
        Err(error) => {
            shard.report_fatal(format!("list replica logs: {error:#}"));
            return;
        }
    }
    while let Ok(request) = requests.recv_async().await {
        match request {
            ReplicaRequest::Position {
                origin,
                shard: origin_shard,
                reply,
            } => {
                let answer = shard
                    .replicas
                    .position(origin, origin_shard)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.send(answer);
            }
            ReplicaRequest::Append {
                origin,
                group,
                reply,
            } => match shard.replicas.append(origin, group.bytes).await {
                Ok(stored) => {
                    glommio::spawn_local(async move {
                        let _ = reply.send(stored.durable().await.map_err(Into::into));
                    })
                    .detach();
                }
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                }
            },
            ReplicaRequest::Reset {
                origin,
                shard: origin_shard,
                lsn,
                reply,
            } => {
                let answer = shard
                    .replicas
                    .reset(origin, origin_shard, lsn)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.send(answer);
            }
        }
    }
}
