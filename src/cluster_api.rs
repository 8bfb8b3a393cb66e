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
            let state = version
                .manifest
                .node_states()
                .get(id)
                .map(|state| format!("{state:?}").to_lowercase());
            json!({
                "id": id,
                "name": if member.name.is_empty() { format!("node-{id}") } else { member.name.clone() },
                "quic_addr": member.quic_addr,
                "http_addr": member.http_addr,
                "raft_role": if voters.contains(id) { "voter" } else { "learner" },
                "is_leader": metrics.current_leader == Some(*id),
                "is_local": *id == node.manifest.node_id(),
                "state": state.unwrap_or_else(|| "active".into()),
                "matched_index": matched.flatten(),
                "lag_entries": lag_entries,
            })
        })
        .collect()
}
