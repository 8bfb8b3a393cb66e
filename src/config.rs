//! Node configuration: the embedded defaults, a TOML file on top, then `SHALE_*` environment
//! overrides. Every limit of the node lives here, with its unit in its name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The configuration `shale serve` uses when given no file.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Prefix of environment overrides: `SHALE_<SECTION>_<KEY>`.
const ENV_PREFIX: &str = "SHALE_";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub runtime: RuntimeConfig,
    pub ingest: IngestConfig,
    pub wal: WalConfig,
    pub buffer: BufferConfig,
    pub parquet: ParquetConfig,
    pub manifest: ManifestConfig,
    pub query: QueryConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
    pub antientropy: AntiEntropyConfig,
}

/// The `[antientropy]` section: the walker that proves every manifest file is held here byte
/// for byte, and repairs what is not (cluster nodes only).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AntiEntropyConfig {
    pub paused: bool,
    pub cheap_pass_interval_ms: u64,
    pub page_files: usize,
    pub scrub_mb_per_s: u64,
    pub scrub_cycle_target_s: u64,
    pub repair_concurrency: usize,
    pub orphan_grace_ms: u64,
    pub lost_recheck_ms: u64,
}

/// The `[query]` section: DuckDB workers and the limits of one query.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    pub workers: usize,
    pub duckdb_threads: usize,
    pub duckdb_memory_bytes_max: u64,
    pub timeout_ms: u64,
    pub queue_depth_max: usize,
    pub sql_bytes_max: usize,
    pub json_rows_max: u64,
    pub json_bytes_max: usize,
    pub json_stream_after_bytes: usize,
    pub snapshot_timeout_ms: u64,
    pub request_bytes_max: usize,
    pub buffer_cache_rows_max: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    pub connections_max_per_shard: usize,
    pub shutdown_grace_ms: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Pinned,
    Unbound,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub shards: usize,
    pub placement: Placement,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    pub shard_stall_ms_max: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub body_bytes_max: usize,
    pub decompressed_bytes_max: usize,
    pub line_bytes_max: usize,
    pub columns_per_table_max: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    pub fsync: bool,
    pub segment_bytes_max: u64,
    pub record_bytes_max: u32,
    pub write_bytes_max: usize,
    pub queue_bytes_max: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    pub flush_rows_max: usize,
    pub flush_bytes_max: usize,
    pub flush_age_ms_max: u64,
    pub shard_bytes_max: usize,
    pub flush_check_interval_ms: u64,
    pub flush_hours_max: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Snappy,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    pub compression: Compression,
    pub zstd_level: i32,
    pub row_group_rows_max: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestConfig {
    pub snapshot_logs_since_last_max: u64,
    pub request_queue_depth_max: usize,
    pub registration_retry_ms: u64,
    pub registration_retry_ms_max: u64,
}

/// The `[cluster]` section: whether this node is part of a cluster, how it finds and proves
/// itself to its peers, and Raft's timings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub enabled: bool,
    pub cluster_id: String,
    pub name: String,
    pub bootstrap: bool,
    pub role: NodeRole,
    pub quic_addr: SocketAddr,
    pub advertise_quic_addr: String,
    pub advertise_http_addr: String,
    pub peers: String,
    pub tls_dir: PathBuf,
    pub admin_token: Secret,
    pub heartbeat_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    pub unhealthy_after_ms: u64,
    pub dead_after_ms: u64,
    pub transfer_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub ack: AckLevel,
    pub ack_timeout_ms: u64,
    pub idempotency_window_ms: u64,
    pub wal_peer_retention_bytes: u64,
    pub wal_ship_ring_bytes: usize,
}

/// How many durable copies a write's acknowledgement waits for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AckLevel {
    /// This node's WAL.
    Local,
    /// A majority of the voters, this node included.
    Majority,
    /// Every member (voters and learners).
    All,
}

impl AckLevel {
    pub fn parse(text: &str) -> Option<AckLevel> {
        match text.trim().to_ascii_lowercase().as_str() {
            "local" | "1" => Some(AckLevel::Local),
            "majority" | "quorum" => Some(AckLevel::Majority),
            "all" => Some(AckLevel::All),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AckLevel::Local => "local",
            AckLevel::Majority => "majority",
            AckLevel::All => "all",
        }
    }
}

/// What a node does in a cluster (a standalone node does everything).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Ingests, answers queries, votes in Raft.
    Writer,
    /// Answers queries and votes; refuses writes, naming the writable nodes.
    Reader,
    /// Holds copies of every file but never votes and never leads.
    ReplicaOnly,
}

/// A secret setting: printed and logged as `"***"`, never as its value.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// A peer as listed in `cluster.peers`: `[name@]host:quic_port:http_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddress {
    pub name: String,
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

