//! Test harness: starts real `shale` node processes on loopback ports with their own data
//! directories, talks HTTP/1.1 to them, and reads their Parquet back with DuckDB.
//!
//! Helpers panic with context on failure (`must_*`), so tests read as the scenario they check.
//! Waits are on conditions (an endpoint answering, a metric reaching a value) with a deadline,
//! never on fixed sleeps.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A node process under test.
pub struct Node {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    env: Vec<(String, String)>,
    command_prefix: Vec<String>,
    child: Option<Child>,
}

/// Settings for a test node; anything else comes from the embedded defaults.
pub struct NodeOptions {
    pub shards: usize,
    pub flush_age_ms: u64,
    pub flush_rows_max: usize,
    pub extra_env: Vec<(String, String)>,
    /// The HTTP address; `None` picks a free port on 127.0.0.1.
    pub http_addr: Option<SocketAddr>,
    /// Runs the binary through this command, e.g. `ip netns exec <ns>`.
    pub command_prefix: Vec<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            shards: 2,
            flush_age_ms: 3_600_000,
            flush_rows_max: 1_000_000,
            extra_env: Vec::new(),
            http_addr: None,
            command_prefix: Vec::new(),
        }
    }
}

impl Node {
    /// Starts a node in `data_dir` on a free loopback port and waits until it is ready.
    pub fn start(data_dir: &Path, options: NodeOptions) -> Node {
        let addr: SocketAddr = options
            .http_addr
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let mut env = vec![
            (
                "SHALE_NODE_DATA_DIR".to_string(),
                data_dir.display().to_string(),
            ),
            ("SHALE_HTTP_ADDR".to_string(), addr.to_string()),
            (
                "SHALE_RUNTIME_SHARDS".to_string(),
                options.shards.to_string(),
            ),
            ("SHALE_RUNTIME_PLACEMENT".to_string(), "unbound".to_string()),
            (
                "SHALE_RUNTIME_IO_MEMORY_BYTES".to_string(),
                (2 << 20).to_string(),
            ),
            (
                "SHALE_BUFFER_FLUSH_AGE_MS_MAX".to_string(),
                options.flush_age_ms.to_string(),
            ),
            (
                "SHALE_BUFFER_FLUSH_ROWS_MAX".to_string(),
                options.flush_rows_max.to_string(),
            ),
            (
                "SHALE_BUFFER_FLUSH_CHECK_INTERVAL_MS".to_string(),
                "50".to_string(),
            ),
            (
                "SHALE_LOG_FILTER".to_string(),
                "info,shale=debug".to_string(),
            ),
        ];
        env.extend(options.extra_env);
        let mut node = Node {
            addr,
            data_dir: data_dir.to_path_buf(),
            log_path: data_dir.with_extension("log"),
            env,
            command_prefix: options.command_prefix,
            child: None,
        };
        node.spawn();
        node.must_become_ready();
        node
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open node log");
        let mut command = match self.command_prefix.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_shale"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_shale")),
        };
        let child = command
            .arg("serve")
            .envs(self.env.iter().cloned())
            .env_remove("SHALE_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start shale");
        self.child = Some(child);
    }

    /// Starts the same node again (same port, same data) after a stop or a kill.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "node is still running");
        self.spawn();
        self.must_become_ready();
    }

    /// Starts the process again and returns its exit status without expecting readiness
    /// (for start-up that must fail).
    pub fn start_expecting_exit(&mut self) -> (ExitStatus, String) {
        assert!(self.child.is_none(), "node is still running");
        let before = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        self.spawn();
        let status = self.wait_exit();
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        (
            status,
            String::from_utf8_lossy(&log[before as usize..]).into_owned(),
        )
    }

    /// Starts the same node again without waiting for it to become ready (for a node that
    /// must stay not ready, or that becomes ready only once others start).
    pub fn restart_without_waiting(&mut self) {
        assert!(self.child.is_none(), "node is still running");
        self.spawn();
    }

    /// Sets (or replaces) an environment variable for the next start of this node.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// Waits for the process to end by itself (a crash or a fail-stop) and returns how.
    pub fn must_exit(&mut self) -> ExitStatus {
        self.wait_exit()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("poll child").is_none(),
            None => false,
        }
    }

    /// One kept-alive connection per shard, index = shard id: connects until the
    /// `x-shale-shard` header has shown every shard (the kernel spreads connections over
    /// shards by hashing, so tests that need a given shard must pick its connection).
    pub fn shard_clients(&self, shards: usize) -> Vec<Client> {
        let mut clients: Vec<Option<Client>> = (0..shards).map(|_| None).collect();
        for _ in 0..1000 {
            if clients.iter().all(Option::is_some) {
                break;
            }
            let mut client = Client::connect(self.addr).expect("connect");
            let response = client
                .request("GET", "/health", &[], b"")
                .expect("GET /health");
            let shard: usize = response
                .header("x-shale-shard")
                .expect("x-shale-shard header")
                .parse()
                .expect("shard id");
            if clients[shard].is_none() {
                clients[shard] = Some(client);
            }
        }
        clients
            .into_iter()
            .enumerate()
            .map(|(shard, c)| c.unwrap_or_else(|| panic!("no connection landed on shard {shard}")))
            .collect()
    }

    /// Runs a query whose answer is one integer (a count) and returns it.
    pub fn must_count(&self, sql: &str) -> u64 {
        let body = serde_json::json!({ "sql": sql }).to_string();
        let response = self.post("/api/v1/query", &[], body.as_bytes());
        assert_eq!(response.status, 200, "{sql}: {}", response.text());
        json(&response)["data"][0][0]
            .as_u64()
            .unwrap_or_else(|| panic!("{sql}: not a count: {}", response.text()))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("node running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// SIGTERM and wait: the node flushes every buffer and exits 0.
    pub fn stop(&mut self) {
        let pid = self.pid();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let status = self.wait_exit();
        assert!(
            status.success(),
            "node exited with {status}; log:\n{}",
            self.log()
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("poll child") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node did not exit in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls `/ready` until it answers 200; fails if the process exits first.
    pub fn must_become_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "node exited with {status} before ready; log:\n{}",
                        self.log()
                    );
                }
            }
            if let Ok(response) = request(self.addr, "GET", "/ready", &[], b"") {
                if response.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn must_get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.addr, "POST", path, headers, body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Writes line protocol to `/write?db=`; panics unless the answer is 204.
    pub fn must_write(&self, database: &str, body: &str) {
        let response = self.post(&format!("/write?db={database}"), &[], body.as_bytes());
        assert_eq!(response.status, 204, "write failed: {}", response.text());
    }

    /// A Prometheus sample summed over its label sets.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.must_get("/metrics").text();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let series_name = series.split('{').next()?;
                (series_name == name)
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }

    /// Waits until `condition` holds, re-evaluating it; fails with `what` at the deadline.
    pub fn wait_until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The manifest's file list.
    pub fn manifest_files(&self) -> Vec<serde_json::Value> {
        // The cluster API wants the admin token when the node has one.
        let token = self
            .env
            .iter()
            .find(|(name, _)| name == "SHALE_CLUSTER_ADMIN_TOKEN")
            .map(|(_, token)| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("authorization", t)])
            .unwrap_or_default();
        let response = request(self.addr, "GET", "/api/v1/cluster/files", &headers, b"")
            .unwrap_or_else(|e| panic!("GET /api/v1/cluster/files: {e}; log:\n{}", self.log()));
        assert_eq!(response.status, 200, "{}", response.text());
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        body["files"].as_array().cloned().unwrap_or_default()
    }

    /// Sum of `rows` over manifest entries for a database.
    pub fn manifest_rows(&self, database: &str) -> u64 {
        self.manifest_files()
            .iter()
            .filter(|f| f["database"] == database)
            .map(|f| f["rows"].as_u64().unwrap())
            .sum()
    }

    /// Absolute paths of the manifest's files for `database`.`measurement`.
    pub fn manifest_paths(&self, database: &str, measurement: &str) -> Vec<PathBuf> {
        self.manifest_files()
            .iter()
            .filter(|f| f["database"] == database && f["measurement"] == measurement)
            .map(|f| self.data_dir.join(f["path"].as_str().unwrap()))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port that was free a moment ago, for TCP and UDP alike (a node's QUIC endpoint
/// is UDP, and tests running at once must not pick a port another node's endpoint holds).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[allow(unused_imports)]
pub use shale::http_client::{request, Client, Response};

/// Parses a response body as JSON, failing the test with the body if it is not.
pub fn json(response: &Response) -> serde_json::Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", response.text()))
}

/// Runs `sql` in an in-memory DuckDB (the prebuilt library the node links) and returns every
/// row as strings, NULL as "NULL".
pub fn duckdb_rows(sql: &str) -> Vec<Vec<String>> {
    let connection = duckdb::Connection::open_in_memory().expect("open duckdb");
    let mut statement = connection
        .prepare(sql)
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
    let mut rows = statement
        .query([])
        .unwrap_or_else(|e| panic!("query {sql}: {e}"));
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let columns = row.as_ref().column_count();
        let mut values = Vec::with_capacity(columns);
        for index in 0..columns {
            let value: duckdb::types::Value = row.get(index).unwrap();
            values.push(match value {
                duckdb::types::Value::Null => "NULL".to_string(),
                duckdb::types::Value::Text(s) => s,
                duckdb::types::Value::Boolean(b) => b.to_string(),
                duckdb::types::Value::BigInt(v) => v.to_string(),
                duckdb::types::Value::Int(v) => v.to_string(),
                duckdb::types::Value::UBigInt(v) => v.to_string(),
                duckdb::types::Value::HugeInt(v) => v.to_string(),
                duckdb::types::Value::Double(v) => v.to_string(),
                other => format!("{other:?}"),
            });
        }
        out.push(values);
    }
    out
}

