//! Peer file replication: every node pulls every Parquet file of the manifest from the origin or
//! any peer, verifies it against the manifest's size and blake3, publishes it durably and records
//! it in a local presence index; and it serves its own copies, but only current manifest paths.
//!
//! Pieces: [`presence`] (the durable index of verified local files), [`planner`] (sans-IO:
//! manifest + presence -> fetch tasks), [`throttle`] (sans-IO token bucket for the bandwidth cap),
//! [`protocol`] (the FileFetch wire format), [`fetch`] (the `FileSource` trait, a source over any
//! byte stream pair, and the client that writes one file), [`serve`] (the server side), and
//! [`replicator`] (the driver on the control thread, and the handle queries use).
//!
//! Threads: the replicator and the server run on the control thread's tokio runtime; file bytes
//! are written and hashed on the `shale-fetch` glommio thread ([`shale_io::sink`]) and served from
//! tokio's blocking pool, so the control thread never waits for the disk.

pub mod fetch;
pub mod holdings;
pub mod planner;
pub mod presence;
pub mod protocol;
pub mod replicator;
pub mod serve;
pub mod throttle;

/// Node ids as Raft knows them (u64 > 0).
pub type NodeId = u64;

/// Suffix of a file being fetched, beside its final path. Start-up clean-up keeps these (they do
/// not match the publish temporaries), so an interrupted fetch resumes from their length.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// The path of the partial beside `target`.
pub fn partial_path(target: &std::path::Path) -> std::path::PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(PARTIAL_SUFFIX);
    std::path::PathBuf::from(name)
}

/// Parses 64 lowercase or uppercase hex digits into a blake3 digest.
pub fn parse_blake3_hex(hex: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(hex)
        .ok()
        .map(|hash| *hash.as_bytes())
}

/// 64 lowercase hex digits of a blake3 digest, as the manifest stores it.
pub fn blake3_hex(digest: &[u8; 32]) -> String {
    blake3::Hash::from(*digest).to_hex().to_string()
}
