//! `shale bench ingest`: a line-protocol load generator that measures any server accepting
//! InfluxDB line protocol on `/write` (shale, VictoriaMetrics, InfluxDB 1.x) the same way.
//!
//! Batches are generated before the clock starts; each worker thread keeps one connection
//! alive and sends one batch at a time, waiting for the acknowledgement (so latency is the
//! server's durable-ack latency). Threads: one per worker plus a progress reporter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::http_client::{self, Client};
use crate::workload::{Generator, Shape};

/// Settings of one ingest run.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    pub target: String,
    pub shape: Shape,
    pub workers: usize,
    pub duration: Duration,
    /// Stop after this many rows instead (whichever comes first).
    pub rows_max: Option<u64>,
    pub batch_lines: usize,
    pub hosts: usize,
    pub database: String,
    /// Pre-generated batches cycled through by the workers.
    pub batches_pregenerated: usize,
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct IngestReport {
    pub target: String,
    pub shape: &'static str,
    pub workers: usize,
    pub batch_lines: usize,
    pub elapsed_seconds: f64,
    pub rows: u64,
    pub bytes: u64,
    pub requests: u64,
    pub errors: u64,
    pub rows_per_second: f64,
    pub megabytes_per_second: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    /// Deltas of the server's own counters over the run, when it exposes shale's /metrics.
    pub server: Vec<(String, f64)>,
    pub first_error: Option<String>,
}

/// Server counters reported next to the client-side figures.
const SERVER_COUNTERS: [&str; 5] = [
    "shale_write_rows_total",
    "shale_wal_syncs_total",
    "shale_wal_appends_total",
    "shale_flushes_total",
    "shale_files_written_total",
];

pub fn run_ingest(options: &IngestOptions) -> anyhow::Result<IngestReport> {
    if options.workers == 0 || options.batch_lines == 0 {
        bail!("--workers and --batch-lines must be at least 1");
    }
    let addr = http_client::resolve(&options.target)
        .with_context(|| format!("resolve {}", options.target))?;
    let start_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as i64
        - 3_600_000_000_000;
    let mut generator = Generator::new(options.shape, options.hosts, 42, start_ns);
    let batches: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..options.batches_pregenerated.max(1))
            .map(|_| generator.batch(options.batch_lines).into_bytes())
            .collect(),
    );
    let path = format!("/write?db={}&precision=ns", options.database);
    let before = scrape_counters(addr);

    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(options.workers);
    for worker in 0..options.workers {
        let (stop, rows, bytes, errors, first_error, batches, path) = (
            stop.clone(),
            rows.clone(),
            bytes.clone(),
            errors.clone(),
            first_error.clone(),
            batches.clone(),
            path.clone(),
        );
        let (rows_max, batch_lines) = (options.rows_max, options.batch_lines as u64);
        handles.push(std::thread::spawn(move || -> Vec<u32> {
            let mut latencies_us = Vec::with_capacity(1 << 16);
            let mut client = None;
            let mut index = worker;
            let note_error = |message: String| {
                errors.fetch_add(1, Ordering::Relaxed);
                first_error.lock().unwrap().get_or_insert(message);
            };
            while !stop.load(Ordering::Relaxed) {
                if rows_max.is_some_and(|max| rows.load(Ordering::Relaxed) >= max) {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                if client.is_none() {
                    match Client::connect(addr) {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            note_error(format!("connect: {e}"));
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    }
                }
                let body = &batches[index % batches.len()];
                index += 1;
                let sent = Instant::now();
                let result = client
                    .as_mut()
                    .expect("connected")
                    .request("POST", &path, &[], body);
                let latency = sent.elapsed();
                match result {
                    Ok(response) if (200..300).contains(&response.status) => {
                        latencies_us.push(latency.as_micros().min(u32::MAX as u128) as u32);
                        rows.fetch_add(batch_lines, Ordering::Relaxed);
                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        note_error(format!("HTTP {}: {}", response.status, response.text()));
                        if response.status == 503 {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                    Err(e) => {
                        note_error(format!("request: {e}"));
                        client = None;
                    }
                }
            }
            latencies_us
        }));
    }

    let mut last = (Instant::now(), 0u64);
    while started.elapsed() < options.duration && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100).min(options.duration));
        if options.progress && last.0.elapsed() >= Duration::from_secs(1) {
            let now_rows = rows.load(Ordering::Relaxed);
            let rate = (now_rows - last.1) as f64 / last.0.elapsed().as_secs_f64();
            eprint!(
                "\r{:>6.1}s  {:>12} rows  {:>12.0} rows/s now  {:>12.0} rows/s overall  {} errors   ",
                started.elapsed().as_secs_f64(),
                now_rows,
                rate,
                now_rows as f64 / started.elapsed().as_secs_f64(),
                errors.load(Ordering::Relaxed)
            );
            last = (Instant::now(), now_rows);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies: Vec<u32> = Vec::new();
    for handle in handles {
        latencies.extend(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))?,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    if options.progress {
        eprintln!();
    }
    let after = scrape_counters(addr);
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index] as f64 / 1000.0
    };
    let rows = rows.load(Ordering::Relaxed);
    let bytes = bytes.load(Ordering::Relaxed);
    let server = match (before, after) {
        (Some(before), Some(after)) => SERVER_COUNTERS
            .iter()
            .zip(before.iter().zip(after.iter()))
            .map(|(name, (b, a))| (name.to_string(), a - b))
            .collect(),
        _ => Vec::new(),
    };
    let first_error = first_error.lock().unwrap().clone();
    Ok(IngestReport {
        target: options.target.clone(),
        shape: options.shape.name(),
        workers: options.workers,
        batch_lines: options.batch_lines,
        elapsed_seconds: elapsed,
        rows,
        bytes,
        requests: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        rows_per_second: rows as f64 / elapsed,
        megabytes_per_second: bytes as f64 / elapsed / 1e6,
        latency_ms_p50: percentile(0.50),
        latency_ms_p99: percentile(0.99),
        latency_ms_p999: percentile(0.999),
        latency_ms_max: latencies.last().map_or(0.0, |&v| v as f64 / 1000.0),
        server,
        first_error,
    })
}

