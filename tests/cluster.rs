//! Cluster tests through the real binary: three (or four) node processes on loopback ports,
//! each with its own data directory and certificates from one cluster CA, forming a Raft
//! group over QUIC and replicating files. Waits are on conditions (cluster status, the
//! manifest, files on disk, query answers), never on fixed sleeps.

#[path = "support/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{free_port, Node, NodeOptions};

const TOKEN: &str = "cluster-test-token";
const CLUSTER_ID: &str = "testcluster";

/// Runs `shale ...` (credentials, cluster verbs); panics on failure.
fn shale_cli(args: &[&str]) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(args)
        .output()
        .expect("run shale");
    assert!(
        output.status.success(),
        "shale {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A cluster CA and certificates for nodes 1..=count in `dir`.
fn make_certs(dir: &Path, count: u64) -> PathBuf {
    let certs = dir.join("certs");
    let certs_arg = certs.to_str().unwrap();
    shale_cli(&[
        "cluster",
        "init-ca",
        "--dir",
        certs_arg,
        "--cluster-id",
        CLUSTER_ID,
    ]);
    for id in 1..=count {
        issue_cert(&certs, id, "127.0.0.1");
    }
    certs
}

/// Settings of one cluster node.
struct Member {
    id: u64,
    quic_port: u16,
}

/// A certificate for node `id` at `ip`, signed by the CA in `certs`.
fn issue_cert(certs: &Path, id: u64, ip: &str) {
    let id = id.to_string();
    shale_cli(&[
        "cluster",
        "issue-cert",
        "--dir",
        certs.to_str().unwrap(),
        "--cluster-id",
        CLUSTER_ID,
        "--node-id",
        &id,
        "--ip",
        ip,
    ]);
}

/// Members 1..=count, each with a free QUIC port.
fn members(count: u64) -> Vec<Member> {
    (1..=count)
        .map(|id| Member {
            id,
            quic_port: free_port(),
        })
        .collect()
}

/// The environment that makes a test node a cluster member.
fn member_options(
    certs: &Path,
    member: &Member,
    bootstrap: bool,
    seed: Option<&Node>,
    seed_quic: u16,
    role: &str,
) -> NodeOptions {
    let peers = seed
        .map(|node| format!("127.0.0.1:{seed_quic}:{}", node.addr.port()))
        .unwrap_or_default();
    NodeOptions {
        shards: 1,
        flush_age_ms: 200,
        extra_env: vec![
            ("SHALE_NODE_ID".into(), member.id.to_string()),
            ("SHALE_CLUSTER_ENABLED".into(), "true".into()),
            ("SHALE_CLUSTER_CLUSTER_ID".into(), CLUSTER_ID.into()),
            ("SHALE_CLUSTER_BOOTSTRAP".into(), bootstrap.to_string()),
            ("SHALE_CLUSTER_ROLE".into(), role.into()),
            (
                "SHALE_CLUSTER_QUIC_ADDR".into(),
                format!("127.0.0.1:{}", member.quic_port),
            ),
            ("SHALE_CLUSTER_PEERS".into(), peers),
            ("SHALE_CLUSTER_TLS_DIR".into(), certs.display().to_string()),
            ("SHALE_CLUSTER_ADMIN_TOKEN".into(), TOKEN.into()),
            // Three processes share two cores: give elections room.
            ("SHALE_CLUSTER_HEARTBEAT_MS".into(), "200".into()),
            (
                "SHALE_CLUSTER_ELECTION_TIMEOUT_MS_MIN".into(),
                "1500".into(),
            ),
            (
                "SHALE_CLUSTER_ELECTION_TIMEOUT_MS_MAX".into(),
                "3000".into(),
            ),
            ("SHALE_LOG_FILTER".into(), "info,openraft=error".into()),
        ],
        ..NodeOptions::default()
    }
}

/// Starts members 1-3 as writers (1 bootstraps, 2 and 3 join through it) and waits until the
/// three are voters.
fn start_three_writers(dir: &Path, certs: &Path, members: &[Member]) -> Vec<Node> {
    start_three_writers_with(dir, certs, members, |_| {})
}

/// Three writers in a fresh directory with fresh certificates; the directory lives as long as
/// the returned guard.
fn three_writers() -> (tempfile::TempDir, Vec<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let nodes = start_three_writers(dir.path(), &certs, &members(3));
    (dir, nodes)
}

/// [`start_three_writers`] with every node's options adjusted by `tune`.
fn start_three_writers_with(
    dir: &Path,
    certs: &Path,
    members: &[Member],
    tune: impl Fn(&mut NodeOptions),
) -> Vec<Node> {
    let seed_quic = members[0].quic_port;
    let mut first = member_options(certs, &members[0], true, None, 0, "writer");
    tune(&mut first);
    let mut nodes = vec![Node::start(&dir.join("n1"), first)];
    // The two joiners start at once, so their joins reach the leader together: both must end
    // as voters (a promotion refused by the other's change in progress once left one a learner).
    let seed = &nodes[0];
    let joined: Vec<Node> = std::thread::scope(|scope| {
        let starting: Vec<_> = members[1..3]
            .iter()
            .map(|member| {
                let mut options =
                    member_options(certs, member, false, Some(seed), seed_quic, "writer");
                tune(&mut options);
                let data_dir = dir.join(format!("n{}", member.id));
                scope.spawn(move || Node::start(&data_dir, options))
            })
            .collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    });
    nodes.extend(joined);
    nodes[0].wait_until("three voters", || {
        members_with_role(&nodes[0], "voter").len() == 3
    });
    nodes
}

/// `GET /api/v1/cluster` of a node, with the admin token.
fn status(node: &Node) -> serde_json::Value {
    let response = harness::request(
        node.addr,
        "GET",
        "/api/v1/cluster",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        b"",
    )
    .expect("GET /api/v1/cluster");
    assert_eq!(response.status, 200, "{}", response.text());
    harness::json(&response)
}

/// A cluster API request with the admin token; returns the status and the JSON answer.
fn admin(node: &Node, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let response = harness::request(
        node.addr,
        method,
        path,
        &[("authorization", &format!("Bearer {TOKEN}"))],
        body.as_bytes(),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let value = serde_json::from_slice(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, value)
}

/// The leader a node knows, if any.
fn leader_of(node: &Node) -> Option<u64> {
    status(node)["leader_id"].as_u64()
}

/// One member's entry in a node's `GET /api/v1/cluster/nodes/{id}`.
fn node_entry(node: &Node, id: u64) -> serde_json::Value {
    let (code, answer) = admin(node, "GET", &format!("/api/v1/cluster/nodes/{id}"), "");
    assert_eq!(code, 200, "{answer}");
    answer["node"].clone()
}

/// Runs `shale cluster <args> --target <node> --token ...` and returns its JSON output.
fn cluster_cli(node: &Node, args: &[&str]) -> serde_json::Value {
    let target = format!("http://{}", node.addr);
    let mut all = vec!["cluster"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--target", &target, "--token", TOKEN]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(&all)
        .output()
        .expect("run shale");
    assert!(
        output.status.success(),
        "shale {all:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the CLI prints JSON")
}

/// Node ids with the given Raft role in a node's view.
fn members_with_role(node: &Node, role: &str) -> Vec<u64> {
    status(node)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["raft_role"] == role)
        .map(|n| n["id"].as_u64().unwrap())
        .collect()
}

/// Every file of `node`'s manifest is on its disk with the manifest's size and blake3.
fn holds_every_file(node: &Node, expected_files: usize) -> bool {
    let files = node.manifest_files();
    files.len() == expected_files
        && files.iter().all(|f| {
            let path = node.data_dir.join(f["path"].as_str().unwrap());
            std::fs::read(&path).is_ok_and(|bytes| {
                bytes.len() as u64 == f["size_bytes"].as_u64().unwrap()
                    && blake3::hash(&bytes).to_hex().as_str() == f["blake3_hex"].as_str().unwrap()
            })
        })
}

/// Writes `count` numbered rows of `host` (precision s) on `node`; panics unless 204.
fn write_rows(node: &Node, host: &str, first: u64, count: u64) {
    let body: String = (first..first + count)
        .map(|i| format!("cpu,host={host} v={i}i {}\n", 1_767_225_600 + i))
        .collect();
    let response = node.post("/write?db=c&precision=s", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
}

/// Waits until every node in `nodes` holds every one of `files` manifest files.
fn wait_all_hold_every_file<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    files: usize,
    what: &str,
) {
    for node in nodes {
        node.wait_until(what, || {
            holds_every_file(node, files) && records_every_file(node)
        });
    }
}

/// Whether `node`'s replicator has recorded every file it fetched (a file reaches its path a
/// moment before it is recorded present, and only then counts as held).
fn records_every_file(node: &Node) -> bool {
    let (code, local) = admin(node, "GET", "/api/v1/cluster/local", "");
    let replication = &local["node"]["replication"];
    code == 200 && replication["files_missing"] == 0 && replication["files_in_flight"] == 0
}

/// `count(*)` and `sum(v)` of c.cpu on a node.
fn totals(node: &Node) -> (u64, i64) {
    let body =
        serde_json::json!({ "sql": "SELECT count(*), sum(v)::BIGINT FROM c.cpu" }).to_string();
    let response = node.post("/api/v1/query", &[], body.as_bytes());
    if response.status != 200 {
        return (0, 0);
    }
    let data = &harness::json(&response)["data"][0];
    (data[0].as_u64().unwrap_or(0), data[1].as_i64().unwrap_or(0))
}

// Three nodes form a cluster (one bootstraps, two join through it; the third is a reader),
// writes on the writers reach every node's disk byte-identical (size and blake3 against the
// manifest) and every node answers the same query alike; the reader refuses writes naming the
// writers. A fourth, replica-only node added later receives every file and stays a learner.
#[test]
fn nodes_form_a_cluster_and_replicate_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 4);
    let members = members(4);
    let first = Node::start(
        &dir.path().join("n1"),
        member_options(&certs, &members[0], true, None, 0, "writer"),
    );
    let seed_quic = members[0].quic_port;
    let second = Node::start(
        &dir.path().join("n2"),
        member_options(
            &certs,
            &members[1],
            false,
            Some(&first),
            seed_quic,
            "writer",
        ),
    );
    let third = Node::start(
        &dir.path().join("n3"),
        member_options(
            &certs,
            &members[2],
            false,
            Some(&first),
            seed_quic,
            "reader",
        ),
    );
    first.wait_until("three voters", || {
        members_with_role(&first, "voter").len() == 3
    });

    write_rows(&first, "a", 0, 50);
    write_rows(&second, "b", 100, 30);
    let refused = third.post(
        "/write?db=c&precision=s",
        &[],
        b"cpu,host=r v=1i 1767225600",
    );
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains(&format!("http://{}", first.addr)),
        "{}",
        refused.text()
    );

    let nodes = [&first, &second, &third];
    first.wait_until("both writers' files in the manifest", || {
        first.manifest_files().len() == 2
    });
    wait_all_hold_every_file(nodes, 2, "every file on this node");
    let expected = (80, (0..50).sum::<i64>() + (100..130).sum::<i64>());
    for node in nodes {
        node.wait_until("identical answers", || totals(node) == expected);
    }

    // A node added while the cluster holds data catches up on every file; replica-only nodes
    // never vote.
    let fourth = Node::start(
        &dir.path().join("n4"),
        member_options(
            &certs,
            &members[3],
            false,
            Some(&first),
            seed_quic,
            "replica-only",
        ),
    );
    fourth.wait_until("the replica holds every file", || {
        holds_every_file(&fourth, 2)
    });
    assert_eq!(totals(&fourth), expected);
    assert_eq!(members_with_role(&first, "learner"), vec![4]);
    assert_eq!(members_with_role(&first, "voter").len(), 3);
}

