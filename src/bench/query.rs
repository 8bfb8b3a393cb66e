//! `shale bench query`: times typical dashboard queries against `POST /api/v1/query`, for the
//! data `shale bench ingest` writes.
//!
//! Each worker thread keeps one connection alive and cycles through the selected queries, one
//! request in flight at a time, starting at a different query than its neighbours so that all of
//! them run concurrently from the first second. A query counts as successful when the server
//! answers 200 with a complete JSON result; its row count is taken from the result's `row_count`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::timeline::{self, SeriesPoint, Timeline};
use super::{plot, Connection, LatencySummary, Progress, Spread};
use crate::http_client;
use crate::workload::Shape;

/// One query of the set, as SQL templates per shape. `{db}` stands for the database, written as
/// a double-quoted identifier so that any valid database name works (`"bench".cpu`); `{end}`
/// stands for the end of the data's time range (see [`QUERY_SET`]).
#[derive(Clone, Copy, Debug)]
pub struct QueryTemplate {
    pub name: &'static str,
    pub description: &'static str,
    /// For TSBS cpu-only: tags `hostname`, `region`, ...; integer fields `usage_user`, ...
    pub tsbs_cpu: &'static str,
    /// For Arc's narrow shape: tag `host`; float fields `value`, `cpu_idle`, `cpu_user`.
    pub arc_narrow: &'static str,
}

/// The dashboard query set.
///
/// `shale bench ingest` writes timestamps from an hour before it started onwards, advancing 10 s
/// (TSBS) or 1 s (narrow) per round of hosts, and it cycles through 64 pre-generated batches, so
/// with the defaults (1000 hosts, 1000-line batches) its data covers only 640 s (TSBS) or 64 s
/// (narrow) however long it runs. The one-day filter is relative to `now()` with no upper bound,
/// which finds that data for the next 23 hours. A one-hour range relative to `now()` would miss
/// it a minute after a narrow ingest, so the one-hour range ends at `{end}`: the latest
/// timestamp in the table, looked up once before the clock starts and written as a literal, the
/// way a dashboard sends an absolute time range.
pub const QUERY_SET: [QueryTemplate; 5] = [
    QueryTemplate {
        name: "last-point-per-host",
        description: "latest value and timestamp of every series",
        tsbs_cpu: "SELECT hostname, max(time) AS last_time, arg_max(usage_user, time) AS \
                   usage_user_last FROM {db}.cpu GROUP BY hostname ORDER BY hostname",
        arc_narrow: "SELECT host, max(time) AS last_time, arg_max(value, time) AS value_last \
                     FROM {db}.cpu GROUP BY host ORDER BY host",
    },
    QueryTemplate {
        name: "hourly-avg-per-host-1d",
        description: "hourly average per host over the last day",
        tsbs_cpu: "SELECT hostname, time_bucket(INTERVAL '1 hour', time) AS hour_start, \
                   avg(usage_user) AS usage_user_avg FROM {db}.cpu \
                   WHERE time > now() - INTERVAL 1 day \
                   GROUP BY hostname, hour_start ORDER BY hostname, hour_start",
        arc_narrow: "SELECT host, time_bucket(INTERVAL '1 hour', time) AS hour_start, \
                     avg(value) AS value_avg FROM {db}.cpu \
                     WHERE time > now() - INTERVAL 1 day \
                     GROUP BY host, hour_start ORDER BY host, hour_start",
    },
    QueryTemplate {
        name: "max-over-range",
        description: "maximum of one field for one host over the data's last hour",
        tsbs_cpu: "SELECT hostname, max(usage_user) AS usage_user_max FROM {db}.cpu \
                   WHERE hostname = 'host_0' \
                   AND time BETWEEN {end} - INTERVAL 1 hour AND {end} GROUP BY hostname",
        arc_narrow: "SELECT host, max(cpu_user) AS cpu_user_max FROM {db}.cpu \
                     WHERE host = 'server000' \
                     AND time BETWEEN {end} - INTERVAL 1 hour AND {end} GROUP BY host",
    },
    QueryTemplate {
        name: "count-by-tag",
        description: "points per region (narrow: per host)",
        tsbs_cpu: "SELECT region, count(*) AS points FROM {db}.cpu GROUP BY region ORDER BY region",
        arc_narrow: "SELECT host, count(*) AS points FROM {db}.cpu GROUP BY host ORDER BY host",
    },
    QueryTemplate {
        name: "full-scan-avg",
        description: "average of one field over all rows",
        tsbs_cpu: "SELECT avg(usage_user) AS usage_user_avg FROM {db}.cpu",
        arc_narrow: "SELECT avg(value) AS value_avg FROM {db}.cpu",
    },
];

