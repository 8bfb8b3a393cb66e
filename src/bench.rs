//! `shale bench`: load generators that measure a server from the outside.
//!
//! `shale bench ingest` is a line-protocol load that measures any server accepting InfluxDB line
//! protocol on `/write` (shale, VictoriaMetrics, InfluxDB 1.x) the same way. Batches are
//! generated before the clock starts; each worker thread keeps one connection alive and sends one
//! batch at a time, waiting for the acknowledgement (so latency is the server's durable-ack
//! latency). `shale bench query` ([`query`]) times dashboard queries the same way.
//!
//! Threads: one per worker plus the calling thread, which prints a progress line each second.
//! Every worker records its completions into its own [`timeline::Timeline`]; the merged
//! timelines give the per-second `series` of the report, which [`plot`] draws as an SVG chart.

pub mod plot;
pub mod query;
pub mod timeline;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::http_client::{self, Client};
use crate::workload::{Generator, Shape};
use timeline::{SeriesPoint, Timeline};

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
    /// The `ack` query parameter of every write (a shale cluster's acknowledgement level).
    pub ack: Option<String>,
    /// Pre-generated batches cycled through by the workers.
    pub batches_pregenerated: usize,
    /// Generate every batch while running instead, each worker its own slice of the hosts, so
    /// that every row is a distinct (series, time) and the data ends about now: for loading a
    /// dataset to query (`rows_max` is required). Costs the loader CPU.
    pub unique: bool,
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
    /// One point per second of the run: rows/s and the latency of the requests completed in it.
    pub series: Vec<SeriesPoint>,
}

/// Latency percentiles of a set of requests, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    /// From latencies in microseconds, sorted ascending; all zero when there are none.
    pub fn from_sorted_us(sorted_us: &[u32]) -> LatencySummary {
        LatencySummary {
            p50: percentile_ms(sorted_us, 0.50),
            p99: percentile_ms(sorted_us, 0.99),
            p999: percentile_ms(sorted_us, 0.999),
            max: sorted_us.last().map_or(0.0, |&v| v as f64 / 1000.0),
        }
    }
}

