//! Peer file replication tests: the presence index on disk, the FileFetch server's refusals, the
//! protocol end to end over TCP, resumed and corrupted fetches, and the replicator driving it
//! all. Real disk (temporary directories), the real sink thread, in-process sources.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use shale_io::sink::Chunk;
use shale_io::sink::FileSink;
use shale_io::sink::SinkConfig;
use shale_replication::files::fetch::fetch_file;
use shale_replication::files::fetch::BoxFuture;
use shale_replication::files::fetch::ChunkStream;
use shale_replication::files::fetch::Connector;
use shale_replication::files::fetch::ExpectedFile;
use shale_replication::files::fetch::FetchError;
use shale_replication::files::fetch::FileSource;
use shale_replication::files::fetch::StreamPair;
use shale_replication::files::fetch::StreamSource;
use shale_replication::files::holdings::Finding;
use shale_replication::files::holdings::Holdings;
use shale_replication::files::partial_path;
use shale_replication::files::planner::PeerInfo;
use shale_replication::files::presence::PresenceEntry;
use shale_replication::files::presence::PresenceError;
use shale_replication::files::presence::PresenceIndex;
use shale_replication::files::presence::PRESENCE_LOG_NAME;
use shale_replication::files::protocol::Copying;
use shale_replication::files::protocol::FetchRequest;
use shale_replication::files::protocol::FetchStatus;
use shale_replication::files::replicator::FetchConfig;
use shale_replication::files::replicator::ManifestWatch;
use shale_replication::files::replicator::RepairJob;
use shale_replication::files::replicator::Replicator;
use shale_replication::files::replicator::ReplicatorParts;
use shale_replication::files::serve::FetchServer;
use shale_replication::files::serve::ServeConfig;
use shale_replication::files::serve::Served;
use shale_replication::files::throttle::Throttle;
use shale_replication::files::NodeId;
use shale_replication::version::PinRegistry;
use shale_replication::FileEntry;
use shale_replication::Manifest;
use shale_replication::ManifestCommand;
use shale_replication::ManifestResponse;
use shale_replication::ManifestVersion;

fn sink() -> FileSink {
    shale_io::runtime::raise_memlock_limit();
    FileSink::start(SinkConfig::default()).expect("start sink")
}

fn content(seed: u8, size: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9u32 ^ seed as u32;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn entry(path: &str, bytes: &[u8], origin_node: NodeId, lsn: u64) -> FileEntry {
    FileEntry {
        path: path.to_owned(),
        size_bytes: bytes.len() as u64,
        blake3_hex: blake3::hash(bytes).to_hex().to_string(),
        rows: 1,
        time_min_us: 0,
        time_max_us: 1,
        database: "db".to_owned(),
        measurement: "m".to_owned(),
        origin_node,
        shard: 0,
        lsn_first: lsn,
        lsn_last: lsn,
        created_at_ms: 0,
        columns_fingerprint: 0,
        taken_by: None,
    }
}

fn version(index: u64, files: Vec<FileEntry>) -> Arc<ManifestVersion> {
    let mut manifest = Manifest::default();
    let response = manifest.apply(index, &ManifestCommand::Register { files });
    assert!(
        matches!(response, ManifestResponse::Applied { .. }),
        "{response:?}"
    );
    Arc::new(ManifestVersion { index, manifest })
}

fn write_file(root: &Path, path: &str, bytes: &[u8]) {
    let target = root.join(path);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(target, bytes).unwrap();
}

fn expected(file: &FileEntry) -> ExpectedFile {
    ExpectedFile {
        path: file.path.clone(),
        size_bytes: file.size_bytes,
        blake3: *blake3::Hash::from_hex(&file.blake3_hex).unwrap().as_bytes(),
    }
}

fn server(data_dir: &Path, version: Arc<ManifestVersion>) -> FetchServer {
    FetchServer::new(
        data_dir,
        Arc::new(move || version.clone()),
        ServeConfig {
            chunk_bytes: 64 << 10,
            ..ServeConfig::default()
        },
    )
    .unwrap()
}

/// In-process transport: a fresh tokio duplex pipe per request, served by the node's server.
#[derive(Clone, Default)]
struct Pipes {
    servers: Arc<Mutex<BTreeMap<NodeId, FetchServer>>>,
    offsets: Arc<Mutex<Vec<(NodeId, u64)>>>,
}

impl Connector for Pipes {
    type Send = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    type Recv = Copying<tokio::io::ReadHalf<tokio::io::DuplexStream>>;

    fn connect(&self, node: NodeId) -> BoxFuture<'_, Result<StreamPair<Self>, FetchError>> {
        Box::pin(async move {
            let server =
                self.servers
                    .lock()
                    .unwrap()
                    .get(&node)
                    .cloned()
                    .ok_or(FetchError::Connect {
                        node,
                        message: "no such node".to_owned(),
                    })?;
            let (client, remote) = tokio::io::duplex(256 << 10);
            tokio::spawn(async move {
                let (recv, send) = tokio::io::split(remote);
                let _ = server.serve(recv, Copying(send)).await;
            });
            let (recv, send) = tokio::io::split(client);
            Ok((send, Copying(recv)))
        })
    }
}

