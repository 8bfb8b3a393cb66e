//! `shale cluster ...`: the operator's commands. Status and membership commands talk to any
//! node's cluster API over HTTP with the admin token; credential commands write the cluster CA
//! and node certificates to files.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::http_client::{resolve, Client};

/// Bound on connecting to a node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on each read of an answer, for requests that answer promptly.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on each read of a verify answer: a deep verify re-hashes every file on every node
/// before it answers.
const VERIFY_READ_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Where and how to reach a node's cluster API.
pub struct Target {
    pub url: String,
    pub token: Option<String>,
}

impl Target {
    /// Sends one request and returns the parsed JSON answer; a non-2xx answer is an error
    /// carrying the node's message.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<serde_json::Value> {
        let (status, value) = self.call_raw(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path}: {status} {}",
                value["error"].as_str().unwrap_or("(no message)")
            );
        }
        Ok(value)
    }

    /// [`Self::call`], following a follower's 421 to the leader it names (a few hops at most,
    /// while leadership moves).
    pub fn call_following(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<serde_json::Value> {
        let mut url = self.url.clone();
        for _ in 0..4 {
            let target = Target {
                url: url.clone(),
                token: self.token.clone(),
            };
            let (status, value) = target.call_raw(method, path, body)?;
            if status == 421 {
                if let Some(leader) = value["leader_http_addr"].as_str() {
                    url = format!("http://{leader}");
                    continue;
                }
            }
            if !(200..300).contains(&status) {
                bail!(
                    "{method} {path} on {url}: {status} {}",
                    value["error"].as_str().unwrap_or("(no message)")
                );
            }
            return Ok(value);
        }
        bail!("{method} {path}: no leader answered (leadership kept moving)")
    }

    /// Sends one request and returns the status and the JSON answer, whatever the status.
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.call_raw_with(method, path, &[], body)
    }

    /// [`Self::call_raw`] with extra request headers.
    pub fn call_raw_with(
        &self,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.exchange(method, path, extra_headers, body, DEFAULT_READ_TIMEOUT)
    }

    /// One request with `read_timeout` on each read of the answer.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: &[u8],
        read_timeout: Duration,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = resolve(&self.url).with_context(|| format!("resolve {}", self.url))?;
        let mut client = Client::connect_with_timeouts(addr, CONNECT_TIMEOUT, read_timeout)
            .with_context(|| format!("connect to {}", self.url))?;
        let authorization = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(value) = authorization.as_deref() {
            headers.push(("authorization", value));
        }
        headers.extend_from_slice(extra_headers);
        let response = client
            .request(method, path, &headers, body)
            .with_context(|| format!("{method} {path}"))?;
        let value: serde_json::Value = serde_json::from_slice(&response.body)
            .with_context(|| format!("{method} {path}: answer is not JSON: {}", response.text()))?;
        Ok((response.status, value))
    }
}

/// Renders `GET /api/v1/cluster` for a terminal.
pub fn format_status(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}  ({})  node {}  leader {}  term {}  applied {}  last log {}  files {}",
        status["cluster_id"].as_str().unwrap_or("-"),
        status["mode"].as_str().unwrap_or("-"),
        status["node_id"],
        status["leader_id"],
        status["term"],
        status["applied_index"],
        status["last_log_index"],
        status["manifest_files"],
    );
    let _ = writeln!(
        out,
        "{:<6} {:<14} {:<8} {:<8} {:<22} {:<22} {:>8} {:>8}",
        "id", "name", "raft", "state", "quic", "http", "matched", "lag"
    );
    for node in status["nodes"].as_array().into_iter().flatten() {
        let leader = if node["is_leader"] == true { "*" } else { "" };
        let _ = writeln!(
            out,
            "{:<6} {:<14} {:<8} {:<8} {:<22} {:<22} {:>8} {:>8}",
            format!("{}{leader}", node["id"]),
            node["name"].as_str().unwrap_or("-"),
            node["raft_role"].as_str().unwrap_or("-"),
            node["state"].as_str().unwrap_or("-"),
            node["quic_addr"].as_str().unwrap_or("-"),
            node["http_addr"].as_str().unwrap_or("-"),
            node["matched_index"],
            node["lag_entries"],
        );
    }
    out
}

