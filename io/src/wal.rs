//! The per-shard write-ahead log: checksummed, versioned rkyv records, appended in groups to
//! DMA-written segment files and made durable with one fdatasync per group.
//!
//! # Threading
//! A `Wal` belongs to one shard's glommio executor: it is `!Send`, shared within the shard
//! through `Rc`, and its group-commit writer is a task on that same executor. Nothing locks.
//!
//! # Durability order (design.md §Durability, steps 2, 4 and 5)
//! `append` assigns the next LSN and copies the framed record into the pending group without
//! waiting. The writer task writes a group at the segment's end, fdatasyncs it, and only then
//! resolves `Append::durable` for every record in it; the ingest layer acknowledges a request
//! after that. A failed write or fdatasync is fatal: the WAL fails every waiter and refuses
//! all further work, because retrying fsync after an error can report lost data as durable.
//! `release_below` deletes whole segments once the ingest layer has flushed their records into
//! committed files. `open` replays every valid record, cuts a torn tail off the last segment,
//! and refuses to start on any other damage.
//!
//! # Format
//! Segment `<first_lsn:020>.wal`: a 64-byte header (magic `SHALEWAL`, segment format version,
//! shard, origin node, first LSN, crc32), then the records. A frame is
//! `[len u32][crc32 u32][body]`, where body = `[record format version u8 = 1][rkyv archive of
//! WalRecord]`. LSNs start at 1, increase by one per record across segments, and are never
//! reused.
//!
//! Segment format version 2 (written today) packs group commits back to back. Each group is
//! a 32-byte group header followed by its frames: magic `SHGC`, record count u32, first LSN
//! u64, bytes of frames u64, crc32 over the 8-byte `[len][crc32]` headers of its frames, and a
//! crc32 of the header itself. It is built in the group's buffer and goes to disk in the same
//! write as the frames, so it costs no extra fdatasync. Version 1 (still read, never written)
//! packs bare frames back to back; a WAL whose last segment is version 1 continues in a new
//! version 2 segment. The record format version versions the body alone and is 1 in both.
//!
//! # Recovery rule
//! Only the newest group can be unsynced, and a power loss may persist any subset of the
//! blocks of its O_DIRECT write, in any order. Nothing of it was acknowledged, so in version 2
//! an incomplete group (bad header, a bad or missing frame, a wrong count or digest) in the
//! last segment with no complete group after it is a torn tail, cut off whole however much of
//! it survived. An incomplete group followed by a complete one, any damage in an earlier
//! segment, or a whole group with wrong LSNs, node or shard refuses start-up naming the segment
//! and byte offset. Version 1 segments keep the per-record rule: a bad record with no valid
//! record after it is a torn tail.
//!
//! # Shipping to peers
//! A group commit is shipped unchanged: `set_durable_observer` sees each group once it is
//! durable, a replica's `Wal` (opened with the origin's node and shard) stores received
//! groups with `append_group` after validating them whole (`shipped`), `reset_to` moves a
//! replica past records its origin released, and `read_groups` (`catchup`) reads groups back
//! from disk on any thread for a peer that is catching up.

mod catchup;
mod config;
mod direct_io;
mod error;
mod group;
mod record;
mod recovery;
mod segment;
mod shipped;
mod stats;
mod writer;

use std::{
    cell::RefCell,
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    rc::Rc,
    task::{Poll, Waker},
};

use glommio::{io::Directory, task::JoinHandle};

pub use self::{
    catchup::{read_groups, GroupRead},
    config::WalConfig,
    direct_io::prime_direct_io_probe,
    error::WalError,
    group::{GROUP_HEADER_BYTES, GROUP_MAGIC},
    record::{ArchivedWalRecord, RecordView, WalRecord, FRAME_HEADER_BYTES, RECORD_FORMAT_VERSION},
    recovery::{RecoveryReport, TornTail},
    segment::{
        SEGMENT_FORMAT_VERSION, SEGMENT_FORMAT_VERSION_V1, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC,
    },
    shipped::{for_each_record, DurableGroup, GroupView},
    stats::{LatencyHistogram, WalStats, SYNC_LATENCY_BUCKET_BOUNDS_US},
};
use self::{
    group::GroupHeader,
    record::{encode_frame, RecordHeader, FRAME_OVERHEAD_BYTES_MAX},
    segment::SEGMENT_HEADER_BYTES as HEADER_BYTES,
};