// A query loop on one node while another ingests: every answer is a success, never counts a
// row twice (count(*) equals count(DISTINCT v) for unique values), never counts more rows than
// were sent, never goes back (files only arrive), and ends with every row once the files are
// there. Replication and the query's pinned version race here: the querying node fetches files
// while it answers, so a file being fetched must be skipped, not read half-written or twice.
#[test]
fn queries_on_one_node_while_another_ingests_never_fail_or_double_count() {
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;

    let (_dir, nodes) = three_writers();
    let (writer, reader) = (&nodes[0], &nodes[1]);
    const BATCH: u64 = 40;
    const BATCHES: u64 = 60;
    // Values are unique over the whole run and spread over several hours, so flushes write
    // several files each and a double-counted file shows as count > count(DISTINCT v).
    let post_batch = |batch: u64| {
        let body: String = (batch * BATCH..(batch + 1) * BATCH)
            .map(|v| format!("cpu,host=h{} v={v}i {}\n", v % 7, 1_767_225_600 + v * 97))
            .collect();
        let response = writer.post("/write?db=c&precision=s", &[], body.as_bytes());
        assert_eq!(response.status, 204, "{}", response.text());
    };
    post_batch(0);
    let count_query =
        serde_json::json!({ "sql": "SELECT count(*), count(DISTINCT v) FROM c.cpu" }).to_string();
    let answer = |node: &Node| -> (u64, u64) {
        let response = node.post("/api/v1/query", &[], count_query.as_bytes());
        assert_eq!(response.status, 200, "a query failed: {}", response.text());
        let data = &harness::json(&response)["data"][0];
        (data[0].as_u64().unwrap(), data[1].as_u64().unwrap())
    };
    reader.wait_until("the first batch on the querying node", || {
        !reader.manifest_files().is_empty()
            && holds_every_file(reader, reader.manifest_files().len())
    });

    let sent = AtomicU64::new(BATCH);
    let done = std::sync::atomic::AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let queries = std::thread::scope(|scope| {
        scope.spawn(|| {
            for batch in 1..BATCHES {
                sent.fetch_add(BATCH, Ordering::SeqCst);
                post_batch(batch);
                // Paced by the reader (a query per two batches), so queries overlap the whole
                // ingest however fast either side is; bounded in case the reader is stuck.
                let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while answered.load(Ordering::SeqCst) < batch / 2
                    && std::time::Instant::now() < until
                {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut last = 0;
        let mut queries = 0u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let finished = done.load(Ordering::SeqCst);
            let (count, distinct) = answer(reader);
            queries += 1;
            answered.store(queries, Ordering::SeqCst);
            let upper = sent.load(Ordering::SeqCst);
            assert_eq!(count, distinct, "rows counted twice");
            assert!(count <= upper, "{count} rows counted but only {upper} sent");
            assert!(count >= last, "the count went back from {last} to {count}");
            last = count;
            if finished && count == BATCH * BATCHES {
                return queries;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the querying node never saw every row: {count} of {}",
                BATCH * BATCHES
            );
        }
    });
    assert!(
        queries > 10,
        "too few queries overlapped the ingest: {queries}"
    );
}

// Kill -9 of the Raft leader: the survivors elect a new leader, registrations resume (a write
// on a survivor becomes a file every survivor holds), and the killed node, restarted, catches
// up on the manifest and files without operator action.
#[test]
fn a_killed_leader_is_replaced_and_catches_up() {
    let (_dir, mut nodes) = three_writers();
    write_rows(&nodes[1], "before", 0, 20);
    wait_all_hold_every_file(&nodes, 1, "the first file everywhere");

    let leader = status(&nodes[0])["leader_id"].as_u64().unwrap();
    let leader_index = (leader - 1) as usize;
    nodes[leader_index].kill9();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader_index).collect();
    let watcher = &nodes[survivors[0]];
    watcher.wait_until("a new leader", || {
        status(watcher)["leader_id"]
            .as_u64()
            .is_some_and(|id| id != leader)
    });
    let writer = &nodes[survivors[1]];
    writer.wait_until("a write on a survivor", || {
        let body = "cpu,host=after v=7i 1767229200\n";
        writer
            .post("/write?db=c&precision=s", &[], body.as_bytes())
            .status
            == 204
    });
    for &i in &survivors {
        nodes[i].wait_until("the new file on every survivor", || {
            holds_every_file(&nodes[i], 2)
        });
    }

    nodes[leader_index].restart();
    let restarted = &nodes[leader_index];
    restarted.wait_until("the restarted node catches up", || {
        holds_every_file(restarted, 2)
    });
    restarted.wait_until("its answers match", || {
        totals(restarted) == (21, (0..20).sum::<i64>() + 7)
    });
}

// A cluster node restarting without a quorum stays up and not ready (it cannot register
// anything), retrying instead of exiting; it becomes ready once a second voter is back.
#[test]
fn without_a_quorum_a_node_stays_not_ready() {
    let (_dir, mut nodes) = three_writers();
    for node in nodes.iter_mut() {
        node.stop();
    }
    nodes[1].restart_without_waiting();
    let lonely = &nodes[1];
    lonely.wait_until("the lone node to serve HTTP", || {
        harness::request(lonely.addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    // Election timeouts are 1.5-3 s; a node alone can never win. It must still be running and
    // not ready after several of them.
    lonely.wait_until("several election timeouts", || {
        status(lonely)["term"]
            .as_u64()
            .is_some_and(|term| term >= 4)
    });
    assert!(nodes[1].is_running(), "a node without quorum must not exit");
    assert_eq!(nodes[1].must_get("/ready").status, 503);
    nodes[2].restart();
    nodes[1].must_become_ready();
}

// A standalone node's data directory becomes the first node of a cluster without
// re-ingesting: restarted with [cluster] bootstrap it keeps its rows, and a node that joins
// receives its files.
#[test]
fn a_standalone_directory_becomes_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 2);
    let members = members(2);
    let mut first = Node::start(
        &dir.path().join("n1"),
        NodeOptions {
            shards: 1,
            flush_age_ms: 200,
            ..NodeOptions::default()
        },
    );
    write_rows(&first, "old", 0, 25);
    first.stop();
    for (name, value) in member_options(&certs, &members[0], true, None, 0, "writer").extra_env {
        first.set_env(&name, &value);
    }
    first.restart();
    assert_eq!(totals(&first).0, 25);
    let second = Node::start(
        &dir.path().join("n2"),
        member_options(
            &certs,
            &members[1],
            false,
            Some(&first),
            members[0].quic_port,
            "writer",
        ),
    );
    second.wait_until("the joined node holds the old files", || {
        holds_every_file(&second, 1)
    });
    assert_eq!(totals(&second), (25, (0..25).sum::<i64>()));
}

// Removing a node (`shale cluster remove` sent to a follower, which names the leader in a 421
// the CLI follows, then DELETE /api/v1/cluster/peer/{id} on the leader) stops it receiving the
// manifest and files; the documented rebuild path for a lost disk, a new node id on an empty
// data directory joining the cluster, ends with that node holding every file.
#[test]
fn a_removed_node_stops_receiving_and_a_fresh_node_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 4);
    let members = members(4);
    let nodes = start_three_writers(dir.path(), &certs, &members);
    write_rows(&nodes[0], "one", 0, 10);
    wait_all_hold_every_file(&nodes, 1, "the first file everywhere");

    let leader_id = status(&nodes[0])["leader_id"].as_u64().unwrap();
    let leader = &nodes[(leader_id - 1) as usize];
    let victim = if leader_id == 3 { 2 } else { 3 };
    // Through the CLI, sent to a node that is not the leader: it answers 421 naming the leader,
    // and the CLI follows it.
    let bystander = (1..=3)
        .find(|id| *id != leader_id && *id != victim)
        .unwrap();
    let bystander_url = format!("http://{}", nodes[(bystander - 1) as usize].addr);
    shale_cli(&[
        "cluster",
        "remove",
        "--target",
        &bystander_url,
        "--token",
        TOKEN,
        &victim.to_string(),
    ]);
    leader.wait_until("two members", || {
        status(leader)["nodes"].as_array().unwrap().len() == 2
    });

    // The replacement: a new id on an empty disk, joining through the seed.
    let fresh = Node::start(
        &dir.path().join("n4"),
        member_options(
            &certs,
            &members[3],
            false,
            Some(leader),
            members[(leader_id - 1) as usize].quic_port,
            "writer",
        ),
    );
    fresh.wait_until("the new node holds every file", || {
        holds_every_file(&fresh, 1)
    });
    write_rows(leader, "two", 100, 10);
    let keepers: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != victim)
        .map(|(_, n)| n)
        .chain([&fresh])
        .collect();
    wait_all_hold_every_file(
        keepers.iter().copied(),
        2,
        "the second file on every member",
    );
    // The removed node was no longer replicated to when the second file was registered.
    let removed = &nodes[(victim - 1) as usize];
    assert_eq!(
        removed.manifest_files().len(),
        1,
        "a removed node must not receive new files"
    );
}

// Leadership transfer: `POST /api/v1/cluster/leader {"id": T}` sent to a node that is neither
// the leader nor T is forwarded to the leader and answers once T leads; then `shale cluster
// stepdown` hands the leadership on to another voter. After each move every node names the
// new leader and a flush registration still commits everywhere. (openraft 0.9 has no transfer;
// before this change the request was refused unless sent to T, which only started an
// election that followers' leader leases could reject.)
#[test]
fn leadership_moves_to_a_chosen_node_and_steps_down() {
    let (_dir, nodes) = three_writers();
    let old = leader_of(&nodes[0]).unwrap();
    let target = if old == 3 { 2 } else { 3 };
    let bystander = &nodes[(6 - old - target - 1) as usize];

    let body = serde_json::json!({ "id": target }).to_string();
    let (code, answer) = admin(bystander, "POST", "/api/v1/cluster/leader", &body);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["leader_id"], target, "{answer}");
    eprintln!("transfer {old} -> {target}: {answer}");
    for node in &nodes {
        node.wait_until("every node names the new leader", || {
            leader_of(node) == Some(target)
        });
    }
    write_rows(&nodes[(old - 1) as usize], "moved", 0, 10);
    wait_all_hold_every_file(&nodes, 1, "a file registered under the new leader");

    let answer = cluster_cli(bystander, &["stepdown"]);
    let next = answer["leader_id"].as_u64().unwrap();
    assert_ne!(next, target, "{answer}");
    eprintln!("stepdown {target} -> {next}: {answer}");
    for node in &nodes {
        node.wait_until("every node names the stepped-up leader", || {
            leader_of(node) == Some(next)
        });
    }
    write_rows(&nodes[(target - 1) as usize], "stepped", 100, 10);
    wait_all_hold_every_file(&nodes, 2, "a file registered after the stepdown");
}