/// `POST /api/v1/cluster/verify/{database}[?deep=true]` on the target: the report, whatever
/// its verdict (a non-2xx answer is an error).
pub fn verify(target: &Target, database: &str, deep: bool) -> anyhow::Result<serde_json::Value> {
    let encoded =
        percent_encoding::utf8_percent_encode(database, percent_encoding::NON_ALPHANUMERIC);
    let path = format!("/api/v1/cluster/verify/{encoded}?deep={deep}");
    let (status, value) = target.exchange("POST", &path, &[], b"", VERIFY_READ_TIMEOUT)?;
    if !(200..300).contains(&status) {
        bail!(
            "POST {path}: {status} {}",
            value["error"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(value)
}

/// Renders a verify report for a terminal: one line per node, then every mismatch and every
/// file the nodes disagree on.
pub fn format_verify(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "verify {}  at manifest index {}{}  status {}  {} ms  {} bytes exchanged",
        report["database"].as_str().unwrap_or("-"),
        report["manifest_index"],
        if report["deep"] == true {
            "  (deep)"
        } else {
            ""
        },
        report["status"].as_str().unwrap_or("-"),
        report["elapsed_ms"],
        report["bytes_exchanged"],
    );
    let _ = writeln!(
        out,
        "{:<6} {:<14} {:<13} {:>8} {:>7} {:>8} {:>14} {:>10}",
        "id", "name", "status", "index", "behind", "files", "bytes", "mismatches"
    );
    let nodes = report["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for node in nodes {
        let _ = writeln!(
            out,
            "{:<6} {:<14} {:<13} {:>8} {:>7} {:>8} {:>14} {:>10}",
            node["node_id"],
            node["name"].as_str().unwrap_or("-"),
            node["status"].as_str().unwrap_or("-"),
            node["manifest_index"],
            if node["behind"] == true { "yes" } else { "no" },
            node["files_compared"],
            node["bytes_compared"],
            node["mismatches_total"],
        );
    }
    for node in nodes {
        if let Some(error) = node["error"].as_str() {
            let _ = writeln!(out, "node {}: error: {error}", node["node_id"]);
        }
        for mismatch in node["mismatches"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "node {}: {}  expected {}  found {}",
                node["node_id"],
                mismatch["path"].as_str().unwrap_or("-"),
                mismatch["expected_blake3"].as_str().unwrap_or("-"),
                mismatch["found"].as_str().unwrap_or("-"),
            );
        }
        let listed = node["mismatches"].as_array().map_or(0, Vec::len) as u64;
        let total = node["mismatches_total"].as_u64().unwrap_or(0);
        if total > listed {
            let _ = writeln!(
                out,
                "node {}: {} more mismatches not listed",
                node["node_id"],
                total - listed
            );
        }
    }
    for disagreement in report["disagreements"].as_array().into_iter().flatten() {
        let found: Vec<String> = disagreement["found"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{}={}", f["node_id"], f["found"].as_str().unwrap_or("-")))
            .collect();
        let _ = writeln!(
            out,
            "nodes disagree on {}: {}",
            disagreement["path"].as_str().unwrap_or("-"),
            found.join(" ")
        );
    }
    out
}

/// Writes a new cluster CA to `dir/ca.pem` and `dir/ca.key`; refuses to overwrite one.
pub fn init_ca(dir: &std::path::Path, cluster_id: &str) -> anyhow::Result<()> {
    use shale_replication::transport::tls;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() || key.exists() {
        bail!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        );
    }
    let ca = tls::generate_ca(cluster_id)?;
    write_secret(&key, ca.key_pem.as_bytes())?;
    shale_io::publish::replace_blocking(&cert, ca.cert_pem.as_bytes())
        .with_context(|| format!("write {}", cert.display()))
}

/// Issues `dir/node-<id>.pem` and `.key`, signed by the CA in `dir`.
pub fn issue_cert(
    dir: &std::path::Path,
    cluster_id: &str,
    node_id: u64,
    ips: &[std::net::IpAddr],
    dns: &[String],
) -> anyhow::Result<()> {
    use shale_replication::transport::tls;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let ca = tls::CaMaterial {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    };
    let node = tls::issue_node_cert(&ca, cluster_id, node_id, ips, dns)?;
    write_secret(
        &dir.join(format!("node-{node_id}.key")),
        node.key_pem.as_bytes(),
    )?;
    let cert = dir.join(format!("node-{node_id}.pem"));
    shale_io::publish::replace_blocking(&cert, node.cert_pem.as_bytes())
        .with_context(|| format!("write {}", cert.display()))
}

/// Writes a private key readable by its owner only.
fn write_secret(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}
