//! Node lifecycle in a cluster: each node's local health view of its peers (probes of their
//! `/health`), the leader's committed node states (joining, active, dead), leadership
//! transfer and stepdown, and drain, activate and leave.
//!
//! Threads: `shale-health` probes peers and, on the leader, commits state changes. The
//! operations block (on Raft and on HTTP calls to peers), so an HTTP handler runs each on a
//! thread of its own (`shale-op`) and awaits the answer: no glommio shard ever blocks.
//!
//! Leadership transfer (openraft 0.9 has none): the leader holds new proposals and stops its
//! heartbeats, waits until the target's log equals its own, then asks the target to start an
//! election. The old leader grants its vote as soon as its own lease (taken when it was
//! elected) has run out; other followers grant theirs once the lease of the last heartbeat
//! they saw has run out (`election_timeout_ms_max`). The target is asked again every half
//! election timeout until it leads or `cluster.transfer_timeout_ms` passes; heartbeats and
//! proposals resume either way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shale_replication::raft_types::{ClusterNode, NodeId, RaftMetrics};
use shale_replication::{ManifestCommand, NodeState};

use crate::node::NodeShared;

/// How many Raft entries behind the leader a node may be and still count as caught up.
pub const CAUGHT_UP_LAG_ENTRIES: u64 = 8;

/// The header a node sets on a request it forwards to another node, so the other node answers
/// instead of forwarding again.
pub const FORWARDED_HEADER: &str = "x-shale-forwarded";

/// What the leader knows of one member when it decides the member's committed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: NodeId,
    pub voter: bool,
    /// Replica-only nodes stay learners; every other node is `joining` until it votes.
    pub replica_only: bool,
    pub state: Option<NodeState>,
    /// Milliseconds since the node last answered a probe (or since this node first saw it).
    pub silent_ms: u64,
    /// Raft entries the node is behind the leader; `None` when unknown.
    pub lag_entries: Option<u64>,
}

/// The state changes the leader commits for its members. Draining and leaving are an
/// operator's intent and never change here (an operator may stop a drained node on purpose);
/// a node silent for `dead_after_ms` becomes dead; a node that answers and has caught up on
/// the log is active once it votes (or, replica-only, once it has caught up), joining before.
pub fn reconcile(
    leader: NodeId,
    members: &[MemberView],
    dead_after_ms: u64,
) -> Vec<(NodeId, NodeState)> {
    members
        .iter()
        .filter_map(|member| {
            let caught_up = member.id == leader
                || member
                    .lag_entries
                    .is_some_and(|lag| lag <= CAUGHT_UP_LAG_ENTRIES);
            let settled = member.voter || (member.replica_only && caught_up);
            let next = match member.state {
                Some(state) if state.is_draining() => return None,
                _ if member.id != leader && member.silent_ms >= dead_after_ms => NodeState::Dead,
                Some(NodeState::Dead) if !caught_up => return None,
                _ if settled => NodeState::Active,
                _ => NodeState::Joining,
            };
            (member.state != Some(next)).then_some((member.id, next))
        })
        .collect()
}

/// A member the leadership could go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub voter: bool,
    pub state: Option<NodeState>,
    /// In the leader's local view.
    pub healthy: bool,
    /// The last log index the leader knows the node holds.
    pub matched: Option<u64>,
}

/// The voter a stepping-down leader hands over to: a healthy voter that is not draining,
/// leaving or dead, with the most of the log (so it can win at once); the lowest id on a tie.
pub fn choose_successor(leader: NodeId, candidates: &[Candidate]) -> Option<NodeId> {
    candidates
        .iter()
        .filter(|c| {
            c.id != leader
                && c.voter
                && c.healthy
                && !c
                    .state
                    .is_some_and(|s| s.is_draining() || s == NodeState::Dead)
        })
        .max_by_key(|c| (c.matched, std::cmp::Reverse(c.id)))
        .map(|c| c.id)
}

/// A failed operation, with the HTTP status it answers with.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader {
        leader: Option<NodeId>,
        leader_http: Option<String>,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    pub fn status(&self) -> u16 {
        match self {
            OpError::NotLeader { .. } => 421,
            OpError::BadRequest(_) => 400,
            OpError::NotFound(_) => 404,
            OpError::Conflict(_) => 409,
            OpError::Unavailable(_) => 503,
            OpError::Timeout(_) => 504,
            OpError::Internal(_) => 500,
        }
    }
}