// Draining the leader (asked through another node): it hands the leadership over, commits
// `draining`, flushes rows that would otherwise sit in its buffer for an hour, then refuses
// writes with 503 + Retry-After naming writable nodes and reports 503 on /ready while /health
// stays 200 and queries still answer; `shale cluster activate` restores writes and readiness.
#[test]
fn a_drained_node_refuses_writes_and_activate_restores_them() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let members = members(3);
    let nodes = start_three_writers_with(dir.path(), &certs, &members, |options| {
        options.flush_age_ms = 3_600_000;
    });
    let drained_id = leader_of(&nodes[0]).unwrap();
    let drained = &nodes[(drained_id - 1) as usize];
    let other = &nodes[(drained_id % 3) as usize];
    write_rows(drained, "buffered", 0, 40);
    assert!(
        drained.manifest_files().is_empty(),
        "rows are still buffered"
    );

    let path = format!("/api/v1/cluster/nodes/{drained_id}/drain");
    let (code, answer) = admin(other, "POST", &path, "");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["unflushed_rows"], 0, "{answer}");
    assert_ne!(leader_of(drained), Some(drained_id), "{answer}");
    assert_eq!(node_entry(other, drained_id)["state"], "draining");
    let (_, listed) = admin(other, "GET", "/api/v1/cluster/nodes?state=draining", "");
    assert_eq!(listed["count"], 1, "{listed}");
    // Its rows were flushed into a registered file every node sees.
    other.wait_until("the drained node's rows in the manifest", || {
        other.manifest_rows("c") == 40
    });

    let refused = drained.post(
        "/write?db=c&precision=s",
        &[],
        b"cpu,host=x v=1i 1767225600",
    );
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert!(
        refused.text().contains(&format!("http://{}", other.addr)),
        "{}",
        refused.text()
    );
    let ready = drained.must_get("/ready");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("draining"), "{}", ready.text());
    assert_eq!(drained.must_get("/health").status, 200);
    assert_eq!(totals(drained), (40, (0..40).sum::<i64>()));

    let answer = cluster_cli(other, &["activate", &drained_id.to_string()]);
    assert_eq!(answer["state"], "active", "{answer}");
    drained.wait_until("the activated node is ready", || {
        drained.must_get("/ready").status == 200
    });
    write_rows(drained, "again", 100, 5);
    assert_eq!(node_entry(other, drained_id)["state"], "active");
}

// `POST /api/v1/cluster/leave` on the leader: it hands the leadership over, flushes, waits
// until the others hold its files and has itself removed; the two others form the cluster on
// their own, hold its file, and keep committing registrations.
#[test]
fn a_leaving_node_is_removed_and_the_others_keep_committing() {
    let (_dir, nodes) = three_writers();
    let leaver_id = leader_of(&nodes[0]).unwrap();
    let leaver = &nodes[(leaver_id - 1) as usize];
    write_rows(leaver, "leaver", 0, 20);

    let (code, answer) = admin(leaver, "POST", "/api/v1/cluster/leave", "");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["left"], true, "{answer}");
    let stayers: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leaver_id)
        .map(|(_, n)| n)
        .collect();
    for node in &stayers {
        node.wait_until("the leaver is gone from the membership", || {
            let ids: Vec<u64> = status(node)["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_u64().unwrap())
                .collect();
            ids.len() == 2 && !ids.contains(&leaver_id)
        });
        assert!(holds_every_file(node, 1), "the leaver's file stays");
    }
    assert_ne!(leader_of(stayers[0]), Some(leaver_id));
    write_rows(stayers[1], "after", 100, 10);
    wait_all_hold_every_file(stayers.iter().copied(), 2, "a registration after the leave");
}

// A node killed for longer than cluster.dead_after_ms is committed `dead` (and shown
// unhealthy, the cluster degraded) on the survivors; restarted, it catches up and is
// committed `active` again.
#[test]
fn a_silent_node_is_declared_dead_and_active_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let members = members(3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members, |options| {
        options
            .extra_env
            .push(("SHALE_CLUSTER_UNHEALTHY_AFTER_MS".into(), "1000".into()));
        options
            .extra_env
            .push(("SHALE_CLUSTER_DEAD_AFTER_MS".into(), "3000".into()));
    });
    let leader = leader_of(&nodes[0]).unwrap();
    let victim = if leader == 3 { 2 } else { 3 };
    let watcher = &nodes[(leader - 1) as usize];
    watcher.wait_until("every member active", || {
        node_entry(watcher, victim)["state"] == "active"
    });
    nodes[(victim - 1) as usize].kill9();
    let watcher = &nodes[(leader - 1) as usize];
    watcher.wait_until("the silent node is dead", || {
        node_entry(watcher, victim)["state"] == "dead"
    });
    let entry = node_entry(watcher, victim);
    assert_eq!(entry["health"], "unhealthy", "{entry}");
    let (code, health) = admin(watcher, "GET", "/api/v1/cluster/health", "");
    assert_eq!(
        (code, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );
    let survivor = &nodes[(6 - leader - victim - 1) as usize];
    survivor.wait_until("the other survivor sees it dead", || {
        node_entry(survivor, victim)["state"] == "dead"
    });

    nodes[(victim - 1) as usize].restart();
    let watcher = &nodes[(leader - 1) as usize];
    watcher.wait_until("the returning node is active again", || {
        node_entry(watcher, victim)["state"] == "active"
    });
    watcher.wait_until("the cluster is healthy again", || {
        admin(watcher, "GET", "/api/v1/cluster/health", "").1["status"] == "healthy"
    });
}

/// Three network namespaces (one per node) on a bridge in a fourth, plus a veth from the test's
/// own namespace to the bridge so the test reaches every node. Addresses are 198.18.N.x (the
/// benchmarking range); everything is removed on drop. Needs root.
struct NamespaceNet {
    prefix: String,
    subnet: u8,
}

impl NamespaceNet {
    fn create(nodes: u8) -> NamespaceNet {
        let id = std::process::id();
        let net = NamespaceNet {
            prefix: format!("shp{}", id % 100_000),
            subnet: (id % 200 + 20) as u8,
        };
        let p = &net.prefix;
        let bridge = format!("{p}-br");
        ip(&["netns", "add", &bridge]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for k in 1..=nodes {
            let ns = net.namespace(k);
            let (inner, outer) = (format!("{p}n{k}"), format!("{p}b{k}"));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &bridge]);
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(k)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (host, outer) = (format!("{p}h"), format!("{p}hb"));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &outer]);
        ip(&["link", "set", &outer, "netns", &bridge]);
        ip(&["-n", &bridge, "link", "set", &outer, "master", "br0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.addr(100)),
            "dev",
            &host,
        ]);
        ip(&["link", "set", &host, "up"]);
        net
    }

    fn namespace(&self, k: u8) -> String {
        format!("{}-{k}", self.prefix)
    }

    fn addr(&self, k: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 18, self.subnet, k)
    }

    /// Cuts (or heals) both directions between node `a` and node `b` with blackhole routes.
    fn partition(&self, a: u8, b: u8, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &self.namespace(from),
                "route",
                verb,
                "blackhole",
                &format!("{}/32", self.addr(to)),
            ]);
        }
    }
}

impl Drop for NamespaceNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &format!("{}h", self.prefix)])
            .status();
        for k in 1..=3 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.namespace(k)])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &format!("{}-br", self.prefix)])
            .status();
    }
}

fn ip(args: &[&str]) {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// A network partition (network namespaces, blackhole routes on both sides): the isolated
// minority cannot register files and answers ack=majority writes 503 (`X-Shale-Stored: local`)
// while the majority elects a leader and goes on registering and acknowledging majority
// writes; the majority declares the live minority node dead and fences its shard; after
// healing every node converges to the same files and answers, and the rows the minority
// stored during the partition are among them exactly once.
#[test]
fn a_partitioned_minority_cannot_register_and_converges_after_healing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the partition test needs root (network namespaces); CI runs as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = NamespaceNet::create(3);
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().unwrap();
    shale_cli(&[
        "cluster",
        "init-ca",
        "--dir",
        certs_arg,
        "--cluster-id",
        CLUSTER_ID,
    ]);
    let options = |k: u8, bootstrap: bool| {
        let quic = format!("{}:7000", net.addr(k));
        let mut options = member_options(
            &certs,
            &Member {
                id: u64::from(k),
                quic_port: 7000,
            },
            bootstrap,
            None,
            0,
            "writer",
        );
        options
            .extra_env
            .retain(|(name, _)| name != "SHALE_CLUSTER_QUIC_ADDR" && name != "SHALE_CLUSTER_PEERS");
        options
            .extra_env
            .push(("SHALE_CLUSTER_QUIC_ADDR".into(), quic));
        options.extra_env.push((
            "SHALE_CLUSTER_PEERS".into(),
            format!("{}:7000:8000", net.addr(1)),
        ));
        options.extra_env.extend([
            ("SHALE_CLUSTER_ACK_TIMEOUT_MS".into(), "1500".into()),
            ("SHALE_CLUSTER_UNHEALTHY_AFTER_MS".into(), "1000".into()),
            ("SHALE_CLUSTER_DEAD_AFTER_MS".into(), "3000".into()),
        ]);
        options.http_addr = Some(format!("{}:8000", net.addr(k)).parse().unwrap());
        options.command_prefix = vec!["ip".into(), "netns".into(), "exec".into(), net.namespace(k)];
        options
    };
    let mut nodes = Vec::new();
    for k in 1..=3u8 {
        issue_cert(&certs, u64::from(k), &net.addr(k).to_string());
        nodes.push(Node::start(
            &dir.path().join(format!("n{k}")),
            options(k, k == 1),
        ));
    }
    nodes[0].wait_until("three voters", || {
        members_with_role(&nodes[0], "voter").len() == 3
    });
    write_rows(&nodes[0], "before", 0, 10);
    wait_all_hold_every_file(&nodes, 1, "the first file everywhere");

    // Isolate node 1 (the bootstrap node, the leader so far).
    net.partition(1, 2, true);
    net.partition(1, 3, true);
    write_rows(&nodes[0], "minority", 100, 5);
    let (code, _, text) = write_acked(&nodes[0], "minority", 200, 3, "majority");
    assert_eq!(
        code, 503,
        "a minority cannot gather a majority of copies: {text}"
    );
    assert!(text.contains("durable on this node"), "{text}");
    let majority = [&nodes[1], &nodes[2]];
    // Acknowledged by node 2's WAL at once; registered once the majority has a leader.
    write_rows(majority[0], "majority", 1000, 1);
    let (code, _, text) = write_acked(majority[1], "majority", 1001, 1, "majority");
    assert_eq!(
        code, 204,
        "the majority acknowledges majority writes: {text}"
    );
    majority[0].wait_until("the majority to register its files", || {
        majority[0].manifest_files().len() == 3
    });
    wait_all_hold_every_file(majority, 3, "the majority's files on both majority nodes");
    // The minority's rows were acknowledged (its WAL holds them) but cannot be registered:
    // its manifest has not moved past the partition.
    assert_eq!(
        nodes[0].manifest_files().len(),
        1,
        "a minority must not register files"
    );

    // The majority declares the live but silent node 1 dead and fences its shard.
    majority[0].wait_until("node 1 dead and its shard fenced", || {
        let cluster = status(majority[0]);
        let dead = cluster["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["id"] == 1 && n["state"] == "dead");
        let fenced = cluster["wal_replication"]["fences"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["origin"] == 1));
        dead && fenced
    });

    net.partition(1, 2, false);
    net.partition(1, 3, false);
    let expected = (
        20,
        (0..10).sum::<i64>() + (100..105).sum::<i64>() + (200..203).sum::<i64>() + 1000 + 1001,
    );
    for node in &nodes {
        node.wait_until("every node converges on every file", || {
            let files = nodes[1].manifest_files().len();
            files >= 4 && holds_every_file(node, files)
        });
        node.wait_until("identical answers", || totals(node) == expected);
    }
}

