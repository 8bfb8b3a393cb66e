//! shale-io: the thread-per-core runtime and durable disk I/O under a shale node.
//!
//! Invariant: nothing here knows about time series, Raft or SQL. The WAL stores opaque payloads,
//! `publish` stores opaque bytes, and the HTTP server runs whatever service it is given.

pub mod frame;
pub mod http;
pub mod publish;
pub mod runtime;
pub mod sink;
pub mod wal;
