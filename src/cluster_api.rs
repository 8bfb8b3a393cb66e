//! The cluster API's answers: the Raft view of the manifest group (leader, term, indexes,
//! membership, per-peer replication progress) joined with the Raft-committed node states, in
//! the shapes the cluster endpoints return. Pure functions of a node's state, so every shard
//! answers alike.

use serde_json::{json, Value};
use shale_replication::raft_types::RaftMetrics;
use shale_replication::ManifestVersion;

use crate::node::NodeShared;

/// `GET /api/v1/cluster`: the whole cluster as this node sees it.
pub fn cluster(node: &NodeShared) -> Value {
    let version = node.manifest.current();
    let metrics = node.manifest.raft_metrics();
    let nodes = nodes(node, metrics.as_deref(), &version);
    let raft = metrics.as_deref();
    json!({
        "success": true,
        "cluster_id": node.identity.cluster_id,
        "mode": if node.config.cluster.enabled { "cluster" } else { "standalone" },
        "node_id": node.manifest.node_id(),
        "leader_id": raft.and_then(|m| m.current_leader),
        "term": raft.map(|m| m.current_term),
        "state": raft.map(|m| format!("{:?}", m.state).to_lowercase()),
        "last_log_index": raft.and_then(|m| m.last_log_index),
        "applied_index": version.index,
        "snapshot_index": raft.and_then(|m| m.snapshot.map(|id| id.index)),
        "purged_index": raft.and_then(|m| m.purged.map(|id| id.index)),
        "millis_since_quorum_ack": raft.and_then(|m| m.millis_since_quorum_ack),
        "manifest_files": version.manifest.files().len(),
        "nodes": nodes,
        "wal_replication": wal_replication(node),
        "antientropy": node
            .cluster
            .as_ref()
            .and_then(|view| view.walker())
            .map(|walker| serde_json::to_value(walker.status()).unwrap_or(Value::Null)),
    })
}

/// This node's WAL streams: per peer and shard what it shipped and the peer holds durably
/// (lag in records and bytes, seconds since the last ack), and per origin and shard what its
/// replica logs hold; and the takeover fences the manifest records.
fn wal_replication(node: &NodeShared) -> Value {
    let version = node.manifest.current();
    let fences: Vec<Value> = version
        .manifest
        .fences()
        .map(|((origin, shard), fence)| {
            json!({
                "origin": origin,
                "shard": shard,
                "through_lsn": fence.through_lsn,
                "taker": fence.taker,
            })
        })
        .collect();
    let streams = node
        .cluster
        .as_ref()
        .and_then(|view| view.wal_stream())
        .map(|handle| serde_json::to_value(handle.status()).unwrap_or(Value::Null));
    json!({
        "ack": node.config.cluster.ack.name(),
        "streams": streams,
        "fences": fences,
    })
}

/// One entry per member of the Raft membership (voters and learners).
pub fn nodes(
    node: &NodeShared,
    metrics: Option<&RaftMetrics>,
    version: &ManifestVersion,
) -> Vec<Value> {
    let Some(metrics) = metrics else {
        return Vec::new();
    };
    let now_ms = node.elapsed_ms();
    let membership = metrics.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let leader_last = metrics.last_log_index;
    membership
        .nodes()
        .map(|(id, member)| {
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(id))
                .map(|log_id| log_id.map(|l| l.index));
            let lag_entries = match (leader_last, matched) {
                (Some(last), Some(matched)) => Some(last.saturating_sub(matched.unwrap_or(0))),
                _ => None,
            };
            let state = version.manifest.node_state(*id).map(|s| s.as_str());
            let local = *id == node.manifest.node_id();
            let health = if local {
                crate::cluster_ops::PeerHealth {
                    healthy: node.health().is_ok(),
                    last_contact_ms: Some(0),
                    silent_ms: 0,
                }
            } else {
                node.ops
                    .peer_health(*id, now_ms, node.config.cluster.unhealthy_after_ms)
            };
            json!({
                "id": id,
                "name": if member.name.is_empty() { format!("node-{id}") } else { member.name.clone() },
                "quic_addr": member.quic_addr,
                "http_addr": member.http_addr,
                "raft_role": if voters.contains(id) { "voter" } else { "learner" },
                "is_leader": metrics.current_leader == Some(*id),
                "is_local": local,
                "state": state.unwrap_or("active"),
                "health": if health.healthy { "healthy" } else { "unhealthy" },
                "last_contact_ms": health.last_contact_ms,
                "matched_index": matched.flatten(),
                "lag_entries": lag_entries,
            })
        })
        .collect()
}

