//! The deep scrub's read against its ceilings, on one machine: `FileSink::scrub` over files on
//! the real disk, unlimited and at a bandwidth limit, next to the two things that bound it,
//! the disk's sequential O_DIRECT read speed (1 MiB requests, one at a time, as the scrub
//! reads) and single-core blake3 over bytes in memory. Each row reports the CPU time per MB of
//! the thread doing the work (the bench thread for the raw read and blake3, the `shale-fetch`
//! sink thread for the scrubs).
//!
//! Run: `cargo bench -p shale-io --bench scrub` (release). Settings from the environment:
//! `SHALE_SCRUB_MIB` (bytes written and scrubbed, default 1024), `SHALE_SCRUB_FILE_MIB` (per
//! file, default 64), `SHALE_SCRUB_LIMITED_MB` (bytes of the limited scrub, default 200),
//! `SHALE_SCRUB_LIMIT_MB_PER_S` (its limit, default 50), `SHALE_SCRUB_IO_MEMORY_MIB` (the
//! sink's registered buffer memory, default `SinkConfig`'s), `SHALE_BENCH_DIR` (default the
//! system temporary directory, which must be on the disk to be measured).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use shale_io::sink::FileSink;
use shale_io::sink::SinkConfig;

const MIB: usize = 1 << 20;
/// Bytes per request of the raw read: what the scrub asks for.
const READ_BYTES: usize = MIB;
/// Alignment of the raw read's buffer: any device's logical block size divides it.
const ALIGN_BYTES: usize = 4096;
/// Bytes of the in-memory buffer blake3 hashes, over and over.
const HASH_BUFFER_BYTES: usize = 64 * MIB;

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

/// CPU time (ms) used so far by the threads whose name starts with `prefix`, or by the calling
/// thread when `prefix` is `None`.
fn cpu_ms(prefix: Option<&str>) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stats: Vec<String> = match prefix {
        None => std::fs::read_to_string("/proc/thread-self/stat")
            .into_iter()
            .collect(),
        Some(_) => std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .collect(),
    };
    let mut ms = 0.0;
    for stat in stats {
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if prefix.is_some_and(|prefix| !stat[open + 1..close].starts_with(prefix)) {
            continue;
        }
        // After the name: utime and stime are fields 14 and 15 of the line.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        ms += ticks * 1000.0 / ticks_per_s;
    }
    ms
}

struct Row {
    name: &'static str,
    bytes: u64,
    elapsed: Duration,
    cpu_ms: f64,
    thread: &'static str,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<44} {:>9} {:>8} {:>9} {:>12}  thread",
        "phase", "MB", "s", "MB/s", "CPU ms/MB"
    );
    for row in rows {
        let mb = row.bytes as f64 / 1e6;
        println!(
            "{:<44} {:>9.1} {:>8.2} {:>9.1} {:>12.3}  {}",
            row.name,
            mb,
            row.elapsed.as_secs_f64(),
            mb / row.elapsed.as_secs_f64(),
            row.cpu_ms / mb,
            row.thread
        );
    }
}

/// Writes `count` files of `file_bytes` incompressible bytes, each fdatasync'd, and answers
/// their paths and blake3 hashes.
fn write_files(dir: &Path, count: usize, file_bytes: usize) -> Vec<(PathBuf, [u8; 32])> {
    let mut buffer = vec![0u8; file_bytes];
    (0..count)
        .map(|index| {
            fill(&mut buffer, 0x9e37_79b9_7f4a_7c15 ^ index as u64);
            let path = dir.join(format!("file-{index:03}.parquet"));
            let mut file = std::fs::File::create(&path).expect("create file");
            file.write_all(&buffer).expect("write file");
            file.sync_data().expect("fdatasync file");
            // Out of the page cache, so that nothing below can be served from it by accident.
            // SAFETY: advice on an open descriptor.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            (path, *blake3::hash(&buffer).as_bytes())
        })
        .collect()
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuffer {
    pointer: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    fn new(bytes: usize) -> AlignedBuffer {
        let layout = std::alloc::Layout::from_size_align(bytes, ALIGN_BYTES).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!pointer.is_null(), "allocate aligned buffer");
        AlignedBuffer { pointer, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `pointer` holds `layout.size()` initialized bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.pointer, self.layout) };
    }
}

/// Reads every file sequentially with O_DIRECT in `READ_BYTES` requests; answers the bytes.
fn raw_direct_read(files: &[(PathBuf, [u8; 32])]) -> u64 {
    let mut buffer = AlignedBuffer::new(READ_BYTES);
    let mut total = 0u64;
    for (path, _) in files {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("open with O_DIRECT");
        let mut at = 0u64;
        loop {
            let read = file
                .read_at(buffer.as_mut_slice(), at)
                .expect("direct read");
            if read == 0 {
                break;
            }
            at += read as u64;
        }
        total += at;
    }
    total
}