/// The nearest-rank percentile `p` (0 < p <= 1) of latencies in microseconds, sorted ascending,
/// in milliseconds: the smallest value that at least `p` of the values are at or below. Zero for
/// no values.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    debug_assert!(sorted_us.windows(2).all(|w| w[0] <= w[1]), "not sorted");
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
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
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as i64;
    let sources: Vec<Source> = if options.unique {
        let Some(rows_max) = options.rows_max else {
            bail!("--unique needs --rows (the dataset's size decides its time span)");
        };
        if options.hosts < options.workers {
            bail!("--unique needs at least as many --hosts as --workers");
        }
        // Each worker writes its hosts' rounds up to now: steps = rows / hosts.
        let step_ns = Generator::new(options.shape, 1, 0, 0).step_ns();
        let steps = rows_max.div_ceil(options.hosts as u64) as i64;
        let start_ns = now_ns - steps * step_ns;
        (0..options.workers)
            .map(|worker| {
                let hosts = options.hosts * worker / options.workers
                    ..options.hosts * (worker + 1) / options.workers;
                let quota = rows_max * hosts.len() as u64 / options.hosts as u64;
                Source::Live {
                    generator: Generator::for_hosts(
                        options.shape,
                        hosts,
                        42 + worker as u64,
                        start_ns,
                    ),
                    remaining: quota,
                    body: String::with_capacity(options.batch_lines * 400),
                }
            })
            .collect()
    } else {
        let mut generator =
            Generator::new(options.shape, options.hosts, 42, now_ns - 3_600_000_000_000);
        let batches: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..options.batches_pregenerated.max(1))
                .map(|_| generator.batch(options.batch_lines).into_bytes())
                .collect(),
        );
        (0..options.workers)
            .map(|worker| Source::Cycle {
                batches: batches.clone(),
                index: worker,
            })
            .collect()
    };
    let mut path = format!("/write?db={}&precision=ns", options.database);
    if let Some(ack) = &options.ack {
        path.push_str(&format!("&ack={ack}"));
    }
    let before = scrape_counters(addr);

    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(options.workers);
    for mut source in sources {
        let (stop, rows, bytes, errors, first_error, path) = (
            stop.clone(),
            rows.clone(),
            bytes.clone(),
            errors.clone(),
            first_error.clone(),
            path.clone(),
        );
        let (rows_max, batch_lines) = (options.rows_max, options.batch_lines as u64);
        handles.push(std::thread::spawn(move || -> Timeline {
            let mut timeline = Timeline::new();
            let mut connection = Connection::new(addr);
            let note_error = |timeline: &mut Timeline, message: String| {
                timeline.record_error(started.elapsed());
                errors.fetch_add(1, Ordering::Relaxed);
                first_error.lock().unwrap().get_or_insert(message);
            };
            while !stop.load(Ordering::Relaxed) {
                if rows_max.is_some_and(|max| rows.load(Ordering::Relaxed) >= max) {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                let Some((body, lines)) = source.next(batch_lines) else {
                    break;
                };
                match connection.send(&path, &[], body) {
                    Ok((_, latency)) => {
                        timeline.record(started.elapsed(), latency, lines);
                        rows.fetch_add(lines, Ordering::Relaxed);
                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                    Err(message) => note_error(&mut timeline, message),
                }
            }
            timeline
        }));
    }

    let mut progress = Progress::new(started, "rows");
    while started.elapsed() < options.duration
        && !stop.load(Ordering::Relaxed)
        && !handles.iter().all(|h| h.is_finished())
    {
        std::thread::sleep(Duration::from_millis(100).min(options.duration));
        if options.progress {
            progress.tick(rows.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut timeline = Timeline::new();
    for handle in handles {
        timeline.merge(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))?,
        );
    }
    let elapsed = started.elapsed();
    if options.progress {
        progress.finish();
    }
    let after = scrape_counters(addr);
    let latencies = timeline.latencies_us_sorted();
    let latency = LatencySummary::from_sorted_us(&latencies);
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
    let elapsed_seconds = elapsed.as_secs_f64();
    Ok(IngestReport {
        target: options.target.clone(),
        shape: options.shape.name(),
        workers: options.workers,
        batch_lines: options.batch_lines,
        elapsed_seconds,
        rows,
        bytes,
        requests: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        rows_per_second: rows as f64 / elapsed_seconds,
        megabytes_per_second: bytes as f64 / elapsed_seconds / 1e6,
        latency_ms_p50: latency.p50,
        latency_ms_p99: latency.p99,
        latency_ms_p999: latency.p999,
        latency_ms_max: latency.max,
        server,
        first_error,
        series: timeline.series(elapsed),
    })
}

/// Where a worker's request bodies come from.
enum Source {
    /// Pre-generated batches, cycled through from `index`.
    Cycle {
        batches: Arc<Vec<Vec<u8>>>,
        index: usize,
    },
    /// Generated on the fly, `remaining` rows in all (a live batch is not retried on error, so
    /// a failed request's rows are missing from the dataset and counted as errors).
    Live {
        generator: Generator,
        remaining: u64,
        body: String,
    },
}

impl Source {
    /// The next body and its line count; `None` once a live source has written its rows.
    fn next(&mut self, batch_lines: u64) -> Option<(&[u8], u64)> {
        match self {
            Source::Cycle { batches, index } => {
                let body = &batches[*index % batches.len()];
                *index += 1;
                Some((body, batch_lines))
            }
            Source::Live {
                generator,
                remaining,
                body,
            } => {
                let lines = batch_lines.min(*remaining);
                if lines == 0 {
                    return None;
                }
                *remaining -= lines;
                body.clear();
                generator.fill(body, lines as usize);
                Some((body.as_bytes(), lines))
            }
        }
    }
}

/// The live progress line on stderr, rewritten about once a second.
struct Progress {
    started: Instant,
    unit: &'static str,
    last: (Instant, u64),
    printed: bool,
}

impl Progress {
    fn new(started: Instant, unit: &'static str) -> Progress {
        Progress {
            started,
            unit,
            last: (started, 0),
            printed: false,
        }
    }

    /// Prints the line if a second has passed since the last one; `count` is the running total.
    fn tick(&mut self, count: u64, errors: u64) {
        let since_last = self.last.0.elapsed();
        if since_last < Duration::from_secs(1) {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let unit = self.unit;
        eprint!(
            "\r{elapsed:>6.1}s  {count:>12} {unit}  {:>12.0} {unit}/s now  {:>12.0} {unit}/s overall  \
             {errors} errors   ",
            count.saturating_sub(self.last.1) as f64 / since_last.as_secs_f64(),
            count as f64 / elapsed,
        );
        self.last = (Instant::now(), count);
        self.printed = true;
    }

    fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
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
        if let Some(spread) = Spread::of(timeline::plotted(&self.series).map(|p| p.rows_per_second))
        {
            text.push_str(&format!(
                "per second        rows/s min {:.0}  median {:.0}  max {:.0} ({} s)\n",
                spread.min, spread.median, spread.max, spread.count
            ));
        }
        for (name, delta) in &self.server {
            text.push_str(&format!("server {name:<28} +{delta}\n"));
        }
        if let Some(error) = &self.first_error {
            text.push_str(&format!("first error       {error}\n"));
        }
        text
    }

    /// The run as a self-contained SVG chart: rows/s and latency p50/p99 per second.
    pub fn svg(&self) -> String {
        plot::render(&plot::Chart {
            title: format!(
                "shale bench ingest: {} \u{2192} {}, {} workers, {} lines/request",
                self.shape, self.target, self.workers, self.batch_lines
            ),
            subtitle: format!(
                "{:.0} rows/s overall, latency p50 {:.2} ms, p99 {:.2} ms, {:.1} s, {} errors",
                self.rows_per_second,
                self.latency_ms_p50,
                self.latency_ms_p99,
                self.elapsed_seconds,
                self.errors
            ),
            throughput_label: "rows/s",
            throughput: |point| point.rows_per_second,
            series: &self.series,
            elapsed_seconds: self.elapsed_seconds,
        })
    }
}

/// Minimum, median and maximum of a set of per-second figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    /// None for no values.
    pub fn of(values: impl Iterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Spread {
            min: values[0],
            median: values[(values.len() - 1) / 2],
            max: values[values.len() - 1],
            count: values.len(),
        })
    }
}

