//! Integration tests of the QUIC transport and the Raft network over it: real endpoints on
//! 127.0.0.1 with certificates from a fresh cluster CA, each node on its own thread and tokio
//! current-thread runtime like the control thread.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use openraft::SnapshotPolicy;
use quinn::RecvStream;
use quinn::SendStream;
use shale_replication::log_store::LogStore;
use shale_replication::raft_types::ClusterNode;
use shale_replication::raft_types::NodeId;
use shale_replication::raft_types::Raft;
use shale_replication::state_machine::ManifestStateMachine;
use shale_replication::transport::raft_network::QuicNetwork;
use shale_replication::transport::raft_network::RaftServer;
use shale_replication::transport::tls;
use shale_replication::transport::tls::CaMaterial;
use shale_replication::transport::CallHandler;
use shale_replication::transport::ClusterTls;
use shale_replication::transport::StreamHandler;
use shale_replication::transport::StreamKind;
use shale_replication::transport::Transport;
use shale_replication::transport::TransportConfig;
use shale_replication::transport::TransportError;
use shale_replication::ManifestCommand;
use shale_replication::NodeState;

const CLUSTER: &str = "alpha";
const WAIT_MAX: Duration = Duration::from_secs(20);

fn node_tls(ca: &CaMaterial, cluster_id: &str, node_id: NodeId) -> ClusterTls {
    let node = tls::issue_node_cert(ca, cluster_id, node_id, &[], &[]).unwrap();
    ClusterTls::new(cluster_id, node_id, ca.cert_pem.clone(), node).unwrap()
}

fn admit_ids(ids: &[NodeId]) -> tls::Admit {
    let ids: BTreeSet<NodeId> = ids.iter().copied().collect();
    Arc::new(move |id| ids.contains(&id))
}

fn bind(tls: ClusterTls, admit: &[NodeId]) -> Transport {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Transport::bind(any, tls, admit_ids(admit), TransportConfig::default()).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Answers a call with the caller's node id and the request, and counts the calls it served.
#[derive(Default)]
struct Echo {
    served: AtomicU64,
}

impl CallHandler for Echo {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> {
        self.served.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if request == b"fail" {
                return Err("asked to fail".to_owned());
            }
            let mut answer = format!("from {peer}: ").into_bytes();
            answer.extend_from_slice(&request);
            Ok(answer)
        })
    }
}

#[test]
fn calls_to_a_silent_peer_fail_fast_once_a_dial_has_failed() {
    // A killed peer answers nothing: a dial to it ends only at the connect timeout, which is
    // longer than a Raft heartbeat's call timeout. The dial must not be cancelled with each
    // short call (calls would then time out forever and never report the peer unreachable, so
    // openraft never backs off): once the one dial has failed, calls fail at once as
    // unreachable until the back-off passes.
    runtime().block_on(async {
        let ca = tls::generate_ca(CLUSTER).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = TransportConfig {
            connect_timeout: Duration::from_millis(400),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5),
            ..TransportConfig::default()
        };
        let a = Transport::bind(any, node_tls(&ca, CLUSTER, 1), admit_ids(&[2]), config).unwrap();
        // A bound UDP socket that never answers: like a peer that is gone.
        let silent = std::net::UdpSocket::bind(any).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let short = Duration::from_millis(100);
        let started = Instant::now();
        let unreachable = loop {
            let result = a
                .call(
                    2,
                    silent_addr,
                    StreamKind::RaftForward,
                    b"x".to_vec(),
                    short,
                )
                .await;
            match result {
                Err(TransportError::Timeout { .. }) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(3),
                        "calls still time out {:?} after the first dial began",
                        started.elapsed()
                    );
                }
                Err(error) => break error,
                Ok(_) => panic!("a silent peer answered"),
            }
        };
        assert!(unreachable.is_unreachable(), "{unreachable}");
        // While backing off, a call fails without waiting at all.
        let quick = Instant::now();
        let again = a
            .call(
                2,
                silent_addr,
                StreamKind::RaftForward,
                b"x".to_vec(),
                short,
            )
            .await;
        assert!(
            matches!(again, Err(TransportError::BackingOff { .. })),
            "{again:?}"
        );
        assert!(quick.elapsed() < short, "{:?}", quick.elapsed());
    });
}