fn internal(error: impl std::fmt::Display) -> OpError {
    OpError::Internal(error.to_string())
}

/// When this node last heard from a peer.
#[derive(Debug, Clone, Copy)]
struct Contact {
    first_seen_ms: u64,
    last_answer_ms: Option<u64>,
}

/// The node's lifecycle bookkeeping: its probes' view of each peer, whether a transfer runs,
/// and whether this node may start elections.
#[derive(Default)]
pub struct OpsState {
    contacts: Mutex<BTreeMap<NodeId, Contact>>,
    transferring: AtomicBool,
    elect_enabled: Mutex<Option<bool>>,
}

/// The local view of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHealth {
    pub healthy: bool,
    /// Milliseconds since it last answered; `None` if it never did.
    pub last_contact_ms: Option<u64>,
    /// Milliseconds since it last answered, or since this node first saw it.
    pub silent_ms: u64,
}

impl OpsState {
    /// This node's view of `id` at `now_ms` (ms since the node started).
    pub fn peer_health(&self, id: NodeId, now_ms: u64, unhealthy_after_ms: u64) -> PeerHealth {
        let contacts = self.contacts.lock().unwrap_or_else(|e| e.into_inner());
        let contact = contacts.get(&id).copied().unwrap_or(Contact {
            first_seen_ms: now_ms,
            last_answer_ms: None,
        });
        let last_contact_ms = contact.last_answer_ms.map(|at| now_ms.saturating_sub(at));
        let silent_ms =
            now_ms.saturating_sub(contact.last_answer_ms.unwrap_or(contact.first_seen_ms));
        PeerHealth {
            healthy: last_contact_ms.is_some_and(|ms| ms < unhealthy_after_ms),
            last_contact_ms,
            silent_ms,
        }
    }

    fn record(&self, id: NodeId, now_ms: u64, answered: bool) {
        let mut contacts = self.contacts.lock().unwrap_or_else(|e| e.into_inner());
        let contact = contacts.entry(id).or_insert(Contact {
            first_seen_ms: now_ms,
            last_answer_ms: None,
        });
        if answered {
            contact.last_answer_ms = Some(now_ms);
        }
    }

    fn retain(&self, members: &[NodeId]) {
        let mut contacts = self.contacts.lock().unwrap_or_else(|e| e.into_inner());
        contacts.retain(|id, _| members.contains(id));
    }
}

/// Turns this node's own elections on or off, once per change.
fn set_elect(shared: &NodeShared, enabled: bool) -> Result<(), OpError> {
    let mut current = shared
        .ops
        .elect_enabled
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if *current != Some(enabled) {
        futures_lite::future::block_on(shared.manifest.set_elect(enabled)).map_err(internal)?;
        *current = Some(enabled);
    }
    Ok(())
}

/// Only one transfer at a time per node; the guard ends it.
struct TransferGuard<'a>(&'a AtomicBool);