/// `GET /api/v1/cluster/health`: this node's summary of the cluster. `unavailable` without a
/// leader; `degraded` when a member is unhealthy in this node's view or not active; otherwise
/// `healthy`.
pub fn health(node: &NodeShared) -> Value {
    let version = node.manifest.current();
    let metrics = node.manifest.raft_metrics();
    let nodes = nodes(node, metrics.as_deref(), &version);
    let leader = metrics.as_deref().and_then(|m| m.current_leader);
    let healthy = nodes.iter().filter(|n| n["health"] == "healthy").count();
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    for n in &nodes {
        *by_state
            .entry(n["state"].as_str().unwrap_or("active").to_string())
            .or_default() += 1;
    }
    let all_active = by_state.keys().all(|state| state == "active");
    let status = match leader {
        None => "unavailable",
        Some(_) if healthy < nodes.len() || !all_active => "degraded",
        Some(_) => "healthy",
    };
    let role = match node.config.cluster.role {
        crate::config::NodeRole::Writer => "writer",
        crate::config::NodeRole::Reader => "reader",
        crate::config::NodeRole::ReplicaOnly => "replica-only",
    };
    json!({
        "success": true,
        "status": status,
        "cluster_name": node.identity.cluster_id,
        "node_id": node.manifest.node_id(),
        "role": role,
        "leader_id": leader,
        "node_count": nodes.len(),
        "healthy_nodes": healthy,
        "states": by_state,
    })
}

/// What `GET /api/v1/cluster/local` adds about this node: rows not yet in files, and file
/// replication (the manifest index it has seen, files and bytes it still misses).
pub fn local_extras(node: &NodeShared) -> Value {
    let replication = node
        .cluster
        .as_ref()
        .and_then(|view| view.replication())
        .map(|handle| {
            let m = handle.metrics();
            json!({
                "latest_index": m.latest_index,
                "present_index": m.present_index,
                "files_missing": m.files_missing,
                "bytes_missing": m.bytes_missing,
                "files_in_flight": m.files_in_flight,
            })
        });
    let replica_logs: Vec<Value> = node
        .positions
        .replica_durable()
        .into_iter()
        .map(|(origin, shard, durable_lsn)| {
            json!({
                "origin": origin,
                "shard": shard,
                "durable_lsn": durable_lsn,
                "applied_lsn": node.positions.get(origin, shard),
            })
        })
        .collect();
    let wal = node
        .cluster
        .as_ref()
        .and_then(|view| view.wal_stream())
        .map(|handle| serde_json::to_value(handle.status()).unwrap_or(Value::Null));
    json!({
        "unflushed_rows": crate::cluster_ops::unflushed_rows(node),
        "replication": replication,
        "replica_logs": replica_logs,
        "wal_streams": wal,
    })
}

/// WAL replication series for `/metrics`: per peer and shard, what this node has shipped and
/// not yet had acknowledged; per origin and shard, what its replica logs hold.
pub fn render_wal_metrics(node: &NodeShared, out: &mut String) {
    use std::fmt::Write;
    let Some(handle) = node.cluster.as_ref().and_then(|view| view.wal_stream()) else {
        return;
    };
    let status = handle.status();
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    type Pick = fn(&shale_replication::wal_stream::ShippingStatus) -> Option<f64>;
    let shipping: [(&str, &str, Pick); 3] = [
        (
            "shale_wal_ship_lag_records",
            "Records of this node's shard WAL a peer does not hold durably yet.",
            |s| Some(s.lag_records as f64),
        ),
        (
            "shale_wal_ship_lag_bytes",
            "Bytes of those records still in the ring (a lower bound for a peer behind it).",
            |s| Some(s.lag_bytes as f64),
        ),
        (
            "shale_wal_ship_ack_age_seconds",
            "Seconds since the peer last acknowledged this shard's WAL (absent before its first ack).",
            |s| s.last_ack_age_ms.map(|ms| ms as f64 / 1000.0),
        ),
    ];
    for (name, help, pick) in shipping {
        gauge(out, name, help);
        for s in &status.shipping {
            if let Some(value) = pick(s) {
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{}\",shard=\"{}\"}} {value}",
                    s.peer, s.shard
                );
            }
        }
    }
    gauge(
        out,
        "shale_replica_durable_lsn",
        "Highest LSN of an origin's shard durable in this node's replica log.",
    );
    for (origin, shard, lsn) in node.positions.replica_durable() {
        let _ = writeln!(
            out,
            "shale_replica_durable_lsn{{origin=\"{origin}\",shard=\"{shard}\"}} {lsn}"
        );
    }
}