/// `count(*)`, `count(DISTINCT v)` of c.cpu on a node, read after `tokens` (write tokens).
fn counts_after(node: &Node, tokens: &[String]) -> (u16, u64, u64) {
    let body =
        serde_json::json!({ "sql": "SELECT count(*), count(DISTINCT v) FROM c.cpu" }).to_string();
    let joined = tokens.join(",");
    let headers: Vec<(&str, &str)> = if tokens.is_empty() {
        Vec::new()
    } else {
        vec![("X-Shale-Read-After", joined.as_str())]
    };
    let response = node.post("/api/v1/query", &headers, body.as_bytes());
    if response.status != 200 {
        return (response.status, 0, 0);
    }
    let data = &harness::json(&response)["data"][0];
    (
        200,
        data[0].as_u64().unwrap_or(0),
        data[1].as_u64().unwrap_or(0),
    )
}

/// Writes rows `first..first + count` of `host` on `node` with `ack`; returns the status and
/// the write token.
fn write_acked(
    node: &Node,
    host: &str,
    first: u64,
    count: u64,
    ack: &str,
) -> (u16, String, String) {
    let body: String = (first..first + count)
        .map(|i| format!("cpu,host={host} v={i}i {}\n", 1_767_225_600 + i))
        .collect();
    let response = node.post(
        &format!("/write?db=c&precision=s&ack={ack}"),
        &[],
        body.as_bytes(),
    );
    (
        response.status,
        response
            .header("x-shale-write-token")
            .unwrap_or_default()
            .to_string(),
        response.text(),
    )
}

// WAL replication with ack=majority on three writers whose buffers do not flush during the
// test (so every read of another node's rows comes from its replica buffers, not files):
// a write on node 1 is read on node 2 at once with its token (read-your-writes across nodes);
// with node 3 killed, majority writes go on and ack=all answers 503 `X-Shale-Stored: local`
// naming the lack of copies; node 3 restarted catches up from node 1's WAL and, like every
// node, holds every acknowledged row exactly once; after the buffers flush, the counts stay
// exact (the per-row rule hands the rows from replica buffers over to files without a gap or
// a double count).
#[test]
fn majority_writes_are_read_anywhere_with_a_token_and_survive_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        options.flush_age_ms = 600_000;
        options
            .extra_env
            .push(("SHALE_CLUSTER_ACK_TIMEOUT_MS".into(), "1500".into()));
    });
    let mut sent = 0u64;
    let mut tokens = Vec::new();
    for batch in 0..5 {
        let (status, token, text) = write_acked(&nodes[0], "a", sent, 100, "majority");
        assert_eq!(status, 204, "batch {batch}: {text}");
        assert!(!token.is_empty(), "a write answers with its token");
        sent += 100;
        // Read on another node right away: the token makes it wait for these rows.
        let (status, rows, distinct) = counts_after(&nodes[1], std::slice::from_ref(&token));
        assert_eq!(
            (status, rows, distinct),
            (200, sent, sent),
            "after batch {batch}"
        );
        tokens.push(token);
    }
    assert!(
        nodes[1].manifest_files().is_empty(),
        "no file was flushed yet, so node 2 answered from its replica buffers"
    );

    nodes[2].kill9();
    for batch in 0..5 {
        let (status, token, text) = write_acked(&nodes[0], "b", sent, 100, "majority");
        assert_eq!(
            status, 204,
            "majority with one node down, batch {batch}: {text}"
        );
        sent += 100;
        tokens.push(token);
    }
    let (status, token, text) = write_acked(&nodes[0], "c", sent, 10, "all");
    assert_eq!(status, 503, "ack=all with a node down: {text}");
    assert!(text.contains("durable on this node"), "{text}");
    assert!(
        !token.is_empty(),
        "the refused write still names its place in the wal"
    );
    sent += 10;
    tokens.push(token);

    nodes[2].restart();
    nodes[2].must_become_ready();
    for node in &nodes {
        let (status, rows, distinct) = counts_after(node, &tokens);
        assert_eq!(
            (status, rows, distinct),
            (200, sent, sent),
            "node {} after the restart",
            node.addr
        );
    }

    // Flush everything on node 1: the rows move from buffers to files on every node.
    let response = admin(&nodes[0], "POST", "/api/v1/cluster/nodes/1/drain", "");
    assert_eq!(response.0, 200, "{}", response.1);
    let files = nodes[0].manifest_files().len();
    assert!(files > 0);
    wait_all_hold_every_file(&nodes, files, "every node holds node 1's files");
    for node in &nodes {
        node.wait_until("exact counts from files", || {
            let (status, rows, distinct) = counts_after(node, &[]);
            assert_eq!(status, 200);
            assert!(
                rows == distinct && rows <= sent,
                "a row counted twice or one never sent on {}: {rows} rows, {distinct} distinct, {sent} sent",
                node.addr
            );
            rows == sent
        });
    }
}

/// Rows in the manifest's files of origin `origin` (all, and those a taker wrote).
fn origin_file_rows(node: &Node, origin: u64) -> (u64, u64) {
    let files = node.manifest_files();
    let of_origin = files
        .iter()
        .filter(|f| f["origin_node"].as_u64() == Some(origin));
    let all = of_origin.clone().map(|f| f["rows"].as_u64().unwrap()).sum();
    let taken = of_origin
        .filter(|f| f["taken_by"].as_u64().is_some())
        .map(|f| f["rows"].as_u64().unwrap())
        .sum();
    (all, taken)
}

/// Waits until `node` counts exactly `sent` rows of c.cpu, asserting on every answer that no
/// row is counted twice and none appears that was never sent.
fn wait_exact(node: &Node, sent: u64, what: &str) {
    node.wait_until(what, || {
        let (status, rows, distinct) = counts_after(node, &[]);
        if status != 200 {
            return false;
        }
        if rows != distinct || rows > sent {
            let files: Vec<String> = node
                .manifest_files()
                .iter()
                .map(|f| {
                    let present = node.data_dir.join(f["path"].as_str().unwrap()).exists();
                    format!("{} present={present}", f["path"])
                })
                .collect();
            panic!(
                "{what}: {rows} rows, {distinct} distinct, {sent} sent on {}\nfiles: {files:#?}\n\
                 local: {}\nlog:\n{}",
                node.addr,
                admin(node, "GET", "/api/v1/cluster/local", "").1,
                node.log()
            );
        }
        rows == sent
    });
}

// Takeover: node 3 takes majority writes that stay in its buffers, then is killed for good.
// After cluster.dead_after_ms the leader commits it dead and fences its shard for the survivor
// holding the most of its WAL, which flushes node 3's replicated rows into files of its own
// (registered under node 3's LSN ranges): every acknowledged row is in files and counted once
// on the survivors. Node 3 restarted replays only above the fence, takes new writes, and after
// everything is flushed the manifest holds every row exactly once.
#[test]
fn a_dead_nodes_rows_are_taken_over_once_and_it_returns_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        options.flush_age_ms = 600_000;
        options.extra_env.extend([
            ("SHALE_CLUSTER_UNHEALTHY_AFTER_MS".into(), "1000".into()),
            ("SHALE_CLUSTER_DEAD_AFTER_MS".into(), "3000".into()),
        ]);
    });
    let mut sent = 0u64;
    for batch in 0..5 {
        let (status, _, text) = write_acked(&nodes[2], "x", sent, 100, "majority");
        assert_eq!(status, 204, "batch {batch} on node 3: {text}");
        sent += 100;
    }
    let (status, _, text) = write_acked(&nodes[0], "y", sent, 100, "majority");
    assert_eq!(status, 204, "{text}");
    sent += 100;
    assert_eq!(
        origin_file_rows(&nodes[0], 3),
        (0, 0),
        "node 3 flushed nothing yet"
    );

    nodes[2].kill9();
    nodes[0].wait_until("node 3's rows taken over into files", || {
        origin_file_rows(&nodes[0], 3) == (500, 500)
    });
    for node in &nodes[..2] {
        wait_exact(
            node,
            sent,
            "the survivors count every acknowledged row once",
        );
    }

    nodes[2].restart();
    nodes[2].must_become_ready();
    wait_exact(&nodes[2], sent, "the returning node counts every row once");
    let (status, _, text) = write_acked(&nodes[2], "z", sent, 100, "majority");
    assert_eq!(status, 204, "a write on the returned node: {text}");
    sent += 100;
    for node in &nodes {
        wait_exact(node, sent, "every node counts the new rows once");
    }

    // Flush every buffer: the manifest then holds every row exactly once.
    for id in [1, 3] {
        let (status, body) = admin(
            &nodes[0],
            "POST",
            &format!("/api/v1/cluster/nodes/{id}/drain"),
            "",
        );
        assert_eq!(
            status,
            200,
            "drain node {id}: {body}\nnode 3 log:\n{}",
            nodes[2].log()
        );
    }
    nodes[0].wait_until("every row in files", || nodes[0].manifest_rows("c") == sent);
    assert_eq!(origin_file_rows(&nodes[0], 3), (600, 500));
    for node in &nodes {
        wait_exact(node, sent, "exact counts from files");
    }
}