/// Records the offset of every request, and optionally cuts a stream after some bytes (a
/// connection that breaks).
struct Recording<S> {
    inner: S,
    offsets: Arc<Mutex<Vec<(NodeId, u64)>>>,
    cut_after_bytes: Option<u64>,
}

struct Cut {
    inner: Box<dyn ChunkStream>,
    left: u64,
}

impl ChunkStream for Cut {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Chunk>, FetchError>> {
        Box::pin(async move {
            if self.left == 0 {
                return Ok(None);
            }
            let Some(mut chunk) = self.inner.next_chunk().await? else {
                return Ok(None);
            };
            chunk.truncate(self.left.min(chunk.len() as u64) as usize);
            self.left -= chunk.len() as u64;
            Ok(Some(chunk))
        })
    }
}

impl<S: FileSource> FileSource for Recording<S> {
    fn fetch<'a>(
        &'a self,
        source: NodeId,
        file: &'a ExpectedFile,
        offset: u64,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, FetchError>> {
        Box::pin(async move {
            self.offsets.lock().unwrap().push((source, offset));
            let stream = self.inner.fetch(source, file, offset).await?;
            Ok(match self.cut_after_bytes {
                Some(left) => Box::new(Cut {
                    inner: stream,
                    left,
                }) as Box<dyn ChunkStream>,
                None => stream,
            })
        })
    }
}

#[test]
fn presence_survives_reopen_and_torn_tail() {
    // The presence index is what lets a restart skip re-hashing every file: entries written
    // before a restart must be there after it, a torn last record (a crash mid-append) must be
    // cut off rather than refuse the start, and damage before the tail must refuse to open.
    let dir = tempfile::tempdir().unwrap();
    let presence_dir = dir.path().join("_system/presence");
    let sink = sink();
    let entry = |path: &str, hash: char| PresenceEntry {
        path: path.to_owned(),
        size_bytes: 10,
        blake3_hex: hash.to_string().repeat(64),
        verified_at_ms: 1,
    };
    futures_lite::future::block_on(async {
        let mut index = PresenceIndex::open(&presence_dir).unwrap();
        index.insert(&sink, entry("a", 'a')).await.unwrap();
        index.insert(&sink, entry("b", 'b')).await.unwrap();
        index.insert(&sink, entry("c", 'c')).await.unwrap();
        index.insert(&sink, entry("a", 'd')).await.unwrap();
        assert!(index.remove(&sink, "b").await.unwrap());
    });
    let log = presence_dir.join(PRESENCE_LOG_NAME);
    let good_bytes = std::fs::metadata(&log).unwrap().len();
    let index = PresenceIndex::open(&presence_dir).unwrap();
    assert!(index.contains("a", &"d".repeat(64)));
    assert!(!index.contains("a", &"a".repeat(64)));
    assert!(!index.contains("b", &"b".repeat(64)));
    assert!(index.contains("c", &"c".repeat(64)));
    assert_eq!(index.len(), 2);

    // A torn append: a header promising more bytes than follow.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 1, b'{']);
    std::fs::write(&log, &bytes).unwrap();
    let mut index = PresenceIndex::open(&presence_dir).unwrap();
    assert_eq!(index.len(), 2);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), good_bytes);
    futures_lite::future::block_on(index.insert(&sink, entry("e", 'e'))).unwrap();
    let index = PresenceIndex::open(&presence_dir).unwrap();
    assert!(index.contains("e", &"e".repeat(64)));
    assert_eq!(index.len(), 3);

    // Damage in the middle (a flipped byte in the first record) is not a torn tail.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[12] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    assert!(matches!(
        PresenceIndex::open(&presence_dir),
        Err(PresenceError::Corrupt { offset: 0, .. })
    ));
    sink.shutdown();
}