/// A load worker's keep-alive connection: reconnects after a failure and backs off when the
/// server refuses (connect failure, 503), the same way in every load mode.
pub(crate) struct Connection {
    addr: std::net::SocketAddr,
    client: Option<Client>,
}

impl Connection {
    pub(crate) fn new(addr: std::net::SocketAddr) -> Connection {
        Connection { addr, client: None }
    }

    /// One request; a 2xx response with its latency, or the error message to count.
    pub(crate) fn send(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(http_client::Response, Duration), String> {
        if self.client.is_none() {
            match Client::connect(self.addr) {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!("connect: {e}"));
                }
            }
        }
        let sent = Instant::now();
        let result = self
            .client
            .as_mut()
            .expect("connected")
            .request("POST", path, headers, body);
        let latency = sent.elapsed();
        match result {
            Ok(response) if (200..300).contains(&response.status) => Ok((response, latency)),
            Ok(response) => {
                if response.status == 503 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(format!("HTTP {}: {}", response.status, response.text()))
            }
            Err(e) => {
                self.client = None;
                Err(format!("request: {e}"))
            }
        }
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

    // Checks the nearest-rank percentile: the smallest value with at least p of the values at or
    // below it, in milliseconds, on small sets where the rank is easy to count by hand.
    #[test]
    fn percentiles() {
        let hundred: Vec<u32> = (1..=100).map(|v| v * 1000).collect();
        assert_eq!(percentile_ms(&hundred, 0.50), 50.0);
        assert_eq!(percentile_ms(&hundred, 0.99), 99.0);
        assert_eq!(percentile_ms(&hundred, 0.999), 100.0);
        assert_eq!(percentile_ms(&hundred, 0.001), 1.0);
        assert_eq!(percentile_ms(&hundred, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&[1500], 0.5), 1.5);
        assert_eq!(percentile_ms(&[1500], 0.999), 1.5);
        // With ten values p99 and p999 are both the largest; p50 is the 5th, not an average.
        let ten: Vec<u32> = (1..=10).map(|v| v * 100).collect();
        assert_eq!(percentile_ms(&ten, 0.50), 0.5);
        assert_eq!(percentile_ms(&ten, 0.99), 1.0);
        let summary = LatencySummary::from_sorted_us(&ten);
        assert_eq!(
            summary,
            LatencySummary {
                p50: 0.5,
                p99: 1.0,
                p999: 1.0,
                max: 1.0
            }
        );
        assert_eq!(
            LatencySummary::from_sorted_us(&[]),
            LatencySummary::default()
        );
    }

    // Checks the per-second spread used in the text reports.
    #[test]
    fn spreads() {
        assert_eq!(Spread::of(std::iter::empty()), None);
        let spread = Spread::of([3.0, 1.0, 2.0, 10.0].into_iter()).unwrap();
        assert_eq!((spread.min, spread.median, spread.max), (1.0, 2.0, 10.0));
        assert_eq!(spread.count, 4);
    }
}
