//! The origin's ring of recently offered WAL groups per shard, and the outbox that shard
//! threads offer into.
//!
//! [`Ring`] is sans-IO: contiguous groups, bounded in bytes, the oldest dropped first. A lagging
//! session finds what the ring no longer holds through the `GroupSource` (the WAL on disk), so
//! a slow peer never makes a shard wait or the origin's memory grow.
//!
//! Threads: [`WalOutbox::offer`] runs on shard threads (glommio). It takes the shard's ring lock
//! for a push (no allocation beyond the deque, no I/O, never across an await) and bumps a watch
//! counter that wakes the sessions on the control thread; it never waits for them.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;

use crate::wal_stream::ShippedGroup;
use crate::wal_stream::WalShipConfig;

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The group continued the ring.
    Continued,
    /// The group did not continue the ring (`expected` was the next LSN): the ring now starts at
    /// it. Sessions behind it resynchronize from the `GroupSource`.
    Restarted { expected: u64 },
}

/// Where a session's next LSN is, relative to the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum RingRead {
    /// The groups from the one containing the LSN on, at least one and about `bytes_max`.
    Groups(Vec<ShippedGroup>),
    /// The LSN is older than the ring (or the ring is empty): read it from disk.
    Behind,
    /// The LSN is past the ring's newest group: wait for an offer.
    Ahead,
}

/// Recently offered groups of one shard, contiguous, oldest first.
#[derive(Debug)]
pub struct Ring {
    groups: VecDeque<ShippedGroup>,
    bytes: usize,
    capacity_bytes: usize,
    /// The last LSN of the newest group ever offered (0 before the first).
    offered_lsn: u64,
    dropped_groups: u64,
}

impl Ring {
    pub fn new(capacity_bytes: usize) -> Ring {
        Ring {
            groups: VecDeque::new(),
            bytes: 0,
            capacity_bytes,
            offered_lsn: 0,
            dropped_groups: 0,
        }
    }

    /// Appends `group`, then drops the oldest groups while the ring is over its capacity; the
    /// newest group always stays, even if it alone exceeds the capacity.
    pub fn push(&mut self, group: ShippedGroup) -> Pushed {
        debug_assert!(group.first_lsn <= group.last_lsn, "checked by the outbox");
        let mut pushed = Pushed::Continued;
        if let Some(newest) = self.groups.back() {
            let expected = newest.last_lsn + 1;
            if group.first_lsn != expected {
                self.dropped_groups += self.groups.len() as u64;
                self.groups.clear();
                self.bytes = 0;
                pushed = Pushed::Restarted { expected };
            }
        }
        self.offered_lsn = group.last_lsn;
        self.bytes += group.bytes.len();
        self.groups.push_back(group);
        while self.bytes > self.capacity_bytes && self.groups.len() > 1 {
            let oldest = self.groups.pop_front().expect("more than one group");
            self.bytes -= oldest.bytes.len();
            self.dropped_groups += 1;
        }
        pushed
    }

    /// The index of the group containing `lsn`, if the ring holds it.
    pub fn find(&self, lsn: u64) -> Option<usize> {
        let index = self.groups.partition_point(|group| group.last_lsn < lsn);
        let group = self.groups.get(index)?;
        (group.first_lsn <= lsn).then_some(index)
    }

    /// The groups a session that needs `next` should send, up to about `bytes_max`.
    pub fn read(&self, next: u64, bytes_max: usize) -> RingRead {
        let (Some(oldest), Some(newest)) = (self.groups.front(), self.groups.back()) else {
            return RingRead::Behind;
        };
        if next > newest.last_lsn {
            return RingRead::Ahead;
        }
        if next < oldest.first_lsn {
            return RingRead::Behind;
        }
        let start = self
            .find(next)
            .expect("contiguous groups cover oldest..=newest");
        let mut groups = Vec::new();
        let mut bytes = 0;
        for group in self.groups.range(start..) {
            if !groups.is_empty() && bytes + group.bytes.len() > bytes_max {
                break;
            }
            bytes += group.bytes.len();
            groups.push(group.clone());
        }
        RingRead::Groups(groups)
    }