#[tokio::test]
async fn server_refuses_paths_outside_the_manifest_or_the_data_dir() {
    // A node serves only current manifest paths and never follows a symlink: `..`, absolute
    // paths, unknown paths, a symlinked file pointing outside, a symlinked directory component
    // and even a symlink to a file inside the data directory are all refused, while a real
    // manifest file is accepted.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = b"secret bytes outside the data dir".to_vec();
    std::fs::write(outside.join("secret.parquet"), &secret).unwrap();
    let good = content(1, 100_000);
    write_file(&data_dir, "db/m/good.parquet", &good);
    std::fs::create_dir_all(data_dir.join("db/m")).unwrap();
    std::os::unix::fs::symlink(
        outside.join("secret.parquet"),
        data_dir.join("db/m/link.parquet"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside, data_dir.join("db/linked")).unwrap();
    // Even a symlink that stays inside the data directory is not followed.
    std::os::unix::fs::symlink("good.parquet", data_dir.join("db/m/inner.parquet")).unwrap();
    let version = version(
        3,
        vec![
            entry("db/m/good.parquet", &good, 1, 1),
            entry("db/m/link.parquet", &secret, 1, 2),
            entry("db/linked/secret.parquet", &secret, 1, 3),
            entry("db/m/inner.parquet", &good, 1, 4),
        ],
    );
    let server = server(&data_dir, version);

    let cases = [
        ("../outside/secret.parquet", FetchStatus::BadPath),
        ("db/../../outside/secret.parquet", FetchStatus::BadPath),
        ("/etc/passwd", FetchStatus::BadPath),
        ("db/m/absent.parquet", FetchStatus::NotInManifest),
        ("db/m/link.parquet", FetchStatus::BadPath),
        ("db/linked/secret.parquet", FetchStatus::BadPath),
        ("db/m/inner.parquet", FetchStatus::BadPath),
    ];
    for (path, status) in cases {
        let request = FetchRequest {
            path: path.to_owned(),
            offset: 0,
        };
        let refusal = server.open_checked(&request).err();
        assert_eq!(refusal.map(|r| r.status), Some(status), "{path}");

        // The same over the wire: the client gets the refusal, never bytes.
        let (client, remote) = tokio::io::duplex(64 << 10);
        let serving = {
            let server = server.clone();
            tokio::spawn(async move {
                let (recv, send) = tokio::io::split(remote);
                server.serve(recv, Copying(send)).await
            })
        };
        let (mut recv, mut send) = tokio::io::split(client);
        shale_replication::files::protocol::write_request(&mut send, &request)
            .await
            .unwrap();
        let response = shale_replication::files::protocol::read_response(&mut recv)
            .await
            .unwrap();
        assert!(
            matches!(response, shale_replication::files::protocol::FetchResponse::Refused { status: s, .. } if s == status),
            "{path}: {response:?}"
        );
        assert!(matches!(serving.await.unwrap(), Ok(Served::Refused(_))));
    }

    let request = FetchRequest {
        path: "db/m/good.parquet".to_owned(),
        offset: 0,
    };
    assert!(server.open_checked(&request).is_ok());
}

#[tokio::test]
async fn fetch_over_tcp_end_to_end() {
    // The FileFetch protocol over a real socket pair: the client verifies and publishes the
    // exact bytes under the manifest path, and leaves no partial behind.
    let dir = tempfile::tempdir().unwrap();
    let (remote_dir, local_dir) = (dir.path().join("remote"), dir.path().join("local"));
    let bytes = content(2, 3_000_123);
    write_file(&remote_dir, "db/m/f.parquet", &bytes);
    let file = entry("db/m/f.parquet", &bytes, 2, 1);
    let server = server(&remote_dir, version(1, vec![file.clone()]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let (recv, send) = stream.into_split();
                let _ = server.serve(recv, Copying(send)).await;
            });
        }
    });
    let source = StreamSource::new(Tcp(address), 1 << 20);
    let sink = sink();
    let fetched = fetch_file(
        &sink,
        &local_dir,
        &expected(&file),
        &source,
        2,
        &Throttle::new(0, 0),
    )
    .await
    .unwrap();
    assert_eq!(fetched.transferred_bytes, bytes.len() as u64);
    assert_eq!(std::fs::read(local_dir.join(&file.path)).unwrap(), bytes);
    assert!(!partial_path(&local_dir.join(&file.path)).exists());
    sink.shutdown();
}

struct Tcp(std::net::SocketAddr);

impl Connector for Tcp {
    type Send = tokio::net::tcp::OwnedWriteHalf;
    type Recv = Copying<tokio::net::tcp::OwnedReadHalf>;

    fn connect(&self, node: NodeId) -> BoxFuture<'_, Result<StreamPair<Self>, FetchError>> {
        Box::pin(async move {
            let stream =
                tokio::net::TcpStream::connect(self.0)
                    .await
                    .map_err(|e| FetchError::Connect {
                        node,
                        message: e.to_string(),
                    })?;
            let (recv, send) = stream.into_split();
            Ok((send, Copying(recv)))
        })
    }
}