/// A shard's write-ahead log. Owned by one glommio executor; share it with `Rc<Wal>`.
pub struct Wal {
    shared: Rc<Shared>,
    writer: RefCell<Option<JoinHandle<()>>>,
}

/// State shared by the `Wal` handle, the writer task and pending `Append`s.
pub(crate) struct Shared {
    config: WalConfig,
    /// The locked WAL directory; taken (and so unlocked) by `close`.
    directory: RefCell<Option<Rc<Directory>>>,
    state: RefCell<State>,
    /// Called by the writer with each group once it is durable (`Wal::set_durable_observer`).
    /// Kept outside `state` so the observer may call back into the `Wal`.
    observer: RefCell<Option<Rc<DurableObserver>>>,
}

/// A durable observer: `(group bytes, first LSN, last LSN)`.
pub type DurableObserver = dyn Fn(&[u8], u64, u64);

impl Shared {
    fn directory(&self) -> Result<Rc<Directory>, WalError> {
        self.directory.borrow().clone().ok_or(WalError::Closed)
    }
}

impl State {
    /// Appends are refused once the WAL failed or is closing.
    fn check_accepting(&self) -> Result<(), WalError> {
        if let Some(reason) = &self.failure {
            return Err(WalError::Failed {
                reason: reason.clone(),
            });
        }
        if self.closing {
            return Err(WalError::Closed);
        }
        Ok(())
    }

    /// Refuses with `Full` (and counts it) when `bytes` more would pass `queue_bytes_max`.
    fn check_queue(&mut self, config: &WalConfig, bytes: usize) -> Result<(), WalError> {
        if self.queue_bytes + bytes > config.queue_bytes_max {
            self.stats.appends_rejected_full += 1;
            return Err(WalError::Full {
                queue_bytes: self.queue_bytes,
                frame_bytes: bytes,
                queue_bytes_max: config.queue_bytes_max,
            });
        }
        Ok(())
    }

    /// Places one frame of at most `frame_bytes_max` bytes with the next LSN in the pending
    /// groups: plans a segment rotation or a new group where the limits say so, lets `write`
    /// append the frame to the group's buffer (returning its length), and updates every
    /// counter. Returns the LSN. The caller checked the queue limit; on error nothing changes.
    fn place_frame(
        &mut self,
        config: &WalConfig,
        frame_bytes_max: usize,
        write: impl FnOnce(&mut Vec<u8>, u64) -> Result<usize, WalError>,
    ) -> Result<u64, WalError> {
        let bytes_max = frame_bytes_max + GROUP_HEADER_BYTES;
        let rotate = self.segment_projected_bytes > HEADER_BYTES as u64
            && self.segment_projected_bytes + bytes_max as u64 > config.segment_bytes_max;
        let start_batch = rotate
            || self
                .batches
                .back()
                .is_none_or(|batch| batch.bytes.len() + frame_bytes_max > config.write_bytes_max);
        let lsn = self.next_lsn;
        // A new group's buffer is pushed only once its first frame is written, so an encoding
        // error or a panic in `write` never leaves an empty group for the writer.
        let (frame_start, frame_len) = if start_batch {
            let mut bytes = self.spare_buffers.pop().unwrap_or_default();
            bytes.extend_from_slice(&[0u8; GROUP_HEADER_BYTES]);
            let frame_len = match write(&mut bytes, lsn) {
                Ok(frame_len) => frame_len,
                Err(error) => {
                    bytes.clear();
                    self.spare_buffers.push(bytes);
                    return Err(error);
                }
            };
            self.batches.push_back(Batch {
                bytes,
                first_lsn: lsn,
                last_lsn: lsn,
                records: 0,
                frames_crc: crc32fast::Hasher::new(),
                rotate_before: rotate,
            });
            (GROUP_HEADER_BYTES, frame_len)
        } else {
            let batch = self
                .batches
                .back_mut()
                .expect("a batch exists when none is started");
            let frame_start = batch.bytes.len();
            (frame_start, write(&mut batch.bytes, lsn)?)
        };
        let batch = self
            .batches
            .back_mut()
            .expect("a batch exists or was just started");
        batch
            .frames_crc
            .update(&batch.bytes[frame_start..frame_start + FRAME_HEADER_BYTES]);
        batch.last_lsn = lsn;
        batch.records += 1;
        debug_assert!(frame_len <= frame_bytes_max);
        debug_assert_eq!(batch.bytes.len(), frame_start + frame_len);
        let added_bytes = frame_len + if start_batch { GROUP_HEADER_BYTES } else { 0 };

        if rotate {
            self.segment_projected_bytes = HEADER_BYTES as u64;
        }
        self.segment_projected_bytes += added_bytes as u64;
        self.queue_bytes += added_bytes;
        self.next_lsn += 1;
        self.stats.appends += 1;
        self.stats.append_bytes += added_bytes as u64;
        Ok(lsn)
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer_waker.take() {
            waker.wake();
        }
    }
}