/// Sums shale's counters over shards; None if the target has no shale `/metrics`.
fn scrape_counters(addr: std::net::SocketAddr) -> Option<Vec<f64>> {
    let response = http_client::request(addr, "GET", "/metrics", &[], b"").ok()?;
    if response.status != 200 {
        return None;
    }
    let text = response.text();
    let values: Vec<f64> = SERVER_COUNTERS
        .iter()
        .map(|name| {
            text.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        })
        .collect();
    text.contains("shale_").then_some(values)
}

impl IngestReport {
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "target            {}\n\
             shape             {} ({} lines per request, {} workers)\n\
             elapsed           {:.1} s\n\
             rows              {} ({:.0} rows/s)\n\
             bytes             {} ({:.1} MB/s)\n\
             requests          {} ok, {} errors\n\
             latency (ms)      p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}\n",
            self.target,
            self.shape,
            self.batch_lines,
            self.workers,
            self.elapsed_seconds,
            self.rows,
            self.rows_per_second,
            self.bytes,
            self.megabytes_per_second,
            self.requests,
            self.errors,
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.latency_ms_p999,
            self.latency_ms_max,
        );
        for (name, delta) in &self.server {
            text.push_str(&format!("server {name:<28} +{delta}\n"));
        }
        if let Some(error) = &self.first_error {
            text.push_str(&format!("first error       {error}\n"));
        }
        text
    }
}

/// Parses `30s`, `2m`, `500ms`, `1h` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .with_context(|| format!("duration {text:?} has no number"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => bail!("duration unit {other:?} is not one of ms, s, m, h"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks the duration forms the command line accepts and that nonsense is refused.
    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("s").is_err());
    }
}