/// The anti-entropy walker's series for `/metrics`.
pub fn render_antientropy_metrics(node: &NodeShared, out: &mut String) {
    use std::fmt::Write;
    let Some(walker) = node.cluster.as_ref().and_then(|view| view.walker()) else {
        return;
    };
    let status = walker.status();
    type Pick = fn(&shale_replication::antientropy::WalkerStatus) -> u64;
    let series: [(&str, &str, &str, Pick); 19] = [
        (
            "shale_antientropy_paused",
            "gauge",
            "1 while the walker is paused.",
            |s| s.paused as u64,
        ),
        (
            "shale_antientropy_cheap_passes_total",
            "counter",
            "Cheap passes completed.",
            |s| s.cheap_passes_total,
        ),
        (
            "shale_antientropy_files_walked_total",
            "counter",
            "Manifest files looked at by cheap passes and the deep scrub.",
            |s| s.files_walked_total,
        ),
        (
            "shale_antientropy_files_missing_total",
            "counter",
            "Held files found absent from disk.",
            |s| s.files_missing_total,
        ),
        (
            "shale_antientropy_files_wrong_size_total",
            "counter",
            "Held files found with another size than the manifest's.",
            |s| s.files_wrong_size_total,
        ),
        (
            "shale_antientropy_files_corrupt_total",
            "counter",
            "Held files whose bytes did not hash to the manifest's blake3.",
            |s| s.files_corrupt_total,
        ),
        (
            "shale_antientropy_files_quarantined_total",
            "counter",
            "Damaged copies moved to _system/quarantine.",
            |s| s.files_quarantined_total,
        ),
        (
            "shale_antientropy_files_repaired_total",
            "counter",
            "Damaged files fetched again and verified.",
            |s| s.files_repaired_total,
        ),
        (
            "shale_antientropy_files_lost_total",
            "counter",
            "Files found lost: no member holds a copy matching the manifest.",
            |s| s.files_lost_total,
        ),
        (
            "shale_antientropy_files_damaged",
            "gauge",
            "Files damaged here and not repaired yet.",
            |s| s.files_damaged,
        ),
        (
            "shale_antientropy_files_lost",
            "gauge",
            "Damaged files no member holds a good copy of.",
            |s| s.files_lost,
        ),
        (
            "shale_antientropy_repair_queue_depth",
            "gauge",
            "Damaged files waiting for a repair or being repaired.",
            |s| s.repair_queue_depth,
        ),
        (
            "shale_antientropy_bytes_verified_total",
            "counter",
            "Bytes re-hashed by the deep scrub and deep checks.",
            |s| s.bytes_verified_total,
        ),
        (
            "shale_antientropy_scrub_files_total",
            "counter",
            "Files re-hashed by the deep scrub.",
            |s| s.scrub_files_total,
        ),
        (
            "shale_antientropy_scrub_cycles_total",
            "counter",
            "Deep-scrub cycles completed.",
            |s| s.scrub_cycles_total,
        ),
        (
            "shale_antientropy_scrub_bytes_per_second",
            "gauge",
            "The deep scrub's read rate in its current cycle.",
            |s| s.scrub_bytes_per_second,
        ),
        (
            "shale_antientropy_oldest_unverified_age_seconds",
            "gauge",
            "Age of the oldest verification of a held file.",
            |s| s.oldest_unverified_age_s,
        ),
        (
            "shale_antientropy_orphans",
            "gauge",
            "Files on disk that no manifest version references.",
            |s| s.orphans,
        ),
        (
            "shale_antientropy_orphans_deleted_total",
            "counter",
            "Orphans deleted after their grace period.",
            |s| s.orphans_deleted_total,
        ),
    ];
    for (name, kind, help, pick) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            pick(&status)
        );
    }
}