impl PeerAddress {
    pub fn parse(text: &str) -> anyhow::Result<PeerAddress> {
        let text = text.trim();
        let (name, address) = match text.split_once('@') {
            Some((name, address)) => (name.to_string(), address),
            None => (String::new(), text),
        };
        let (host_quic, http_port) = address
            .rsplit_once(':')
            .with_context(|| format!("peer {text:?}: expected [name@]host:quic_port:http_port"))?;
        let quic_addr: SocketAddr =
            resolve(host_quic).with_context(|| format!("peer {text:?}: host and QUIC port"))?;
        let http_port: u16 = http_port
            .parse()
            .with_context(|| format!("peer {text:?}: HTTP port"))?;
        Ok(PeerAddress {
            name,
            quic_addr,
            http_addr: SocketAddr::new(quic_addr.ip(), http_port),
        })
    }
}

fn resolve(host_port: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .with_context(|| format!("resolve {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to no address"))
}

impl ClusterConfig {
    /// The peers named in `cluster.peers` (comma-separated).
    pub fn peer_addresses(&self) -> anyhow::Result<Vec<PeerAddress>> {
        self.peers
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(PeerAddress::parse)
            .collect()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str(DEFAULT_TOML).expect("the embedded default configuration is valid")
    }
}

impl Config {
    /// Loads the defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let overrides: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        let file_text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?,
            ),
            None => None,
        };
        Self::from_sources(file_text.as_deref(), &overrides)
    }

    /// Layers the sources in order; separated from `load` so tests need no real environment.
    pub fn from_sources(
        file_text: Option<&str>,
        env: &[(String, String)],
    ) -> anyhow::Result<Config> {
        let mut merged: toml::Table = DEFAULT_TOML.parse().context("parse embedded defaults")?;
        if let Some(text) = file_text {
            let file: toml::Table = text.parse().context("parse config file")?;
            merge_tables(&mut merged, file, "")?;
        }
        for (name, value) in env {
            apply_env_override(&mut merged, name, value)?;
        }
        let config: Config = toml::Value::Table(merged)
            .try_into()
            .context("check configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.node.id == 0 {
            bail!("node.id must be greater than 0");
        }
        if self.ingest.line_bytes_max == 0 || self.ingest.body_bytes_max == 0 {
            bail!("ingest limits must be greater than 0");
        }
        if (self.wal.record_bytes_max as usize) < self.ingest.decompressed_bytes_max + 1024 {
            bail!(
                "wal.record_bytes_max ({}) must be at least ingest.decompressed_bytes_max ({}) \
                 + 1024: every accepted request must fit in one WAL record",
                self.wal.record_bytes_max,
                self.ingest.decompressed_bytes_max
            );
        }
        if self.wal.queue_bytes_max < self.wal.record_bytes_max as usize + 1024 {
            bail!(
                "wal.queue_bytes_max ({}) must hold at least one record of wal.record_bytes_max ({})",
                self.wal.queue_bytes_max,
                self.wal.record_bytes_max
            );
        }
        if self.manifest.registration_retry_ms == 0
            || self.manifest.registration_retry_ms_max < self.manifest.registration_retry_ms
        {
            bail!(
                "manifest.registration_retry_ms must be > 0 and at most registration_retry_ms_max"
            );
        }
        let items_max = shale_replication::manifest::COMMAND_ITEMS_MAX;
        if self.buffer.flush_hours_max == 0 || self.buffer.flush_hours_max > items_max {
            bail!(
                "buffer.flush_hours_max ({}) must be between 1 and {items_max}: one flush \
                 registers one file per hour in one manifest command",
                self.buffer.flush_hours_max
            );
        }
        if self.ingest.columns_per_table_max == 0 || self.ingest.columns_per_table_max > items_max {
            bail!("ingest.columns_per_table_max must be between 1 and {items_max}");
        }
        if self.cluster.enabled {
            let id = &self.cluster.cluster_id;
            if id.is_empty()
                || id.len() > 63
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                bail!("cluster.cluster_id {id:?} must be 1 to 63 of a-z, 0-9 and -");
            }
            self.cluster.peer_addresses()?;
            if self.cluster.election_timeout_ms_min <= self.cluster.heartbeat_ms * 2
                || self.cluster.election_timeout_ms_max <= self.cluster.election_timeout_ms_min
            {
                bail!(
                    "cluster timings: need heartbeat_ms * 2 < election_timeout_ms_min < \
                     election_timeout_ms_max"
                );
            }
            if self.cluster.unhealthy_after_ms < 100
                || self.cluster.dead_after_ms <= self.cluster.unhealthy_after_ms
            {
                bail!(
                    "cluster health: need 100 <= unhealthy_after_ms < dead_after_ms \
                     (a node is unhealthy before it is declared dead)"
                );
            }
            if self.cluster.transfer_timeout_ms <= self.cluster.election_timeout_ms_max {
                bail!(
                    "cluster.transfer_timeout_ms must exceed election_timeout_ms_max: a \
                     transfer may have to wait out the followers' leader lease"
                );
            }
        }
        let antientropy = &self.antientropy;
        if antientropy.page_files == 0 || antientropy.repair_concurrency == 0 {
            bail!(
                "antientropy.page_files and antientropy.repair_concurrency must be greater than 0"
            );
        }
        if antientropy.scrub_mb_per_s == 0 || antientropy.scrub_cycle_target_s == 0 {
            bail!(
                "antientropy.scrub_mb_per_s and scrub_cycle_target_s must be greater than 0 \
                 (pause the walker with antientropy.paused instead)"
            );
        }
        if self.buffer.flush_rows_max == 0 || self.parquet.row_group_rows_max == 0 {
            bail!("buffer.flush_rows_max and parquet.row_group_rows_max must be greater than 0");
        }
        Ok(())
    }

    /// Shard count with 0 resolved to the CPUs this process may use.
    pub fn shard_count(&self) -> usize {
        if self.runtime.shards > 0 {
            self.runtime.shards
        } else {
            shale_io::runtime::allowed_cpus().len().max(1)
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration serialises")
    }
}