/// The name under which a `--sql` query is reported.
pub const CUSTOM_QUERY_NAME: &str = "custom";

/// The placeholder for the end of the data's time range; a `--sql` query may use it too.
pub const END_PLACEHOLDER: &str = "{end}";

/// What `{end}` becomes when the table's latest timestamp cannot be found.
const END_FALLBACK: &str = "now()";

/// The longest error message kept per query.
const ERROR_BYTES_MAX: usize = 400;

impl QueryTemplate {
    /// The SQL for `shape` with `{db}` replaced by the quoted database name; `{end}` is left for
    /// [`run_query`] to fill in.
    pub fn render(&self, shape: Shape, database: &str) -> String {
        let template = match shape {
            Shape::TsbsCpu => self.tsbs_cpu,
            Shape::ArcNarrow => self.arc_narrow,
        };
        template.replace("{db}", &quote_identifier(database))
    }
}

/// `name` as a DuckDB double-quoted identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The names of the query set, in order.
pub fn query_names() -> impl Iterator<Item = &'static str> {
    QUERY_SET.iter().map(|q| q.name)
}

/// A query ready to send, but for `{end}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub name: String,
    pub sql: String,
}

/// The queries of the set named in `names` (all of them when empty), in the order given.
pub fn select(shape: Shape, database: &str, names: &[String]) -> anyhow::Result<Vec<Query>> {
    let chosen: Vec<&QueryTemplate> = if names.is_empty() {
        QUERY_SET.iter().collect()
    } else {
        names
            .iter()
            .map(|name| {
                QUERY_SET.iter().find(|q| q.name == name).with_context(|| {
                    format!(
                        "unknown query {name:?}: use one of {}",
                        query_names().collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    Ok(chosen
        .into_iter()
        .map(|template| Query {
            name: template.name.to_string(),
            sql: template.render(shape, database),
        })
        .collect())
}

/// Settings of one query run.
#[derive(Clone, Debug)]
pub struct QueryOptions {
    pub target: String,
    pub database: String,
    pub shape: Shape,
    pub workers: usize,
    pub duration: Duration,
    pub queries: Vec<Query>,
    pub progress: bool,
}

/// What a run measured, per query and in total.
#[derive(Debug, Serialize)]
pub struct QueryReport {
    pub target: String,
    pub database: String,
    pub shape: &'static str,
    pub workers: usize,
    pub elapsed_seconds: f64,
    /// What `{end}` stood for: a `TIMESTAMPTZ` literal, or `now()` when the table's latest
    /// timestamp could not be found. None when no query used it.
    pub range_end: Option<String>,
    pub queries: Vec<QueryStats>,
    pub total: QueryStats,
    /// One point per second of the run, over all queries: queries/s (`requests_per_second`), rows
    /// returned per second and the latency of the queries completed in that second.
    pub series: Vec<SeriesPoint>,
}

/// The figures of one query (or of all of them, in [`QueryReport::total`]).
#[derive(Debug, Serialize)]
pub struct QueryStats {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// Successful executions.
    pub count: u64,
    pub errors: u64,
    pub queries_per_second: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    /// Mean `row_count` of the successful executions.
    pub rows_mean: f64,
    pub first_error: Option<String>,
}

/// What one worker measured for one query.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u32>,
    rows: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.rows += other.rows;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn stats(mut self, name: String, sql: Option<String>, elapsed_seconds: f64) -> QueryStats {
        self.latencies_us.sort_unstable();
        let latency = LatencySummary::from_sorted_us(&self.latencies_us);
        let count = self.latencies_us.len() as u64;
        QueryStats {
            name,
            sql,
            count,
            errors: self.errors,
            queries_per_second: count as f64 / elapsed_seconds,
            latency_ms_p50: latency.p50,
            latency_ms_p99: latency.p99,
            latency_ms_p999: latency.p999,
            latency_ms_max: latency.max,
            rows_mean: if count == 0 {
                0.0
            } else {
                self.rows as f64 / count as f64
            },
            first_error: self.first_error,
        }
    }
}

pub fn run_query(options: &QueryOptions) -> anyhow::Result<QueryReport> {
    if options.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if options.queries.is_empty() {
        bail!("no query selected");
    }
    let addr = http_client::resolve(&options.target)
        .with_context(|| format!("resolve {}", options.target))?;
    let range_end = options
        .queries
        .iter()
        .any(|q| q.sql.contains(END_PLACEHOLDER))
        .then(|| {
            latest_time(addr, &options.database).unwrap_or_else(|reason| {
                eprintln!("warning: using {END_FALLBACK} as the end of the time range: {reason}");
                END_FALLBACK.to_string()
            })
        });
    let queries: Vec<Query> = options
        .queries
        .iter()
        .map(|q| Query {
            name: q.name.clone(),
            sql: match &range_end {
                Some(end) => q.sql.replace(END_PLACEHOLDER, end),
                None => q.sql.clone(),
            },
        })
        .collect();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        queries
            .iter()
            .map(|q| serde_json::json!({ "sql": q.sql }).to_string().into_bytes())
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(options.workers);
    for worker in 0..options.workers {
        let (stop, completed, errors, bodies) = (
            stop.clone(),
            completed.clone(),
            errors.clone(),
            bodies.clone(),
        );
        handles.push(std::thread::spawn(move || -> (Vec<Tally>, Timeline) {
            let mut tallies: Vec<Tally> = (0..bodies.len()).map(|_| Tally::default()).collect();
            let mut timeline = Timeline::new();
            let mut connection = Connection::new(addr);
            let mut index = worker;
            while !stop.load(Ordering::Relaxed) {
                let query = index % bodies.len();
                let tally = &mut tallies[query];
                let mut note_error = |timeline: &mut Timeline, message: String| {
                    timeline.record_error(started.elapsed());
                    errors.fetch_add(1, Ordering::Relaxed);
                    tally.errors += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| truncate(message, ERROR_BYTES_MAX));
                };
                index += 1;
                let sent = connection.send(
                    "/api/v1/query",
                    &[("content-type", "application/json")],
                    &bodies[query],
                );
                match sent.and_then(|(response, latency)| Ok((row_count(&response.body)?, latency)))
                {
                    Ok((rows, latency)) => {
                        timeline.record(started.elapsed(), latency, rows);
                        let tally = &mut tallies[query];
                        tally
                            .latencies_us
                            .push(latency.as_micros().min(u32::MAX as u128) as u32);
                        tally.rows += rows;
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(message) => note_error(&mut timeline, message),
                }
            }
            (tallies, timeline)
        }));
    }

    let mut progress = Progress::new(started, "queries");
    while started.elapsed() < options.duration {
        std::thread::sleep(Duration::from_millis(100).min(options.duration));
        if options.progress {
            progress.tick(
                completed.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut tallies: Vec<Tally> = options.queries.iter().map(|_| Tally::default()).collect();
    let mut timeline = Timeline::new();
    for handle in handles {
        let (worker_tallies, worker_timeline) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))?;
        for (tally, worker_tally) in tallies.iter_mut().zip(worker_tallies) {
            tally.merge(worker_tally);
        }
        timeline.merge(worker_timeline);
    }
    let elapsed = started.elapsed();
    if options.progress {
        progress.finish();
    }
    let elapsed_seconds = elapsed.as_secs_f64();
    let mut total = Tally::default();
    let mut per_query = Vec::with_capacity(tallies.len());
    for (tally, query) in tallies.into_iter().zip(&queries) {
        total.latencies_us.extend_from_slice(&tally.latencies_us);
        total.rows += tally.rows;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally
                .first_error
                .as_ref()
                .map(|e| format!("{}: {e}", query.name));
        }
        per_query.push(tally.stats(query.name.clone(), Some(query.sql.clone()), elapsed_seconds));
    }
    Ok(QueryReport {
        target: options.target.clone(),
        database: options.database.clone(),
        shape: options.shape.name(),
        workers: options.workers,
        elapsed_seconds,
        range_end,
        queries: per_query,
        total: total.stats("total".to_string(), None, elapsed_seconds),
        series: timeline.series(elapsed),
    })
}

/// The latest timestamp in `<database>.cpu` as a `TIMESTAMPTZ` literal, or why there is none.
fn latest_time(addr: std::net::SocketAddr, database: &str) -> Result<String, String> {
    let sql = format!(
        "SELECT max(time) AS time_max FROM {}.cpu",
        quote_identifier(database)
    );
    let body = serde_json::json!({ "sql": sql }).to_string();
    let response = http_client::request(
        addr,
        "POST",
        "/api/v1/query",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .map_err(|e| format!("query the latest timestamp: {e}"))?;
    if response.status != 200 {
        return Err(truncate(
            format!("HTTP {}: {}", response.status, response.text()),
            ERROR_BYTES_MAX,
        ));
    }
    let result: serde_json::Value = serde_json::from_slice(&response.body)
        .map_err(|e| format!("parse the latest timestamp: {e}"))?;
    let value = result["data"][0][0]
        .as_str()
        .ok_or_else(|| format!("{database}.cpu has no rows"))?;
    timestamp_literal(value)
}

/// `value` (as the server writes a timestamp, `2026-01-02T03:04:05.123456Z`) as a SQL literal.
/// Only the characters of such a timestamp are let through, since it becomes part of the SQL.
fn timestamp_literal(value: &str) -> Result<String, String> {
    let plausible = !value.is_empty()
        && value.len() <= 40
        && value.starts_with(|c: char| c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || "-:.TZ+ ".contains(c));
    if plausible {
        Ok(format!("TIMESTAMPTZ '{value}'"))
    } else {
        Err(format!("unexpected timestamp {value:?}"))
    }
}

/// The `row_count` of a complete JSON query result, or why the body is not one.
fn row_count(body: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(body).map_err(|_| "response is not UTF-8".to_string())?;
    let start = text.trim_start();
    let success = start.starts_with('{')
        && start[1..]
            .trim_start()
            .strip_prefix("\"success\"")
            .and_then(|rest| rest.trim_start().strip_prefix(':'))
            .is_some_and(|rest| rest.trim_start().starts_with("true"));
    if !success {
        return Err(format!(
            "unsuccessful response: {}",
            truncate(text.to_string(), 200)
        ));
    }
    // The field is written last, after the data, so the last occurrence is the real one even if
    // a string in the data happens to contain the same text.
    let after = text
        .rfind("\"row_count\"")
        .map(|at| &text[at + "\"row_count\"".len()..])
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .map(str::trim_start)
        .ok_or_else(|| "response has no row_count (cut short?)".to_string())?;
    let digits = after.bytes().take_while(u8::is_ascii_digit).count();
    after[..digits].parse().map_err(|_| {
        format!(
            "row_count is not a number: {}",
            truncate(after.to_string(), 40)
        )
    })
}

/// `text` cut to at most `bytes_max` bytes on a character boundary.
fn truncate(mut text: String, bytes_max: usize) -> String {
    if text.len() > bytes_max {
        let mut end = bytes_max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl QueryReport {
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "target            {}\n\
             database          {} (shape {}, {} workers)\n\
             elapsed           {:.1} s\n\
             queries           {} ok, {} errors ({:.1} queries/s)\n",
            self.target,
            self.database,
            self.shape,
            self.workers,
            self.elapsed_seconds,
            self.total.count,
            self.total.errors,
            self.total.queries_per_second,
        );
        if let Some(end) = &self.range_end {
            text.push_str(&format!("range end ({{end}}) {end}\n"));
        }
        if let Some(spread) =
            Spread::of(timeline::plotted(&self.series).map(|p| p.requests_per_second))
        {
            text.push_str(&format!(
                "per second        queries/s min {:.0}  median {:.0}  max {:.0} ({} s)\n",
                spread.min, spread.median, spread.max, spread.count
            ));
        }
        text.push_str(&format!(
            "\n{:<24} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            "query",
            "count",
            "errors",
            "q/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "rows/query"
        ));
        for stats in self.queries.iter().chain([&self.total]) {
            text.push_str(&format!(
                "{:<24} {:>8} {:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.1}\n",
                stats.name,
                stats.count,
                stats.errors,
                stats.queries_per_second,
                stats.latency_ms_p50,
                stats.latency_ms_p99,
                stats.latency_ms_p999,
                stats.latency_ms_max,
                stats.rows_mean,
            ));
        }
        for stats in &self.queries {
            if let Some(error) = &stats.first_error {
                text.push_str(&format!("first error of {}: {error}\n", stats.name));
            }
            if stats.count > 0 && stats.rows_mean == 0.0 {
                text.push_str(&format!(
                    "note: {} returned no rows; is there recent data in {}.cpu?\n",
                    stats.name, self.database
                ));
            }
        }
        text
    }

    /// The run as a self-contained SVG chart: queries/s and latency p50/p99 per second.
    pub fn svg(&self) -> String {
        plot::render(&plot::Chart {
            title: format!(
                "shale bench query: {} \u{2192} {}, {} workers",
                self.shape, self.target, self.workers
            ),
            subtitle: format!(
                "{:.1} queries/s overall ({} kinds), latency p50 {:.2} ms, p99 {:.2} ms, {:.1} s, \
                 {} errors",
                self.total.queries_per_second,
                self.queries.len(),
                self.total.latency_ms_p50,
                self.total.latency_ms_p99,
                self.elapsed_seconds,
                self.total.errors,
            ),
            throughput_label: "queries/s",
            throughput: |point| point.requests_per_second,
            series: &self.series,
            elapsed_seconds: self.elapsed_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql_guard::{check, GuardLimits};

    // Checks that every query of the set, for both shapes, for database names that need quoting
    // and for both forms of `{end}`, names the database and passes the server's SQL guard, which
    // is what decides whether the server runs it at all.
    #[test]
    fn query_set_renders_and_passes_the_guard() {
        let limits = GuardLimits {
            sql_bytes_max: 1 << 20,
        };
        for shape in [Shape::TsbsCpu, Shape::ArcNarrow] {
            for database in ["bench", "my-metrics", "load"] {
                let queries = select(shape, database, &[]).unwrap();
                assert_eq!(queries.len(), QUERY_SET.len());
                for (query, end) in queries.iter().flat_map(|q| {
                    [
                        timestamp_literal("2026-11-22T02:51:44.955049Z").unwrap(),
                        END_FALLBACK.to_string(),
                    ]
                    .map(|end| (q, end))
                }) {
                    let sql = query.sql.replace(END_PLACEHOLDER, &end);
                    assert!(!sql.contains('{'), "{sql}");
                    assert!(sql.contains(&format!("FROM \"{database}\".cpu")), "{sql}");
                    let checked = check(&sql, None, &limits).unwrap_or_else(|e| {
                        panic!("{} ({shape:?}, {database}): {e}: {sql}", query.name)
                    });
                    assert_eq!(checked.tables.len(), 1, "{}", query.name);
                }
            }
        }
    }

    // Checks selection by name: order as given, unknown names refused with the list of known
    // ones, names unique.
    #[test]
    fn selection_by_name() {
        let names = ["full-scan-avg".to_string(), "count-by-tag".to_string()];
        let queries = select(Shape::ArcNarrow, "bench", &names).unwrap();
        assert_eq!(
            queries.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            ["full-scan-avg", "count-by-tag"]
        );
        assert_eq!(
            queries[1].sql,
            "SELECT host, count(*) AS points FROM \"bench\".cpu GROUP BY host ORDER BY host"
        );
        let error = select(Shape::TsbsCpu, "bench", &["nope".to_string()]).unwrap_err();
        assert!(error.to_string().contains("last-point-per-host"), "{error}");
        let mut all: Vec<&str> = query_names().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), QUERY_SET.len());
        assert!(!all.contains(&CUSTOM_QUERY_NAME));
    }

    // Checks reading the row count from result bodies, including ones that are not results.
    #[test]
    fn row_counts() {
        let body = br#"{"success":true,"columns":["a"],"data":[["\"row_count\":7"],["x"]],"row_count":2,"execution_time_ms":1.5}"#;
        assert_eq!(row_count(body), Ok(2));
        assert_eq!(
            row_count(br#"{ "success" : true, "data": [], "row_count" : 0 }"#),
            Ok(0)
        );
        assert!(row_count(br#"{"success":false,"error":"bad"}"#)
            .unwrap_err()
            .contains("bad"));
        assert!(row_count(br#"{"success":true,"columns":["a"],"data":[[1]"#).is_err());
        assert!(row_count(b"\xff").is_err());
        assert!(row_count(br#"{"success":true,"row_count":-1}"#).is_err());
    }

    // Checks that only what looks like a timestamp becomes a literal in the SQL.
    #[test]
    fn timestamp_literals() {
        assert_eq!(
            timestamp_literal("2026-11-22T02:51:44.955049Z"),
            Ok("TIMESTAMPTZ '2026-11-22T02:51:44.955049Z'".to_string())
        );
        assert!(timestamp_literal("2026-11-22 02:51:44+00").is_ok());
        assert!(timestamp_literal("").is_err());
        assert!(timestamp_literal("2026' OR 1=1 --").is_err());
        assert!(timestamp_literal("now()").is_err());
    }

    // Checks that long error messages are cut on a character boundary.
    #[test]
    fn truncation() {
        assert_eq!(truncate("short".into(), 10), "short");
        assert_eq!(truncate("ééé".into(), 3), "é…");
    }
}
