//! SQL queries: what exists is what one manifest version says plus the shards' unflushed rows,
//! read by DuckDB on its own worker threads.
//!
//! Flow: the shard that received the HTTP request submits a [`engine::QueryRequest`] to the
//! [`engine::QueryEngine`] and awaits its events; a DuckDB worker checks the SQL
//! (`sql_guard`), asks every shard for a [`snapshot::ShardSnapshot`] of the tables it names,
//! pins the newest manifest version among the answers, keeps each unflushed piece only if that
//! version has no file holding it, and runs the rewritten SQL over views of exactly those
//! Parquet files and pieces. Results stream back in chunks (JSON or Arrow IPC).

pub mod encode;
pub mod engine;
pub mod snapshot;
