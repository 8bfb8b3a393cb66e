//! The origin side of WAL streaming: one session per (peer, shard), each on its own
//! `WalStream` stream, started and stopped as the membership changes.
//!
//! A session opens its stream, says Hello, hears the replica's durable position P and ships from
//! P+1: out of the shard's ring while it still holds P+1, otherwise out of the `GroupSource`
//! (with a Reset first when the disk no longer holds P+1), then follows the ring live. Up to
//! `window_bytes` may be unacknowledged; acks are read by a task of their own so that a send
//! waiting for flow control never delays them, and every advance reaches the `AckSink`. Any
//! error closes the stream; the session backs off and asks for the position again, so a resend
//! never depends on what the old stream delivered.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use bytes::BytesMut;
use quinn::SendStream;

use crate::raft_types::NodeId;
use crate::transport::StreamKind;
use crate::transport::Transport;
use crate::wal_stream::protocol;
use crate::wal_stream::protocol::Message;
use crate::wal_stream::ring::RingRead;
use crate::wal_stream::ring::Rings;
use crate::wal_stream::ring::ShardRing;
use crate::wal_stream::AckSink;
use crate::wal_stream::GroupSource;
use crate::wal_stream::MessageReader;
use crate::wal_stream::Peers;
use crate::wal_stream::ShippedGroup;
use crate::wal_stream::WalReplicationParts;
use crate::wal_stream::WalShipConfig;
use crate::wal_stream::WalStreamError;
use crate::wal_stream::WalStreamHandle;

/// Replica messages a session's reader may queue before it waits for the session.
const MESSAGE_QUEUE: usize = 64;

/// Aborts a task when dropped, so a session's helpers end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps a session per (peer, shard) for every peer of the membership.
pub(crate) struct Shipper {
    transport: Transport,
    rings: Arc<Rings>,
    source: Arc<dyn GroupSource>,
    acks: AckSink,
    config: Arc<WalShipConfig>,
    shards: u32,
    peers: Peers,
    handle: WalStreamHandle,
}

impl Shipper {
    pub(crate) fn new(
        transport: Transport,
        parts: WalReplicationParts,
        peers: Peers,
        handle: WalStreamHandle,
    ) -> Shipper {
        Shipper {
            transport,
            rings: parts.outbox.rings,
            source: parts.source,
            acks: parts.acks,
            config: Arc::new(parts.config),
            shards: parts.shards,
            peers,
            handle,
        }
    }

