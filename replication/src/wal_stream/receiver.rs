//! The replica side of WAL streaming: the `WalStream` handler. It checks the Hello against the
//! peer's TLS identity, answers with the sink's durable position, and appends the groups that
//! follow through the [`ReplicaSink`], pipelined and in order.
//!
//! Appends in flight are bounded in count and bytes; while a bound is reached the handler reads
//! nothing more from the stream, so QUIC flow control holds the origin back. Completed appends
//! are acknowledged at once, those already complete sharing one Ack. A Gap answers with Resync
//! and the groups the origin had sent before it heard the Resync are dropped unread by the
//! sink. Appends run as tasks of their own and are never cancelled half-way: a stream that
//! breaks lets the appends it started finish, and the next stream starts from the sink's
//! position.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use quinn::RecvStream;
use quinn::SendStream;

use crate::raft_types::NodeId;
use crate::transport::StreamHandler;
use crate::wal_stream::protocol;
use crate::wal_stream::protocol::Message;
use crate::wal_stream::shipper::write_message;
use crate::wal_stream::MessageReader;
use crate::wal_stream::ReplicaAppendError;
use crate::wal_stream::ReplicaSink;
use crate::wal_stream::ShippedGroup;
use crate::wal_stream::WalShipConfig;
use crate::wal_stream::WalStreamError;
use crate::wal_stream::WalStreamHandle;

/// Serves `WalStream` streams into a [`ReplicaSink`].
pub struct WalReceiver {
    replicas: Arc<dyn ReplicaSink>,
    config: Arc<WalShipConfig>,
    handle: WalStreamHandle,
}

impl WalReceiver {
    pub(crate) fn new(
        replicas: Arc<dyn ReplicaSink>,
        config: WalShipConfig,
        handle: WalStreamHandle,
    ) -> WalReceiver {
        WalReceiver {
            replicas,
            config: Arc::new(config),
            handle,
        }
    }
}

impl StreamHandler for WalReceiver {
    fn handle(
        &self,
        peer: NodeId,
        send: SendStream,
        recv: RecvStream,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let stream = Stream {
            peer,
            replicas: self.replicas.clone(),
            config: self.config.clone(),
            handle: self.handle.clone(),
            send,
        };
        Box::pin(async move {
            match stream.serve(recv).await {
                Ok(()) => tracing::debug!(peer, "wal stream from peer ended"),
                Err(error @ (WalStreamError::Io(_) | WalStreamError::Ended)) => {
                    tracing::debug!(peer, %error, "wal stream from peer broke")
                }
                Err(error) => tracing::warn!(peer, %error, "wal stream from peer refused"),
            }
        })
    }
}

/// One append in flight.
struct Pending {
    /// The resync epoch the group was received in; Gaps of older epochs are already answered.
    epoch: u64,
    bytes: usize,
    task: tokio::task::JoinHandle<Result<u64, ReplicaAppendError>>,
}

/// Receiving state of one stream.
struct Receiving {
    origin: NodeId,
    shard: u32,
    /// Highest LSN the sink reported durable.
    durable_lsn: u64,
    /// Highest LSN told to the origin.
    told_lsn: u64,
    epoch: u64,
    /// After a Resync: the LSN the origin resends from. Groups starting after it were sent
    /// before the origin heard the Resync and are dropped.
    resync_from: Option<u64>,
    in_flight: VecDeque<Pending>,
    in_flight_bytes: usize,
}

struct Stream {
    peer: NodeId,
    replicas: Arc<dyn ReplicaSink>,
    config: Arc<WalShipConfig>,
    handle: WalStreamHandle,
    send: SendStream,
}

/// The next append to complete, in order; pending forever when none is in flight.
/// Cancel-safe: a completed append is removed only in the same poll that returns it.
async fn next_done(
    in_flight: &mut VecDeque<Pending>,
) -> (Pending, Result<u64, ReplicaAppendError>) {
    let Some(front) = in_flight.front_mut() else {
        return std::future::pending().await;
    };
    let result = (&mut front.task).await;
    let pending = in_flight.pop_front().expect("front exists");
    let result = result.unwrap_or_else(|error| {
        Err(ReplicaAppendError::Failed(format!(
            "replica append task: {error}"
        )))
    });
    (pending, result)
}