struct State {
    next_lsn: u64,
    /// Every record with an LSN at or below this is written and synced.
    durable_lsn: u64,
    /// Groups appended but not yet taken by the writer, oldest first; never empty groups.
    batches: VecDeque<Batch>,
    /// Cleared group buffers kept to avoid reallocating on every group.
    spare_buffers: Vec<Vec<u8>>,
    /// Size the active segment will have once every queued group is written; used at append
    /// time to decide where a segment rotates.
    segment_projected_bytes: u64,
    /// Framed bytes appended but not yet durable (queued and in flight).
    queue_bytes: usize,
    /// Set on the first write or sync error; the WAL is dead from then on.
    failure: Option<String>,
    closing: bool,
    writer_waker: Option<Waker>,
    /// Tasks waiting in `Append::durable`, by LSN.
    waiters: BTreeMap<u64, Waker>,
    /// Segment files on disk, oldest first; the last is the one being written.
    segments: VecDeque<SegmentEntry>,
    /// A `reset_to` the writer has not started yet: the LSN the fresh segment starts at.
    reset_requested: Option<u64>,
    /// The writer is carrying out a reset.
    reset_running: bool,
    /// The task waiting in `reset_to`.
    reset_waker: Option<Waker>,
    stats: WalStats,
}

/// One group commit's worth of framed records.
pub(crate) struct Batch {
    /// The group header (zeros until `seal`) followed by the frames.
    bytes: Vec<u8>,
    first_lsn: u64,
    last_lsn: u64,
    records: u64,
    /// crc32 of the frame headers appended so far, for the group header.
    frames_crc: crc32fast::Hasher,
    /// The group starts a new segment (planned at append time).
    rotate_before: bool,
}