#[tokio::test]
async fn fetch_resumes_from_a_partial() {
    // A transfer that breaks off keeps its partial, and the next attempt asks only for the bytes
    // after it (the prefix is hashed locally, not fetched again) and still verifies the whole.
    let dir = tempfile::tempdir().unwrap();
    let (remote_dir, local_dir) = (dir.path().join("remote"), dir.path().join("local"));
    let bytes = content(3, 1_500_000);
    write_file(&remote_dir, "db/m/f.parquet", &bytes);
    let file = entry("db/m/f.parquet", &bytes, 2, 1);
    let pipes = Pipes::default();
    pipes
        .servers
        .lock()
        .unwrap()
        .insert(2, server(&remote_dir, version(1, vec![file.clone()])));
    let sink = sink();
    let throttle = Throttle::new(0, 0);

    let breaking = Recording {
        inner: StreamSource::new(pipes.clone(), 64 << 10),
        offsets: pipes.offsets.clone(),
        cut_after_bytes: Some(600_000),
    };
    let error = fetch_file(&sink, &local_dir, &expected(&file), &breaking, 2, &throttle)
        .await
        .unwrap_err();
    assert!(matches!(error, FetchError::Truncated { .. }), "{error}");
    let partial = partial_path(&local_dir.join(&file.path));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 600_000);
    assert!(!local_dir.join(&file.path).exists());

    let whole = Recording {
        inner: StreamSource::new(pipes.clone(), 64 << 10),
        offsets: pipes.offsets.clone(),
        cut_after_bytes: None,
    };
    let fetched = fetch_file(&sink, &local_dir, &expected(&file), &whole, 2, &throttle)
        .await
        .unwrap();
    // The partial is written with direct I/O where possible: a resume starts at the last
    // aligned offset at or before the partial's end, so at most one block is fetched again.
    let resumed = fetched.resumed_bytes;
    assert!(
        resumed <= 600_000 && resumed > 600_000 - 65_536,
        "{resumed}"
    );
    assert_eq!(fetched.transferred_bytes, bytes.len() as u64 - resumed);
    assert_eq!(*pipes.offsets.lock().unwrap(), vec![(2, 0), (2, resumed)]);
    assert_eq!(std::fs::read(local_dir.join(&file.path)).unwrap(), bytes);
    assert!(!partial.exists());
    sink.shutdown();
}

/// Published versions for a replicator under test, with the pins a real node tracks.
struct Versions {
    sender: tokio::sync::watch::Sender<Arc<ManifestVersion>>,
    pins: PinRegistry,
}

impl Versions {
    fn new(first: Arc<ManifestVersion>) -> Arc<Versions> {
        let pins = PinRegistry::default();
        pins.register(&first);
        Arc::new(Versions {
            sender: tokio::sync::watch::channel(first).0,
            pins,
        })
    }

    fn publish(&self, version: Arc<ManifestVersion>) {
        self.pins.register(&version);
        self.sender.send_replace(version);
    }
}

impl ManifestWatch for Versions {
    fn current(&self) -> Arc<ManifestVersion> {
        self.sender.borrow().clone()
    }

    fn changed(&self, index: u64) -> BoxFuture<'_, bool> {
        let mut receiver = self.sender.subscribe();
        Box::pin(async move {
            let newer = receiver.wait_for(|v| v.index > index).await.is_ok();
            newer
        })
    }

    fn oldest_pinned_index(&self) -> u64 {
        self.pins
            .oldest_pinned_index()
            .unwrap_or_else(|| self.current().index)
    }
}