impl<'a> TransferGuard<'a> {
    fn acquire(flag: &'a AtomicBool) -> Result<TransferGuard<'a>, OpError> {
        if flag.swap(true, Ordering::AcqRel) {
            return Err(OpError::Conflict(
                "a leadership transfer is already running on this node".into(),
            ));
        }
        Ok(TransferGuard(flag))
    }
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs a blocking operation on a thread of its own and awaits its answer from any executor.
pub async fn off_shard<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OpError> {
    let (reply, answer) = flume::bounded(1);
    std::thread::Builder::new()
        .name("shale-op".into())
        .spawn(move || {
            let _ = reply.send(job());
        })
        .map_err(internal)?;
    answer
        .recv_async()
        .await
        .map_err(|_| OpError::Internal("the operation thread ended without an answer".into()))
}

/// Sends a cluster API request to another node with this node's admin token, marked as
/// forwarded. Returns the status and the JSON answer.
pub fn call_node(
    shared: &NodeShared,
    http_addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    let target = crate::cluster_cli::Target {
        url: format!("http://{http_addr}"),
        token: Some(shared.config.cluster.admin_token.expose().to_string()),
    };
    target.call_raw_with(method, path, &[(FORWARDED_HEADER, "1")], body)
}

fn metrics(shared: &NodeShared) -> Result<Arc<RaftMetrics>, OpError> {
    shared
        .manifest
        .raft_metrics()
        .ok_or_else(|| OpError::Unavailable("Raft has not started".into()))
}

fn member(metrics: &RaftMetrics, id: NodeId) -> Option<ClusterNode> {
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .cloned()
}

fn not_leader(metrics: &RaftMetrics) -> OpError {
    let leader = metrics.current_leader;
    OpError::NotLeader {
        leader,
        leader_http: leader
            .and_then(|id| member(metrics, id))
            .map(|n| n.http_addr),
    }
}

fn matched_index(metrics: &RaftMetrics, id: NodeId) -> Option<u64> {
    metrics
        .replication
        .as_ref()?
        .get(&id)
        .copied()
        .flatten()
        .map(|log_id| log_id.index)
}

/// Rows this node has accepted but not yet registered in a file.
pub fn unflushed_rows(shared: &NodeShared) -> u64 {
    shared
        .metrics
        .shards
        .iter()
        .map(|s| s.buffer_rows.get())
        .sum()
}

/// This node's committed state.
pub fn own_state(shared: &NodeShared) -> Option<NodeState> {
    shared
        .manifest
        .current()
        .manifest
        .node_state(shared.manifest.node_id())
}

fn propose_state(shared: &NodeShared, node_id: NodeId, state: NodeState) -> Result<(), OpError> {
    shared
        .manifest
        .propose_blocking(ManifestCommand::SetNodeState { node_id, state })
        .map(|_| ())
        .map_err(|e| match e {
            shale_replication::ManifestError::NotLeader { leader: None } => {
                OpError::Unavailable("no leader: the state change cannot commit".into())
            }
            other => OpError::Unavailable(format!("commit the state of node {node_id}: {other}")),
        })
}

/// What a completed transfer reports.
#[derive(Debug, Clone)]
pub struct TransferReport {
    pub from: NodeId,
    pub to: NodeId,
    /// From the request to the old leader seeing the target lead.
    pub elapsed_ms: u64,
    /// Elections the target was asked to start.
    pub elections: u32,
}

impl TransferReport {
    pub fn to_json(&self) -> Value {
        json!({
            "success": true,
            "previous_leader_id": self.from,
            "leader_id": self.to,
            "elapsed_ms": self.elapsed_ms,
            "elections": self.elections,
        })
    }
}

/// Makes `target` the leader. Runs on the leader (elsewhere `NotLeader`); blocks until the
/// target leads, another node does, or `cluster.transfer_timeout_ms` passes.
pub fn transfer_leadership(shared: &NodeShared, target: NodeId) -> Result<TransferReport, OpError> {
    let started = Instant::now();
    let me = shared.manifest.node_id();
    let metrics = metrics(shared)?;
    if metrics.current_leader != Some(me) {
        return Err(not_leader(&metrics));
    }
    let report = |elections| TransferReport {
        from: me,
        to: target,
        elapsed_ms: started.elapsed().as_millis() as u64,
        elections,
    };
    if target == me {
        return Ok(report(0));
    }
    let Some(node) = member(&metrics, target) else {
        return Err(OpError::NotFound(format!("node {target} is not a member")));
    };
    if !metrics
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == target)
    {
        return Err(OpError::Conflict(format!(
            "node {target} is a learner: only voters can lead"
        )));
    }
    if let Some(state) = shared.manifest.current().manifest.node_state(target) {
        if state.is_draining() || state == NodeState::Dead {
            return Err(OpError::Conflict(format!(
                "node {target} is {}: it cannot take the leadership",
                state.as_str()
            )));
        }
    }
    let _guard = TransferGuard::acquire(&shared.ops.transferring)?;
    let pause = shared.manifest.pause_proposals();
    futures_lite::future::block_on(shared.manifest.set_heartbeat(false)).map_err(internal)?;
    let outcome = drive_transfer(shared, me, target, &node.http_addr, started);
    // Whatever happened: as a follower the switch does nothing, and after a failed transfer
    // this node must keep its followers.
    if let Err(error) = futures_lite::future::block_on(shared.manifest.set_heartbeat(true)) {
        tracing::error!(%error, "heartbeats not re-enabled after a leadership transfer");
    }
    drop(pause);
    match &outcome {
        Ok(elections) => tracing::info!(
            from = me,
            to = target,
            elapsed_ms = started.elapsed().as_millis() as u64,
            elections,
            "leadership transferred"
        ),
        Err(error) => tracing::warn!(from = me, to = target, %error, "leadership transfer failed"),
    }
    outcome.map(report)
}

/// The waiting part of a transfer; returns how many elections the target was asked to start.
fn drive_transfer(
    shared: &NodeShared,
    me: NodeId,
    target: NodeId,
    target_http: &str,
    started: Instant,
) -> Result<u32, OpError> {
    let cluster = &shared.config.cluster;
    let timeout = Duration::from_millis(cluster.transfer_timeout_ms);
    let retry = Duration::from_millis((cluster.election_timeout_ms_min / 2).max(200));
    let mut asked: Option<Instant> = None;
    let mut elections = 0;
    loop {
        let metrics = metrics(shared)?;
        match metrics.current_leader {
            Some(leader) if leader == target => return Ok(elections),
            Some(leader) if leader != me => {
                return Err(OpError::Conflict(format!(
                    "node {leader} became leader instead of node {target}"
                )))
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            return Err(OpError::Timeout(format!(
                "node {target} did not become leader within cluster.transfer_timeout_ms ({} ms)",
                timeout.as_millis()
            )));
        }
        // Ask only once the target holds the whole log, or it cannot win this node's vote; once
        // this node stepped down (no leader known) keep asking, the target may have lost a
        // round to a follower's lease.
        let leading = metrics.current_leader == Some(me);
        let ready = !leading || matched_index(&metrics, target) == metrics.last_log_index;
        if ready && asked.is_none_or(|at| at.elapsed() >= retry) {
            asked = Some(Instant::now());
            elections += 1;
            match call_node(shared, target_http, "POST", "/api/v1/cluster/elect", b"") {
                Ok((200, _)) => {}
                Ok((status, answer)) => tracing::info!(
                    target,
                    status,
                    error = answer["error"].as_str().unwrap_or(""),
                    "transfer target refused to start an election"
                ),
                Err(error) => {
                    tracing::info!(target, error = %format!("{error:#}"), "transfer target unreachable")
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The members as candidates for the leadership, in this (leading) node's view.
fn successor_candidates(shared: &NodeShared, metrics: &RaftMetrics) -> Vec<Candidate> {
    let version = shared.manifest.current();
    let now_ms = shared.elapsed_ms();
    let unhealthy_after_ms = shared.config.cluster.unhealthy_after_ms;
    let membership = metrics.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, _)| {
            let health = shared.ops.peer_health(*id, now_ms, unhealthy_after_ms);
            let matched = matched_index(metrics, *id);
            Candidate {
                id: *id,
                voter: voters.contains(id),
                state: version.manifest.node_state(*id),
                healthy: health.healthy,
                matched,
            }
        })
        .collect()
}

/// The leader hands over to the best other voter (see [`choose_successor`]), or to
/// `preferred` when given.
pub fn stepdown(shared: &NodeShared, preferred: Option<NodeId>) -> Result<TransferReport, OpError> {
    let me = shared.manifest.node_id();
    let metrics = metrics(shared)?;
    if metrics.current_leader != Some(me) {
        return Err(not_leader(&metrics));
    }
    let target = match preferred {
        Some(target) => target,
        None => {
            let chosen = choose_successor(me, &successor_candidates(shared, &metrics));
            let chosen = chosen.or_else(|| {
                // Nobody known healthy yet (the probes run once a second, and members that
                // just joined have not been probed): probe now rather than refuse.
                probe_members(shared, &metrics, Duration::from_millis(500));
                choose_successor(me, &successor_candidates(shared, &metrics))
            });
            chosen.ok_or_else(|| {
                OpError::Conflict("no other healthy, active voter can take the leadership".into())
            })?
        }
    };
    transfer_leadership(shared, target)
}

/// Waits until this node holds no unflushed rows (its shards flush everything while the node
/// is draining or leaving).
fn wait_flushed(shared: &NodeShared, deadline: Instant) -> Result<(), OpError> {
    loop {
        let rows = unflushed_rows(shared);
        if rows == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(OpError::Timeout(format!(
                "{rows} rows are still unflushed after cluster.drain_timeout_ms"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hands the leadership away if this node leads, then disables its own elections.
fn give_up_leadership(shared: &NodeShared) -> Result<Option<NodeId>, OpError> {
    set_elect(shared, false)?;
    let metrics = metrics(shared)?;
    if metrics.current_leader == Some(shared.manifest.node_id()) {
        return stepdown(shared, None).map(|report| Some(report.to));
    }
    Ok(None)
}

/// Drains this node: hands the leadership over if it leads, commits `draining` (writes are
/// refused, `/ready` answers 503, shards flush everything) and waits until no row is unflushed.
pub fn drain_local(shared: &NodeShared) -> Result<Value, OpError> {
    let started = Instant::now();
    let me = shared.manifest.node_id();
    let transferred_to = match give_up_leadership(shared) {
        Ok(to) => to,
        Err(error) => {
            // Still active: it may lead again.
            let _ = set_elect(shared, true);
            return Err(error);
        }
    };
    propose_state(shared, me, NodeState::Draining)?;
    let deadline = started + Duration::from_millis(shared.config.cluster.drain_timeout_ms);
    wait_flushed(shared, deadline)?;
    Ok(json!({
        "success": true,
        "node_id": me,
        "state": "draining",
        "unflushed_rows": 0,
        "leadership_transferred_to": transferred_to,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}

/// Makes this node active again: it takes writes and may lead.
pub fn activate_local(shared: &NodeShared) -> Result<Value, OpError> {
    let me = shared.manifest.node_id();
    propose_state(shared, me, NodeState::Active)?;
    set_elect(shared, true)?;
    Ok(json!({ "success": true, "node_id": me, "state": "active" }))
}

/// Leaves the cluster: drains (handing the leadership over first), waits until every other
/// member that is not dead holds every file this node registered, then asks the leader to
/// remove it from the membership. The process keeps running; the operator stops it.
pub fn leave_local(shared: &NodeShared) -> Result<Value, OpError> {
    let started = Instant::now();
    let me = shared.manifest.node_id();
    if member(&*metrics(shared)?, me).is_none() {
        return Err(OpError::Conflict(format!("node {me} is not a member")));
    }
    let transferred_to = give_up_leadership(shared)?;
    propose_state(shared, me, NodeState::Leaving)?;
    let deadline = started + Duration::from_millis(shared.config.cluster.drain_timeout_ms);
    wait_flushed(shared, deadline)?;
    // Every file this node registered is in this version; once the others hold all of it,
    // nothing is lost when this node stops serving files.
    let index = shared.manifest.current().index;
    wait_peers_hold_files(shared, me, index, deadline)?;
    remove_through_leader(shared, me, deadline)?;
    Ok(json!({
        "success": true,
        "node_id": me,
        "left": true,
        "leadership_transferred_to": transferred_to,
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "next": "stop this process: it is no longer a member (restarting it would ask to join again)",
    }))
}

fn wait_peers_hold_files(
    shared: &NodeShared,
    me: NodeId,
    index: u64,
    deadline: Instant,
) -> Result<(), OpError> {
    loop {
        let metrics = metrics(shared)?;
        let version = shared.manifest.current();
        let mut behind = Vec::new();
        for (id, node) in metrics.membership_config.membership().nodes() {
            if *id == me || version.manifest.node_state(*id) == Some(NodeState::Dead) {
                continue;
            }
            let caught_up =
                match call_node(shared, &node.http_addr, "GET", "/api/v1/cluster/local", b"") {
                    Ok((200, answer)) => {
                        let replication = &answer["node"]["replication"];
                        replication["latest_index"]
                            .as_u64()
                            .is_some_and(|i| i >= index)
                            && replication["files_missing"].as_u64() == Some(0)
                    }
                    _ => false,
                };
            if !caught_up {
                behind.push(*id);
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(OpError::Timeout(format!(
                "nodes {behind:?} do not hold every file of manifest index {index} yet; \
                 this node stays a member (leaving) so nothing is lost"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_through_leader(
    shared: &NodeShared,
    me: NodeId,
    deadline: Instant,
) -> Result<(), OpError> {
    let path = format!("/api/v1/cluster/peer/{me}");
    loop {
        let metrics = metrics(shared)?;
        let leader = metrics.current_leader.and_then(|id| member(&metrics, id));
        let outcome = match leader {
            Some(leader) => call_node(shared, &leader.http_addr, "DELETE", &path, b"")
                .map_err(|e| format!("{e:#}")),
            None => Err("no leader known".to_string()),
        };
        match outcome {
            Ok((200, _)) => return Ok(()),
            Ok((status, answer)) => {
                let message = answer["error"].as_str().unwrap_or("").to_string();
                if Instant::now() >= deadline {
                    return Err(OpError::Unavailable(format!(
                        "the leader did not remove node {me}: {status} {message}"
                    )));
                }
            }
            Err(message) => {
                if Instant::now() >= deadline {
                    return Err(OpError::Unavailable(format!(
                        "the leader did not remove node {me}: {message}"
                    )));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `shale-health`: probes every member's `/health` for the local view; keeps this
/// node's own elections off while it drains or leaves (and hands the leadership over if it
/// leads then); on the leader, commits the states [`reconcile`] decides.
pub fn spawn_health_thread(shared: Arc<NodeShared>) -> anyhow::Result<()> {
    use anyhow::Context;
    std::thread::Builder::new()
        .name("shale-health".into())
        .spawn(move || {
            let cluster = &shared.config.cluster;
            let interval = Duration::from_millis((cluster.unhealthy_after_ms / 5).clamp(50, 1000));
            let mut next_stepdown = Instant::now();
            let mut first = true;
            while !shared.is_stopping() {
                if !std::mem::take(&mut first) {
                    std::thread::sleep(interval);
                }
                let Some(metrics) = shared.manifest.raft_metrics() else {
                    continue;
                };
                probe_members(&shared, &metrics, interval);
                let draining = own_state(&shared).is_some_and(NodeState::is_draining);
                if let Err(error) = set_elect(&shared, !draining) {
                    tracing::warn!(%error, "could not switch this node's elections");
                }
                let me = shared.manifest.node_id();
                if metrics.current_leader != Some(me) {
                    continue;
                }
                if draining {
                    if Instant::now() >= next_stepdown
                        && !shared.ops.transferring.load(Ordering::Acquire)
                    {
                        if let Err(error) = stepdown(&shared, None) {
                            tracing::warn!(%error, "a draining leader could not hand over; retrying");
                            next_stepdown = Instant::now() + Duration::from_secs(5);
                        }
                    }
                    continue;
                }
                commit_states(&shared, &metrics);
                propose_fences(&shared, &metrics);
            }
        })
        .context("start the health thread")?;
    Ok(())
}

fn probe_members(shared: &NodeShared, metrics: &RaftMetrics, timeout: Duration) {
    let me = shared.manifest.node_id();
    let members: Vec<(NodeId, String)> = metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| (*id, node.http_addr.clone()))
        .collect();
    for (id, http_addr) in &members {
        let answered = *id == me || probe(http_addr, timeout);
        shared.ops.record(*id, shared.elapsed_ms(), answered);
    }
    let ids: Vec<NodeId> = members.iter().map(|(id, _)| *id).collect();
    shared.ops.retain(&ids);
}

/// Whether a node's HTTP server answers `/health` at all (a 503 still proves it runs).
fn probe(http_addr: &str, timeout: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let Some(addr) = http_addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    crate::http_client::Client::connect_with_timeouts(addr, timeout, timeout)
        .and_then(|mut client| client.request("GET", "/health", &[], b""))
        .is_ok()
}

fn commit_states(shared: &NodeShared, metrics: &RaftMetrics) {
    let me = shared.manifest.node_id();
    let version = shared.manifest.current();
    let now_ms = shared.elapsed_ms();
    let cluster = &shared.config.cluster;
    let membership = metrics.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let members: Vec<MemberView> = membership
        .nodes()
        .map(|(id, node)| MemberView {
            id: *id,
            voter: voters.contains(id),
            replica_only: node.role == "replica-only",
            state: version.manifest.node_state(*id),
            silent_ms: shared
                .ops
                .peer_health(*id, now_ms, cluster.unhealthy_after_ms)
                .silent_ms,
            lag_entries: match (metrics.last_log_index, matched_index(metrics, *id)) {
                (Some(last), Some(matched)) => Some(last.saturating_sub(matched)),
                _ => None,
            },
        })
        .collect();
    for (node_id, state) in reconcile(me, &members, cluster.dead_after_ms) {
        tracing::info!(node_id, state = state.as_str(), "committing node state");
        if let Err(error) = propose_state(shared, node_id, state) {
            tracing::warn!(node_id, %error, "node state not committed");
            return;
        }
    }
}

/// The durable WAL positions of every live member's own shards (members committed dead are
/// skipped), as (origin, shard, lsn). Fails naming a member that did not answer.
pub fn peer_positions(shared: &NodeShared) -> Result<Vec<(u64, u32, u64)>, String> {
    let metrics = shared
        .manifest
        .raft_metrics()
        .ok_or_else(|| "Raft has not started".to_string())?;
    let version = shared.manifest.current();
    let me = shared.manifest.node_id();
    let mut positions = Vec::new();
    for (id, node) in metrics.membership_config.membership().nodes() {
        if *id == me || version.manifest.node_state(*id) == Some(NodeState::Dead) {
            continue;
        }
        match call_node(
            shared,
            &node.http_addr,
            "GET",
            "/api/v1/cluster/positions",
            b"",
        ) {
            Ok((200, answer)) => {
                for entry in answer["positions"].as_array().into_iter().flatten() {
                    let parsed = (|| {
                        Some((
                            entry["origin"].as_u64()?,
                            u32::try_from(entry["shard"].as_u64()?).ok()?,
                            entry["durable_lsn"].as_u64()?,
                        ))
                    })();
                    positions.extend(parsed);
                }
            }
            Ok((status, answer)) => {
                return Err(format!(
                    "node {id} answered {status} for its positions: {answer}"
                ))
            }
            Err(error) => {
                return Err(format!(
                    "node {id} did not answer for its positions: {error}"
                ))
            }
        }
    }
    Ok(positions)
}

/// On the leader: hands each shard of every dead node over to the live member holding the
/// most of that shard's WAL (a `Fence` through its durable position, lowest id on a tie). Every
/// live member must answer first: one that does not might hold more, and a fence through less
/// than the most any survivor holds would drop rows acknowledged with `majority`. A fence moves
/// up if a survivor later holds more, and moves to another taker if its taker died too.
fn propose_fences(shared: &NodeShared, metrics: &RaftMetrics) {
    let version = shared.manifest.current();
    let dead: Vec<NodeId> = version
        .manifest
        .node_states()
        .iter()
        .filter(|(_, state)| **state == NodeState::Dead)
        .map(|(id, _)| *id)
        .collect();
    if dead.is_empty() {
        return;
    }
    let me = shared.manifest.node_id();
    let mut best: BTreeMap<(NodeId, u32), (u64, NodeId)> = BTreeMap::new();
    for (id, node) in metrics.membership_config.membership().nodes() {
        if dead.contains(id) {
            continue;
        }
        let held: Vec<(u64, u32, u64)> = if *id == me {
            shared.positions.replica_durable()
        } else {
            match call_node(shared, &node.http_addr, "GET", "/api/v1/cluster/local", b"") {
                Ok((200, answer)) => answer["node"]["replica_logs"]
                    .as_array()
                    .map(|logs| {
                        logs.iter()
                            .filter_map(|log| {
                                Some((
                                    log["origin"].as_u64()?,
                                    u32::try_from(log["shard"].as_u64()?).ok()?,
                                    log["durable_lsn"].as_u64()?,
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => {
                    tracing::debug!(
                        node_id = id,
                        "no replica positions from a live member; fences wait"
                    );
                    return;
                }
            }
        };
        for (origin, shard, lsn) in held {
            if !dead.contains(&origin) {
                continue;
            }
            let entry = best.entry((origin, shard)).or_insert((lsn, *id));
            if lsn > entry.0 || (lsn == entry.0 && *id < entry.1) {
                *entry = (lsn, *id);
            }
        }
    }
    for ((origin, shard), (through_lsn, taker)) in best {
        if through_lsn == 0 {
            continue;
        }
        let needed = match version.manifest.fence_of(origin, shard) {
            None => true,
            Some(fence) => {
                through_lsn > fence.through_lsn
                    || (through_lsn == fence.through_lsn
                        && fence.taker != taker
                        && dead.contains(&fence.taker))
            }
        };
        if !needed {
            continue;
        }
        tracing::info!(
            origin,
            shard,
            through_lsn,
            taker,
            "fencing a dead node's shard for takeover"
        );
        let command = ManifestCommand::Fence {
            origin,
            shard,
            through_lsn,
            taker,
        };
        if let Err(error) = shared.manifest.propose_blocking(command) {
            tracing::warn!(origin, shard, %error, "fence not committed; retrying");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: NodeId, state: Option<NodeState>, silent_ms: u64, lag: Option<u64>) -> MemberView {
        MemberView {
            id,
            voter: true,
            replica_only: false,
            state,
            silent_ms,
            lag_entries: lag,
        }
    }

    // The leader commits dead after dead_after_ms of silence, active again only once a dead
    // node answers and has caught up, and never overrides an operator's draining or leaving.
    #[test]
    fn reconcile_declares_dead_and_revives_caught_up_nodes() {
        let members = [
            view(1, Some(NodeState::Active), 0, Some(0)),
            view(2, Some(NodeState::Active), 60_000, None),
            view(3, Some(NodeState::Draining), 90_000, None),
            view(4, Some(NodeState::Dead), 10, Some(500)),
            view(5, Some(NodeState::Dead), 10, Some(2)),
            view(6, Some(NodeState::Leaving), 0, Some(0)),
            view(7, Some(NodeState::Dead), 70_000, None),
        ];
        assert_eq!(
            reconcile(1, &members, 60_000),
            vec![(2, NodeState::Dead), (5, NodeState::Active)]
        );
    }

    // A node is joining until it votes; a replica-only learner is active once caught up; the
    // leader never declares itself dead and a node without a state gets one.
    #[test]
    fn reconcile_moves_joining_nodes_to_active() {
        let mut learner = view(2, Some(NodeState::Joining), 0, Some(0));
        learner.voter = false;
        let mut replica = view(3, None, 0, Some(100));
        replica.voter = false;
        replica.replica_only = true;
        let mut caught_up_replica = view(4, Some(NodeState::Joining), 0, Some(1));
        caught_up_replica.voter = false;
        caught_up_replica.replica_only = true;
        let members = [
            view(1, None, 1_000_000, None),
            learner,
            replica,
            caught_up_replica,
            view(5, Some(NodeState::Joining), 0, Some(0)),
        ];
        assert_eq!(
            reconcile(1, &members, 60_000),
            vec![
                (1, NodeState::Active),
                (3, NodeState::Joining),
                (4, NodeState::Active),
                (5, NodeState::Active),
            ]
        );
    }

    fn candidate(id: NodeId, matched: Option<u64>) -> Candidate {
        Candidate {
            id,
            voter: true,
            state: Some(NodeState::Active),
            healthy: true,
            matched,
        }
    }

    // Stepdown picks the healthy active voter with the most of the log (lowest id on a tie),
    // never itself, a learner, an unhealthy node or one that drains, leaves or is dead.
    #[test]
    fn successor_is_the_most_up_to_date_eligible_voter() {
        let mut learner = candidate(5, Some(100));
        learner.voter = false;
        let mut sick = candidate(6, Some(100));
        sick.healthy = false;
        let mut draining = candidate(7, Some(100));
        draining.state = Some(NodeState::Draining);
        let mut dead = candidate(8, Some(100));
        dead.state = Some(NodeState::Dead);
        let others = [learner, sick, draining, dead];
        let mut all = vec![
            candidate(1, Some(100)),
            candidate(2, Some(40)),
            candidate(3, Some(41)),
        ];
        all.extend(others.iter().cloned());
        assert_eq!(choose_successor(1, &all), Some(3));
        all.push(candidate(4, Some(41)));
        assert_eq!(choose_successor(1, &all), Some(3), "lowest id on a tie");
        let mut unknown_state = candidate(9, Some(41));
        unknown_state.state = None;
        assert_eq!(
            choose_successor(1, &[candidate(1, None), unknown_state]),
            Some(9)
        );
        let mut only_others = vec![candidate(1, Some(100))];
        only_others.extend(others);
        assert_eq!(choose_successor(1, &only_others), None);
    }
}
