//! Per-second time series of a benchmark run: each worker records its completed requests into its
//! own [`Timeline`] (no locks on the request path), and the merged timelines become one
//! [`SeriesPoint`] per second of the run.
//!
//! A request belongs to the second in which it completed, counted from the start of the run, so
//! a request that stalls for three seconds shows up as three empty seconds and one slow one.

use std::time::Duration;

use serde::Serialize;

use super::{percentile_ms, LatencySummary};

/// The longest run a timeline covers. Completions after it are folded into the last second, so a
/// wrong clock can never make a worker allocate without bound.
pub const SECONDS_MAX: usize = 7 * 24 * 3600;

/// One worker's completions, bucketed by second. Memory is 4 bytes per successful request (its
/// latency), which the run's overall percentiles need anyway.
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: Vec<Second>,
}

#[derive(Debug, Default)]
struct Second {
    requests: u64,
    rows: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

/// What the requests completed in one second of the run did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Start of this second, counted from the start of the run.
    pub second: u64,
    /// How much of this second the run covered: 1.0, except for the last, partial second (which
    /// holds the requests still in flight when the run was told to stop).
    pub span_seconds: f64,
    /// Successful requests.
    pub requests: u64,
    /// Rows written (ingest) or returned (query) by those requests.
    pub rows: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub rows_per_second: f64,
    /// None when no request succeeded in this second.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline::default()
    }

    fn second_mut(&mut self, at: Duration) -> &mut Second {
        let index = (at.as_secs() as usize).min(SECONDS_MAX - 1);
        if index >= self.seconds.len() {
            self.seconds.resize_with(index + 1, Second::default);
        }
        &mut self.seconds[index]
    }

    /// A request that succeeded `at` after the start of the run, after `latency`.
    pub fn record(&mut self, at: Duration, latency: Duration, rows: u64) {
        let second = self.second_mut(at);
        second.requests += 1;
        second.rows += rows;
        second
            .latencies_us
            .push(latency.as_micros().min(u32::MAX as u128) as u32);
    }

    /// A request that failed `at` after the start of the run.
    pub fn record_error(&mut self, at: Duration) {
        self.second_mut(at).errors += 1;
    }

    /// Adds another worker's completions to this one's.
    pub fn merge(&mut self, other: Timeline) {
        if other.seconds.len() > self.seconds.len() {
            self.seconds
                .resize_with(other.seconds.len(), Second::default);
        }
        for (mine, theirs) in self.seconds.iter_mut().zip(other.seconds) {
            mine.requests += theirs.requests;
            mine.rows += theirs.rows;
            mine.errors += theirs.errors;
            mine.latencies_us.extend(theirs.latencies_us);
        }
    }

    /// Every successful request's latency, sorted, in microseconds.
    pub fn latencies_us_sorted(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .seconds
            .iter()
            .flat_map(|s| s.latencies_us.iter().copied())
            .collect();
        all.sort_unstable();
        all
    }

    /// Overall latency percentiles of the successful requests.
    pub fn latency_summary(&self) -> LatencySummary {
        LatencySummary::from_sorted_us(&self.latencies_us_sorted())
    }

    /// One point per second from the start of the run up to `elapsed` (the time at which the
    /// last worker finished), including seconds in which nothing completed.
    pub fn series(&self, elapsed: Duration) -> Vec<SeriesPoint> {
        let elapsed_seconds = elapsed.as_secs_f64();
        let covered = (elapsed_seconds.ceil() as usize)
            .max(self.seconds.len())
            .min(SECONDS_MAX);
        let empty = Second::default();
        (0..covered)
            .map(|index| {
                let second = self.seconds.get(index).unwrap_or(&empty);
                // A completion stamped a moment after `elapsed` was measured (or in the final
                // partial second) must not produce a span of zero and an infinite rate.
                let span_seconds = (elapsed_seconds - index as f64).clamp(0.001, 1.0);
                let mut sorted = second.latencies_us.clone();
                sorted.sort_unstable();
                let latency = |p: f64| (!sorted.is_empty()).then(|| percentile_ms(&sorted, p));
                SeriesPoint {
                    second: index as u64,
                    span_seconds,
                    requests: second.requests,
                    rows: second.rows,
                    errors: second.errors,
                    requests_per_second: second.requests as f64 / span_seconds,
                    rows_per_second: second.rows as f64 / span_seconds,
                    latency_ms_p50: latency(0.50),
                    latency_ms_p99: latency(0.99),
                }
            })
            .collect()
    }
}