impl Stream {
    async fn serve(mut self, recv: RecvStream) -> Result<(), WalStreamError> {
        let mut reader = MessageReader::new(recv, self.config.message_bytes_max);
        let timeout_ms = self.config.hello_timeout_ms;
        let hello = tokio::time::timeout(Duration::from_millis(timeout_ms), reader.next())
            .await
            .map_err(|_| WalStreamError::Timeout("hello", timeout_ms));
        let (origin, shard) = match hello {
            Ok(Ok(Some(Message::Hello {
                version,
                origin,
                shard,
            }))) => {
                if version != protocol::WAL_PROTOCOL_VERSION {
                    return self
                        .refuse(format!("unsupported wal stream version {version}"))
                        .await;
                }
                if origin != self.peer {
                    return self
                        .refuse(format!(
                            "hello names origin {origin} but the peer is node {}",
                            self.peer
                        ))
                        .await;
                }
                (origin, shard)
            }
            Ok(Ok(Some(_))) => return self.refuse("expected hello".to_owned()).await,
            Ok(Ok(None)) => return Err(WalStreamError::Ended),
            Ok(Err(WalStreamError::Protocol(error))) => {
                return self.refuse(error.to_string()).await
            }
            Ok(Err(error)) | Err(error) => return Err(error),
        };
        let position = match self.replicas.position(origin, shard).await {
            Ok(position) => position,
            Err(error) => return self.refuse(format!("replica position: {error}")).await,
        };
        write_message(
            &mut self.send,
            &Message::Position {
                durable_lsn: position,
            },
        )
        .await?;
        self.handle
            .update_receiving(origin, shard, |stat| stat.durable_lsn = position);
        tracing::debug!(
            origin,
            shard_id = shard,
            lsn = position,
            "wal stream from peer open"
        );
        let mut state = Receiving {
            origin,
            shard,
            durable_lsn: position,
            told_lsn: position,
            epoch: 0,
            resync_from: None,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
        };
        match self.receive(&mut reader, &mut state).await {
            Err(WalStreamError::Protocol(error)) => self.refuse(error.to_string()).await,
            Err(WalStreamError::Sink(error)) => self.refuse(error).await,
            other => other,
        }
    }

    async fn receive(
        &mut self,
        reader: &mut MessageReader<RecvStream>,
        state: &mut Receiving,
    ) -> Result<(), WalStreamError> {
        loop {
            let room = state.in_flight.len() < self.config.appends_in_flight_max
                && state.in_flight_bytes < self.config.append_bytes_in_flight_max;
            tokio::select! {
                biased;
                (pending, result) = next_done(&mut state.in_flight) => {
                    self.completed(state, pending, result).await?;
                }
                message = reader.next(), if room => match message? {
                    Some(Message::Group { first_lsn, last_lsn, bytes }) => {
                        self.group(state, ShippedGroup { shard: state.shard, first_lsn, last_lsn, bytes });
                    }
                    Some(Message::Reset { lsn }) => self.reset(state, lsn).await?,
                    Some(_) => return Err(WalStreamError::Unexpected("origin")),
                    None => {
                        // The origin closed the stream: let the started appends finish and
                        // tell it what became durable.
                        while !state.in_flight.is_empty() {
                            let (pending, result) = next_done(&mut state.in_flight).await;
                            self.completed(state, pending, result).await?;
                        }
                        let _ = self.send.finish();
                        return Ok(());
                    }
                },
            }
        }
    }