#[test]
fn call_round_trip_names_the_caller_and_refuses_unknown_headers() {
    // A call reaches the handler with the caller's node id taken from its certificate and comes
    // back intact; handler errors, missing handlers, unknown versions and kinds are reported as
    // such, not as garbage or hangs.
    runtime().block_on(async {
        let ca = tls::generate_ca(CLUSTER).unwrap();
        let a = bind(node_tls(&ca, CLUSTER, 1), &[2]);
        let b = bind(node_tls(&ca, CLUSTER, 2), &[1]);
        let echo = Arc::new(Echo::default());
        b.set_call_handler(StreamKind::RaftForward, echo.clone());
        let b_addr = b.local_addr().unwrap();
        let timeout = Duration::from_secs(5);

        let answer = a
            .call(2, b_addr, StreamKind::RaftForward, b"hello".to_vec(), timeout)
            .await
            .unwrap();
        assert_eq!(answer, b"from 1: hello");
        // A second call reuses the cached connection.
        let big = vec![7u8; 1 << 20];
        let answer = a
            .call(2, b_addr, StreamKind::RaftForward, big.clone(), timeout)
            .await
            .unwrap();
        assert!(answer.starts_with(b"from 1: ") && answer[8..] == big[..]);

        let failed = a
            .call(2, b_addr, StreamKind::RaftForward, b"fail".to_vec(), timeout)
            .await;
        assert!(
            matches!(&failed, Err(TransportError::Remote { message, .. }) if message == "asked to fail"),
            "{failed:?}"
        );
        let unserved = a
            .call(2, b_addr, StreamKind::RaftVote, b"x".to_vec(), timeout)
            .await;
        assert!(
            matches!(&unserved, Err(e @ TransportError::Refused { status: 3, .. }) if e.is_unreachable()),
            "{unserved:?}"
        );
        assert_eq!(echo.served.load(Ordering::Relaxed), 3);

        // Raw streams with a bad header, dialed with node 1's credentials.
        let client_tls = node_tls(&ca, CLUSTER, 1).client_config().unwrap();
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
        let mut raw = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        raw.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
        let connection = raw
            .connect(b_addr, &tls::node_name(CLUSTER, 2))
            .unwrap()
            .await
            .unwrap();
        for (header, status) in [([9u8, 4u8], 1u8), ([1, 200], 2)] {
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(&header).await.unwrap();
            send.finish().unwrap();
            let answer = recv.read_to_end(4096).await.unwrap();
            assert_eq!(answer[0], status, "{:?}", String::from_utf8_lossy(&answer));
        }
        assert_eq!(echo.served.load(Ordering::Relaxed), 3);
        raw.close(0u32.into(), b"");
        a.shutdown().await;
        b.shutdown().await;
    });
}