fn main() {
    let total_mib = env_usize("SHALE_SCRUB_MIB", 1024);
    let file_mib = env_usize("SHALE_SCRUB_FILE_MIB", 64).max(1);
    let limited_mb = env_usize("SHALE_SCRUB_LIMITED_MB", 200);
    let limit_mb_per_s = env_usize("SHALE_SCRUB_LIMIT_MB_PER_S", 50).max(1);
    let base = std::env::var_os("SHALE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("shale-scrub-bench")
        .tempdir_in(&base)
        .expect("bench directory");
    let count = (total_mib / file_mib).max(1);
    println!(
        "deep scrub read: {count} files of {file_mib} MiB in {}",
        dir.path().display()
    );

    let started = Instant::now();
    let files = write_files(dir.path(), count, file_mib * MIB);
    let written = (count * file_mib * MIB) as u64;
    println!(
        "written and fdatasync'd in {:.2} s ({:.1} MB/s, fill and blake3 included)\n",
        started.elapsed().as_secs_f64(),
        written as f64 / 1e6 / started.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();

    // (a) The disk's read bandwidth, as the scrub asks for it.
    let cpu = cpu_ms(None);
    let started = Instant::now();
    let bytes = raw_direct_read(&files);
    rows.push(Row {
        name: "(a) raw O_DIRECT read, 1 MiB requests, QD1",
        bytes,
        elapsed: started.elapsed(),
        cpu_ms: cpu_ms(None) - cpu,
        thread: "bench",
    });

    // (b) Single-core blake3 over bytes already in memory (and mostly in cache lines no
    // other core holds): the most the scrub can hash.
    let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
    fill(&mut buffer, 7);
    let rounds = (total_mib * MIB / HASH_BUFFER_BYTES).max(1);
    let cpu = cpu_ms(None);
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    for _ in 0..rounds {
        hasher.update(&buffer);
    }
    std::hint::black_box(hasher.finalize());
    rows.push(Row {
        name: "(b) blake3 single core, in memory",
        bytes: (rounds * HASH_BUFFER_BYTES) as u64,
        elapsed: started.elapsed(),
        cpu_ms: cpu_ms(None) - cpu,
        thread: "bench",
    });
    drop(buffer);

    shale_io::runtime::raise_memlock_limit();
    let defaults = SinkConfig::default();
    let io_memory_bytes =
        env_usize("SHALE_SCRUB_IO_MEMORY_MIB", defaults.io_memory_bytes / MIB) * MIB;
    let sink = FileSink::start(SinkConfig {
        io_memory_bytes,
        ..defaults
    })
    .expect("start the sink");
    let sink_thread = SinkConfig::default().thread_name;
    let scrub_all = |files: &[(PathBuf, [u8; 32])], bytes_per_second: u64| -> u64 {
        futures_lite::future::block_on(async {
            let mut total = 0u64;
            for (path, blake3) in files {
                let scrubbed = sink
                    .scrub(path, bytes_per_second)
                    .await
                    .expect("scrub")
                    .expect("the file exists");
                assert_eq!(&scrubbed.blake3, blake3, "{}", path.display());
                total += scrubbed.size_bytes;
            }
            total
        })
    };

    // (c) The scrub without a limit: how close it gets to min(disk, blake3).
    let cpu = cpu_ms(Some(&sink_thread));
    let started = Instant::now();
    let bytes = scrub_all(&files, 0);
    rows.push(Row {
        name: "(c) FileSink::scrub, unlimited",
        bytes,
        elapsed: started.elapsed(),
        cpu_ms: cpu_ms(Some(&sink_thread)) - cpu,
        thread: "shale-fetch",
    });

    // (d) The scrub at its limit, over enough files for the limit to show.
    let mut limited = Vec::new();
    let mut limited_bytes = 0usize;
    for file in &files {
        if limited_bytes >= limited_mb * 1_000_000 {
            break;
        }
        limited.push(file.clone());
        limited_bytes += file_mib * MIB;
    }
    let cpu = cpu_ms(Some(&sink_thread));
    let started = Instant::now();
    let bytes = scrub_all(&limited, (limit_mb_per_s * 1_000_000) as u64);
    rows.push(Row {
        name: if limit_mb_per_s == 50 {
            "(d) FileSink::scrub at 50 MB/s"
        } else {
            "(d) FileSink::scrub at SHALE_SCRUB_LIMIT_MB_PER_S"
        },
        bytes,
        elapsed: started.elapsed(),
        cpu_ms: cpu_ms(Some(&sink_thread)) - cpu,
        thread: "shale-fetch",
    });
    sink.shutdown();

    print_table(&rows);
    let rate = |row: &Row| row.bytes as f64 / 1e6 / row.elapsed.as_secs_f64();
    let (disk, hash, scrub, paced) = (
        rate(&rows[0]),
        rate(&rows[1]),
        rate(&rows[2]),
        rate(&rows[3]),
    );
    println!(
        "\nunlimited scrub: {:.0}% of the disk's read, {:.0}% of single-core blake3, {:.0}% of \
         the lesser; limited scrub: {:.1} MB/s against a limit of {limit_mb_per_s} MB/s",
        100.0 * scrub / disk,
        100.0 * scrub / hash,
        100.0 * scrub / disk.min(hash),
        paced
    );
}
