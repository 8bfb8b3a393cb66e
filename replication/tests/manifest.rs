//! Integration tests of the manifest service: a standalone node's Raft manifest through its public
//! API, across restarts, snapshots, torn log tails and concurrent proposers.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures_lite::future::block_on;
use shale_replication::FileEntry;
use shale_replication::ManifestClient;
use shale_replication::ManifestCommand;
use shale_replication::ManifestConfig;
use shale_replication::ManifestError;
use shale_replication::ManifestResponse;
use shale_replication::ManifestService;
use shale_replication::NodeState;
use shale_replication::Rejection;

const WAIT_MS_MAX: u64 = 10_000;

fn config(dir: &Path) -> ManifestConfig {
    ManifestConfig::new(dir, 1, "127.0.0.1:7100")
}

fn must_start(config: ManifestConfig) -> (ManifestService, ManifestClient) {
    let started = Instant::now();
    let (service, client) = ManifestService::start(config).expect("start manifest service");
    eprintln!(
        "manifest service ready in {} ms",
        started.elapsed().as_millis()
    );
    (service, client)
}

fn file(index: u64) -> FileEntry {
    FileEntry {
        path: format!("db/cpu/2026/11/22/01/n1-s0-{index:020}-{index:020}-0.parquet"),
        size_bytes: 1000 + index,
        blake3_hex: format!("{:064x}", index),
        rows: 10,
        time_min_us: 0,
        time_max_us: 1_000,
        database: "db".to_owned(),
        measurement: "cpu".to_owned(),
        origin_node: 1,
        shard: 0,
        lsn_first: index * 10,
        lsn_last: index * 10 + 9,
        created_at_ms: 1_700_000_000_000,
        columns_fingerprint: 7,
        taken_by: None,
    }
}

fn register(index: u64) -> ManifestCommand {
    ManifestCommand::Register {
        files: vec![file(index)],
    }
}

/// Proposes through the async API (as a shard would), driven by a tiny executor.
fn must_propose(client: &ManifestClient, command: ManifestCommand) -> u64 {
    block_on(client.propose(command))
        .expect("propose")
        .log_index
}

/// Polls `condition` until it holds; panics naming `what` after `WAIT_MS_MAX`.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn manifest_survives_restart() {
    // The manifest is the truth of what data exists: every committed registration must be there
    // after a restart, at the same applied index, with no proposals needed to rebuild it.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    let mut last_index = 0;
    for index in 0..10 {
        last_index = must_propose(&client, register(index));
    }
    must_propose(
        &client,
        ManifestCommand::SetNodeState {
            node_id: 1,
            state: NodeState::Active,
        },
    );
    let before = client.current();
    assert!(before.index > last_index);
    assert_eq!(before.manifest.files().len(), 10);
    assert_eq!(before.manifest.flushed_through(1, 0, "db", "cpu"), Some(99));
    service.shutdown().expect("shutdown");

    let (service, client) = must_start(config(dir.path()));
    let after = client.current();
    assert_eq!(after.manifest.files(), before.manifest.files());
    assert_eq!(after.manifest.node_state(1), Some(NodeState::Active));
    assert!(after.index >= before.index, "applied index went back");
    let metrics = client.metrics();
    assert!(
        metrics.is_leader,
        "standalone node leads after start: {metrics:?}"
    );
    assert_eq!(metrics.files, 10);

    // Still writable after the restart.
    must_propose(&client, register(10));
    assert_eq!(client.current().manifest.files().len(), 11);
    service.shutdown().expect("shutdown");
}

#[test]
fn manifest_survives_restart_across_snapshots() {
    // With a small snapshot threshold the log is purged behind snapshots, so a restart must load
    // the snapshot and re-apply only the log after it, and still end with every file.
    let dir = tempfile::tempdir().expect("temp dir");
    let small = || {
        let mut config = config(dir.path());
        config.snapshot_logs_since_last_max = 5;
        config.snapshot_logs_kept_max = 0;
        config.log_rewrite_garbage_bytes_min = 1024;
        config
    };
    let (service, client) = must_start(small());
    for index in 0..23 {
        must_propose(&client, register(index));
    }
    // Snapshots are built in the background; wait for one that covers most of the log.
    wait_until("a snapshot and a purge", || {
        let metrics = client.metrics();
        metrics.snapshot_index >= Some(15) && metrics.purged_index >= Some(15)
    });
    let before = client.current();
    service.shutdown().expect("shutdown");
    let snapshots: Vec<String> = fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snapshot-"))
        .collect();
    assert_eq!(
        snapshots.len(),
        1,
        "exactly one snapshot kept: {snapshots:?}"
    );

    let (service, client) = must_start(small());
    assert_eq!(client.current().manifest.files(), before.manifest.files());
    assert!(client.current().index >= before.index);
    for index in 23..30 {
        must_propose(&client, register(index));
    }
    let before = client.current();
    service.shutdown().expect("shutdown");

    let (service, client) = must_start(small());
    assert_eq!(client.current().manifest.files(), before.manifest.files());
    assert_eq!(client.current().manifest.files().len(), 30);
    service.shutdown().expect("shutdown");
}