#[test]
fn certificates_outside_the_cluster_are_refused() {
    // Only a certificate from the cluster CA that names an admitted node of this cluster gets a
    // stream served: another CA, another cluster id, a non-admitted node id, and a server
    // presenting another cluster's name all fail, and the handler never runs for them.
    runtime().block_on(async {
        let ca = tls::generate_ca(CLUSTER).unwrap();
        let other_ca = tls::generate_ca(CLUSTER).unwrap();
        let server = bind(node_tls(&ca, CLUSTER, 2), &[1]);
        let echo = Arc::new(Echo::default());
        server.set_call_handler(StreamKind::RaftForward, echo.clone());
        let addr = server.local_addr().unwrap();

        // Each client trusts the real CA, so it is the server that has to refuse it.
        let other_ca_cert = tls::issue_node_cert(&other_ca, CLUSTER, 1, &[], &[]).unwrap();
        let other_cluster_cert = tls::issue_node_cert(&ca, "beta", 1, &[], &[]).unwrap();
        let clients = [
            (
                "certificate of another CA",
                ClusterTls {
                    cluster_id: CLUSTER.to_owned(),
                    node_id: 1,
                    ca_cert_pem: ca.cert_pem.clone(),
                    cert_pem: other_ca_cert.cert_pem,
                    key_pem: other_ca_cert.key_pem,
                },
            ),
            (
                "certificate of another cluster id",
                ClusterTls {
                    cluster_id: CLUSTER.to_owned(),
                    node_id: 1,
                    ca_cert_pem: ca.cert_pem.clone(),
                    cert_pem: other_cluster_cert.cert_pem,
                    key_pem: other_cluster_cert.key_pem,
                },
            ),
            ("node id not admitted", node_tls(&ca, CLUSTER, 3)),
            // This client dials node-2.beta, which the server's certificate does not name.
            ("server of another cluster id", node_tls(&ca, "beta", 1)),
        ];
        for (case, client_tls) in clients {
            let client = bind(client_tls, &[2]);
            let result = client
                .call(
                    2,
                    addr,
                    StreamKind::RaftForward,
                    b"hi".to_vec(),
                    Duration::from_secs(5),
                )
                .await;
            eprintln!("{case}: {result:?}");
            assert!(result.is_err(), "{case}: served");
            assert!(
                !matches!(result, Err(TransportError::Timeout { .. })),
                "{case}: refusal must be prompt, not a timeout"
            );
            client.shutdown().await;
        }
        assert_eq!(echo.served.load(Ordering::Relaxed), 0);

        // The same setup with the right certificate is served, so the refusals above are real.
        let good = bind(node_tls(&ca, CLUSTER, 1), &[2]);
        let answer = good
            .call(
                2,
                addr,
                StreamKind::RaftForward,
                b"hi".to_vec(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(answer, b"from 1: hi");
        good.shutdown().await;
        server.shutdown().await;
    });
}

/// Serves a bulk stream: reads a u64 byte count, then sends that many bytes in `chunk_bytes`
/// writes, counting in `written` what the peer's flow control let through.
struct Source {
    chunk_bytes: usize,
    written: Arc<AtomicU64>,
}

impl StreamHandler for Source {
    fn handle(
        &self,
        _peer: NodeId,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let chunk = vec![0x5au8; self.chunk_bytes];
        let written = self.written.clone();
        Box::pin(async move {
            let mut size = [0u8; 8];
            if recv.read_exact(&mut size).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(size);
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if send.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                written.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            let _ = send.finish();
            // Keep the stream until the reader has everything (or goes away).
            let _ = send.stopped().await;
        })
    }
}

/// A node on its own thread and tokio runtime, stopped by a signal.
struct NodeThread<T> {
    value: T,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl<T> NodeThread<T> {
    fn spawn<B, Fut>(body: B) -> NodeThread<T>
    where
        T: Send + 'static,
        B: FnOnce(std::sync::mpsc::SyncSender<T>, tokio::sync::oneshot::Receiver<()>) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (started, value) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::spawn(move || runtime().block_on(body(started, stopped)));
        let value = value.recv_timeout(WAIT_MAX).expect("node thread to start");
        NodeThread {
            value,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("node thread panicked");
        }
    }
}

impl<T> Drop for NodeThread<T> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

#[test]
fn calls_answer_promptly_during_a_bulk_transfer() {
    // A bulk stream must not delay Raft-sized calls to the same peer enough to threaten an
    // election: the p99 call latency during a 100 MiB transfer stays far below the election
    // timeout. The numbers are printed for the record.
    const BULK_BYTES: u64 = 100 << 20;
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let server_tls = node_tls(&ca, CLUSTER, 2);
    let mut server = NodeThread::spawn(move |started, stopped| async move {
        let transport = bind(server_tls, &[1]);
        let source = Source {
            chunk_bytes: 256 << 10,
            written: Arc::default(),
        };
        transport.set_handler(StreamKind::FileFetch, Arc::new(source));
        transport.set_call_handler(StreamKind::RaftAppend, Arc::new(Echo::default()));
        started.send(transport.local_addr().unwrap()).unwrap();
        let _ = stopped.await;
        transport.shutdown().await;
    });
    let addr = server.value;

    runtime().block_on(async {
        let client = bind(node_tls(&ca, CLUSTER, 1), &[2]);
        // Warm up the control connection so the first sample is not a handshake.
        client
            .call(2, addr, StreamKind::RaftAppend, vec![1; 64], Duration::from_secs(5))
            .await
            .unwrap();
        let bulk = {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut send, mut recv) = client.open(2, addr, StreamKind::FileFetch).await?;
                send.write_all(&BULK_BYTES.to_be_bytes()).await.unwrap();
                send.finish().unwrap();
                let started = Instant::now();
                let mut received = 0u64;
                while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                    received += chunk.bytes.len() as u64;
                }
                Ok::<_, TransportError>((received, started.elapsed()))
            })
        };
        let mut latencies = Vec::new();
        while !bulk.is_finished() {
            let sent = Instant::now();
            let answer = client
                .call(2, addr, StreamKind::RaftAppend, vec![1; 256], Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(answer.len(), 256 + "from 1: ".len());
            latencies.push(sent.elapsed());
            // Pace the calls like heartbeats rather than flooding the peer.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (received, elapsed) = bulk.await.unwrap().unwrap();
        assert_eq!(received, BULK_BYTES);
        latencies.sort();
        let p50 = percentile(&latencies, 0.5);
        let p99 = percentile(&latencies, 0.99);
        let max = *latencies.last().unwrap();
        let mb_per_s = received as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
        eprintln!(
            "bulk {} MiB in {:.2} s = {mb_per_s:.1} MiB/s; {} calls during it: p50 {:?} p99 {:?} max {:?}",
            received >> 20,
            elapsed.as_secs_f64(),
            latencies.len(),
            p50,
            p99,
            max
        );
        assert!(latencies.len() >= 10, "too few calls during the transfer");
        assert!(p99 < Duration::from_millis(100), "call p99 {p99:?} during bulk");
        client.shutdown().await;
    });
    server.stop();
}

