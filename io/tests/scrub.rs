//! Integration tests of the deep scrub's read (`FileSink::scrub`) on the sink's real glommio
//! thread, with files in temp directories on the local disk, so O_DIRECT is exercised for real.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use shale_io::sink::FileSink;
use shale_io::sink::SinkConfig;
use shale_io::sink::Written;

const MIB: usize = 1 << 20;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures_lite::future::block_on(future)
}

fn start(direct_io: bool) -> FileSink {
    shale_io::runtime::raise_memlock_limit();
    FileSink::start(SinkConfig {
        direct_io,
        ..SinkConfig::default()
    })
    .expect("start the sink")
}

/// Bytes that no block of the file repeats, so a block read at the wrong offset changes the hash.
fn content(size: usize, seed: u32) -> Vec<u8> {
    (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

fn expected(bytes: &[u8]) -> Written {
    Written {
        size_bytes: bytes.len() as u64,
        blake3: *blake3::hash(bytes).as_bytes(),
    }
}

/// The least time `bytes` may take at `bytes_per_second`, less a millisecond for rounding.
fn least_time(bytes: usize, bytes_per_second: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / bytes_per_second as f64)
        .saturating_sub(Duration::from_millis(1))
}

// Checks that a scrub answers the size and blake3 of exactly the file's bytes at the sizes
// where direct reads go wrong (empty, below, at and just past the alignment, a tail after
// whole 1 MiB blocks, several blocks), through O_DIRECT and through the page cache, limited
// and not, and None for a missing file: the walker compares these with the manifest, so a
// wrong answer here is a false alarm or a missed rot.
#[test]
fn scrub_hashes_exactly_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sizes = [0, 1, 4095, 4096, MIB + 3, 5 * MIB + 17];
    let files: Vec<(PathBuf, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            let bytes = content(size, index as u32);
            (write_file(dir.path(), &format!("f{size}"), &bytes), bytes)
        })
        .collect();
    for direct_io in [true, false] {
        let sink = start(direct_io);
        block_on(async {
            for (path, bytes) in &files {
                for bytes_per_second in [0, 1 << 30] {
                    let scrubbed = sink.scrub(path, bytes_per_second).await.expect("scrub");
                    assert_eq!(
                        scrubbed,
                        Some(expected(bytes)),
                        "{} direct_io={direct_io}",
                        path.display()
                    );
                }
            }
            let missing = dir.path().join("missing");
            assert_eq!(sink.scrub(&missing, 0).await.expect("scrub missing"), None);
        });
        sink.shutdown();
    }
}

/// Pages of `file` in the page cache, and pages in all.
fn resident_pages(file: &std::fs::File) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let length = file.metadata().expect("stat").len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let pages = length.div_ceil(page);
    // SAFETY: a read-only shared mapping of a whole open file, unmapped below; mincore only
    // reports residency and touches no page.
    unsafe {
        let mapped = libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(mapped, libc::MAP_FAILED, "mmap");
        let mut vector = vec![0u8; pages];
        assert_eq!(
            libc::mincore(mapped, length, vector.as_mut_ptr()),
            0,
            "mincore"
        );
        libc::munmap(mapped, length);
        (vector.iter().filter(|&&v| v & 1 == 1).count(), pages)
    }
}

// Checks that the scrub reads from the disk, not the page cache: a file whose pages were
// dropped from the cache is scrubbed, and afterwards none of its pages is cached. A buffered
// read would have cached them all, and a scrub of cached pages proves nothing about the disk.
#[test]
fn scrub_reads_the_disk_not_the_page_cache() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = content(4 * MIB + 5, 9);
    let path = write_file(dir.path(), "cold", &bytes);
    let file = std::fs::File::open(&path).expect("open");
    file.sync_all().expect("sync");
    // SAFETY: advice on an open descriptor; clean pages are dropped.
    let advised = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(advised, 0);
    let (cached, pages) = resident_pages(&file);
    assert_eq!(cached, 0, "the test needs the file out of the page cache");

    let sink = start(true);
    let scrubbed = block_on(sink.scrub(&path, 0)).expect("scrub");
    sink.shutdown();
    assert_eq!(scrubbed, Some(expected(&bytes)));
    let (cached, _) = resident_pages(&file);
    assert_eq!(
        cached, 0,
        "{cached} of {pages} pages were read into the page cache"
    );
}

