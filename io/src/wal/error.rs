//! Errors of the WAL. Back-pressure (`Full`), caller mistakes (`TooLarge`), a dead WAL
//! (`Failed`), and start-up failures (`Corrupt`, `Io`, ...) are distinct so callers can map
//! them to 503, 413, 500 and "refuse to start".

use std::path::PathBuf;

/// Everything the WAL can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Appending would exceed `queue_bytes_max`; nothing was appended. Retry after earlier
    /// appends become durable.
    #[error("wal queue is full: {queue_bytes} bytes waiting for sync, a {frame_bytes}-byte record would exceed queue_bytes_max {queue_bytes_max}")]
    Full {
        queue_bytes: usize,
        frame_bytes: usize,
        queue_bytes_max: usize,
    },

    /// The payload is larger than `record_bytes_max`.
    #[error(
        "wal record payload of {payload_bytes} bytes exceeds record_bytes_max {record_bytes_max}"
    )]
    TooLarge {
        payload_bytes: usize,
        record_bytes_max: u32,
    },

    /// An earlier write or sync failed. The WAL refuses all further work because after a
    /// failed fdatasync the kernel may have dropped the dirty data: retrying could report
    /// success for writes that were lost.
    #[error("wal failed and refuses all further work: {reason}")]
    Failed { reason: String },

    /// `close` was called (or the handle was dropped).
    #[error("wal is closed")]
    Closed,

    /// A segment is damaged somewhere other than a torn tail.
    #[error(
        "wal segment {} is corrupt at offset {offset}: {reason}; refusing to start, because records \
         after this point may have been acknowledged to clients. Keep a copy of the directory, \
         then either restore the shard from a peer or, to accept losing every record from this \
         offset on, truncate this segment to {offset} bytes and move all later segments away",
        segment.display()
    )]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The replay callback rejected a record.
    #[error("replay of wal record lsn {lsn} failed: {reason}")]
    Replay { lsn: u64, reason: String },

    /// An operating-system error outside the writer (open, scan, release).
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A record could not be encoded (a bug: limits in `WalConfig` rule this out).
    #[error("encode wal record: {0}")]
    Encode(String),

    /// The configuration is inconsistent.
    #[error("invalid wal config: {0}")]
    Config(String),

    /// `append_group` got a group that starts after this WAL's next LSN: records in between
    /// are missing, and nothing was appended. The sender must resend from `expected` (or, if
    /// it no longer has those records, the replica must `reset_to` a later LSN).
    #[error(
        "wal group starts at lsn {got}, but this wal expects lsn {expected}: records are missing"
    )]
    Gap { expected: u64, got: u64 },

    /// `append_group` got a group whose every record is already in this WAL (a resend);
    /// nothing was appended. `got` is the group's first LSN. The records are durable once
    /// `Wal::durable_lsn` reaches the group's last LSN.
    #[error("wal group starting at lsn {got} is already in this wal (next lsn {next_lsn})")]
    Duplicate { next_lsn: u64, got: u64 },

    /// A group received from another WAL is damaged or not for this WAL; nothing was
    /// appended. The message names what is wrong.
    #[error("bad wal group: {0}")]
    BadGroup(String),

    /// A group holds more bytes than `queue_bytes_max` can ever hold, so `append_group`
    /// could never accept it: the replica's limits must be at least the origin's.
    #[error("wal group of {group_bytes} bytes can never fit queue_bytes_max {queue_bytes_max}")]
    GroupTooLarge {
        group_bytes: usize,
        queue_bytes_max: usize,
    },

    /// `reset_to` was called when it is not allowed; nothing changed.
    #[error("wal reset refused: {0}")]
    ResetRefused(String),
}

impl WalError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> WalError {
        WalError::Io {
            context,
            path: path.into(),
            source: source.into(),
        }
    }
}