#[test]
fn calls_answer_while_bulk_readers_stall() {
    // A fetch whose reader stalls (a slow disk) leaves its bytes unread in the receive windows.
    // Several such streams exhaust the whole connection's receive credit; Raft answers must not
    // queue behind them, so calls still complete while the bulk streams are stuck.
    const STREAMS: usize = 4;
    let config = TransportConfig {
        stream_window_bytes: 1 << 20,
        connection_window_bytes: 2 << 20,
        ..TransportConfig::default()
    };
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let server_tls = node_tls(&ca, CLUSTER, 2);
    let written = Arc::new(AtomicU64::new(0));
    let server_config = config.clone();
    let source_written = written.clone();
    let mut server = NodeThread::spawn(move |started, stopped| async move {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let transport = Transport::bind(any, server_tls, admit_ids(&[1]), server_config).unwrap();
        let source = Source {
            chunk_bytes: 4 << 10,
            written: source_written,
        };
        transport.set_handler(StreamKind::FileFetch, Arc::new(source));
        transport.set_call_handler(StreamKind::RaftAppend, Arc::new(Echo::default()));
        started.send(transport.local_addr().unwrap()).unwrap();
        let _ = stopped.await;
        transport.shutdown().await;
    });
    let addr = server.value;

    runtime().block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let client =
            Transport::bind(any, node_tls(&ca, CLUSTER, 1), admit_ids(&[2]), config).unwrap();
        // Open the bulk streams, ask each for more than its window, and never read.
        let mut stalled = Vec::new();
        for _ in 0..STREAMS {
            stalled.push(client.open(2, addr, StreamKind::FileFetch).await.unwrap());
        }
        for (send, _) in &mut stalled {
            send.write_all(&(8u64 << 20).to_be_bytes()).await.unwrap();
        }
        // The source stops once the receiver's connection credit (2 MiB) is used up.
        wait_until("the stalled streams to fill the receive window", || {
            written.load(Ordering::Relaxed) >= (2 << 20) - STREAMS as u64 * (4 << 10)
        })
        .await;
        for round in 0..20 {
            let answer = client
                .call(
                    2,
                    addr,
                    StreamKind::RaftAppend,
                    vec![1; 256],
                    Duration::from_secs(2),
                )
                .await;
            assert!(
                answer.is_ok(),
                "call {round} during stalled bulk: {answer:?}"
            );
        }
        drop(stalled);
        client.shutdown().await;
    });
    server.stop();
}

/// One Raft member: transport, log store and state machine on their own control thread.
struct Member {
    id: NodeId,
    addr: SocketAddr,
    raft: Raft,
}

fn raft_config() -> Arc<openraft::Config> {
    // Timings for three Raft nodes plus the test on two shared cores in a debug build.
    let config = openraft::Config {
        cluster_name: "transport-test".to_owned(),
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        install_snapshot_timeout: 2_000,
        // Small chunks, so the snapshot below travels in several install-snapshot calls.
        snapshot_max_chunk_size: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

fn start_member(
    id: NodeId,
    bind_addr: SocketAddr,
    dir: PathBuf,
    tls: ClusterTls,
) -> NodeThread<Member> {
    NodeThread::spawn(move |started, stopped| async move {
        let transport = Transport::bind(
            bind_addr,
            tls,
            admit_ids(&[1, 2, 3]),
            TransportConfig::default(),
        )
        .unwrap();
        let log_store = LogStore::open(&dir, 1 << 20).unwrap();
        let state_machine = ManifestStateMachine::open(&dir).unwrap();
        let raft = Raft::new(
            id,
            raft_config(),
            QuicNetwork::new(transport.clone()),
            log_store,
            state_machine,
        )
        .await
        .unwrap();
        // Peers' RPCs are served only once Raft exists; until then they see no handler.
        RaftServer::new(raft.clone()).register(&transport);
        let addr = transport.local_addr().unwrap();
        started
            .send(Member {
                id,
                addr,
                raft: raft.clone(),
            })
            .unwrap();
        let _ = stopped.await;
        raft.shutdown().await.unwrap();
        transport.shutdown().await;
    })
}

/// The leader every given member agrees on, once they do.
async fn agreed_leader(members: &[&Member], not: Option<NodeId>) -> NodeId {
    let leader = Mutex::new(None);
    wait_until("members to agree on a leader", || {
        let seen: BTreeSet<Option<NodeId>> = members
            .iter()
            .map(|m| m.raft.metrics().borrow().current_leader)
            .collect();
        match seen.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(id)] if Some(*id) != not && members.iter().any(|m| m.id == *id) => {
                *leader.lock().unwrap() = Some(*id);
                true
            }
            _ => false,
        }
    })
    .await;
    let leader = leader.lock().unwrap().unwrap();
    leader
}