/// Rows of c.cpu per batch (`v / 100`) on a node, or `None` if the query failed.
fn batch_counts(node: &Node) -> Option<std::collections::BTreeMap<u64, u64>> {
    let body = serde_json::json!({
        "sql": "SELECT v // 100 AS batch, count(*) AS n FROM c.cpu GROUP BY batch ORDER BY batch"
    })
    .to_string();
    let response =
        harness::request(node.addr, "POST", "/api/v1/query", &[], body.as_bytes()).ok()?;
    if response.status != 200 {
        return None;
    }
    let value = harness::json(&response);
    Some(
        value["data"]
            .as_array()?
            .iter()
            .map(|row| (row[0].as_u64().unwrap(), row[1].as_u64().unwrap()))
            .collect(),
    )
}

/// What Jepsen's set checker checks, per batch of 100 rows (one WAL record, so all or
/// nothing): every acknowledged batch is there exactly once, no batch is there twice or in
/// part, and nothing appears that was never sent. Waits until the three nodes agree.
fn check_batches(nodes: &[Node], acked: &std::collections::BTreeSet<u64>, sent: u64, what: &str) {
    nodes[0].wait_until(what, || {
        let answers: Vec<_> = nodes.iter().map(batch_counts).collect();
        for (node, answer) in nodes.iter().zip(&answers) {
            let Some(batches) = answer else { return false };
            for (&batch, &rows) in batches {
                assert!(
                    batch < sent,
                    "{what}: batch {batch} was never sent ({})",
                    node.addr
                );
                assert!(
                    rows == 100 || (rows < 100 && !acked.contains(&batch)),
                    "{what}: batch {batch} has {rows} rows on {}",
                    node.addr
                );
            }
        }
        let agreed = answers.windows(2).all(|pair| pair[0] == pair[1]);
        let complete = answers[0].as_ref().is_some_and(|batches| {
            acked.iter().all(|b| batches.get(b) == Some(&100))
                && batches.values().all(|&rows| rows == 100)
        });
        agreed && complete
    });
}

/// Sends batch `batch` (rows `batch * 100 ..`) to `node` with ack=majority; true if acknowledged.
fn send_batch(node: &Node, batch: u64) -> bool {
    let body: String = (batch * 100..batch * 100 + 100)
        .map(|i| format!("cpu,host=h{} v={i}i {}\n", batch % 7, 1_767_225_600 + i))
        .collect();
    harness::request(
        node.addr,
        "POST",
        "/write?db=c&precision=s&ack=majority",
        &[],
        body.as_bytes(),
    )
    .is_ok_and(|response| response.status == 204)
}

// A power cut: all three nodes are killed at once (kill -9) while a loader writes with
// ack=majority to all of them, then restarted. Every acknowledged batch must be on every
// node exactly once; a batch in flight at the cut may be there (whole) or not at all.
#[test]
fn a_power_cut_under_majority_writes_keeps_every_acknowledged_row_once() {
    let (_dir, mut nodes) = three_writers();
    let mut acked = std::collections::BTreeSet::new();
    let mut batch = 0u64;
    // Enough acknowledged writes that some are in files and some only in WALs.
    while acked.len() < 30 {
        if send_batch(&nodes[(batch % 3) as usize], batch) {
            acked.insert(batch);
        }
        batch += 1;
    }
    let in_flight: Vec<_> = (0..3u64)
        .map(|i| {
            let addr = nodes[i as usize].addr;
            let first = batch + i * 1000;
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for b in first..first + 1000 {
                    let body: String = (b * 100..b * 100 + 100)
                        .map(|v| format!("cpu,host=h{} v={v}i {}\n", b % 7, 1_767_225_600 + v))
                        .collect();
                    match harness::request(
                        addr,
                        "POST",
                        "/write?db=c&precision=s&ack=majority",
                        &[],
                        body.as_bytes(),
                    ) {
                        Ok(response) if response.status == 204 => acked.push(b),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    nodes[0].wait_until("the loaders have written", || {
        batch_counts(&nodes[0]).is_some_and(|b| b.len() > acked.len() + 10)
    });
    for node in nodes.iter_mut() {
        node.kill9();
    }
    for loader in in_flight {
        acked.extend(loader.join().unwrap());
    }
    let sent = batch + 3000;
    for node in nodes.iter_mut() {
        node.restart_without_waiting();
    }
    for node in nodes.iter_mut() {
        node.must_become_ready();
    }
    check_batches(&nodes, &acked, sent, "after the power cut");
}

// Chaos: for a bounded time a node is killed (kill -9) every couple of seconds, in turn the Raft
// leader, a follower and a node a batch is in flight to, and restarted a moment later, while a
// loader writes batches with ack=majority to random nodes and never retries. At the end every
// acknowledged batch is on every node exactly once.
#[test]
fn random_kills_under_majority_writes_lose_and_double_nothing() {
    let (_dir, mut nodes) = three_writers();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("chaos seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut acked = std::collections::BTreeSet::new();
    let mut batch = 0u64;
    let started = Instant::now();
    let mut down: Option<(usize, Instant)> = None;
    let mut next_kill = Instant::now() + Duration::from_millis(1500);
    let mut kills = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        if let Some((index, at)) = down {
            if at.elapsed() >= Duration::from_millis(800) {
                nodes[index].restart_without_waiting();
                down = None;
                next_kill = Instant::now() + Duration::from_millis(1500 + next(1500));
            }
        } else if Instant::now() >= next_kill {
            // Roles in turn: the Raft leader, a follower, then the node a batch is being sent
            // to; and so on while the run lasts.
            let leader = nodes.iter().find_map(|node| {
                let auth = format!("Bearer {TOKEN}");
                let response = harness::request(
                    node.addr,
                    "GET",
                    "/api/v1/cluster",
                    &[("authorization", auth.as_str())],
                    b"",
                )
                .ok()?;
                let value: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
                value["leader_id"].as_u64().map(|id| id as usize - 1)
            });
            let index = match kills % 3 {
                0 => leader.unwrap_or(0),
                1 => (leader.unwrap_or(0) + 1 + next(2) as usize) % 3,
                _ => next(3) as usize,
            };
            kills += 1;
            if kills.is_multiple_of(3) {
                // The node being written to: a batch is in flight to it as it dies.
                let addr = nodes[index].addr;
                let in_flight = batch;
                batch += 1;
                let sender = std::thread::spawn(move || {
                    let body: String = (in_flight * 100..in_flight * 100 + 100)
                        .map(|v| {
                            format!("cpu,host=h{} v={v}i {}\n", in_flight % 7, 1_767_225_600 + v)
                        })
                        .collect();
                    harness::request(
                        addr,
                        "POST",
                        "/write?db=c&precision=s&ack=majority",
                        &[],
                        body.as_bytes(),
                    )
                    .is_ok_and(|response| response.status == 204)
                });
                nodes[index].kill9();
                if sender.join().unwrap() {
                    acked.insert(in_flight);
                }
            } else {
                nodes[index].kill9();
            }
            down = Some((index, Instant::now()));
        }
        let target = next(3) as usize;
        if down.is_some_and(|(index, _)| index == target) {
            continue;
        }
        if send_batch(&nodes[target], batch) {
            acked.insert(batch);
        }
        batch += 1;
    }
    if let Some((index, _)) = down {
        nodes[index].restart_without_waiting();
    }
    for node in nodes.iter_mut() {
        node.must_become_ready();
    }
    assert!(
        acked.len() > 20,
        "the load went on through the kills: {} acked",
        acked.len()
    );
    assert!(
        kills >= 3,
        "every role was killed at least once ({kills} kills)"
    );
    check_batches(&nodes, &acked, batch, "after the chaos run");
}

/// Sends batch `batch` to `node` with an `Idempotency-Key`; returns (status, token, replayed).
fn send_keyed(node: &Node, batch: u64, key: &str, ack: &str) -> (u16, String, bool) {
    let body: String = (batch * 100..batch * 100 + 100)
        .map(|i| format!("cpu,host=h{} v={i}i {}\n", batch % 7, 1_767_225_600 + i))
        .collect();
    let response = node.post(
        &format!("/write?db=c&precision=s&ack={ack}"),
        &[("Idempotency-Key", key)],
        body.as_bytes(),
    );
    (
        response.status,
        response
            .header("x-shale-write-token")
            .unwrap_or_default()
            .to_string(),
        response.header("x-shale-idempotent-replay") == Some("true"),
    )
}

// Ambiguous outcomes are resolved, not guessed: a write carrying an Idempotency-Key and
// retried — on the same node, on another node right away, after an ack=all timeout (503,
// stored locally) on another node, and after its origin was killed — answers the original
// outcome (same write token, `X-Shale-Idempotent-Replay`) and stores nothing twice. And a
// linearizable read on another node sees an ack=local write made just before it.
#[test]
fn idempotent_retries_on_any_node_store_nothing_twice() {
    let (_dir, mut nodes) = three_writers();
    let mut acked = std::collections::BTreeSet::new();

    let (status, token, replayed) = send_keyed(&nodes[0], 0, "k0", "majority");
    assert_eq!((status, replayed), (204, false));
    acked.insert(0);
    assert_eq!(
        send_keyed(&nodes[0], 0, "k0", "majority"),
        (204, token.clone(), true)
    );
    assert_eq!(
        send_keyed(&nodes[1], 0, "k0", "majority"),
        (204, token.clone(), true)
    );

    // A linearizable read on node 3 sees node 1's ack=local write at once.
    let (status, _, _) = send_keyed(&nodes[0], 1, "k1", "local");
    assert_eq!(status, 204);
    acked.insert(1);
    let body = serde_json::json!({ "sql": "SELECT count(*) FROM c.cpu" }).to_string();
    let response = nodes[2].post(
        "/api/v1/query",
        &[("X-Shale-Read-Consistency", "linearizable")],
        body.as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(harness::json(&response)["data"][0][0].as_u64(), Some(200));

    // ack=all with node 3 down: 503, stored locally; the retry on node 2 finds the original.
    nodes[2].kill9();
    let (status, token, _) = send_keyed(&nodes[0], 2, "k2", "all");
    assert_eq!(status, 503, "ack=all with a node down");
    assert!(!token.is_empty());
    acked.insert(2);
    assert_eq!(
        send_keyed(&nodes[1], 2, "k2", "majority"),
        (204, token, true)
    );

    // The origin is killed after acknowledging; the retry on a survivor finds the original.
    nodes[2].restart();
    nodes[2].must_become_ready();
    let (status, token, _) = send_keyed(&nodes[0], 3, "k3", "majority");
    assert_eq!(status, 204);
    acked.insert(3);
    nodes[0].kill9();
    assert_eq!(
        send_keyed(&nodes[1], 3, "k3", "majority"),
        (204, token, true)
    );
    // A fresh key on a survivor is a new write.
    assert_eq!(send_keyed(&nodes[2], 4, "k4", "majority").0, 204);
    acked.insert(4);
    nodes[0].restart();
    nodes[0].must_become_ready();
    check_batches(&nodes, &acked, 5, "after the retries");
}

// A node declared dead while it still runs (here frozen with SIGSTOP, as a long GC pause or a
// partition would silence it) has its unflushed, replicated rows taken over by a survivor.
// When it resumes it finds the fence over rows it still buffers: it must stop rather than
// flush them a second time, and its restart replays only what is its own. Every acknowledged
// row ends up counted once on every node.
#[test]
fn a_node_declared_dead_while_running_stops_and_returns_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        options.flush_age_ms = 600_000;
        options.extra_env.extend([
            ("SHALE_CLUSTER_UNHEALTHY_AFTER_MS".into(), "1000".into()),
            ("SHALE_CLUSTER_DEAD_AFTER_MS".into(), "3000".into()),
        ]);
    });
    let frozen = (0..3)
        .find(|&i| leader_of(&nodes[0]) != Some(i as u64 + 1))
        .unwrap();
    let origin = frozen as u64 + 1;
    let mut sent = 0u64;
    for batch in 0..3 {
        let (status, _, text) = write_acked(&nodes[frozen], "f", sent, 100, "majority");
        assert_eq!(status, 204, "batch {batch}: {text}");
        sent += 100;
    }
    // SAFETY: kill(2) with a live child's pid has no memory-safety preconditions.
    assert_eq!(
        unsafe { libc::kill(nodes[frozen].pid() as i32, libc::SIGSTOP) },
        0
    );
    let watcher = &nodes[(frozen + 1) % 3];
    watcher.wait_until("the frozen node's rows taken over into files", || {
        origin_file_rows(watcher, origin) == (300, 300)
    });
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(nodes[frozen].pid() as i32, libc::SIGCONT) },
        0
    );
    let status = nodes[frozen].must_exit();
    assert!(!status.success(), "a fenced node stops with an error");
    assert!(
        nodes[frozen].log().contains("took over this shard's rows"),
        "the node says why it stopped"
    );
    nodes[frozen].restart();
    nodes[frozen].must_become_ready();
    for node in &nodes {
        wait_exact(node, sent, "every node counts the taken-over rows once");
    }
    let (status, _, text) = write_acked(&nodes[frozen], "g", sent, 100, "majority");
    assert_eq!(status, 204, "{text}");
    sent += 100;
    for node in &nodes {
        wait_exact(node, sent, "and the rows written after the return");
    }
}

