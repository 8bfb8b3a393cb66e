//! File catch-up against its ceilings, on one machine: a node that lacks every file of the
//! manifest fetches them all from a peer over the QUIC transport (FileFetch protocol, written,
//! hashed and published by the `shale-fetch` sink thread, recorded in the presence index), and
//! the figures it is measured against: a raw quinn transfer of the same bytes with the same
//! transport config (one stream, and as many streams as the fetcher runs at once), the disk's
//! fdatasync'd write speed, and single-core blake3. Two diagnostic rows split the catch-up
//! path: the FileFetch protocol alone (bytes discarded) and the sink alone (bytes from memory).
//! Each phase also reports CPU ms per MB by thread role (server node, client node, sink), and
//! announces itself on stderr so a profiler can attach. While the catch-up runs, a Raft-lane call
//! (what a heartbeat is) is timed every 50 ms, and its round trip is reported.
//!
//! Run: `cargo bench -p shale-replication --bench catchup` (release). Settings from the
//! environment: `SHALE_CATCHUP_MIB` (total, default 2048), `SHALE_CATCHUP_FILE_MIB` (per file,
//! default 64), `SHALE_CATCHUP_CONCURRENCY` (files fetched at once, default the fetcher's
//! default), `SHALE_CATCHUP_UDP_BUFFER` (UDP socket buffer bytes, default the transport's),
//! `SHALE_BENCH_DIR` (default the system temporary directory). The two endpoints
//! run on their own threads with current-thread tokio runtimes, like two nodes' control threads;
//! both share this machine's cores with the sink thread and tokio's blocking pool.

use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use shale_io::sink::FileSink;
use shale_io::sink::SinkConfig;
use shale_replication::files::fetch::BoxFuture;
use shale_replication::files::fetch::Connector;
use shale_replication::files::fetch::ExpectedFile;
use shale_replication::files::fetch::FetchError;
use shale_replication::files::fetch::FileSource;
use shale_replication::files::fetch::StreamPair;
use shale_replication::files::fetch::StreamSource;
use shale_replication::files::planner::PeerInfo;
use shale_replication::files::presence::PresenceIndex;
use shale_replication::files::replicator::FetchConfig;
use shale_replication::files::replicator::ManifestWatch;
use shale_replication::files::replicator::Replicator;
use shale_replication::files::replicator::ReplicatorParts;
use shale_replication::files::serve::FetchServer;
use shale_replication::files::serve::ServeConfig;
use shale_replication::files::NodeId;
use shale_replication::transport::tls;
use shale_replication::transport::tls::ClusterTls;
use shale_replication::transport::CallHandler;
use shale_replication::transport::StreamHandler;
use shale_replication::transport::StreamKind;
use shale_replication::transport::Transport;
use shale_replication::transport::TransportConfig;
use shale_replication::version::PinRegistry;
use shale_replication::FileEntry;
use shale_replication::Manifest;
use shale_replication::ManifestCommand;
use shale_replication::ManifestVersion;

const CLUSTER: &str = "bench";
const SERVER: NodeId = 2;
const CLIENT: NodeId = 1;
const CHUNK_BYTES: usize = 1 << 20;
/// What the cluster's fetch source uses (cluster.rs).
const FETCH_CHUNK_BYTES: usize = 1 << 20;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(50);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills `buffer` with incompressible bytes quickly (xorshift64).
fn fill(buffer: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    for chunk in buffer.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Datagrams the kernel dropped because a UDP socket's receive buffer was full (all sockets):
/// on loopback the only loss QUIC sees, and it makes the congestion controller back off.
fn udp_receive_buffer_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// CPU time (ms) used so far by this process's threads, by role: the server node's and the
/// client node's control threads, the sink thread, and tokio's blocking pools (the server reads
/// files there). A thread that exits takes its share with it; none does during a phase.
fn cpu_ms_by_role() -> std::collections::BTreeMap<&'static str, f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut roles = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return roles;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        // After the name: state is field 3, utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        let role = match name {
            "bench-server" => "server node",
            name if name.starts_with("shale-fetch") => "sink",
            name if name.starts_with("tokio-runtime") => "blocking pools",
            _ => "client node",
        };
        *roles.entry(role).or_insert(0.0) += ticks * 1000.0 / ticks_per_s;
    }
    roles
}