async fn applied_everywhere(members: &[&Member], index: u64) {
    wait_until("members to apply the entry", || {
        members
            .iter()
            .all(|m| m.raft.metrics().borrow().last_applied.map(|id| id.index) >= Some(index))
    })
    .await;
}

fn set_state(node_id: NodeId) -> ManifestCommand {
    ManifestCommand::SetNodeState {
        node_id,
        state: NodeState::Active,
    }
}

#[test]
fn three_members_elect_replicate_fail_over_and_install_a_snapshot() {
    // openraft over real QUIC: three members elect a leader and replicate a manifest command;
    // with the leader stopped the other two elect a new one and go on committing; a member that
    // was down while the log was purged past its position catches up by a chunked snapshot.
    let ca = tls::generate_ca(CLUSTER).unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut nodes: BTreeMap<NodeId, NodeThread<Member>> = (1..=3)
        .map(|id| {
            let dir = dirs[id as usize - 1].path().to_owned();
            (id, start_member(id, any, dir, node_tls(&ca, CLUSTER, id)))
        })
        .collect();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        nodes.iter().map(|(id, n)| (*id, n.value.addr)).collect();

    runtime().block_on(async {
        let members: BTreeMap<NodeId, ClusterNode> = addrs
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    ClusterNode::new(format!("node-{id}"), addr.to_string(), ""),
                )
            })
            .collect();
        nodes[&1].value.raft.initialize(members).await.unwrap();
        let all: Vec<&Member> = nodes.values().map(|n| &n.value).collect();
        let leader = agreed_leader(&all, None).await;
        let written = nodes[&leader]
            .value
            .raft
            .client_write(set_state(1))
            .await
            .unwrap();
        applied_everywhere(&all, written.log_id.index).await;
        eprintln!("leader {leader} replicated index {}", written.log_id.index);

        // Fail-over: stop the leader; the two others elect a new one and commit.
        let started = Instant::now();
        nodes.get_mut(&leader).unwrap().stop();
        let rest: Vec<&Member> = nodes
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, n)| &n.value)
            .collect();
        let new_leader = agreed_leader(&rest, Some(leader)).await;
        let written = nodes[&new_leader]
            .value
            .raft
            .client_write(set_state(2))
            .await
            .unwrap();
        applied_everywhere(&rest, written.log_id.index).await;
        eprintln!(
            "node {new_leader} leads after {} ms and committed index {}",
            started.elapsed().as_millis(),
            written.log_id.index
        );

        // Enough entries past the snapshot policy that the log is purged beyond what the
        // stopped member has.
        let mut last = written.log_id.index;
        for round in 0..60u64 {
            let written = nodes[&new_leader]
                .value
                .raft
                .client_write(set_state(10 + round))
                .await
                .unwrap();
            last = written.log_id.index;
        }
        applied_everywhere(&rest, last).await;
        let leader_raft = nodes[&new_leader].value.raft.clone();
        wait_until("the leader to purge its log", || {
            leader_raft.metrics().borrow().purged.map(|id| id.index) > Some(last - 20)
        })
        .await;

        // Restart the stopped member at its old address with its old storage.
        let dir = dirs[leader as usize - 1].path().to_owned();
        let restarted = start_member(leader, addrs[&leader], dir, node_tls(&ca, CLUSTER, leader));
        nodes.insert(leader, restarted);
        let back = &nodes[&leader].value;
        applied_everywhere(&[back], last).await;
        let snapshot = back.raft.metrics().borrow().snapshot;
        let snapshot_bytes = std::fs::read_dir(dirs[leader as usize - 1].path())
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("snapshot-"))
            .map(|entry| entry.metadata().unwrap().len())
            .max()
            .unwrap_or(0);
        eprintln!("installed snapshot of {snapshot_bytes} bytes in chunks of 64");
        assert!(
            snapshot_bytes > 4 * 64,
            "the snapshot must take several chunks"
        );
        eprintln!("restarted node {leader} caught up to {last} with snapshot {snapshot:?}");
        assert!(
            snapshot.map(|id| id.index) > Some(written.log_id.index),
            "the restarted member must have installed a snapshot past its log"
        );
    });
    for node in nodes.values_mut() {
        node.stop();
    }
}