    fn group(&mut self, state: &mut Receiving, group: ShippedGroup) {
        if let Some(from) = state.resync_from {
            if group.first_lsn > from {
                return;
            }
            if group.last_lsn >= from {
                state.resync_from = None;
            }
        }
        let bytes = group.bytes.len();
        self.handle
            .update_receiving(state.origin, state.shard, |stat| {
                stat.groups_received += 1;
                stat.bytes_received += bytes as u64;
                stat.last_group = Some(Instant::now());
            });
        let append = self.replicas.append(state.origin, group);
        state.in_flight.push_back(Pending {
            epoch: state.epoch,
            bytes,
            task: tokio::spawn(append),
        });
        state.in_flight_bytes += bytes;
    }

    /// Handles a completed append and those completed right behind it, then tells the origin:
    /// one Ack for all of them, or a Resync after a Gap.
    async fn completed(
        &mut self,
        state: &mut Receiving,
        first: Pending,
        result: Result<u64, ReplicaAppendError>,
    ) -> Result<(), WalStreamError> {
        let mut resync = None;
        let mut next = Some((first, result));
        let mut folded = 0;
        while let Some((pending, result)) = next.take() {
            state.in_flight_bytes -= pending.bytes;
            folded += 1;
            match result {
                Ok(durable_lsn) => state.durable_lsn = state.durable_lsn.max(durable_lsn),
                Err(ReplicaAppendError::Gap { expected }) if pending.epoch == state.epoch => {
                    state.epoch += 1;
                    state.resync_from = Some(expected);
                    state.durable_lsn = expected.saturating_sub(1);
                    resync = Some(state.durable_lsn);
                }
                // Answered already: the origin resends from the earlier Resync.
                Err(ReplicaAppendError::Gap { .. }) => {}
                Err(ReplicaAppendError::Failed(error)) => return Err(WalStreamError::Sink(error)),
            }
            if folded < self.config.ack_coalesce_appends_max
                && state
                    .in_flight
                    .front()
                    .is_some_and(|front| front.task.is_finished())
            {
                next = Some(next_done(&mut state.in_flight).await);
            }
        }
        let durable_lsn = state.durable_lsn;
        self.handle
            .update_receiving(state.origin, state.shard, |stat| {
                stat.durable_lsn = durable_lsn
            });
        if let Some(durable_lsn) = resync {
            tracing::info!(
                origin = state.origin,
                shard_id = state.shard,
                lsn = durable_lsn,
                "gap in the replica log; asking the origin to resend"
            );
            state.told_lsn = durable_lsn;
            write_message(&mut self.send, &Message::Resync { durable_lsn }).await?;
        } else if durable_lsn > state.told_lsn {
            state.told_lsn = durable_lsn;
            write_message(&mut self.send, &Message::Ack { durable_lsn }).await?;
        }
        Ok(())
    }

    /// Restarts the replica log at `lsn` once the appends before the Reset are done.
    async fn reset(&mut self, state: &mut Receiving, lsn: u64) -> Result<(), WalStreamError> {
        if lsn == 0 {
            return Err(WalStreamError::Unexpected("reset to lsn 0"));
        }
        while !state.in_flight.is_empty() {
            let (pending, result) = next_done(&mut state.in_flight).await;
            self.completed(state, pending, result).await?;
        }
        tracing::info!(
            origin = state.origin,
            shard_id = state.shard,
            lsn,
            "origin holds no older wal records; restarting the replica log"
        );
        self.replicas
            .reset(state.origin, state.shard, lsn)
            .await
            .map_err(|error| WalStreamError::Sink(format!("reset replica log: {error}")))?;
        state.resync_from = None;
        state.durable_lsn = lsn - 1;
        state.told_lsn = lsn - 1;
        let durable_lsn = lsn - 1;
        self.handle
            .update_receiving(state.origin, state.shard, |stat| {
                stat.durable_lsn = durable_lsn
            });
        write_message(&mut self.send, &Message::Ack { durable_lsn }).await
    }

    /// Tells the origin why the stream ends, and ends it.
    async fn refuse(&mut self, reason: String) -> Result<(), WalStreamError> {
        let _ = write_message(
            &mut self.send,
            &Message::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        let _ = self.send.finish();
        // Keep the stream until the origin has read the refusal (or goes away), so the reason
        // is not lost to a reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        Err(WalStreamError::Refused(reason))
    }
}
