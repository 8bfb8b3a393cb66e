//! shale: a shared-nothing time-series database node.
//!
//! The library holds everything the `shale` binary runs, so integration tests and benches can
//! reach the same code: configuration, the line-protocol parser, Arrow buffers, Parquet
//! encoding, shards and the HTTP API.

pub mod api;
pub mod bench;
pub mod buffer;
pub mod cluster_api;
pub mod cluster_cli;
pub mod cluster_ops;
pub mod config;
pub mod failpoint;
pub mod http_client;
pub mod idempotency;
pub mod identity;
pub mod ingest;
pub mod line_protocol;
pub mod metrics;
pub mod msgpack;
pub mod names;
pub mod node;
pub mod query;
pub mod replica;
pub mod replica_log;
pub mod shard;
pub mod sql_guard;
pub mod storage;
pub mod wal_replication;
pub mod workload;