    /// Runs until the peer watch closes.
    pub(crate) async fn run(mut self) {
        let local = self.transport.node_id();
        let mut sessions: HashMap<NodeId, Vec<AbortOnDrop>> = HashMap::new();
        loop {
            let current: Vec<NodeId> = self
                .peers
                .borrow_and_update()
                .keys()
                .copied()
                .filter(|peer| *peer != local)
                .collect();
            sessions.retain(|peer, _| {
                let keep = current.contains(peer);
                if !keep {
                    tracing::info!(peer, "wal shipping to peer stopped");
                    self.handle.forget_peer(*peer);
                }
                keep
            });
            for peer in current {
                if sessions.contains_key(&peer) {
                    continue;
                }
                tracing::info!(peer, shards = self.shards, "wal shipping to peer started");
                let tasks = (0..self.shards)
                    .map(|shard| {
                        let session = Session {
                            peer,
                            local,
                            shard,
                            transport: self.transport.clone(),
                            ring: self.rings.shard(shard),
                            source: self.source.clone(),
                            acks: self.acks.clone(),
                            config: self.config.clone(),
                            peers: self.peers.clone(),
                            handle: self.handle.clone(),
                        };
                        AbortOnDrop(tokio::spawn(session.run()))
                    })
                    .collect();
                sessions.insert(peer, tasks);
            }
            if self.peers.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Shipping state of one open stream.
struct Flight {
    /// The next LSN to send.
    next: u64,
    /// Last LSN and bytes of each sent, unacknowledged group, oldest first.
    unacked: VecDeque<(u64, usize)>,
    unacked_bytes: usize,
}

struct Session {
    peer: NodeId,
    local: NodeId,
    shard: u32,
    transport: Transport,
    ring: Arc<ShardRing>,
    source: Arc<dyn GroupSource>,
    acks: AckSink,
    config: Arc<WalShipConfig>,
    peers: Peers,
    handle: WalStreamHandle,
}

impl Session {
    async fn run(self) {
        let backoff_min = Duration::from_millis(self.config.reconnect_backoff_min_ms);
        let backoff_max = Duration::from_millis(self.config.reconnect_backoff_max_ms);
        let mut backoff = backoff_min;
        loop {
            let result = self.ship(&mut backoff, backoff_min).await;
            self.handle
                .update_shipping(self.peer, self.shard, |stat| stat.connected = false);
            let error = match result {
                Ok(never) => match never {},
                Err(error) => error,
            };
            let retry_in_ms = backoff.as_millis() as u64;
            match error {
                WalStreamError::Open(_) | WalStreamError::Io(_) | WalStreamError::Ended => {
                    tracing::debug!(peer = self.peer, shard_id = self.shard, retry_in_ms, %error, "wal stream to peer ended")
                }
                _ => {
                    tracing::warn!(peer = self.peer, shard_id = self.shard, retry_in_ms, %error, "wal stream to peer failed")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(backoff_max);
        }
    }

    /// One stream: returns only with the error that ended it. Resets `backoff` once the
    /// replica answered with its position.
    async fn ship(
        &self,
        backoff: &mut Duration,
        backoff_min: Duration,
    ) -> Result<std::convert::Infallible, WalStreamError> {
        let addr = self
            .peers
            .borrow()
            .get(&self.peer)
            .copied()
            .ok_or(WalStreamError::Ended)?;
        let (mut send, recv) = self
            .transport
            .open(self.peer, addr, StreamKind::WalStream)
            .await?;
        let mut reader = MessageReader::new(recv, self.config.message_bytes_max);
        let hello = Message::Hello {
            version: protocol::WAL_PROTOCOL_VERSION,
            origin: self.local,
            shard: self.shard,
        };
        write_message(&mut send, &hello).await?;
        let timeout_ms = self.config.hello_timeout_ms;
        let answer = tokio::time::timeout(Duration::from_millis(timeout_ms), reader.next())
            .await
            .map_err(|_| WalStreamError::Timeout("position", timeout_ms))??;
        let position = match answer {
            Some(Message::Position { durable_lsn }) => durable_lsn,
            Some(Message::Refused { reason }) => return Err(WalStreamError::Refused(reason)),
            Some(_) => return Err(WalStreamError::Unexpected("first replica")),
            None => return Err(WalStreamError::Ended),
        };
        *backoff = backoff_min;
        tracing::debug!(
            peer = self.peer,
            shard_id = self.shard,
            lsn = position,
            "wal stream to peer open"
        );
        self.handle
            .update_shipping(self.peer, self.shard, |stat| stat.connected = true);
        self.acked(position);

        let (queue, mut messages) = tokio::sync::mpsc::channel(MESSAGE_QUEUE);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let message = reader.next().await;
                let last = !matches!(message, Ok(Some(_)));
                if queue.send(message).await.is_err() || last {
                    return;
                }
            }
        }));
        let mut offers = self.ring.offers.subscribe();
        let mut flight = Flight {
            next: position + 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
        };
        let read_bytes_max = self.config.read_bytes_max;
        loop {
            while let Ok(message) = messages.try_recv() {
                self.on_message(message, &mut flight)?;
            }
            if flight.unacked_bytes >= self.config.window_bytes {
                let message = messages.recv().await.ok_or(WalStreamError::Ended)?;
                self.on_message(message, &mut flight)?;
                continue;
            }
            // Marks the offers seen before looking at the ring, so an offer after the look
            // wakes the wait below.
            offers.borrow_and_update();
            let read = self.ring.lock().read(flight.next, read_bytes_max);
            let groups = match read {
                RingRead::Groups(groups) => groups,
                RingRead::Behind => {
                    let batch = self
                        .source
                        .read(self.shard, flight.next, read_bytes_max)
                        .await
                        .map_err(WalStreamError::Source)?;
                    if let Some(oldest_lsn) = batch.oldest_lsn.filter(|lsn| *lsn > flight.next) {
                        tracing::info!(
                            peer = self.peer,
                            shard_id = self.shard,
                            lsn = flight.next,
                            oldest_lsn,
                            "peer needs wal records that are only in files; resetting its replica log"
                        );
                        write_message(&mut send, &Message::Reset { lsn: oldest_lsn }).await?;
                        flight.next = oldest_lsn;
                    }
                    let next = flight.next;
                    batch
                        .groups
                        .into_iter()
                        .filter(|group| group.last_lsn >= next)
                        .collect()
                }
                RingRead::Ahead => Vec::new(),
            };
            if groups.is_empty() {
                tokio::select! {
                    message = messages.recv() => {
                        let message = message.ok_or(WalStreamError::Ended)?;
                        self.on_message(message, &mut flight)?;
                    }
                    changed = offers.changed() => {
                        // The rings live as long as the outbox; a closed watch means shutdown.
                        if changed.is_err() {
                            return Err(WalStreamError::Ended);
                        }
                    }
                }
                continue;
            }
            self.send_groups(&mut send, groups, &mut flight).await?;
        }
    }

    /// Sends contiguous `groups` starting with the one containing `flight.next`, until the
    /// window is full.
    async fn send_groups(
        &self,
        send: &mut SendStream,
        groups: Vec<ShippedGroup>,
        flight: &mut Flight,
    ) -> Result<(), WalStreamError> {
        for group in groups {
            if group.first_lsn > flight.next || group.last_lsn < flight.next {
                return Err(WalStreamError::Source(format!(
                    "group {}..={} read for lsn {}: not contiguous",
                    group.first_lsn, group.last_lsn, flight.next
                )));
            }
            let length = group.bytes.len();
            if protocol::group_payload_bytes(length) > self.config.message_bytes_max {
                tracing::error!(
                    shard_id = self.shard,
                    first_lsn = group.first_lsn,
                    bytes = length,
                    "wal group exceeds message_bytes_max and cannot be shipped"
                );
                return Err(WalStreamError::GroupTooLarge {
                    first_lsn: group.first_lsn,
                    last_lsn: group.last_lsn,
                    bytes: length,
                });
            }
            let header = protocol::group_header(group.first_lsn, group.last_lsn, length);
            send.write_all(&header)
                .await
                .map_err(std::io::Error::from)?;
            // quinn keeps the buffer until it is acknowledged instead of copying it.
            send.write_chunk(group.bytes)
                .await
                .map_err(std::io::Error::from)?;
            flight.next = group.last_lsn + 1;
            flight.unacked.push_back((group.last_lsn, length));
            flight.unacked_bytes += length;
            if flight.unacked_bytes >= self.config.window_bytes {
                break;
            }
        }
        Ok(())
    }

    fn on_message(
        &self,
        message: Result<Option<Message>, WalStreamError>,
        flight: &mut Flight,
    ) -> Result<(), WalStreamError> {
        match message? {
            Some(Message::Ack { durable_lsn }) => {
                while let Some(&(last_lsn, bytes)) = flight.unacked.front() {
                    if last_lsn > durable_lsn {
                        break;
                    }
                    flight.unacked.pop_front();
                    flight.unacked_bytes -= bytes;
                }
                self.acked(durable_lsn);
                Ok(())
            }
            Some(Message::Resync { durable_lsn }) => {
                tracing::info!(
                    peer = self.peer,
                    shard_id = self.shard,
                    lsn = durable_lsn,
                    resend_from_lsn = durable_lsn + 1,
                    "replica found a gap; resending"
                );
                flight.unacked.clear();
                flight.unacked_bytes = 0;
                flight.next = durable_lsn + 1;
                self.acked(durable_lsn);
                Ok(())
            }
            Some(Message::Refused { reason }) => Err(WalStreamError::Refused(reason)),
            Some(_) => Err(WalStreamError::Unexpected("replica")),
            None => Err(WalStreamError::Ended),
        }
    }

    /// Records an answer of the replica; an advance of its durable position reaches the
    /// `AckSink`. The position never moves back here: a replica that lost records is resent
    /// them, but the copies it acknowledged earlier were counted then.
    fn acked(&self, durable_lsn: u64) {
        let mut advanced = false;
        self.handle.update_shipping(self.peer, self.shard, |stat| {
            stat.last_ack = Some(Instant::now());
            if durable_lsn > stat.acked_lsn {
                stat.acked_lsn = durable_lsn;
                advanced = true;
            }
        });
        if advanced {
            (self.acks)(self.peer, self.shard, durable_lsn);
        }
    }
}

pub(crate) async fn write_message(
    send: &mut SendStream,
    message: &Message,
) -> Result<(), WalStreamError> {
    let mut frame = BytesMut::new();
    protocol::encode(message, &mut frame);
    send.write_all(&frame).await.map_err(std::io::Error::from)?;
    Ok(())
}