/// CPU ms per MB moved since `before`, in total and by role.
fn cpu_per_mb(before: &std::collections::BTreeMap<&'static str, f64>, bytes: u64) -> String {
    let after = cpu_ms_by_role();
    let mb = bytes as f64 / 1e6;
    let used = |role: &str| after.get(role).unwrap_or(&0.0) - before.get(role).unwrap_or(&0.0);
    let total: f64 = after.keys().map(|role| used(role)).sum();
    let parts: Vec<String> = after
        .keys()
        .map(|role| format!("{role} {:.2}", used(role) / mb))
        .collect();
    format!("{:.2} ({})", total / mb, parts.join(", "))
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn node_tls(ca: &tls::CaMaterial, node_id: NodeId) -> ClusterTls {
    let node = tls::issue_node_cert(ca, CLUSTER, node_id, &[], &[]).expect("issue certificate");
    ClusterTls::new(CLUSTER, node_id, ca.cert_pem.clone(), node).expect("load certificate")
}

fn bind(tls: ClusterTls, peer: NodeId) -> Transport {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    Transport::bind(
        any,
        tls,
        Arc::new(move |id| id == peer),
        TransportConfig {
            udp_buffer_bytes: env_usize(
                "SHALE_CATCHUP_UDP_BUFFER",
                TransportConfig::default().udp_buffer_bytes,
            ),
            ..TransportConfig::default()
        },
    )
    .expect("bind transport")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Raw bulk stream: the request is a byte count; the answer is that many bytes from memory.
struct RawSource {
    chunk: bytes::Bytes,
}

impl StreamHandler for RawSource {
    fn handle(
        &self,
        _peer: NodeId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let chunk = self.chunk.clone();
        Box::pin(async move {
            let mut length = [0u8; 8];
            if recv.read_exact(&mut length).await.is_err() {
                return;
            }
            let mut left = u64::from_le_bytes(length);
            while left > 0 {
                let piece = chunk.slice(..(left.min(chunk.len() as u64) as usize));
                left -= piece.len() as u64;
                if send.write_chunk(piece).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
            let _ = send.stopped().await;
        })
    }
}

struct FetchHandler(Arc<FetchServer>);

impl StreamHandler for FetchHandler {
    fn handle(
        &self,
        _peer: NodeId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let server = self.0.clone();
        Box::pin(async move {
            let _ = server.serve(recv, send).await;
        })
    }
}

struct Echo;

impl CallHandler for Echo {
    fn call(
        &self,
        _peer: NodeId,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        Box::pin(async move { Ok(request) })
    }
}

struct QuicConnector {
    transport: Transport,
    addr: SocketAddr,
}

impl Connector for QuicConnector {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;

    fn connect(&self, node: NodeId) -> BoxFuture<'_, Result<StreamPair<Self>, FetchError>> {
        Box::pin(async move {
            self.transport
                .open(node, self.addr, StreamKind::FileFetch)
                .await
                .map_err(|e| FetchError::Connect {
                    node,
                    message: e.to_string(),
                })
        })
    }
}

/// One published version, pinned by nothing but itself.
struct OneVersion(Arc<ManifestVersion>, PinRegistry);

impl ManifestWatch for OneVersion {
    fn current(&self) -> Arc<ManifestVersion> {
        self.0.clone()
    }

    fn changed(&self, _index: u64) -> BoxFuture<'_, bool> {
        Box::pin(std::future::pending())
    }

    fn oldest_pinned_index(&self) -> u64 {
        self.1.oldest_pinned_index().unwrap_or(self.0.index)
    }
}

fn file_entry(path: String, size_bytes: u64, blake3_hex: String, i: u64) -> FileEntry {
    FileEntry {
        path,
        size_bytes,
        blake3_hex,
        rows: 1,
        time_min_us: 0,
        time_max_us: 1,
        database: "bench".to_owned(),
        measurement: "m".to_owned(),
        origin_node: SERVER,
        shard: 0,
        lsn_first: i + 1,
        lsn_last: i + 1,
        created_at_ms: 0,
        columns_fingerprint: 0,
        taken_by: None,
    }
}

/// Writes `total_bytes` in 1 MiB writes and fdatasyncs once at the end; with `direct`, through
/// O_DIRECT (as the fetch sink writes), else through the page cache.
fn disk_write(dir: &Path, total_bytes: u64, direct: bool) -> Duration {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("disk-write");
    let layout = std::alloc::Layout::from_size_align(CHUNK_BYTES, 4096).expect("layout");
    // SAFETY: the layout has a non-zero size; the memory is freed below with the same layout.
    let pointer = unsafe { std::alloc::alloc(layout) };
    assert!(!pointer.is_null(), "allocate an aligned buffer");
    // SAFETY: `pointer` is valid for `CHUNK_BYTES` bytes and nothing else refers to it.
    let buffer = unsafe { std::slice::from_raw_parts_mut(pointer, CHUNK_BYTES) };
    fill(buffer, 99);
    let started = Instant::now();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let mut file = options.open(&path).expect("create");
    let mut left = total_bytes;
    while left > 0 {
        file.write_all(buffer).expect("write");
        left = left.saturating_sub(CHUNK_BYTES as u64);
    }
    file.sync_data().expect("fdatasync");
    let elapsed = started.elapsed();
    drop(file);
    // SAFETY: allocated above with this layout and no longer used.
    unsafe { std::alloc::dealloc(pointer, layout) };
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// Writes the source node's files; answers their manifest entries.
fn source_files(root: &Path, total_mib: usize, file_mib: usize) -> Vec<FileEntry> {
    let count = total_mib.div_ceil(file_mib).max(1);
    let mut buffer = vec![0u8; file_mib << 20];
    (0..count)
        .map(|i| {
            fill(&mut buffer, i as u64 + 1);
            let path = format!("bench/m/2026/01/01/00/file-{i:04}.parquet");
            let target = root.join(&path);
            std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
            std::fs::write(&target, &buffer).expect("write source file");
            let hash = blake3::hash(&buffer).to_hex().to_string();
            file_entry(path, buffer.len() as u64, hash, i as u64)
        })
        .collect()
}

fn main() {
    // Criterion-style filters are passed to every bench binary; this one has nothing to filter.
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // to prove it works, so a small transfer is enough there (and keeps the suite short).
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let total_mib = env_usize("SHALE_CATCHUP_MIB", if measuring { 2048 } else { 32 });
    let file_mib = env_usize("SHALE_CATCHUP_FILE_MIB", if measuring { 64 } else { 8 });
    let base = std::env::var_os("SHALE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("bench directory");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "catch-up bench: {total_mib} MiB in {file_mib} MiB files under {}; load average {}",
        base.display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    shale_io::runtime::raise_memlock_limit();

    // Single-core blake3.
    let mut buffer = vec![0u8; 256 << 20];
    fill(&mut buffer, 7);
    let started = Instant::now();
    let hash = blake3::hash(&buffer);
    let blake3_elapsed = started.elapsed();
    std::hint::black_box(hash);
    let blake3_mb_s = mb_per_s(buffer.len() as u64, blake3_elapsed);
    drop(buffer);

    let total_bytes = (total_mib as u64) << 20;
    let disk_mb_s = mb_per_s(total_bytes, disk_write(dir.path(), total_bytes, false));
    let direct_mb_s = mb_per_s(total_bytes, disk_write(dir.path(), total_bytes, true));

    let server_dir = dir.path().join("server");
    let client_dir = dir.path().join("client");
    let files = source_files(&server_dir, total_mib, file_mib);
    let file_bytes: u64 = files.iter().map(|f| f.size_bytes).sum();
    let mut manifest = Manifest::default();
    for (i, file) in files.iter().enumerate() {
        manifest.apply(
            i as u64 + 1,
            &ManifestCommand::Register {
                files: vec![file.clone()],
            },
        );
    }
    let index = manifest.applied_index();
    let version = Arc::new(ManifestVersion { index, manifest });

    let ca = tls::generate_ca(CLUSTER).expect("generate ca");
    let server_tls = node_tls(&ca, SERVER);
    let client_tls = node_tls(&ca, CLIENT);
    let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_version = Arc::new((*version).clone());
    let server = std::thread::Builder::new()
        .name("bench-server".to_owned())
        .spawn(move || {
            runtime().block_on(async move {
                let transport = bind(server_tls, CLIENT);
                let mut chunk = vec![0u8; CHUNK_BYTES];
                fill(&mut chunk, 3);
                transport.set_handler(
                    StreamKind::WalStream,
                    Arc::new(RawSource {
                        chunk: bytes::Bytes::from(chunk),
                    }),
                );
                let fetch = FetchServer::new(
                    &server_dir,
                    Arc::new(move || server_version.clone()),
                    ServeConfig::default(),
                )
                .expect("fetch server");
                transport.set_handler(
                    StreamKind::FileFetch,
                    Arc::new(FetchHandler(Arc::new(fetch))),
                );
                transport.set_call_handler(StreamKind::RaftAppend, Arc::new(Echo));
                addr_sender
                    .send(transport.local_addr().expect("address"))
                    .expect("send address");
                let _ = stopped.await;
                transport.shutdown().await;
            })
        })
        .expect("server thread");
    let addr = addr_receiver.recv().expect("server address");
    let fetch_config = FetchConfig {
        concurrency: env_usize(
            "SHALE_CATCHUP_CONCURRENCY",
            FetchConfig::default().concurrency,
        ),
        ..FetchConfig::default()
    };
    let concurrency = fetch_config.concurrency;

    let sink = FileSink::start(SinkConfig::default()).expect("start sink");
    let rows = runtime().block_on(async {
        let client = bind(client_tls, SERVER);
        let heartbeat = || async {
            let sent = Instant::now();
            client
                .call(
                    SERVER,
                    addr,
                    StreamKind::RaftAppend,
                    vec![1; 256],
                    Duration::from_secs(5),
                )
                .await
                .expect("heartbeat call");
            sent.elapsed()
        };
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(heartbeat().await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        idle.sort();

        let raw = |streams: usize| {
            let client = client.clone();
            async move {
                let per_stream = total_bytes / streams as u64;
                let started = Instant::now();
                let mut transfers = tokio::task::JoinSet::new();
                for _ in 0..streams {
                    let client = client.clone();
                    transfers.spawn(async move {
                        let (mut send, mut recv) = client
                            .open(SERVER, addr, StreamKind::WalStream)
                            .await
                            .expect("open raw stream");
                        send.write_all(&per_stream.to_le_bytes())
                            .await
                            .expect("request");
                        let _ = send.finish();
                        let mut received = 0u64;
                        while let Some(chunk) =
                            recv.read_chunk(usize::MAX, true).await.expect("read")
                        {
                            received += chunk.bytes.len() as u64;
                        }
                        received
                    });
                }
                let received: u64 = transfers.join_all().await.into_iter().sum();
                assert_eq!(received, per_stream * streams as u64);
                mb_per_s(received, started.elapsed())
            }
        };
        let raw_one = raw(1).await;
        // Measured before and after the catch-up: other load on the machine moves it.
        let mut drops = Vec::new();
        let mut cpu = Vec::new();
        let before = udp_receive_buffer_drops();
        eprintln!("phase: raw");
        let cpu_before = cpu_ms_by_role();
        let raw_before = raw(concurrency).await;
        cpu.push(("raw", cpu_per_mb(&cpu_before, total_bytes)));
        drops.push(("raw", udp_receive_buffer_drops() - before));

        // The FileFetch protocol alone (server reads, stream, client chunks), bytes discarded:
        // separates the protocol's cost from the sink's.
        let before = udp_receive_buffer_drops();
        eprintln!("phase: protocol only");
        let cpu_before = cpu_ms_by_role();
        let protocol_only = {
            let source = Arc::new(StreamSource::new(
                QuicConnector {
                    transport: client.clone(),
                    addr,
                },
                FETCH_CHUNK_BYTES,
            ));
            let started = Instant::now();
            let mut fetches = tokio::task::JoinSet::new();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..concurrency {
                let (source, next, files) = (source.clone(), next.clone(), files.clone());
                fetches.spawn(async move {
                    let mut received = 0u64;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(file) = files.get(i) else {
                            return received;
                        };
                        let expected = ExpectedFile {
                            path: file.path.clone(),
                            size_bytes: file.size_bytes,
                            blake3: *blake3::Hash::from_hex(&file.blake3_hex)
                                .expect("hex")
                                .as_bytes(),
                        };
                        let mut stream = source.fetch(SERVER, &expected, 0).await.expect("fetch");
                        while let Some(chunk) = stream.next_chunk().await.expect("chunk") {
                            received += chunk.len() as u64;
                        }
                    }
                });
            }
            let received: u64 = fetches.join_all().await.into_iter().sum();
            assert_eq!(received, file_bytes);
            mb_per_s(received, started.elapsed())
        };

        cpu.push(("protocol only", cpu_per_mb(&cpu_before, file_bytes)));
        drops.push(("protocol only", udp_receive_buffer_drops() - before));
        let cpu_before = cpu_ms_by_role();
        // The sink alone: the same files written, hashed and published from memory, as many at
        // once as the fetcher runs.
        let sink_only = {
            let started = Instant::now();
            let mut writes = tokio::task::JoinSet::new();
            for (i, file) in files.iter().enumerate().take(concurrency.max(1) * 4) {
                let sink = sink.clone();
                let target = dir.path().join("sink-only").join(&file.path);
                let size = file.size_bytes;
                writes.spawn(async move {
                    let mut chunk = vec![0u8; FETCH_CHUNK_BYTES];
                    fill(&mut chunk, i as u64);
                    let chunk = bytes::Bytes::from(chunk);
                    let partial = target.with_extension("partial");
                    let writer = sink.open(&partial, false).await.expect("open");
                    let mut left = size;
                    while left > 0 {
                        let length = left.min(chunk.len() as u64) as usize;
                        writer.write(chunk.slice(..length)).await.expect("write");
                        left -= length as u64;
                    }
                    writer.finish().await.expect("finish");
                    writer.publish(&target).await.expect("publish");
                    size
                });
                if writes.len() >= concurrency.max(1) {
                    writes.join_next().await;
                }
            }
            while writes.join_next().await.is_some() {}
            let count = files.len().min(concurrency.max(1) * 4) as u64;
            let bytes: u64 = files
                .iter()
                .take(count as usize)
                .map(|f| f.size_bytes)
                .sum();
            let elapsed = started.elapsed();
            cpu.push(("sink only", cpu_per_mb(&cpu_before, bytes)));
            let _ = std::fs::remove_dir_all(dir.path().join("sink-only"));
            mb_per_s(bytes, elapsed)
        };

        let (replicator, handle) = Replicator::new(ReplicatorParts {
            local: CLIENT,
            data_dir: client_dir.clone(),
            presence: PresenceIndex::open(&client_dir.join("_system/presence"))
                .expect("presence index"),
            sink: sink.clone(),
            source: Arc::new(StreamSource::new(
                QuicConnector {
                    transport: client.clone(),
                    addr,
                },
                FETCH_CHUNK_BYTES,
            )),
            watch: Arc::new(OneVersion(version.clone(), PinRegistry::default())),
            peers: Arc::new(|| vec![PeerInfo { node_id: SERVER }]),
            config: fetch_config,
            holdings: Default::default(),
            repairs: None,
            on_bad_source: None,
        });
        let before = udp_receive_buffer_drops();
        // Announced on stderr so a profiler can attach for this phase alone.
        eprintln!("phase: catch-up");
        let cpu_before = cpu_ms_by_role();
        let started = Instant::now();
        let running = tokio::spawn(replicator.run(std::future::pending()));
        let mut during = Vec::new();
        let done = handle.wait_present(index);
        tokio::pin!(done);
        loop {
            tokio::select! {
                reached = &mut done => {
                    assert!(reached, "replicator stopped");
                    break;
                }
                () = tokio::time::sleep(HEARTBEAT_EVERY) => during.push(heartbeat().await),
            }
        }
        let catch_up = started.elapsed();
        cpu.push(("catch-up", cpu_per_mb(&cpu_before, file_bytes)));
        drops.push(("catch-up", udp_receive_buffer_drops() - before));
        running.abort();
        let metrics = handle.metrics();
        assert_eq!(metrics.bytes_fetched_total, file_bytes);
        during.sort();
        let catch_up_mb_s = mb_per_s(file_bytes, catch_up);
        let raw_after = raw(concurrency).await;
        client.shutdown().await;
        (
            raw_one,
            raw_before,
            raw_after,
            protocol_only,
            sink_only,
            catch_up_mb_s,
            idle,
            during,
            drops,
            cpu,
        )
    });
    let _ = stop.send(());
    let _ = server.join();
    sink.shutdown();

    let (
        raw_one,
        raw_before,
        raw_after,
        protocol_only,
        sink_only,
        catch_up,
        idle,
        during,
        drops,
        cpu,
    ) = rows;
    let raw_many = (raw_before + raw_after) / 2.0;
    let share = |value: f64| format!("{:.0}%", 100.0 * value / raw_many);
    let row = |name: &str, value: f64, versus: String| {
        println!("| {name:50} | {value:7.0} | {versus:>9} |");
    };
    println!();
    println!("| {:50} | {:>7} | {:>9} |", "measurement", "MB/s", "vs raw");
    println!("|{}|{}|{}|", "-".repeat(52), "-".repeat(9), "-".repeat(11));
    row("blake3, one core", blake3_mb_s, String::new());
    row(
        "disk write, buffered 1 MiB writes + fdatasync",
        disk_mb_s,
        String::new(),
    );
    row(
        "disk write, O_DIRECT 1 MiB writes + fdatasync",
        direct_mb_s,
        String::new(),
    );
    row(
        "raw quinn, 1 stream, same transport config",
        raw_one,
        share(raw_one),
    );
    row(
        &format!("raw quinn, {concurrency} streams (before {raw_before:.0}, after {raw_after:.0})"),
        raw_many,
        share(raw_many),
    );
    row(
        &format!("FileFetch protocol only, {concurrency} at once, bytes discarded"),
        protocol_only,
        share(protocol_only),
    );
    row(
        &format!("sink only: hash, write, fdatasync, publish, {concurrency} at once"),
        sink_only,
        String::new(),
    );
    row(
        &format!("catch-up, {concurrency} files at once (verified, durable)"),
        catch_up,
        share(catch_up),
    );
    println!(
        "UDP datagrams dropped for a full receive buffer: {}",
        drops
            .iter()
            .map(|(phase, count)| format!("{phase} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("CPU ms per MB (both nodes in this process):");
    for (phase, figures) in &cpu {
        println!("  {phase:13} {figures}");
    }
    println!();
    println!("| Raft-lane call round trip | calls | p50       | p99       | max       |");
    println!("|---------------------------|-------|-----------|-----------|-----------|");
    for (name, samples) in [("idle", &idle), ("during catch-up", &during)] {
        println!(
            "| {name:25} | {:5} | {:9.2?} | {:9.2?} | {:9.2?} |",
            samples.len(),
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            samples.last().copied().unwrap_or_default()
        );
    }
}