// Checks the bandwidth limit: one scrub of 8 MiB at 32 MiB/s takes at least 250 ms, and
// back-to-back scrubs of small files (each a single block, all read long before their time)
// hold the rate too, because each sleeps the rest of its time before answering. The upper
// bounds are loose: they only catch a scrub that sleeps far too long.
#[test]
fn scrub_holds_its_rate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let large = content(8 * MIB, 1);
    let large_path = write_file(dir.path(), "large", &large);
    let small: Vec<(PathBuf, Vec<u8>)> = (0..16)
        .map(|index| {
            let bytes = content(64 << 10, index);
            (
                write_file(dir.path(), &format!("small{index}"), &bytes),
                bytes,
            )
        })
        .collect();
    let sink = start(true);
    block_on(async {
        let rate = 32 * MIB as u64;
        let started = Instant::now();
        let scrubbed = sink.scrub(&large_path, rate).await.expect("scrub");
        let took = started.elapsed();
        assert_eq!(scrubbed, Some(expected(&large)));
        assert!(took >= least_time(large.len(), rate), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");

        let rate = 2 * MIB as u64;
        let started = Instant::now();
        for (path, bytes) in &small {
            assert_eq!(
                sink.scrub(path, rate).await.expect("scrub"),
                Some(expected(bytes))
            );
        }
        let took = started.elapsed();
        let total: usize = small.iter().map(|(_, bytes)| bytes.len()).sum();
        assert!(took >= least_time(total, rate), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
    sink.shutdown();
}

// Checks that a paced scrub does not hold the sink thread: while a two-second scrub runs
// (four blocks, each followed by half a second of pacing), a durable append completes and
// small-file hashes (what the replicator sends the sink all the time) are answered one after
// another, each far quicker than one of the scrub's pauses. A scrub that paused or read by
// blocking the thread would hold some of them for a whole pause.
#[test]
fn other_jobs_run_during_a_paced_scrub() {
    let dir = tempfile::tempdir().expect("temp dir");
    let large = content(4 * MIB, 3);
    let large_path = write_file(dir.path(), "large", &large);
    let small = content(10_000, 4);
    let small_path = write_file(dir.path(), "small", &small);
    let log = dir.path().join("presence.log");
    let rate = 2 * MIB as u64;
    let pause = least_time(MIB, rate);
    let sink = start(true);
    block_on(async {
        let started = Instant::now();
        let scrub_done = std::cell::Cell::new(false);
        // `zip` polls the scrub first, so its job is queued before the others.
        let (scrub, others) = futures_lite::future::zip(
            async {
                let scrubbed = sink.scrub(&large_path, rate).await.expect("scrub");
                scrub_done.set(true);
                (scrubbed, started.elapsed())
            },
            async {
                futures_lite::future::yield_now().await;
                sink.append_durable(&log, b"entry".to_vec())
                    .await
                    .expect("append");
                let appended = started.elapsed();
                let mut hashes = 0u32;
                let mut slowest = Duration::ZERO;
                while !scrub_done.get() {
                    let asked = Instant::now();
                    let hashed = sink.hash(&small_path).await.expect("hash");
                    assert_eq!(hashed, Some(expected(&small)));
                    slowest = slowest.max(asked.elapsed());
                    hashes += 1;
                }
                (appended, hashes, slowest)
            },
        )
        .await;
        let (scrubbed, scrub_took) = scrub;
        let (appended, hashes, slowest) = others;
        assert_eq!(scrubbed, Some(expected(&large)));
        assert_eq!(std::fs::read(&log).expect("read log"), b"entry");
        assert!(
            scrub_took >= least_time(large.len(), rate),
            "{scrub_took:?}"
        );
        assert!(
            appended < scrub_took / 2,
            "the append took {appended:?}, the scrub {scrub_took:?}"
        );
        assert!(hashes > 4, "{hashes} hashes during the scrub");
        assert!(
            slowest < pause / 2,
            "the slowest of {hashes} hashes took {slowest:?}; the scrub pauses {pause:?}"
        );
    });
    sink.shutdown();
}