// A member that is down while its peers write, flush and rotate their WAL segments resumes
// from their WALs when it returns: an origin keeps the segments a member has not stored
// (within cluster.wal_peer_retention_bytes) instead of releasing them once flushed, so the
// member's replica log continues without a gap (no reset) and holds every row.
#[test]
fn a_member_that_was_down_resumes_from_its_peers_wal() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        // Small segments rotate after a few writes and flushes (200 ms) would release them;
        // a small ring makes a returning member read older groups from the WAL on disk.
        options.extra_env.extend([
            ("SHALE_WAL_SEGMENT_BYTES_MAX".into(), "8192".into()),
            ("SHALE_CLUSTER_WAL_SHIP_RING_BYTES".into(), "4096".into()),
        ]);
    });
    let mut sent = 0u64;
    let (status, _, text) = write_acked(&nodes[0], "a", sent, 100, "all");
    assert_eq!(status, 204, "{text}");
    sent += 100;
    nodes[2].kill9();
    for _ in 0..10 {
        let (status, _, text) = write_acked(&nodes[0], "b", sent, 100, "majority");
        assert_eq!(status, 204, "{text}");
        sent += 100;
    }
    nodes[0].wait_until("node 1 flushed its rows", || {
        nodes[0].manifest_rows("c") == sent
    });
    nodes[2].restart();
    nodes[2].must_become_ready();
    wait_exact(&nodes[2], sent, "the returning member holds every row");
    nodes[2].wait_until("node 1's wal position on node 3", || {
        let positions = admin(&nodes[2], "GET", "/api/v1/cluster/local", "").1;
        positions["node"]["replica_logs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|log| log["origin"] == 1 && log["durable_lsn"].as_u64() >= Some(11))
    });
    assert!(
        !nodes[2].log().contains("replica log reset"),
        "node 3's replica of node 1 restarted at a gap instead of resuming"
    );
}

// ---- Anti-entropy (issue 10) ----

/// Walker settings for tests: a cheap pass every 200 ms, scrub cycles of about a second, lost
/// files asked about again every half second.
fn fast_walker(options: &mut NodeOptions) {
    for (name, value) in [
        ("SHALE_ANTIENTROPY_CHEAP_PASS_INTERVAL_MS", "200"),
        ("SHALE_ANTIENTROPY_SCRUB_CYCLE_TARGET_S", "1"),
        ("SHALE_ANTIENTROPY_SCRUB_MB_PER_S", "50"),
        ("SHALE_ANTIENTROPY_LOST_RECHECK_MS", "500"),
    ] {
        options.extra_env.push((name.into(), value.into()));
    }
}

/// `GET /api/v1/cluster/antientropy` of a node: the walker's status.
fn walker_status(node: &Node) -> serde_json::Value {
    let (code, answer) = admin(node, "GET", "/api/v1/cluster/antientropy", "");
    assert_eq!(code, 200, "{answer}");
    answer["antientropy"].clone()
}

/// Writes one row of `host` in each of `hours` consecutive UTC hours from 2026-01-01 on
/// `node`, in one request: one flush, one file per hour.
fn write_hours(node: &Node, host: &str, hours: u64, rows_per_hour: u64) {
    let body: String = (0..hours)
        .flat_map(|hour| {
            (0..rows_per_hour).map(move |i| {
                format!(
                    "cpu,host={host} v={}i {}\n",
                    hour * 1000 + i,
                    1_767_225_600 + hour * 3600 + i
                )
            })
        })
        .collect();
    let response = node.post("/write?db=c&precision=s", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
}

/// Flips one bit of the byte at `offset` (from the end when negative) of a file.
fn flip_byte(path: &Path, offset: i64) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = if offset < 0 {
        bytes.len() - offset.unsigned_abs() as usize
    } else {
        offset as usize
    };
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// Waits until `node`'s manifest lists `count` files of database c, and answers them.
fn wait_cpu_files(node: &Node, count: usize) -> Vec<(String, u64, String)> {
    node.wait_until(&format!("{count} files registered"), || {
        cpu_files(node).len() == count
    });
    cpu_files(node)
}

/// The manifest's files of c.cpu on `node`, in path order: (path relative, size, blake3).
fn cpu_files(node: &Node) -> Vec<(String, u64, String)> {
    let mut files: Vec<(String, u64, String)> = node
        .manifest_files()
        .iter()
        .filter(|f| f["database"] == "c")
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["size_bytes"].as_u64().unwrap(),
                f["blake3_hex"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Whether `node` holds `path` byte-identical to the manifest's blake3.
fn holds_intact(node: &Node, path: &str, blake3_hex: &str) -> bool {
    std::fs::read(node.data_dir.join(path))
        .is_ok_and(|bytes| blake3::hash(&bytes).to_hex().as_str() == blake3_hex)
}

// Damage of every kind on one node and on two nodes at once is found and repaired without
// anyone asking: a deleted and a truncated file (cheap pass), a flipped byte in a Parquet
// footer and one in a data page (deep scrub), and one file flipped on the origin and on a
// second node (the origin's own repair first meets the other damaged copy, which serves bad
// bytes and is told so). Each comes back byte-identical to the manifest's blake3, the metrics
// count what happened, and no query ever sees fewer rows than were written.
#[test]
fn damaged_files_are_found_and_repaired_from_a_good_peer() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let nodes = start_three_writers_with(dir.path(), &certs, &members(3), fast_walker);
    write_hours(&nodes[0], "a", 6, 50);
    let files = wait_cpu_files(&nodes[0], 6);
    wait_all_hold_every_file(&nodes, 6, "every node holds the six files");

    let damaged_at = Instant::now();
    let on = |node: &Node, index: usize| node.data_dir.join(&files[index].0);
    std::fs::remove_file(on(&nodes[1], 0)).unwrap();
    let truncated = std::fs::OpenOptions::new()
        .write(true)
        .open(on(&nodes[1], 1))
        .unwrap();
    truncated.set_len(files[1].1 / 2).unwrap();
    drop(truncated);
    // Parquet ends with the footer, its 4-byte length and "PAR1": byte -12 is in the footer.
    flip_byte(&on(&nodes[1], 2), -12);
    // Data pages follow the leading "PAR1".
    flip_byte(&on(&nodes[1], 3), 40);
    flip_byte(&on(&nodes[0], 4), 40);
    flip_byte(&on(&nodes[1], 4), 40);

    for (node, index) in [(1, 0), (1, 1), (1, 2), (1, 3), (0, 4), (1, 4)] {
        let (path, _, blake3_hex) = &files[index];
        nodes[node].wait_until(&format!("node {} repairs {path}", node + 1), || {
            holds_intact(&nodes[node], path, blake3_hex)
        });
    }
    let repaired_in = damaged_at.elapsed();
    eprintln!("damage to repair of six files: {repaired_in:?}");
    nodes[1].wait_until("node 2 has no damage left", || {
        walker_status(&nodes[1])["files_damaged"] == 0
    });
    let status = walker_status(&nodes[1]);
    assert_eq!(status["files_missing_total"], 1, "{status}");
    assert_eq!(status["files_wrong_size_total"], 1, "{status}");
    assert_eq!(status["files_corrupt_total"], 3, "{status}");
    assert_eq!(status["files_repaired_total"], 5, "{status}");
    // The truncated and the three corrupt copies were set aside; the deleted one had nothing.
    assert_eq!(status["files_quarantined_total"], 4, "{status}");
    assert_eq!(
        nodes[1].metric("shale_antientropy_files_repaired_total"),
        5.0
    );
    assert!(nodes[1].log().contains("repaired damaged file"));
    nodes[0].wait_until("node 1 repaired its copy", || {
        walker_status(&nodes[0])["files_repaired_total"] == 1
    });
    // A repaired file's quarantined copy is removed: a verified copy is back.
    let quarantine = nodes[1].data_dir.join("_system/quarantine");
    let leftovers = walk_files(&quarantine);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for node in &nodes {
        assert_eq!(totals(node).0, 300, "every row on node {:?}", node.addr);
    }
    assert!(holds_every_file(&nodes[2], 6));
}

/// Regular files below `dir` (none when it does not exist).
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

// A file whose every copy is corrupt is reported lost on every node (ERROR log, metric,
// status), its damaged copies are kept in quarantine rather than replaced, and a query that
// needs it fails naming it while a query of the other hours still answers.
#[test]
fn a_file_corrupt_on_every_node_is_reported_lost() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let nodes = start_three_writers_with(dir.path(), &certs, &members(3), fast_walker);
    write_hours(&nodes[0], "a", 2, 50);
    let files = wait_cpu_files(&nodes[0], 2);
    wait_all_hold_every_file(&nodes, 2, "every node holds both files");
    let (lost_path, _, lost_blake3) = files[1].clone();
    for node in &nodes {
        flip_byte(&node.data_dir.join(&lost_path), 40);
    }
    for node in &nodes {
        node.wait_until("the file is reported lost", || {
            let status = walker_status(node);
            status["files_lost"] == 1
                && status["damaged"][0]["path"] == lost_path.as_str()
                && status["damaged"][0]["lost"] == true
        });
        assert_eq!(node.metric("shale_antientropy_files_lost"), 1.0);
        assert!(node.log().contains("file lost"), "{}", node.log());
        // Not replaced: not at its path, and the damaged copy is kept in quarantine.
        assert!(!node.data_dir.join(&lost_path).exists());
        let kept = walk_files(&node.data_dir.join("_system/quarantine"));
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_ne!(
            blake3::hash(&std::fs::read(&kept[0]).unwrap())
                .to_hex()
                .as_str(),
            lost_blake3
        );
    }
    // The second hour is 2026-01-01T01; the first hour's rows still answer.
    let query = |sql: &str| {
        let body = serde_json::json!({ "sql": sql }).to_string();
        nodes[1].post("/api/v1/query", &[], body.as_bytes())
    };
    let failed = query("SELECT count(*) FROM c.cpu");
    assert_eq!(failed.status, 503, "{}", failed.text());
    assert!(
        failed.text().contains(&lost_path) && failed.text().contains("lost"),
        "{}",
        failed.text()
    );
    let first_hour =
        query("SELECT count(*) FROM c.cpu WHERE time < TIMESTAMP '2026-01-01 00:30:00'");
    assert_eq!(first_hour.status, 200, "{}", first_hour.text());
    assert_eq!(harness::json(&first_hour)["data"][0][0], 50);
}

// A query that needs a file this node held but lost from disk waits for its repair and
// answers every row, never a silent partial answer: the walker's own passes are an hour
// apart here, so only the query's report can have the file repaired in time.
#[test]
fn a_query_waits_for_a_file_being_repaired_and_counts_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        options.extra_env.push((
            "SHALE_ANTIENTROPY_CHEAP_PASS_INTERVAL_MS".into(),
            "3600000".into(),
        ));
        options.extra_env.push((
            "SHALE_ANTIENTROPY_SCRUB_CYCLE_TARGET_S".into(),
            "3600".into(),
        ));
    });
    write_hours(&nodes[0], "a", 3, 40);
    let files = wait_cpu_files(&nodes[0], 3);
    wait_all_hold_every_file(&nodes, 3, "every node holds the three files");
    // The walker's first passes run at start-up, before the files existed; let them finish.
    nodes[1].wait_until("first cheap pass", || {
        walker_status(&nodes[1])["cheap_passes_total"].as_u64() >= Some(1)
    });
    std::fs::remove_file(nodes[1].data_dir.join(&files[1].0)).unwrap();
    assert_eq!(totals(&nodes[1]).0, 120, "the query waited for the repair");
    assert!(holds_intact(&nodes[1], &files[1].0, &files[1].2));
    assert_eq!(walker_status(&nodes[1])["files_repaired_total"], 1);
}