impl Batch {
    /// Fills in the group header once no more records can join the group (the writer has
    /// taken it).
    pub(crate) fn seal(&mut self) {
        let header = GroupHeader {
            records: u32::try_from(self.records)
                .expect("write_bytes_max bounds a group far below u32::MAX records"),
            first_lsn: self.first_lsn,
            body_bytes: (self.bytes.len() - GROUP_HEADER_BYTES) as u64,
            frames_crc: self.frames_crc.clone().finalize(),
        };
        self.bytes[..GROUP_HEADER_BYTES].copy_from_slice(&header.encode());
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SegmentEntry {
    first_lsn: u64,
    path: PathBuf,
}

/// A record accepted by `append`. Await `durable` before acknowledging it.
#[must_use = "an appended record is not durable until Append::durable resolves"]
pub struct Append {
    pub lsn: u64,
    shared: Rc<Shared>,
}

impl Append {
    /// Resolves with the record's LSN once the group holding it has been written and
    /// fdatasync'd, or with `WalError::Failed` if that write or sync failed. Cancellation-safe:
    /// dropping the future only stops waiting.
    pub async fn durable(self) -> Result<u64, WalError> {
        std::future::poll_fn(|context| {
            let mut state = self.shared.state.borrow_mut();
            if state.durable_lsn >= self.lsn {
                return Poll::Ready(Ok(self.lsn));
            }
            if let Some(reason) = &state.failure {
                return Poll::Ready(Err(WalError::Failed {
                    reason: reason.clone(),
                }));
            }
            state.waiters.insert(self.lsn, context.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Wal {
    /// Opens the WAL in `config.dir` (creating it if needed): scans every segment in LSN
    /// order, calls `on_record` for each valid record with `lsn >= replay_from_lsn` (lower ones
    /// are validated but skipped), cuts a torn tail off the last segment, and starts the
    /// group-commit writer on the current glommio executor.
    ///
    /// `replay_from_lsn` is the lowest LSN not yet in a committed manifest entry; new LSNs
    /// never go below it, even if the directory is empty. Fails with `WalError::Corrupt` on any
    /// damage other than a torn tail, and with `WalError::Replay` if `on_record` fails.
    /// Must run inside a glommio executor.
    pub async fn open(
        config: WalConfig,
        replay_from_lsn: u64,
        on_record: impl FnMut(RecordView<'_>) -> Result<(), String>,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let recovered = recovery::recover(&config, replay_from_lsn, on_record).await?;
        let next_lsn = recovered.report.next_lsn;
        let mut stats = WalStats {
            next_lsn,
            durable_lsn: next_lsn - 1,
            ..WalStats::default()
        };
        stats.segments = recovered.segments.len();
        stats.segments_created = u64::from(recovered.created_segment);
        let shared = Rc::new(Shared {
            state: RefCell::new(State {
                next_lsn,
                durable_lsn: next_lsn - 1,
                batches: VecDeque::new(),
                spare_buffers: Vec::new(),
                segment_projected_bytes: recovered.active.data_end(),
                queue_bytes: 0,
                failure: None,
                closing: false,
                writer_waker: None,
                waiters: BTreeMap::new(),
                segments: recovered.segments,
                reset_requested: None,
                reset_running: false,
                reset_waker: None,
                stats,
            }),
            directory: RefCell::new(Some(Rc::new(recovered.directory))),
            config,
            observer: RefCell::new(None),
        });
        let writer = glommio::spawn_local(writer::run(shared.clone(), recovered.active)).detach();
        Ok((
            Wal {
                shared,
                writer: RefCell::new(Some(writer)),
            },
            recovered.report,
        ))
    }

    /// Assigns the next LSN and copies the framed record into the pending group; never waits.
    /// Fails with `Full` when `queue_bytes_max` would be exceeded (nothing is appended),
    /// `TooLarge` over `record_bytes_max`, `Failed` after an I/O error, `Closed` after `close`.
    pub fn append(&self, kind: u8, time_ns: i64, payload: &[u8]) -> Result<Append, WalError> {
        self.append_frame(kind, time_ns, payload.len(), |buffer| {
            buffer.extend_from_slice(payload)
        })
    }

    /// Like `append`, but `write` fills the `payload_len`-byte payload in place (it starts
    /// zeroed), saving a copy when the caller serializes straight into the log. `write` must
    /// not call back into this `Wal`; if it panics, nothing is appended.
    pub fn append_with(
        &self,
        kind: u8,
        time_ns: i64,
        payload_len: usize,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<Append, WalError> {
        self.append_frame(kind, time_ns, payload_len, |buffer| {
            let start = buffer.len();
            buffer.resize(start + payload_len, 0);
            write(&mut buffer[start..]);
        })
    }

    fn append_frame(
        &self,
        kind: u8,
        time_ns: i64,
        payload_len: usize,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Append, WalError> {
        let config = &self.shared.config;
        let mut guard = self.shared.state.borrow_mut();
        let state = &mut *guard;
        state.check_accepting()?;
        if payload_len > config.record_bytes_max as usize {
            return Err(WalError::TooLarge {
                payload_bytes: payload_len,
                record_bytes_max: config.record_bytes_max,
            });
        }
        let frame_bytes_max = payload_len + FRAME_OVERHEAD_BYTES_MAX;
        // Whether this record starts a group is decided below; limits assume it does.
        state.check_queue(config, frame_bytes_max + GROUP_HEADER_BYTES)?;
        let lsn = state.place_frame(config, frame_bytes_max, |bytes, lsn| {
            let header = RecordHeader {
                origin_node: config.origin_node,
                shard: config.shard,
                lsn,
                kind,
                time_ns,
            };
            encode_frame(bytes, header, payload_len, fill).map_err(WalError::Encode)
        })?;
        state.wake_writer();
        Ok(Append {
            lsn,
            shared: self.shared.clone(),
        })
    }

    /// Appends a group commit received from another WAL of this WAL's origin node and shard
    /// (a replica storing its origin's log): `group` is one whole group as the origin wrote it
    /// (`DurableGroup::bytes`, or what the durable observer saw). The group is validated
    /// completely before anything is appended (see `GroupView::parse`); its frames are then
    /// copied unchanged, byte for byte, into this WAL's pending groups, where they may share a
    /// group (and its new group header) with other frames. Limits and segment rotation apply
    /// exactly as for `append`. All of the group is appended or none of it.
    ///
    /// The group must continue this WAL: a first LSN above `next_lsn` fails with `Gap`. A
    /// group wholly below `next_lsn` (a resend) fails with `Duplicate`. A group that straddles
    /// `next_lsn` (a catch-up that restarts inside a group) appends only its records from
    /// `next_lsn` on. The returned `Append` carries the group's last LSN; its `durable`
    /// resolves when the whole group is durable here. Other faults: `BadGroup` (damaged, or
    /// another origin node or shard), `TooLarge` (a payload over `record_bytes_max`), `Full`,
    /// `GroupTooLarge`, `Failed`, `Closed`.
    pub fn append_group(&self, group: &[u8]) -> Result<Append, WalError> {
        let view = GroupView::parse(group, self.shared.config.record_bytes_max)?;
        self.append_group_view(&view)
    }

    /// `append_group` for a group the caller already parsed (to read its rows as well).
    pub fn append_group_view(&self, group: &GroupView<'_>) -> Result<Append, WalError> {
        let config = &self.shared.config;
        let mut guard = self.shared.state.borrow_mut();
        let state = &mut *guard;
        state.check_accepting()?;
        if (group.origin_node(), group.shard()) != (config.origin_node, config.shard) {
            return Err(WalError::BadGroup(format!(
                "group belongs to node {} shard {}, but this wal stores node {} shard {}",
                group.origin_node(),
                group.shard(),
                config.origin_node,
                config.shard
            )));
        }
        if group.payload_bytes_max() > config.record_bytes_max as usize {
            return Err(WalError::TooLarge {
                payload_bytes: group.payload_bytes_max(),
                record_bytes_max: config.record_bytes_max,
            });
        }
        let next_lsn = state.next_lsn;
        if group.first_lsn() > next_lsn {
            return Err(WalError::Gap {
                expected: next_lsn,
                got: group.first_lsn(),
            });
        }
        if group.last_lsn() < next_lsn {
            return Err(WalError::Duplicate {
                next_lsn,
                got: group.first_lsn(),
            });
        }
        let new_frames = || group.frames().filter(|&(lsn, _)| lsn >= next_lsn);
        // Each frame may start a group of its own, so the bound counts a group header per
        // frame; the queue check then holds for every frame placed below.
        let bytes_max: usize = new_frames()
            .map(|(_, frame)| frame.len() + GROUP_HEADER_BYTES)
            .sum();
        if bytes_max > config.queue_bytes_max {
            return Err(WalError::GroupTooLarge {
                group_bytes: bytes_max,
                queue_bytes_max: config.queue_bytes_max,
            });
        }
        state.check_queue(config, bytes_max)?;
        for (lsn, frame) in new_frames() {
            let placed = state.place_frame(config, frame.len(), |bytes, placed_lsn| {
                debug_assert_eq!(placed_lsn, lsn);
                bytes.extend_from_slice(frame);
                Ok(frame.len())
            })?;
            debug_assert_eq!(placed, lsn);
        }
        state.wake_writer();
        Ok(Append {
            lsn: group.last_lsn(),
            shared: self.shared.clone(),
        })
    }

    /// Registers `observer` (replacing any earlier one) to see every group commit from now on,
    /// exactly as it is on disk (sealed group header and frames), with its first and last
    /// LSN. The writer task calls it on this WAL's executor, in LSN order, once per group,
    /// right after the group's fdatasync returned (after its write, with `fsync` off), and
    /// after `durable_lsn` covers the group but before the group's `Append::durable` waiters
    /// run. It is never called for a group whose write or sync failed. It borrows the WAL's
    /// own buffer, so copy what must outlive the call; it must not block or panic, and it may
    /// call back into this `Wal`. Groups made durable before it was set are not seen: read
    /// them with `read_groups`. With no observer set the writer only checks an `Option`.
    pub fn set_durable_observer(&self, observer: Box<DurableObserver>) {
        *self.shared.observer.borrow_mut() = Some(Rc::from(observer));
    }

    /// Removes the durable observer; groups completing from now on are not reported.
    pub fn clear_durable_observer(&self) {
        self.shared.observer.borrow_mut().take();
    }

    /// Makes this WAL continue at `lsn`, dropping every record it holds: for a replica whose
    /// origin no longer has the records from `next_lsn` up to `lsn` (it released them because
    /// they are in committed files). Allowed only when `lsn > next_lsn` and every appended
    /// record is durable (nothing pending or in flight); otherwise `ResetRefused` and nothing
    /// changes. The writer then creates and syncs a fresh segment starting at `lsn`, deletes
    /// every older segment and syncs the directory; `next_lsn` is `lsn` from the call on, so
    /// appends may follow at once (they are written after the reset). An I/O error during the
    /// reset fails the WAL, as any writer error does. Cancellation-safe: once called, the
    /// reset happens whether or not the future is awaited.
    ///
    /// Crash safety: a crash at any point leaves the old segments (all, some, or none) and
    /// possibly the fresh one. The caller must make sure that reopening passes
    /// `replay_from_lsn >= lsn` to `Wal::open` (for a replica, the origin's first unflushed LSN
    /// from the committed manifest, which is at least `lsn` because the origin only releases
    /// flushed records); record it durably before calling this if it is not already. With
    /// that, every crash state opens with `next_lsn == lsn`: old records are below
    /// `replay_from_lsn`, so they are checked and skipped, and the LSN gap before `lsn` is
    /// accepted. Opened with a lower `replay_from_lsn`, such a WAL refuses to start, because
    /// the records between its old end and `lsn` are missing.
    pub async fn reset_to(&self, lsn: u64) -> Result<(), WalError> {
        {
            let mut state = self.shared.state.borrow_mut();
            state.check_accepting()?;
            let refuse = |reason: String| Err(WalError::ResetRefused(reason));
            if state.reset_requested.is_some() || state.reset_running {
                return refuse("another reset is under way".to_owned());
            }
            if lsn <= state.next_lsn {
                return refuse(format!(
                    "lsn {lsn} is not above the next lsn {}",
                    state.next_lsn
                ));
            }
            if !state.batches.is_empty() || state.durable_lsn + 1 != state.next_lsn {
                return refuse(format!(
                    "records up to lsn {} are appended but only up to {} are durable",
                    state.next_lsn - 1,
                    state.durable_lsn
                ));
            }
            state.reset_requested = Some(lsn);
            state.next_lsn = lsn;
            // Appends made from now on plan their groups in the fresh segment.
            state.segment_projected_bytes = HEADER_BYTES as u64;
            state.wake_writer();
        }
        std::future::poll_fn(|context| {
            let mut state = self.shared.state.borrow_mut();
            if let Some(reason) = &state.failure {
                return Poll::Ready(Err(WalError::Failed {
                    reason: reason.clone(),
                }));
            }
            if state.reset_requested.is_none() && !state.reset_running {
                return Poll::Ready(Ok(()));
            }
            state.reset_waker = Some(context.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Deletes, oldest first, every segment all of whose records have an LSN below `lsn`,
    /// never the segment being written, syncing the directory after each deletion so a crash
    /// cannot bring back an older segment without the newer ones. Call it once the records up
    /// to `lsn - 1` are in a committed manifest entry. Returns the number of segments deleted.
    pub async fn release_below(&self, lsn: u64) -> Result<u64, WalError> {
        // Taken first so a WAL closed meanwhile deletes nothing it cannot sync.
        let directory = self.shared.directory()?;
        let mut deleted = 0;
        loop {
            let victim = {
                let state = self.shared.state.borrow();
                if let Some(reason) = &state.failure {
                    return Err(WalError::Failed {
                        reason: reason.clone(),
                    });
                }
                match (state.segments.front(), state.segments.get(1)) {
                    (Some(oldest), Some(next)) if next.first_lsn <= lsn => oldest.clone(),
                    _ => return Ok(deleted),
                }
            };
            match glommio::io::remove(&victim.path)
                .await
                .map_err(std::io::Error::from)
            {
                Ok(()) => {}
                // A concurrent release_below got there first.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(WalError::io("delete wal segment", &victim.path, error)),
            }
            if self.shared.config.fsync {
                directory.sync().await.map_err(|error| {
                    WalError::io("sync wal directory", &self.shared.config.dir, error)
                })?;
            }
            let mut state = self.shared.state.borrow_mut();
            if state
                .segments
                .front()
                .is_some_and(|entry| entry.first_lsn == victim.first_lsn)
            {
                state.segments.pop_front();
                state.stats.segments_released += 1;
                deleted += 1;
                tracing::debug!(
                    shard_id = self.shared.config.shard,
                    lsn = victim.first_lsn,
                    "wal segment released"
                );
            }
        }
    }

    /// Stops accepting appends, writes and syncs everything pending, and stops the writer.
    /// Returns `Failed` if the WAL failed before or while draining. Takes `&self` so a WAL
    /// shared through `Rc` can be closed; later calls return at once.
    pub async fn close(&self) -> Result<(), WalError> {
        self.begin_close();
        let writer = self.writer.borrow_mut().take();
        if let Some(writer) = writer {
            writer.await;
        }
        // Unlock the directory so the WAL can be opened again, even while stale `Append`
        // handles keep the shared state alive.
        let directory = self.shared.directory.borrow_mut().take();
        if let Some(directory) = directory.and_then(|directory| Rc::try_unwrap(directory).ok()) {
            if let Err(error) = directory.close().await {
                tracing::warn!(path = %self.shared.config.dir.display(), %error, "close wal directory");
            }
        }
        match &self.shared.state.borrow().failure {
            Some(reason) => Err(WalError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn begin_close(&self) {
        let mut state = self.shared.state.borrow_mut();
        state.closing = true;
        if let Some(waker) = state.writer_waker.take() {
            waker.wake();
        }
    }

    pub fn stats(&self) -> WalStats {
        let state = self.shared.state.borrow();
        let mut stats = state.stats.clone();
        stats.queue_bytes = state.queue_bytes;
        stats.next_lsn = state.next_lsn;
        stats.durable_lsn = state.durable_lsn;
        stats.segments = state.segments.len();
        stats
    }

    /// LSN the next append will get.
    pub fn next_lsn(&self) -> u64 {
        self.shared.state.borrow().next_lsn
    }

    /// Every record at or below this LSN is durable.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.state.borrow().durable_lsn
    }

    pub fn config(&self) -> &WalConfig {
        &self.shared.config
    }

    /// Paths of the segment files on disk, oldest first (the last is being written).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.shared
            .state
            .borrow()
            .segments
            .iter()
            .map(|entry| entry.path.clone())
            .collect()
    }
}

impl Drop for Wal {
    /// A dropped WAL still drains: the writer writes and syncs what was appended, then exits.
    fn drop(&mut self) {
        self.begin_close();
    }
}