    pub fn offered_lsn(&self) -> u64 {
        self.offered_lsn
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn dropped_groups(&self) -> u64 {
        self.dropped_groups
    }

    /// Bytes of the held groups with records above `lsn`: the ring's share of a peer's lag
    /// (a lower bound when the peer is behind the ring).
    pub fn bytes_above(&self, lsn: u64) -> u64 {
        let start = self.groups.partition_point(|group| group.last_lsn <= lsn);
        self.groups
            .range(start..)
            .map(|group| group.bytes.len() as u64)
            .sum()
    }
}

/// One shard's ring and the counter that wakes its sessions.
pub(crate) struct ShardRing {
    pub(crate) ring: Mutex<Ring>,
    pub(crate) offers: tokio::sync::watch::Sender<u64>,
}

impl ShardRing {
    /// The ring, locked for a short look or push. Never held across an await.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panicking holder leaves at worst a ring without its last push, which sessions
        // recover from through the GroupSource.
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The rings of every shard, created on first use.
pub(crate) struct Rings {
    shards: RwLock<HashMap<u32, Arc<ShardRing>>>,
    capacity_bytes: usize,
}

impl Rings {
    pub(crate) fn shard(&self, shard: u32) -> Arc<ShardRing> {
        if let Some(ring) = self
            .shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&shard)
        {
            return ring.clone();
        }
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(shard)
            .or_insert_with(|| {
                Arc::new(ShardRing {
                    ring: Mutex::new(Ring::new(self.capacity_bytes)),
                    offers: tokio::sync::watch::Sender::new(0),
                })
            })
            .clone()
    }
}

/// The origin's side of WAL shipping that shard threads hold. Cheap to clone.
#[derive(Clone)]
pub struct WalOutbox {
    rings: Arc<Rings>,
}

/// The shipper's side of the outbox, handed to it through `WalReplicationParts`.
pub struct OutboxReceiver {
    pub(crate) rings: Arc<Rings>,
}

/// The outbox shard threads offer their groups into, and its receiving side.
pub fn outbox(config: &WalShipConfig) -> (WalOutbox, OutboxReceiver) {
    let rings = Arc::new(Rings {
        shards: RwLock::new(HashMap::new()),
        capacity_bytes: config.ring_bytes_per_shard,
    });
    (
        WalOutbox {
            rings: rings.clone(),
        },
        OutboxReceiver { rings },
    )
}

impl WalOutbox {
    /// Offers a group right after its fdatasync. Never blocks on peers and never awaits: a full
    /// ring drops its oldest group instead.
    pub fn offer(&self, group: ShippedGroup) {
        if group.first_lsn == 0 || group.first_lsn > group.last_lsn {
            tracing::error!(
                shard_id = group.shard,
                first_lsn = group.first_lsn,
                last_lsn = group.last_lsn,
                "wal group with an invalid lsn range not shipped"
            );
            return;
        }
        let shard = self.rings.shard(group.shard);
        let (shard_id, first_lsn) = (group.shard, group.first_lsn);
        let pushed = shard.lock().push(group);
        if let Pushed::Restarted { expected } = pushed {
            tracing::error!(
                shard_id,
                first_lsn,
                expected_lsn = expected,
                "offered wal group does not continue the previous one; ring restarted"
            );
        }
        shard.offers.send_modify(|offers| *offers += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn group(first_lsn: u64, last_lsn: u64, bytes: usize) -> ShippedGroup {
        ShippedGroup {
            shard: 0,
            first_lsn,
            last_lsn,
            bytes: Bytes::from(vec![0u8; bytes]),
        }
    }

    fn firsts(read: RingRead) -> Vec<u64> {
        match read {
            RingRead::Groups(groups) => groups.iter().map(|g| g.first_lsn).collect(),
            other => panic!("expected groups, got {other:?}"),
        }
    }

    // Checks that a full ring drops its oldest groups (never the newest, never blocks), so a
    // shard's memory for a lagging peer stays bounded, and that reads then send the session
    // to disk for what was dropped.
    #[test]
    fn full_ring_drops_the_oldest() {
        let mut ring = Ring::new(300);
        for index in 0..5 {
            assert_eq!(
                ring.push(group(index * 10 + 1, index * 10 + 10, 100)),
                Pushed::Continued
            );
        }
        assert_eq!(
            (ring.len(), ring.bytes(), ring.dropped_groups()),
            (3, 300, 2)
        );
        assert_eq!(ring.read(1, 1 << 20), RingRead::Behind);
        assert_eq!(ring.read(20, 1 << 20), RingRead::Behind);
        assert_eq!(firsts(ring.read(21, 1 << 20)), vec![21, 31, 41]);
        assert_eq!(ring.read(51, 1 << 20), RingRead::Ahead);
        assert_eq!(ring.offered_lsn(), 50);
        // One group larger than the whole ring stays, alone.
        ring.push(group(51, 60, 1000));
        assert_eq!((ring.len(), ring.bytes()), (1, 1000));
        assert_eq!(firsts(ring.read(55, 1)), vec![51]);
    }

    // Checks that the group containing an LSN is found wherever the LSN falls in it, so a
    // session resuming mid-group resends that whole group (the replica skips its duplicate
    // records), and that a read stops near its byte budget but always returns one group.
    #[test]
    fn finds_the_group_containing_an_lsn() {
        let mut ring = Ring::new(1 << 20);
        ring.push(group(1, 1, 10));
        ring.push(group(2, 9, 10));
        ring.push(group(10, 12, 10));
        assert_eq!(ring.find(0), None);
        assert_eq!(ring.find(1), Some(0));
        for lsn in 2..=9 {
            assert_eq!(ring.find(lsn), Some(1), "lsn {lsn}");
        }
        assert_eq!(ring.find(12), Some(2));
        assert_eq!(ring.find(13), None);
        assert_eq!(firsts(ring.read(5, 15)), vec![2]);
        assert_eq!(firsts(ring.read(5, 20)), vec![2, 10]);
        assert_eq!(firsts(ring.read(5, 0)), vec![2]);
        assert_eq!(ring.bytes_above(0), 30);
        assert_eq!(ring.bytes_above(9), 10);
        assert_eq!(ring.bytes_above(12), 0);
        assert_eq!(Ring::new(10).read(1, 10), RingRead::Behind);
    }

    // Checks that a group that does not continue the ring (an origin bug) restarts the ring
    // from it instead of leaving a hole that sessions would ship across.
    #[test]
    fn a_discontinuous_group_restarts_the_ring() {
        let mut ring = Ring::new(1 << 20);
        ring.push(group(1, 5, 10));
        assert_eq!(
            ring.push(group(8, 9, 10)),
            Pushed::Restarted { expected: 6 }
        );
        assert_eq!(ring.len(), 1);
        assert_eq!(ring.read(6, 100), RingRead::Behind);
        assert_eq!(firsts(ring.read(8, 100)), vec![8]);
    }
}