#[test]
fn torn_log_tail_is_survived() {
    // kill -9 during a log write leaves a partial record at the end of the log; the node must
    // come back with everything that was acknowledged before it.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    for index in 0..5 {
        must_propose(&client, register(index));
    }
    let before = client.current();
    service.shutdown().expect("shutdown");

    let log = dir.path().join("raft-log");
    let mut bytes = fs::read(&log).expect("read log");
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 1, b'{']);
    fs::write(&log, &bytes).expect("write torn log");

    let (service, client) = must_start(config(dir.path()));
    assert_eq!(client.current().manifest.files(), before.manifest.files());
    must_propose(&client, register(5));
    service.shutdown().expect("shutdown");
}

#[test]
fn corrupt_log_stops_start_up() {
    // Damage in the middle of the log is not a torn write; starting anyway could forget
    // committed files, so start-up must fail and name the file.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    for index in 0..5 {
        must_propose(&client, register(index));
    }
    service.shutdown().expect("shutdown");

    let log = dir.path().join("raft-log");
    let mut bytes = fs::read(&log).expect("read log");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&log, &bytes).expect("write corrupt log");

    let error = ManifestService::start(config(dir.path()))
        .err()
        .expect("start must fail on a corrupt log");
    let message = error.to_string();
    assert!(matches!(error, ManifestError::LogStore(_)), "{message}");
    assert!(
        message.contains("raft-log") && message.contains("offset"),
        "{message}"
    );
}

#[test]
fn concurrent_proposals_from_many_threads() {
    // Shards propose from their own threads at the same time; every proposal must commit once,
    // at its own log index, and the control loop must not serialize on any single one.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    let threads = 4;
    let per_thread = 25;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let client = client.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        let command = register(thread * per_thread + i);
                        // Half blocking, half async, to cover both client paths.
                        if i % 2 == 0 {
                            client.propose_blocking(command).expect("propose").log_index
                        } else {
                            block_on(client.propose(command))
                                .expect("propose")
                                .log_index
                        }
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut indexes: Vec<u64> = handles
        .into_iter()
        .flat_map(|handle| handle.join().expect("proposer thread"))
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(
        indexes.len() as u64,
        threads * per_thread,
        "distinct log indexes"
    );
    assert_eq!(
        client.current().manifest.files().len() as u64,
        threads * per_thread
    );
    let metrics = client.metrics();
    assert_eq!(metrics.commits_total, threads * per_thread);
    assert_eq!(metrics.commit_errors_total, 0);
    assert_eq!(metrics.proposals_in_flight, 0);
    service.shutdown().expect("shutdown");
}

#[test]
fn rejections_and_idempotent_retries() {
    // A flush retried after a lost reply must succeed without change, while a different file
    // under a registered name must be refused and leave the manifest as it was.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    must_propose(&client, register(1));
    let retry = block_on(client.propose(register(1))).expect("idempotent retry");
    assert_eq!(
        retry.response,
        ManifestResponse::Applied {
            files_added: 0,
            files_removed: 0
        }
    );

    let before = client.current();
    let mut changed = file(1);
    changed.rows += 1;
    let conflict = block_on(client.propose(ManifestCommand::Batch {
        add: vec![file(2), changed],
        remove: vec![],
    }));
    assert!(
        matches!(
            conflict,
            Err(ManifestError::Rejected(Rejection::Conflict { .. }))
        ),
        "{conflict:?}"
    );
    assert_eq!(client.current().manifest.files(), before.manifest.files());

    // Invalid commands are refused before they reach the log.
    let mut invalid = file(3);
    invalid.path = "../escape.parquet".to_owned();
    let index_before = client.current().index;
    let refused = client.propose_blocking(ManifestCommand::Register {
        files: vec![invalid],
    });
    assert!(matches!(
        refused,
        Err(ManifestError::Rejected(Rejection::InvalidEntry { .. }))
    ));
    assert_eq!(client.current().index, index_before);
    assert_eq!(client.metrics().rejections_total, 2);
    service.shutdown().expect("shutdown");
}

#[test]
fn read_your_writes_and_shutdown() {
    // wait_applied gives read-your-writes for a receipt's index; after shutdown every call must
    // fail with Shutdown instead of hanging.
    let dir = tempfile::tempdir().expect("temp dir");
    let (service, client) = must_start(config(dir.path()));
    let receipt = block_on(client.propose(register(1))).expect("propose");
    block_on(client.wait_applied(receipt.log_index)).expect("applied");
    assert!(client.current().index >= receipt.log_index);

    // A waiter for a future index is woken by the commit that reaches it.
    let waiter = {
        let client = client.clone();
        let index = receipt.log_index + 1;
        std::thread::spawn(move || block_on(client.wait_applied(index)))
    };
    must_propose(&client, register(2));
    waiter.join().expect("waiter").expect("woken by commit");

    // A pinned version does not change under later commits.
    let pinned: Arc<_> = client.current();
    must_propose(&client, register(3));
    assert_eq!(pinned.manifest.files().len(), 2);

    let far = client.current().index + 100;
    let stuck = {
        let client = client.clone();
        std::thread::spawn(move || block_on(client.wait_applied(far)))
    };
    service.shutdown().expect("shutdown");
    assert!(matches!(
        stuck.join().expect("waiter"),
        Err(ManifestError::Shutdown)
    ));
    assert!(matches!(
        block_on(client.propose(register(4))),
        Err(ManifestError::Shutdown)
    ));
    assert!(matches!(
        client.wait_applied_blocking(far, Duration::from_millis(WAIT_MS_MAX)),
        Err(ManifestError::Shutdown)
    ));
    assert_eq!(
        client.current().manifest.files().len(),
        3,
        "last version stays readable"
    );
}