// A node stopped while 100 files are registered fetches all of them after its restart.
#[test]
fn a_node_stopped_while_100_files_were_registered_catches_up() {
    let (_dir, mut nodes) = three_writers();
    nodes[2].stop();
    write_hours(&nodes[0], "a", 100, 2);
    wait_cpu_files(&nodes[0], 100);
    wait_all_hold_every_file(&nodes[..2], 100, "the running nodes hold the 100 files");
    nodes[2].restart();
    wait_all_hold_every_file(&nodes[2..], 100, "the restarted node holds the 100 files");
    assert_eq!(totals(&nodes[2]).0, 200);
}

// A repair on a full disk fails without harm: the node stays up, the damaged copy stays in
// quarantine, the file stays recorded damaged (a query that needs it waits, then fails naming
// it), and once space is freed the retried repair completes byte-identical. Needs root (a
// loop-mounted filesystem as node 2's data directory); CI runs as root.
#[test]
fn a_repair_on_a_full_disk_waits_for_space_and_then_completes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("a_repair_on_a_full_disk_... needs root (loop mounts); CI runs as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let disk = harness::SmallDisk::mount_at(&dir.path().join("n2.img"), &dir.path().join("n2"), 64);
    let nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        fast_walker(options);
        options
            .extra_env
            .push(("SHALE_WAL_SEGMENT_BYTES_MAX".into(), "1048576".into()));
        options
            .extra_env
            .push(("SHALE_QUERY_TIMEOUT_MS".into(), "3000".into()));
    });
    // One file of a few hundred kilobytes: values that do not compress.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let body: String = (0..40_000u64)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            format!("big,host=a r={} {}\n", state >> 11, 1_767_225_600_000 + i)
        })
        .collect();
    let response = nodes[0].post("/write?db=d&precision=ms", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    nodes[0].wait_until("the file is registered", || {
        nodes[0].manifest_files().len() == 1
    });
    let file = nodes[0].manifest_files()[0].clone();
    let (path, size, blake3_hex) = (
        file["path"].as_str().unwrap().to_string(),
        file["size_bytes"].as_u64().unwrap(),
        file["blake3_hex"].as_str().unwrap().to_string(),
    );
    assert!(
        size > 256 << 10,
        "the file is big enough to not fit: {size}"
    );
    wait_all_hold_every_file(&nodes, 1, "every node holds the file");

    // Fill node 2's disk to within 64 KiB, then damage its copy.
    let filler = disk.mount_point.join("filler");
    let free = disk.free_bytes();
    let fill = std::fs::File::create(&filler).unwrap();
    fill.set_len(free - (64 << 10)).unwrap();
    // set_len makes a sparse file; writing it makes the blocks real.
    {
        use std::io::Write;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &fill);
        let block = vec![0xa5u8; 1 << 20];
        let mut left = free - (64 << 10);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if writer.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = writer.flush();
    }
    let _ = fill.sync_all();
    drop(fill);
    assert!(
        disk.free_bytes() < size,
        "free {} size {size}",
        disk.free_bytes()
    );
    flip_byte(&nodes[1].data_dir.join(&path), 40);

    nodes[1].wait_until("the repair fails for lack of space", || {
        let status = walker_status(&nodes[1]);
        status["files_damaged"] == 1
            && status["files_quarantined_total"] == 1
            && nodes[1].log().contains("No space left on device")
    });
    let status = walker_status(&nodes[1]);
    assert_eq!(
        status["files_lost"], 0,
        "other members hold good copies: {status}"
    );
    assert!(!nodes[1].data_dir.join(&path).exists());
    assert_eq!(nodes[1].must_get("/health").status, 200);
    let body = serde_json::json!({ "sql": "SELECT count(*) FROM d.big" }).to_string();
    let waited = nodes[1].post("/api/v1/query", &[], body.as_bytes());
    assert_eq!(waited.status, 503, "{}", waited.text());
    assert!(waited.text().contains(&path), "{}", waited.text());

    std::fs::remove_file(&filler).unwrap();
    nodes[1].wait_until("the repair completes once space is free", || {
        holds_intact(&nodes[1], &path, &blake3_hex)
    });
    assert_eq!(nodes[1].must_count("SELECT count(*) FROM d.big"), 40_000);
    assert_eq!(walker_status(&nodes[1])["files_repaired_total"], 1);
    drop(nodes);
    drop(disk);
}

/// `POST /api/v1/cluster/verify/{database}[?deep=true]` on `node`: the status and the report.
fn verify(node: &Node, database: &str, deep: bool) -> (u16, serde_json::Value) {
    let path = format!("/api/v1/cluster/verify/{database}?deep={deep}");
    admin(node, "POST", &path, "")
}

