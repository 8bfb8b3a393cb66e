//! Fetch planning cost per new manifest version, at 100k and 1M files, on a node that holds
//! every file (the steady state: one registration arrives, one file goes missing).
//!
//! `incremental`: what the replicator does now per version, [`Planner::observe`] over the
//! difference to the previous version (which shares structure with it, as published versions
//! do) plus one planning round. `full_scan`: the work the replicator did per version before,
//! reproduced here (one pass over every file with a presence lookup to build the new
//! present-version candidate's missing set, and a second pass to plan).

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use shale_replication::files::planner::PeerInfo;
use shale_replication::files::planner::PlanInput;
use shale_replication::files::planner::Planner;
use shale_replication::files::planner::PlannerConfig;
use shale_replication::files::planner::Presence;
use shale_replication::{FileEntry, Manifest, ManifestCommand};

const SIZES: [usize; 2] = [100_000, 1_000_000];

struct Present(HashMap<String, String>);

impl Presence for Present {
    fn contains(&self, path: &str, blake3_hex: &str) -> bool {
        self.0.get(path).is_some_and(|h| h == blake3_hex)
    }
}

fn entry(i: usize) -> FileEntry {
    FileEntry {
        path: format!("bench/m{}/{i:07}.parquet", i % 1000),
        size_bytes: 1 << 20,
        blake3_hex: format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        rows: 1,
        time_min_us: i as i64,
        time_max_us: i as i64,
        database: "bench".to_owned(),
        measurement: format!("m{}", i % 1000),
        origin_node: 2,
        shard: 0,
        lsn_first: i as u64 + 1,
        lsn_last: i as u64 + 1,
        created_at_ms: 0,
        columns_fingerprint: 0,
        taken_by: None,
    }
}

/// A manifest of `files` files, all present locally.
fn build(files: usize) -> (Manifest, Present) {
    let mut manifest = Manifest::default();
    let mut present = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..files {
        let file = entry(i);
        present.insert(file.path.clone(), file.blake3_hex.clone());
        batch.push(file);
        if batch.len() == 10_000 {
            let index = manifest.applied_index() + 1;
            manifest.apply(
                index,
                &ManifestCommand::Register {
                    files: std::mem::take(&mut batch),
                },
            );
        }
    }
    if !batch.is_empty() {
        let index = manifest.applied_index() + 1;
        manifest.apply(index, &ManifestCommand::Register { files: batch });
    }
    (manifest, Present(present))
}

fn planning(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_per_version");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let peers = vec![PeerInfo { node_id: 2 }];
    for size in SIZES {
        let (manifest, present) = build(size);
        let mut next = manifest.clone();
        let index = next.applied_index() + 1;
        next.apply(
            index,
            &ManifestCommand::Register {
                files: vec![entry(size)],
            },
        );
        let config = PlannerConfig {
            retry: Duration::from_secs(1),
            bad_source_forget: Duration::from_secs(60),
        };
        let mut caught_up = Planner::new(config);
        caught_up.observe(None, &manifest, &present);
        assert_eq!(caught_up.missing_files(), 0);

        group.bench_with_input(BenchmarkId::new("incremental", size), &size, |b, _| {
            b.iter_batched(
                || caught_up.clone(),
                |mut planner| {
                    planner.observe(Some(&manifest), &next, &present);
                    let missing = planner.missing();
                    let tasks = planner.next_tasks(PlanInput {
                        local: 1,
                        peers: &peers,
                        concurrency: 4,
                        now: Duration::ZERO,
                    });
                    assert_eq!(tasks.len(), 1);
                    (planner, missing, tasks)
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("full_scan", size), &size, |b, _| {
            b.iter(|| {
                let missing: BTreeSet<String> = next
                    .files()
                    .iter()
                    .filter(|(path, entry)| !present.contains(path, &entry.blake3_hex))
                    .map(|(path, _)| path.to_string())
                    .collect();
                let mut tasks = Vec::new();
                let mut missing_bytes = 0u64;
                for (path, entry) in next.files() {
                    if present.contains(path, &entry.blake3_hex) {
                        continue;
                    }
                    missing_bytes += entry.size_bytes;
                    tasks.push(path.clone());
                }
                assert_eq!(tasks.len(), 1);
                (missing, tasks, missing_bytes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
