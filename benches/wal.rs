//! WAL append + group-commit throughput on one glommio executor, on the real disk.
//!
//! `appenders` concurrent tasks (think: HTTP requests on one shard) each append an 8 KiB
//! payload (a typical 100-line request) and wait until it is durable, then append the next.
//! One iteration is one durable append, so criterion's elements/s are synced appends/s; the
//! bench also prints MB/s and how many appends shared each fdatasync. Measured with fsync on
//! (the real contract) and off (the write path alone, for reference).
//!
//! The WAL lives in a temp directory under the cargo target dir (or `SHALE_BENCH_DIR`), which
//! must be on a real disk: on tmpfs glommio silently drops O_DIRECT and fdatasync is free.

use std::{
    cell::Cell,
    path::PathBuf,
    rc::Rc,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutorBuilder, Placement};
use shale_io::wal::{Wal, WalConfig};

const PAYLOAD_BYTES: usize = 8 << 10;

fn bench_dir() -> PathBuf {
    std::env::var_os("SHALE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

/// Runs `appends` durable appends spread over `appenders` tasks on a fresh executor and WAL;
/// returns the time from the first append to the last durable one, and prints a summary line.
fn run(appends: u64, appenders: usize, fsync: bool) -> Duration {
    let root = bench_dir();
    std::fs::create_dir_all(&root).expect("create bench dir");
    let dir = tempfile::tempdir_in(&root).expect("create temp wal dir");
    let config = WalConfig {
        fsync,
        ..WalConfig::new(dir.path().join("wal"), 1, 0)
    };
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .expect("build glommio executor");
    executor.run(async move {
        let (wal, _) = Wal::open(config, 1, |_| Ok(())).await.expect("open wal");
        let wal = Rc::new(wal);
        let remaining = Rc::new(Cell::new(appends));
        let payload = Rc::new(vec![0x5Au8; PAYLOAD_BYTES]);
        let started = Instant::now();
        let tasks: Vec<_> = (0..appenders)
            .map(|_| {
                let (wal, remaining, payload) = (wal.clone(), remaining.clone(), payload.clone());
                glommio::spawn_local(async move {
                    while remaining.get() > 0 {
                        remaining.set(remaining.get() - 1);
                        let append = wal.append(1, 0, &payload).expect("append");
                        append.durable().await.expect("durable");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        let elapsed = started.elapsed();
        let stats = wal.stats();
        wal.close().await.expect("close wal");
        if appends >= 100 {
            let seconds = elapsed.as_secs_f64();
            println!(
                "wal fsync={} appenders={appenders}: {:.0} durable appends/s, {:.1} MB/s payload, \
                 {:.1} appends per group, write mean {}us, sync mean {}us p50<={}us p99<={}us",
                if fsync { "on" } else { "off" },
                appends as f64 / seconds,
                (appends as usize * PAYLOAD_BYTES) as f64 / seconds / 1e6,
                stats.group_records as f64 / stats.groups.max(1) as f64,
                stats.write_latency.sum_us / stats.write_latency.count.max(1),
                stats.sync_latency.sum_us / stats.sync_latency.count.max(1),
                stats.sync_latency.quantile_bound_us(0.5),
                stats.sync_latency.quantile_bound_us(0.99),
            );
        }
        elapsed
    })
}

fn group_commit(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("wal_durable_append_8k");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for fsync in [true, false] {
        for appenders in [1usize, 16, 64] {
            let name = if fsync { "fsync" } else { "no_fsync" };
            group.bench_with_input(
                BenchmarkId::new(name, appenders),
                &appenders,
                |bencher, &appenders| {
                    bencher.iter_custom(|iterations| run(iterations, appenders, fsync))
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
