//! The manifest at scale: apply latency while a reader pins an older version, table and time
//! lookups, and snapshot size, encode and decode time, with 100k and 1M files over 1000 tables.
//!
//! Every table holds the same number of files, one per hour, as hourly flushes make them. The
//! apply bench registers one new file per iteration while the previous version is still held,
//! which is what a query does to the control thread when it pins a version during a flush.
//! Snapshot sizes are printed once per size as `snapshot bytes`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use openraft::CommittedLeaderId;
use shale_replication::raft_types::{LogId, SnapshotMeta};
use shale_replication::state_machine::{decode_snapshot, encode_snapshot};
use shale_replication::{FileEntry, Manifest, ManifestCommand};

const TABLES: usize = 1000;
const HOUR_US: i64 = 3_600_000_000;
const BASE_US: i64 = 1_780_000_000_000_000;
const SIZES: [usize; 2] = [100_000, 1_000_000];

/// 64 hex digits that look like a real hash (as incompressible), derived from `seed`.
fn pseudo_hash(seed: u64) -> String {
    let mut state = seed;
    (0..4)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:016x}", z ^ (z >> 31))
        })
        .collect()
}

/// The `i`-th file of table `table`: one hour of data, from one of four shards.
fn entry(table: usize, i: usize) -> FileEntry {
    let time_min_us = BASE_US + i as i64 * HOUR_US;
    let shard = (i % 4) as u32;
    FileEntry {
        path: format!("bench/m{table}/{i:06}/n1-s{shard}-{time_min_us}-{i}.parquet"),
        size_bytes: 1 << 20,
        blake3_hex: pseudo_hash((table * 1_000_000 + i) as u64),
        rows: 100_000,
        time_min_us,
        time_max_us: time_min_us + HOUR_US - 1,
        database: "bench".to_owned(),
        measurement: format!("m{table}"),
        origin_node: 1,
        shard,
        lsn_first: i as u64 * 10 + 1,
        lsn_last: i as u64 * 10 + 10,
        created_at_ms: time_min_us / 1000,
        columns_fingerprint: table as u64,
        taken_by: None,
    }
}

/// A manifest with `files` files over [`TABLES`] tables, registered in commands of 10k files.
fn build(files: usize) -> Manifest {
    let per_table = files / TABLES;
    let mut manifest = Manifest::default();
    let mut batch = Vec::new();
    let mut index = 0;
    for i in 0..per_table {
        for table in 0..TABLES {
            batch.push(entry(table, i));
            if batch.len() == 10_000 {
                index += 1;
                manifest.apply(
                    index,
                    &ManifestCommand::Register {
                        files: std::mem::take(&mut batch),
                    },
                );
            }
        }
    }
    if !batch.is_empty() {
        index += 1;
        manifest.apply(index, &ManifestCommand::Register { files: batch });
    }
    assert_eq!(manifest.files().len(), files);
    manifest
}

/// Built manifests, shared by the groups so each size is built once per run.
fn manifest(files: usize) -> Manifest {
    static CACHE: OnceLock<Mutex<HashMap<usize, Manifest>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("cache lock");
    cache.entry(files).or_insert_with(|| build(files)).clone()
}

fn label(files: usize) -> String {
    format!("{}k", files / 1000)
}

fn apply_pinned(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_register_1_file_pinned");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for files in SIZES {
        let mut manifest = manifest(files);
        let mut next = files;
        group.bench_function(BenchmarkId::from_parameter(label(files)), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let pinned = manifest.clone();
                    next += 1;
                    let command = ManifestCommand::Register {
                        files: vec![entry(next % TABLES, next)],
                    };
                    let index = manifest.applied_index() + 1;
                    let started = Instant::now();
                    manifest.apply(index, &command);
                    total += started.elapsed();
                    drop(pinned);
                }
                total
            });
        });
    }
    group.finish();
}

fn lookups(c: &mut Criterion) {
    let files = 1_000_000;
    let manifest = manifest(files);
    let mut group = c.benchmark_group("lookup_1000k_files_1000_tables");
    group.bench_function("files_for", |b| {
        b.iter(|| manifest.files_for("bench", "m500").count());
    });
    // One hour in the middle of the table's range: what a query with a narrow time filter reads.
    let lower = BASE_US + 500 * HOUR_US + 10;
    let upper = lower + HOUR_US / 2;
    group.bench_function("files_in_1h", |b| {
        b.iter(|| files_in(&manifest, lower, upper));
    });
    group.finish();
}

/// Files of table m500 overlapping `[lower, upper]`.
fn files_in(manifest: &Manifest, lower: i64, upper: i64) -> usize {
    manifest.files_in("bench", "m500", lower, upper).len()
}

fn snapshot_meta(manifest: &Manifest) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(LogId::new(
            CommittedLeaderId::new(1, 1),
            manifest.applied_index(),
        )),
        last_membership: Default::default(),
        snapshot_id: "bench".to_owned(),
    }
}

fn snapshots(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for files in SIZES {
        let manifest = manifest(files);
        let meta = snapshot_meta(&manifest);
        let bytes = encode_snapshot(&meta, &manifest).expect("encode");
        println!("snapshot bytes: {} files -> {} bytes", files, bytes.len());
        group.bench_function(BenchmarkId::new("encode", label(files)), |b| {
            b.iter(|| encode_snapshot(&meta, &manifest).expect("encode").len());
        });
        // The part of decode that rebuilds the maps and indexes from a decoded image.
        let image = manifest.to_image();
        group.bench_function(BenchmarkId::new("rebuild_from_image", label(files)), |b| {
            b.iter_batched(
                || image.clone(),
                |image| Manifest::from_image(image).expect("valid image"),
                BatchSize::LargeInput,
            );
        });
        group.bench_function(BenchmarkId::new("decode", label(files)), |b| {
            b.iter(|| {
                decode_snapshot(&bytes, Path::new("bench"))
                    .expect("decode")
                    .1
                    .applied_index()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, apply_pinned, lookups, snapshots);
criterion_main!(benches);