/// A SQL list literal of file paths for `read_parquet([...])`.
pub fn parquet_list(paths: &[PathBuf]) -> String {
    let quoted: Vec<String> = paths
        .iter()
        .map(|p| format!("'{}'", p.display().to_string().replace('\'', "''")))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// A small ext4 filesystem in a file, loop-mounted for the life of the value (needs root).
pub struct SmallDisk {
    pub mount_point: PathBuf,
}

impl SmallDisk {
    /// Mounts a fresh filesystem of `megabytes` (image `dir/disk.img`) at `dir/disk`.
    pub fn mount(dir: &Path, megabytes: u64) -> SmallDisk {
        SmallDisk::mount_at(&dir.join("disk.img"), &dir.join("disk"), megabytes)
    }

    /// Mounts a fresh filesystem of `megabytes`, kept in the file `image`, at `mount_point`.
    pub fn mount_at(image: &Path, mount_point: &Path, megabytes: u64) -> SmallDisk {
        let mount_point = mount_point.to_path_buf();
        std::fs::create_dir_all(&mount_point).unwrap();
        let file = std::fs::File::create(image).unwrap();
        file.set_len(megabytes << 20).unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("run {program}: {e}"));
            assert!(
                output.status.success(),
                "{program} failed (this test needs root and loop devices): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        // No blocks reserved for root: the tests run as root and fill the disk to a known point.
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                image.as_os_str(),
            ],
        );
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount_point.as_os_str(),
            ],
        );
        SmallDisk { mount_point }
    }

    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.mount_point.to_str().unwrap()).unwrap();
        // SAFETY: statvfs fills the zeroed struct for a valid NUL-terminated path.
        unsafe {
            let mut stat: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut stat), 0);
            stat.f_bavail as u64 * stat.f_frsize as u64
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount_point)
            .status();
    }
}