#[tokio::test]
async fn replicator_skips_a_corrupt_source_and_publishes_the_present_version() {
    // The whole driver: node 1 must end up with every file of the manifest. The origin (node 2)
    // holds a corrupt copy of one file (right size, one flipped byte): that is detected by blake3,
    // node 2 is marked bad for that file and node 3's copy is used. The present version moves to
    // the new manifest index only once every file is present, and the presence index says so
    // after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let good_a = content(4, 700_000);
    let good_b = content(5, 300_001);
    let file_a = entry("db/m/a.parquet", &good_a, 2, 1);
    let file_b = entry("db/m/b.parquet", &good_b, 2, 2);
    let first = version(1, vec![]);
    let second = version(2, vec![file_a.clone(), file_b.clone()]);
    let pipes = Pipes::default();
    for node in [2, 3] {
        let node_dir = dir.path().join(format!("n{node}"));
        let mut a = good_a.clone();
        if node == 2 {
            a[123_456] ^= 1;
        }
        write_file(&node_dir, &file_a.path, &a);
        write_file(&node_dir, &file_b.path, &good_b);
        pipes
            .servers
            .lock()
            .unwrap()
            .insert(node, server(&node_dir, second.clone()));
    }
    let sink = sink();
    let versions = Versions::new(first);
    // The source that served bad bytes is told, so it can check its own copy at once.
    let told: Arc<Mutex<Vec<(NodeId, String, String)>>> = Arc::default();
    let (replicator, handle) = Replicator::new(ReplicatorParts {
        local: 1,
        data_dir: local_dir.clone(),
        presence: PresenceIndex::open(&local_dir.join("_system/presence")).unwrap(),
        sink: sink.clone(),
        source: Arc::new(StreamSource::new(pipes.clone(), 64 << 10)),
        watch: versions.clone(),
        peers: Arc::new(|| vec![PeerInfo { node_id: 2 }, PeerInfo { node_id: 3 }]),
        config: FetchConfig::default(),
        holdings: Default::default(),
        repairs: None,
        on_bad_source: Some(Arc::new({
            let told = told.clone();
            move |node, path: &str, blake3_hex: &str| {
                told.lock()
                    .unwrap()
                    .push((node, path.to_owned(), blake3_hex.to_owned()));
            }
        })),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(replicator.run(async move {
        let _ = stopped.await;
    }));

    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, handle.wait_present(1))
        .await
        .unwrap();
    versions.publish(second);
    assert!(tokio::time::timeout(deadline, handle.wait_present(2))
        .await
        .unwrap());
    let metrics = handle.metrics();
    assert_eq!(metrics.present_index, Some(2));
    assert_eq!(metrics.files_fetched_total, 2);
    assert_eq!(metrics.bad_source_total, 1);
    assert_eq!(
        *told.lock().unwrap(),
        [(2, file_a.path.clone(), file_a.blake3_hex.clone())]
    );
    assert_eq!(std::fs::read(local_dir.join(&file_a.path)).unwrap(), good_a);
    assert_eq!(std::fs::read(local_dir.join(&file_b.path)).unwrap(), good_b);

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert!(presence.contains(&file_a.path, &file_a.blake3_hex));
    assert!(presence.contains(&file_b.path, &file_b.blake3_hex));
    sink.shutdown();
}

#[tokio::test]
async fn replicator_adopts_files_already_on_disk() {
    // A node's own flushed files (and a fetch renamed just before a crash) are on disk but not
    // in the presence index: the driver must adopt them after hashing, without any source, and
    // must not adopt a local copy whose bytes differ from the manifest.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let own = content(6, 200_000);
    let file = entry("db/m/own.parquet", &own, 1, 1);
    write_file(&local_dir, &file.path, &own);
    let mut wrong = content(7, 1000);
    let other = entry("db/m/other.parquet", &wrong, 2, 1);
    wrong[0] ^= 1;
    write_file(&local_dir, &other.path, &wrong);
    let sink = sink();
    let versions = Versions::new(version(5, vec![file.clone(), other.clone()]));
    let (replicator, handle) = Replicator::new(ReplicatorParts {
        local: 1,
        data_dir: local_dir.clone(),
        presence: PresenceIndex::open(&local_dir.join("_system/presence")).unwrap(),
        sink: sink.clone(),
        source: Arc::new(StreamSource::new(Pipes::default(), 64 << 10)),
        watch: versions,
        peers: Arc::new(Vec::new),
        config: FetchConfig::default(),
        holdings: Default::default(),
        repairs: None,
        on_bad_source: None,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(replicator.run(async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handle.metrics().files_adopted_total < 1 {
        assert!(tokio::time::Instant::now() < deadline, "not adopted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let metrics = handle.metrics();
    assert_eq!(metrics.files_adopted_total, 1);
    assert_eq!(metrics.files_missing, 1);
    assert_eq!(handle.present_version(), None);
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert!(presence.contains(&file.path, &file.blake3_hex));
    assert!(presence.get(&other.path).is_none());
    sink.shutdown();
}

/// A replicator running on the test's runtime, and how to stop it.
struct Running {
    handle: shale_replication::files::replicator::ReplicatorHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task:
        tokio::task::JoinHandle<Result<(), shale_replication::files::replicator::ReplicatorError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn start_replicator(
    local_dir: &Path,
    sink: &FileSink,
    source: Arc<dyn FileSource>,
    versions: Arc<Versions>,
    peers: Vec<NodeId>,
) -> Running {
    let (replicator, handle) = Replicator::new(ReplicatorParts {
        local: 1,
        data_dir: local_dir.to_path_buf(),
        presence: PresenceIndex::open(&local_dir.join("_system/presence")).unwrap(),
        sink: sink.clone(),
        source,
        watch: versions,
        peers: Arc::new(move || peers.iter().map(|&node_id| PeerInfo { node_id }).collect()),
        config: FetchConfig {
            delete_check_ms: 10,
            ..FetchConfig::default()
        },
        holdings: Default::default(),
        repairs: None,
        on_bad_source: None,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(replicator.run(async move {
        let _ = stopped.await;
    }));
    Running { handle, stop, task }
}

async fn wait_for_metrics(
    handle: &shale_replication::files::replicator::ReplicatorHandle,
    what: &str,
    done: impl Fn(&shale_replication::files::replicator::ReplicationMetrics) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = handle.metrics();
        if done(&metrics) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `base` with `command` applied at `index`: shares structure with `base`, as published
/// versions do.
fn next_version(
    base: &ManifestVersion,
    index: u64,
    command: ManifestCommand,
) -> Arc<ManifestVersion> {
    let mut manifest = base.manifest.clone();
    let response = manifest.apply(index, &command);
    assert!(
        matches!(response, ManifestResponse::Applied { .. }),
        "{response:?}"
    );
    Arc::new(ManifestVersion { index, manifest })
}

#[tokio::test]
async fn deleted_file_stays_while_a_query_pins_it_then_goes_for_good() {
    // A manifest Delete must not pull a file from under a query: while a version that lists
    // the file is pinned (a query holds it), the file stays on disk and readable; once the pin
    // is released the file is removed from disk and from the presence index. A restart after
    // that neither fetches it again nor finds it present.
    let dir = tempfile::tempdir().unwrap();
    let (remote_dir, local_dir) = (dir.path().join("n2"), dir.path().join("n1"));
    let bytes_a = content(10, 300_000);
    let bytes_b = content(11, 200_000);
    let file_a = entry("db/m/a.parquet", &bytes_a, 2, 1);
    let file_b = entry("db/m/b.parquet", &bytes_b, 2, 2);
    write_file(&remote_dir, &file_a.path, &bytes_a);
    write_file(&remote_dir, &file_b.path, &bytes_b);
    let first = version(1, vec![file_a.clone(), file_b.clone()]);
    let pipes = Pipes::default();
    pipes
        .servers
        .lock()
        .unwrap()
        // The peer's own copy of the version: another node's pins are not this node's.
        .insert(2, server(&remote_dir, Arc::new((*first).clone())));
    let sink = sink();
    let versions = Versions::new(first.clone());
    let source: Arc<dyn FileSource> = Arc::new(StreamSource::new(pipes.clone(), 64 << 10));
    let running = start_replicator(&local_dir, &sink, source.clone(), versions.clone(), vec![2]);
    assert!(
        tokio::time::timeout(Duration::from_secs(30), running.handle.wait_present(1))
            .await
            .unwrap()
    );

    // A query pins version 1; version 2 deletes a.
    let pinned = versions.current();
    let second = next_version(
        &first,
        2,
        ManifestCommand::Delete {
            paths: vec![file_a.path.clone()],
        },
    );
    drop(first);
    versions.publish(second);
    wait_for_metrics(&running.handle, "the deletion to be queued", |m| {
        m.latest_index == 2 && m.files_delete_pending == 1 && m.present_index == Some(2)
    })
    .await;
    assert_eq!(
        std::fs::read(local_dir.join(&file_a.path)).unwrap(),
        bytes_a
    );
    assert!(pinned.manifest.file(&file_a.path).is_some());
    assert_eq!(running.handle.metrics().files_deleted_total, 0);

    drop(pinned);
    wait_for_metrics(&running.handle, "the deletion", |m| {
        m.files_deleted_total == 1 && m.files_delete_pending == 0
    })
    .await;
    assert!(!local_dir.join(&file_a.path).exists());
    assert_eq!(
        std::fs::read(local_dir.join(&file_b.path)).unwrap(),
        bytes_b
    );
    running.stop().await;
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert!(presence.get(&file_a.path).is_none());
    assert!(presence.contains(&file_b.path, &file_b.blake3_hex));
    assert_eq!(presence.deleting().count(), 0);
    drop(presence);

    // Restart on version 2: complete at once, nothing fetched, a stays gone.
    let running = start_replicator(&local_dir, &sink, source, versions.clone(), vec![2]);
    assert!(
        tokio::time::timeout(Duration::from_secs(30), running.handle.wait_present(2))
            .await
            .unwrap()
    );
    let metrics = running.handle.metrics();
    assert_eq!(metrics.files_fetched_total + metrics.files_adopted_total, 0);
    assert_eq!(metrics.files_missing, 0);
    assert!(!local_dir.join(&file_a.path).exists());
    running.stop().await;
    sink.shutdown();
}

#[tokio::test]
async fn restart_finishes_interrupted_removals() {
    // A crash can stop a removal after the presence index marked the file as being deleted but
    // before the unlink, or leave a presence entry for a file the manifest deleted while the
    // node was down. Neither may count as present, and the next start must remove both files
    // and forget them, while a current file stays.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let sink = sink();
    let mut presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    let mut files = Vec::new();
    for (seed, name) in [(20, "x"), (21, "y"), (22, "z")] {
        let bytes = content(seed, 10_000);
        let file = entry(&format!("db/m/{name}.parquet"), &bytes, 2, seed as u64);
        write_file(&local_dir, &file.path, &bytes);
        presence
            .insert(
                &sink,
                PresenceEntry {
                    path: file.path.clone(),
                    size_bytes: file.size_bytes,
                    blake3_hex: file.blake3_hex.clone(),
                    verified_at_ms: 0,
                },
            )
            .await
            .unwrap();
        files.push(file);
    }
    presence
        .mark_deleting(&sink, &[files[0].path.clone()])
        .await
        .unwrap();
    assert!(!presence.contains(&files[0].path, &files[0].blake3_hex));
    drop(presence);
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert_eq!(
        presence.deleting().collect::<Vec<_>>(),
        [files[0].path.as_str()]
    );
    assert!(!presence.contains(&files[0].path, &files[0].blake3_hex));
    drop(presence);

    let versions = Versions::new(version(7, vec![files[2].clone()]));
    let source: Arc<dyn FileSource> = Arc::new(StreamSource::new(Pipes::default(), 64 << 10));
    let running = start_replicator(&local_dir, &sink, source, versions, vec![]);
    wait_for_metrics(&running.handle, "both removals", |m| {
        m.files_deleted_total == 2 && m.present_index == Some(7)
    })
    .await;
    running.stop().await;
    assert!(!local_dir.join(&files[0].path).exists());
    assert!(!local_dir.join(&files[1].path).exists());
    assert!(local_dir.join(&files[2].path).exists());
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert_eq!(presence.deleting().count(), 0);
    assert_eq!(
        presence.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
        [files[2].path.clone()]
    );
    sink.shutdown();
}

/// A source that accepts every request and then never sends a byte.
struct Stalling;

impl FileSource for Stalling {
    fn fetch<'a>(
        &'a self,
        _source: NodeId,
        _file: &'a ExpectedFile,
        _offset: u64,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, FetchError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn deleting_a_file_being_fetched_cancels_the_fetch() {
    // A fetch of a file that a new version removes is wasted work and would hold a fetch slot
    // (and, with a slow peer, hold it for long): it must be stopped at once, and the file must
    // neither count as missing nor be fetched again.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let bytes = content(30, 1000);
    let file = entry("db/m/slow.parquet", &bytes, 2, 1);
    let first = version(1, vec![file.clone()]);
    let sink = sink();
    let versions = Versions::new(first.clone());
    let running = start_replicator(
        &local_dir,
        &sink,
        Arc::new(Stalling),
        versions.clone(),
        vec![2],
    );
    wait_for_metrics(&running.handle, "the fetch to start", |m| {
        m.files_in_flight == 1
    })
    .await;
    versions.publish(next_version(
        &first,
        2,
        ManifestCommand::Delete {
            paths: vec![file.path.clone()],
        },
    ));
    drop(first);
    wait_for_metrics(&running.handle, "the cancellation", |m| {
        m.fetches_cancelled_total == 1
            && m.files_in_flight == 0
            && m.files_missing == 0
            && m.present_index == Some(2)
    })
    .await;
    running.stop().await;
    sink.shutdown();
}

#[tokio::test]
async fn a_file_deleted_from_the_manifest_during_its_repair_is_abandoned() {
    // A damaged file is set aside and fetched again; if the manifest drops the file while the
    // fetch runs, the repair must stop: no fetch left running, no damage left recorded (queries
    // would wait for it forever), the quarantined copy removed (it holds no manifest file any
    // more), and nothing put back at the path.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let bytes = content(31, 5000);
    let file = entry("db/m/damaged.parquet", &bytes, 2, 1);
    write_file(&local_dir, &file.path, &bytes);
    let first = version(1, vec![file.clone()]);
    let sink = sink();
    let versions = Versions::new(first.clone());
    let holdings = Holdings::default();
    let (repairs, repair_jobs) = tokio::sync::mpsc::unbounded_channel();
    let (replicator, handle) = Replicator::new(ReplicatorParts {
        local: 1,
        data_dir: local_dir.clone(),
        presence: PresenceIndex::open(&local_dir.join("_system/presence")).unwrap(),
        sink: sink.clone(),
        source: Arc::new(Stalling),
        watch: versions.clone(),
        peers: Arc::new(|| vec![PeerInfo { node_id: 2 }]),
        config: FetchConfig {
            delete_check_ms: 10,
            ..FetchConfig::default()
        },
        holdings: holdings.clone(),
        repairs: Some(repair_jobs),
        on_bad_source: None,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(replicator.run(async move {
        let _ = stopped.await;
    }));
    wait_for_metrics(&handle, "the local copy adopted", |m| {
        m.files_adopted_total == 1
    })
    .await;
    assert!(holdings.held(&file.path).is_some());

    let mut damaged = bytes.clone();
    damaged[100] ^= 1;
    std::fs::write(local_dir.join(&file.path), &damaged).unwrap();
    repairs
        .send(RepairJob {
            path: file.path.clone(),
            expected_blake3: file.blake3_hex.clone(),
            finding: Finding::Corrupt {
                found_blake3: blake3::hash(&damaged).to_hex().to_string(),
            },
        })
        .unwrap();
    wait_for_metrics(&handle, "the repair's fetch to start", |m| {
        m.files_in_flight == 1
    })
    .await;
    let damage = holdings.damaged(&file.path).expect("recorded damaged");
    let quarantined = local_dir.join(damage.quarantined_as.expect("moved to quarantine"));
    assert_eq!(std::fs::read(&quarantined).unwrap(), damaged);
    assert!(!local_dir.join(&file.path).exists());
    assert!(holdings.held(&file.path).is_none());

    versions.publish(next_version(
        &first,
        2,
        ManifestCommand::Delete {
            paths: vec![file.path.clone()],
        },
    ));
    drop(first);
    wait_for_metrics(&handle, "the repair abandoned", |m| {
        m.fetches_cancelled_total == 1 && m.files_in_flight == 0 && m.files_missing == 0
    })
    .await;
    assert!(holdings.damaged(&file.path).is_none());
    assert!(!quarantined.exists());
    assert!(!local_dir.join(&file.path).exists());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    sink.shutdown();
}

#[tokio::test]
async fn a_damaged_file_is_still_damaged_after_a_restart() {
    // Damage is recorded durably: a node restarted before the repair finished must still treat
    // the file as held and lost (queries wait for it), not as a file never fetched (queries
    // would skip it, and the replica buffers no longer hold its rows). The restarted node then
    // repairs it and forgets the damage.
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("n1");
    let bytes = content(32, 5000);
    let file = entry("db/m/damaged.parquet", &bytes, 2, 1);
    write_file(&local_dir, &file.path, &bytes);
    let first = version(1, vec![file.clone()]);
    let sink = sink();
    let versions = Versions::new(first.clone());
    let start = |source: Arc<dyn FileSource>, holdings: Holdings| {
        let (repairs, repair_jobs) = tokio::sync::mpsc::unbounded_channel();
        let (replicator, handle) = Replicator::new(ReplicatorParts {
            local: 1,
            data_dir: local_dir.clone(),
            presence: PresenceIndex::open(&local_dir.join("_system/presence")).unwrap(),
            sink: sink.clone(),
            source,
            watch: versions.clone(),
            peers: Arc::new(|| vec![PeerInfo { node_id: 2 }]),
            config: FetchConfig::default(),
            holdings,
            repairs: Some(repair_jobs),
            on_bad_source: None,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(replicator.run(async move {
            let _ = stopped.await;
        }));
        (repairs, handle, stop, task)
    };
    let (repairs, handle, stop, task) = start(Arc::new(Stalling), Holdings::default());
    wait_for_metrics(&handle, "the local copy adopted", |m| {
        m.files_adopted_total == 1
    })
    .await;
    std::fs::remove_file(local_dir.join(&file.path)).unwrap();
    repairs
        .send(RepairJob {
            path: file.path.clone(),
            expected_blake3: file.blake3_hex.clone(),
            finding: Finding::Missing,
        })
        .unwrap();
    wait_for_metrics(&handle, "the repair's fetch to start", |m| {
        m.files_in_flight == 1
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert_eq!(
        presence
            .damaged()
            .map(|d| d.path.as_str())
            .collect::<Vec<_>>(),
        [file.path.as_str()]
    );
    assert!(presence.get(&file.path).is_none());
    drop(presence);

    // Restarted with the sources stalling still: the damage is back in the shared view.
    let restarted = Holdings::default();
    let (_repairs, handle, stop, task) = start(Arc::new(Stalling), restarted.clone());
    wait_for_metrics(&handle, "the repair's fetch to start again", |m| {
        m.files_in_flight == 1
    })
    .await;
    assert_eq!(
        restarted.damaged(&file.path).map(|d| d.finding),
        Some(Finding::Missing)
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // Restarted once a peer serves the file: repaired, and the damage forgotten for good.
    let node_dir = dir.path().join("n2");
    write_file(&node_dir, &file.path, &bytes);
    let pipes = Pipes::default();
    pipes
        .servers
        .lock()
        .unwrap()
        .insert(2, server(&node_dir, first.clone()));
    let repaired = Holdings::default();
    let (_repairs, handle, stop, task) = start(
        Arc::new(StreamSource::new(pipes.clone(), 64 << 10)),
        repaired.clone(),
    );
    wait_for_metrics(&handle, "the repair after the restart", |m| {
        m.files_fetched_total == 1
    })
    .await;
    assert!(repaired.damaged(&file.path).is_none());
    assert!(repaired.held(&file.path).is_some());
    assert_eq!(std::fs::read(local_dir.join(&file.path)).unwrap(), bytes);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let presence = PresenceIndex::open(&local_dir.join("_system/presence")).unwrap();
    assert_eq!(presence.damaged().count(), 0);
    assert!(presence.get(&file.path).is_some());
    sink.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_throughput_and_blake3_speed() {
    // Measures (never asserts) the catch-up path's speed: a 1 GiB file over the FileFetch
    // protocol on a local TCP socket, written and hashed by the sink thread, against
    // single-core blake3. Slow, so gated: SHALE_BENCH_FETCH=1 (size in MiB with
    // SHALE_BENCH_FETCH_MIB, default 1024).
    if std::env::var_os("SHALE_BENCH_FETCH").is_none() {
        return;
    }
    let mib: usize = std::env::var("SHALE_BENCH_FETCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir =
        tempfile::tempdir_in(std::env::var("SHALE_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    let (remote_dir, local_dir) = (dir.path().join("remote"), dir.path().join("local"));
    let bytes = content(8, mib << 20);

    let started = std::time::Instant::now();
    let hash = blake3::hash(&bytes);
    let hash_seconds = started.elapsed().as_secs_f64();
    println!(
        "blake3 single core: {:.0} MB/s",
        bytes.len() as f64 / 1e6 / hash_seconds
    );

    write_file(&remote_dir, "db/m/big.parquet", &bytes);
    let mut file = entry("db/m/big.parquet", &bytes, 2, 1);
    file.blake3_hex = hash.to_hex().to_string();
    drop(bytes);
    let server = server(&remote_dir, version(1, vec![file.clone()]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let (recv, send) = stream.into_split();
                let _ = server.serve(recv, Copying(send)).await;
            });
        }
    });
    let sink = sink();
    let source = StreamSource::new(Tcp(address), 1 << 20);
    let started = std::time::Instant::now();
    fetch_file(
        &sink,
        &local_dir,
        &expected(&file),
        &source,
        2,
        &Throttle::new(0, 0),
    )
    .await
    .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "fetch {} MiB over local tcp (verified, fdatasync, rename): {:.0} MB/s",
        mib,
        (mib << 20) as f64 / 1e6 / seconds
    );
    sink.shutdown();
}