/// The points worth drawing and summarizing: all but a final partial second shorter than half a
/// second. Such a sliver holds only the requests still in flight when the run stopped, so its rate
/// says little about the server; it stays in the report's JSON with its `span_seconds`.
pub fn plotted(series: &[SeriesPoint]) -> impl Iterator<Item = &SeriesPoint> {
    series.iter().filter(|point| point.span_seconds >= 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    // Checks that completions land in the second they completed in, that workers' timelines merge
    // second by second, that an idle second still gets a point, and that the final partial second
    // reports its rate over the part of the second the run covered.
    #[test]
    fn completions_are_bucketed_by_second() {
        let mut first = Timeline::new();
        first.record(ms(100), ms(2), 10);
        first.record(ms(999), ms(4), 10);
        first.record(ms(1000), ms(6), 10);
        first.record_error(ms(1500));
        let mut second = Timeline::new();
        second.record(ms(200), ms(8), 5);
        second.record(ms(3100), ms(10), 5);
        first.merge(second);

        let series = first.series(ms(3250));
        assert_eq!(series.len(), 4);
        assert_eq!(
            series.iter().map(|p| p.second).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(
            series.iter().map(|p| p.requests).collect::<Vec<_>>(),
            [3, 1, 0, 1]
        );
        assert_eq!(
            series.iter().map(|p| p.rows).collect::<Vec<_>>(),
            [25, 10, 0, 5]
        );
        assert_eq!(
            series.iter().map(|p| p.errors).collect::<Vec<_>>(),
            [0, 1, 0, 0]
        );
        // Nearest rank over {2, 4, 8} ms: p50 is the 2nd value, p99 the 3rd.
        assert_eq!(series[0].latency_ms_p50, Some(4.0));
        assert_eq!(series[0].latency_ms_p99, Some(8.0));
        assert_eq!(series[1].latency_ms_p50, Some(6.0));
        assert_eq!(series[2].latency_ms_p50, None);
        assert_eq!(series[2].requests_per_second, 0.0);
        assert_eq!(series[0].span_seconds, 1.0);
        assert!((series[3].span_seconds - 0.25).abs() < 1e-9);
        assert!((series[3].requests_per_second - 4.0).abs() < 1e-9);
        assert!((series[3].rows_per_second - 20.0).abs() < 1e-9);
        assert_eq!(plotted(&series).count(), 3);

        assert_eq!(first.latencies_us_sorted(), [2000, 4000, 6000, 8000, 10000]);
        let summary = first.latency_summary();
        assert_eq!(summary.p50, 6.0);
        assert_eq!(summary.max, 10.0);
    }

    // Checks the edges: nothing recorded gives one empty point per covered second, and a
    // completion stamped after the measured end still gets a point with a finite rate.
    #[test]
    fn empty_and_late_completions() {
        let series = Timeline::new().series(ms(2000));
        assert_eq!(series.len(), 2);
        assert!(series
            .iter()
            .all(|p| p.requests == 0 && p.latency_ms_p99.is_none()));
        assert!(Timeline::new().series(Duration::ZERO).is_empty());

        let mut late = Timeline::new();
        late.record(ms(2001), ms(1), 1);
        let series = late.series(ms(2000));
        assert_eq!(series.len(), 3);
        assert!(series[2].requests_per_second.is_finite());
    }
}