/// `shale cluster verify <database> --target <node>`: whether it exited 0, and its output.
fn verify_cli(node: &Node, database: &str) -> (bool, String) {
    let target = format!("http://{}", node.addr);
    let args = [
        "cluster", "verify", database, "--target", &target, "--token", TOKEN,
    ];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(args)
        .output()
        .expect("run shale");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The `nodes` entry of node `id` in a verify report.
fn verified_node(report: &serde_json::Value, id: u64) -> &serde_json::Value {
    report["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == id))
        .unwrap_or_else(|| panic!("node {id} not in the report: {report}"))
}

// Verification across peers (issue 10): on a healthy three-node cluster every node is
// CONSISTENT with the manifest's file count and bytes; after one file is deleted on node 2 and
// one byte of another is flipped on node 3 (same size), a plain verify names exactly the
// deleted file as MISSING on node 2 (cached hashes cannot see the flip), a deep verify also
// names the flipped file on node 3 with the blake3 of its bytes, and no other file is named.
// The CLI exits 0 on the healthy cluster and non-zero on the damaged one; an unknown database
// is a 404; a killed peer is an ERROR entry while the others still answer. The anti-entropy
// walker is paused so that it leaves the damage in place.
#[test]
fn verify_names_exactly_the_damaged_files_on_each_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), |options| {
        options
            .extra_env
            .push(("SHALE_ANTIENTROPY_PAUSED".into(), "true".into()));
    });
    // Four hours of cpu on node 1, two of mem on node 2: six files, one per hour partition.
    let hours = |measurement: &str, count: u64| -> String {
        (0..count)
            .map(|h| format!("{measurement},host=a v={h}i {}\n", 1_767_225_600 + h * 3600))
            .collect()
    };
    for (node, body) in [(&nodes[0], hours("cpu", 4)), (&nodes[1], hours("mem", 2))] {
        let response = node.post("/write?db=v&precision=s", &[], body.as_bytes());
        assert_eq!(response.status, 204, "{}", response.text());
    }
    nodes[0].wait_until("six files in the manifest", || {
        nodes[0].manifest_files().len() == 6
    });
    wait_all_hold_every_file(&nodes, 6, "every file on every node");
    let mut files = nodes[0].manifest_files();
    files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let total_bytes: u64 = files
        .iter()
        .map(|f| f["size_bytes"].as_u64().unwrap())
        .sum();

    // Each node records a file held just after it lands on disk: poll until all three have.
    let mut healthy = serde_json::Value::Null;
    nodes[0].wait_until("a consistent verify", || {
        let (code, report) = verify(&nodes[0], "v", false);
        assert_eq!(code, 200, "{report}");
        healthy = report;
        healthy["status"] == "CONSISTENT"
    });
    eprintln!(
        "verify (consistent, 6 files, 3 nodes): {} ms, {} bytes exchanged",
        healthy["elapsed_ms"], healthy["bytes_exchanged"]
    );
    for id in 1..=3 {
        let node = verified_node(&healthy, id);
        assert_eq!(node["status"], "CONSISTENT", "{healthy}");
        assert_eq!(node["files_compared"], 6, "{healthy}");
        assert_eq!(node["bytes_compared"], total_bytes, "{healthy}");
        assert_eq!(node["behind"], false, "{healthy}");
        assert_eq!(node["mismatches"], serde_json::json!([]), "{healthy}");
    }
    assert!(
        healthy["bytes_exchanged"].as_u64().unwrap() > 0,
        "{healthy}"
    );
    let (ok, output) = verify_cli(&nodes[1], "v");
    assert!(ok, "{output}");
    assert!(output.contains("CONSISTENT"), "{output}");

    let (code, answer) = verify(&nodes[0], "nosuch", false);
    assert_eq!(code, 404, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("nosuch"),
        "{answer}"
    );

    // Damage: node 2 loses its first file, node 3 gets one byte of its fourth flipped.
    let deleted = &files[0];
    let flipped = &files[3];
    std::fs::remove_file(nodes[1].data_dir.join(deleted["path"].as_str().unwrap())).unwrap();
    let flipped_path = nodes[2].data_dir.join(flipped["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&flipped_path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&flipped_path, &bytes).unwrap();
    let flipped_blake3 = blake3::hash(&bytes).to_hex().to_string();
    let mismatch = |file: &serde_json::Value, found: &str| {
        serde_json::json!([{
            "path": file["path"],
            "expected_blake3": file["blake3_hex"],
            "found": found,
        }])
    };

    let (code, plain) = verify(&nodes[0], "v", false);
    assert_eq!(code, 200, "{plain}");
    assert_eq!(plain["status"], "INCONSISTENT", "{plain}");
    assert_eq!(verified_node(&plain, 1)["status"], "CONSISTENT", "{plain}");
    let two = verified_node(&plain, 2);
    assert_eq!(two["status"], "INCONSISTENT", "{plain}");
    assert_eq!(two["mismatches"], mismatch(deleted, "MISSING"), "{plain}");
    assert_eq!(two["files_compared"], 6, "{plain}");
    assert_eq!(verified_node(&plain, 3)["status"], "CONSISTENT", "{plain}");

    let (code, deep) = verify(&nodes[0], "v", true);
    assert_eq!(code, 200, "{deep}");
    eprintln!(
        "verify deep (damaged, 6 files, 3 nodes): {} ms, {} bytes exchanged",
        deep["elapsed_ms"], deep["bytes_exchanged"]
    );
    assert_eq!(deep["deep"], true, "{deep}");
    assert_eq!(deep["status"], "INCONSISTENT", "{deep}");
    assert_eq!(verified_node(&deep, 1)["status"], "CONSISTENT", "{deep}");
    assert_eq!(
        verified_node(&deep, 2)["mismatches"],
        mismatch(deleted, "MISSING"),
        "{deep}"
    );
    let three = verified_node(&deep, 3);
    assert_eq!(three["status"], "INCONSISTENT", "{deep}");
    assert_eq!(
        three["mismatches"],
        mismatch(flipped, &flipped_blake3),
        "{deep}"
    );
    let disagreed: Vec<&str> = deep["disagreements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        disagreed,
        [
            deleted["path"].as_str().unwrap(),
            flipped["path"].as_str().unwrap()
        ],
        "{deep}"
    );

    let (ok, output) = verify_cli(&nodes[0], "v");
    assert!(!ok, "the CLI must fail on a damaged cluster: {output}");
    assert!(
        output.contains(deleted["path"].as_str().unwrap()),
        "{output}"
    );
    assert!(output.contains("MISSING"), "{output}");

    // A peer that cannot answer is an ERROR entry; the others are still verified.
    nodes[2].kill9();
    let (code, partial) = verify(&nodes[0], "v", false);
    assert_eq!(code, 200, "{partial}");
    let three = verified_node(&partial, 3);
    assert_eq!(three["status"], "ERROR", "{partial}");
    assert!(
        three["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{partial}"
    );
    assert_eq!(
        verified_node(&partial, 1)["status"],
        "CONSISTENT",
        "{partial}"
    );
    assert_eq!(
        verified_node(&partial, 2)["mismatches"],
        mismatch(deleted, "MISSING"),
        "{partial}"
    );
}

// The deep scrub holds its bandwidth limit: on a one-node cluster with a 1 MB/s cap and a few
// megabytes of files, the bytes it re-hashes over a few seconds stay within the cap (plus one
// file, since a file is paced from its own start), and it does run (at least half the cap).
#[test]
fn the_deep_scrub_holds_its_bandwidth_limit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 1);
    let member = &members(1)[0];
    let mut options = member_options(&certs, member, true, None, 0, "writer");
    options.extra_env.extend([
        ("SHALE_ANTIENTROPY_SCRUB_MB_PER_S".into(), "1".into()),
        ("SHALE_ANTIENTROPY_SCRUB_CYCLE_TARGET_S".into(), "1".into()),
        (
            "SHALE_ANTIENTROPY_CHEAP_PASS_INTERVAL_MS".into(),
            "200".into(),
        ),
    ]);
    let node = Node::start(&dir.path().join("n1"), options);
    // Ten files of about 300 KB each: values that do not compress.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let body: String = (0..10u64)
        .flat_map(|hour| (0..30_000u64).map(move |i| (hour, i)))
        .map(|(hour, i)| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let ms = 1_767_225_600_000 + hour * 3_600_000 + i;
            format!("big,host=a r={} {ms}\n", state >> 11)
        })
        .collect();
    let response = node.post("/write?db=d&precision=ms", &[], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
    node.wait_until("ten files registered", || node.manifest_files().len() == 10);
    let largest = node
        .manifest_files()
        .iter()
        .map(|f| f["size_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    node.wait_until("the scrub reads the new files", || {
        walker_status(&node)["bytes_verified_total"].as_u64() > Some(largest)
    });
    let verified = || {
        walker_status(&node)["bytes_verified_total"]
            .as_u64()
            .unwrap() as f64
    };
    let (before, started) = (verified(), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let (read, elapsed) = (verified() - before, started.elapsed().as_secs_f64());
    let rate = read / elapsed;
    eprintln!("deep scrub: {read} bytes in {elapsed:.2} s = {rate:.0} B/s against a 1 MB/s cap");
    assert!(
        read <= 1_000_000.0 * elapsed + largest as f64,
        "{read} bytes in {elapsed:.2} s exceeds 1 MB/s plus one file of {largest}"
    );
    assert!(rate >= 500_000.0, "the scrub runs: {rate:.0} B/s");
    assert_eq!(walker_status(&node)["scrub_bytes_per_second"], 1_000_000);
}

// A node that receives bytes not matching the manifest tells the source, which deep-checks its
// own copy at once (here its walker is paused, so only that message can make it look), and a
// file with no good copy among the members that answer is not called lost while a member is
// unreachable: "lost" is decided by asking every member. Once the third node is back, both
// damaged copies are repaired from it.
#[test]
fn a_source_that_served_bad_bytes_is_told_and_checks_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 3);
    let mut nodes = start_three_writers_with(dir.path(), &certs, &members(3), fast_walker);
    write_hours(&nodes[0], "a", 1, 50);
    let (path, _, blake3_hex) = wait_cpu_files(&nodes[0], 1)[0].clone();
    wait_all_hold_every_file(&nodes, 1, "every node holds the file");
    let (code, _) = admin(&nodes[1], "POST", "/api/v1/cluster/antientropy/pause", "");
    assert_eq!(code, 200);
    assert_eq!(walker_status(&nodes[1])["paused"], true);
    nodes[2].stop();
    flip_byte(&nodes[1].data_dir.join(&path), 40);
    flip_byte(&nodes[0].data_dir.join(&path), 40);

    // Node 1's scrub finds its copy corrupt. Node 2 hears of it either as the source that
    // served node 1's repair bad bytes or as a member asked about its copy (whichever comes
    // first): both make it deep-check its copy at once, and it sets the copy aside although
    // its walker is paused.
    nodes[1].wait_until("node 2 found its copy corrupt when told", || {
        let status = walker_status(&nodes[1]);
        status["files_corrupt_total"] == 1 && status["files_quarantined_total"] == 1
    });
    assert!(walker_status(&nodes[1])["checks_answered_total"].as_u64() >= Some(1));
    // Node 3 is down: no member that answered holds a good copy, but that is not "lost".
    nodes[0].wait_until("node 1 asked the members", || {
        nodes[0]
            .log()
            .contains("no good copy among the members that answered")
    });
    assert_eq!(walker_status(&nodes[0])["files_lost"], 0);
    assert_eq!(walker_status(&nodes[1])["files_lost"], 0);

    nodes[2].restart();
    for node in &nodes[..2] {
        node.wait_until("repaired from node 3", || {
            holds_intact(node, &path, &blake3_hex)
        });
    }
    let (code, _) = admin(&nodes[1], "POST", "/api/v1/cluster/antientropy/resume", "");
    assert_eq!(code, 200);
    assert_eq!(walker_status(&nodes[1])["paused"], false);
    for node in &nodes {
        assert_eq!(totals(node).0, 50);
    }
}

/// Sets a file's modification time `seconds` into the past.
fn age_file(path: &Path, seconds: i64) {
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let past = libc::timespec {
        tv_sec: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - seconds) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [past, past];
    // SAFETY: a valid NUL-terminated path and two initialised timespecs.
    let done = unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(done, 0, "utimensat {}", path.display());
}

// A file on disk that no manifest version references is reported at once and deleted only
// after the grace period; files under _system, partial fetches, files a pending flush journal
// names and young files are never orphans.
#[test]
fn orphans_are_reported_then_deleted_after_their_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), 1);
    let member = &members(1)[0];
    let mut options = member_options(&certs, member, true, None, 0, "writer");
    fast_walker(&mut options);
    options
        .extra_env
        .push(("SHALE_ANTIENTROPY_ORPHAN_GRACE_MS".into(), "3000".into()));
    let node = Node::start(&dir.path().join("n1"), options);
    write_hours(&node, "a", 1, 10);
    wait_cpu_files(&node, 1);
    let data = &node.data_dir;
    let place = |relative: &str, old: bool| {
        let path = data.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not a manifest file").unwrap();
        if old {
            age_file(&path, 3600);
        }
        path
    };
    let stray = place("c/cpu/2026/01/01/07/stray.parquet", true);
    let young = place("c/cpu/2026/01/01/07/young.parquet", false);
    let partial = place("c/cpu/2026/01/01/07/fetching.parquet.partial", true);
    let system = place("_system/some-state", true);
    let journaled = place("c/cpu/2026/01/01/07/journaled.parquet", true);
    let journal = data.join("_system/pending/shard-0/c-cpu-test.json");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    std::fs::write(
        &journal,
        serde_json::json!([{ "path": "c/cpu/2026/01/01/07/journaled.parquet" }]).to_string(),
    )
    .unwrap();

    node.wait_until("the stray file is reported", || {
        let status = walker_status(&node);
        status["orphans"] == 1 && status["orphan_paths"][0] == "c/cpu/2026/01/01/07/stray.parquet"
    });
    assert!(stray.exists(), "not deleted before its grace period");
    node.wait_until("the stray file is deleted after its grace period", || {
        !stray.exists() && walker_status(&node)["orphans_deleted_total"] == 1
    });
    for kept in [&young, &partial, &system, &journaled] {
        assert!(kept.exists(), "{} kept", kept.display());
    }
    assert_eq!(node.must_count("SELECT count(*) FROM c.cpu"), 10);
    // The journal names no real flush: remove it so no restart tries to register it.
    std::fs::remove_file(&journal).unwrap();
}