/// Copies `source` into `target`, refusing keys the defaults do not have (typos would otherwise
/// be ignored silently).
fn merge_tables(target: &mut toml::Table, source: toml::Table, path: &str) -> anyhow::Result<()> {
    for (key, value) in source {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match (target.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge_tables(existing, incoming, &full)?
            }
            (Some(existing), incoming) => *existing = incoming,
            (None, _) => bail!("unknown configuration key {full}"),
        }
    }
    Ok(())
}

/// Applies `SHALE_<SECTION>_<KEY>=value`. The key is matched against the known keys, so keys
/// with underscores are unambiguous; the value is parsed as the type the default has.
fn apply_env_override(table: &mut toml::Table, name: &str, value: &str) -> anyhow::Result<()> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    let rest = rest.to_ascii_lowercase();
    for (section_name, section) in table.iter_mut() {
        let Some(key) = rest.strip_prefix(&format!("{section_name}_")) else {
            continue;
        };
        let toml::Value::Table(section) = section else {
            continue;
        };
        let Some(existing) = section.get_mut(key) else {
            continue;
        };
        *existing = parse_like(existing, value)
            .with_context(|| format!("environment variable {name}={value:?}"))?;
        return Ok(());
    }
    // SHALE_CONFIG and variables of other tools are not configuration keys.
    Ok(())
}

fn parse_like(existing: &toml::Value, text: &str) -> anyhow::Result<toml::Value> {
    Ok(match existing {
        toml::Value::String(_) => toml::Value::String(text.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(
            text.parse()
                .with_context(|| "expected an integer".to_string())?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            text.parse()
                .with_context(|| "expected a number".to_string())?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match text {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => bail!("expected true or false"),
        }),
        other => bail!(
            "cannot override a {} from the environment",
            other.type_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks that the embedded defaults parse and are what the README promises.
    #[test]
    fn defaults_parse() {
        let config = Config::default();
        assert_eq!(config.http.addr.to_string(), "127.0.0.1:8000");
        assert!(config.wal.fsync);
        assert_eq!(config.node.data_dir, PathBuf::from("./data"));
    }

    // Checks the layering order (defaults < file < environment) and that values are typed.
    #[test]
    fn file_then_environment_override_defaults() {
        let file = "[http]\naddr = \"127.0.0.2:9000\"\n[wal]\nfsync = false\n";
        let env = vec![
            ("SHALE_WAL_FSYNC".to_string(), "true".to_string()),
            ("SHALE_BUFFER_FLUSH_ROWS_MAX".to_string(), "5".to_string()),
            ("SHALE_CONFIG".to_string(), "/ignored".to_string()),
        ];
        let config = Config::from_sources(Some(file), &env).unwrap();
        assert_eq!(config.http.addr.to_string(), "127.0.0.2:9000");
        assert!(config.wal.fsync);
        assert_eq!(config.buffer.flush_rows_max, 5);
    }

    // Checks that mistakes are reported, not ignored: unknown keys, badly typed values.
    #[test]
    fn mistakes_are_errors() {
        let error = Config::from_sources(Some("[wal]\nfsynk = true\n"), &[]).unwrap_err();
        assert!(format!("{error:#}").contains("wal.fsynk"), "{error:#}");
        let env = vec![("SHALE_WAL_FSYNC".to_string(), "maybe".to_string())];
        let error = Config::from_sources(None, &env).unwrap_err();
        assert!(
            format!("{error:#}").contains("SHALE_WAL_FSYNC"),
            "{error:#}"
        );
        let error = Config::from_sources(Some("[node]\nid = 0\n"), &[]).unwrap_err();
        assert!(format!("{error:#}").contains("node.id"), "{error:#}");
    }
}
