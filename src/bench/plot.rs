//! A self-contained SVG chart of a benchmark's per-second series, written by hand: throughput
//! over time in the upper panel, latency p50 and p99 over time in the lower one, sharing the time
//! axis. No scripts, no external fonts or styles, so the file renders the same anywhere.

use std::fmt::Write;

use super::timeline::{plotted, SeriesPoint};

/// What to draw.
pub struct Chart<'a> {
    pub title: String,
    /// A one-line summary under the title.
    pub subtitle: String,
    /// Unit of the upper panel, e.g. `rows/s`.
    pub throughput_label: &'static str,
    /// Which figure of a point the upper panel shows.
    pub throughput: fn(&SeriesPoint) -> f64,
    pub series: &'a [SeriesPoint],
    pub elapsed_seconds: f64,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 640.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 28.0;
const PANEL_HEIGHT: f64 = 200.0;
const THROUGHPUT_TOP: f64 = 100.0;
const LATENCY_TOP: f64 = 372.0;

const THROUGHPUT_COLOR: &str = "#1f77b4";
const P50_COLOR: &str = "#2ca02c";
const P99_COLOR: &str = "#d62728";
const GRID_COLOR: &str = "#e4e4e4";
const AXIS_COLOR: &str = "#555555";

/// Markers are drawn on every point while they stay readable (and so a point between two gaps,
/// which a polyline of one point cannot show, is still visible).
const MARKER_POINTS_MAX: usize = 120;

/// A linear axis from 0 to `max` with ticks every `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Axis {
    max: f64,
    step: f64,
}

impl Axis {
    /// An axis from 0 that covers `value_max` with at most about `ticks` steps of 1, 2, 2.5 or 5
    /// times a power of ten.
    fn covering(value_max: f64, ticks: f64) -> Axis {
        let value_max = if value_max.is_finite() && value_max > 0.0 {
            value_max
        } else {
            1.0
        };
        let raw = value_max / ticks;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .into_iter()
            .map(|m| m * magnitude)
            .find(|&s| s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * magnitude);
        let max = (value_max / step * (1.0 - 1e-9)).ceil().max(1.0) * step;
        Axis { max, step }
    }

    /// Like [`Axis::covering`], but ending exactly at `value_max`, with ticks only up to it: for
    /// the time axis, so that the lines reach the right edge.
    fn tight(value_max: f64, ticks: f64) -> Axis {
        let axis = Axis::covering(value_max, ticks);
        if value_max.is_finite() && value_max > 0.0 {
            Axis {
                max: value_max,
                step: axis.step,
            }
        } else {
            axis
        }
    }

    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        let count = (self.max / self.step + 1e-9).floor() as usize;
        (0..=count).map(move |i| i as f64 * self.step)
    }

    /// Formats a tick value with a k or M suffix and as many decimals as the step needs.
    fn label(&self, value: f64) -> String {
        let (divisor, suffix) = if self.max >= 1e6 {
            (1e6, "M")
        } else if self.max >= 1e4 {
            (1e3, "k")
        } else {
            (1.0, "")
        };
        if value == 0.0 {
            return "0".to_string();
        }
        // As many decimals as it takes to write the step exactly (0.25 needs two).
        let step = self.step / divisor;
        let decimals = (0..4)
            .find(|&d| {
                let scaled = step * 10f64.powi(d);
                (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
            })
            .unwrap_or(4) as usize;
        format!("{:.*}{suffix}", decimals, value / divisor)
    }
}

/// Maps data coordinates of one panel to SVG coordinates.
struct Panel {
    top: f64,
    x: Axis,
    y: Axis,
}

impl Panel {
    fn plot_width() -> f64 {
        WIDTH - LEFT - RIGHT
    }

    fn to_x(&self, seconds: f64) -> f64 {
        LEFT + (seconds / self.x.max).clamp(0.0, 1.0) * Panel::plot_width()
    }

    fn to_y(&self, value: f64) -> f64 {
        self.top + PANEL_HEIGHT - (value / self.y.max).clamp(0.0, 1.0) * PANEL_HEIGHT
    }

    fn bottom(&self) -> f64 {
        self.top + PANEL_HEIGHT
    }

    /// Grid, axes, tick labels, the panel's heading and its y-axis title.
    fn frame(&self, svg: &mut String, heading: &str, y_title: &str) {
        let (left, right) = (LEFT, LEFT + Panel::plot_width());
        let bottom = self.bottom();
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="{:.1}" font-size="14" font-weight="bold" fill="#222">{}</text>"##,
            self.top - 12.0,
            escape(heading)
        );
        for value in self.y.ticks() {
            let y = self.to_y(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="{GRID_COLOR}" stroke-width="1"/>"##
            );
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="{AXIS_COLOR}" text-anchor="end">{}</text>"##,
                left - 6.0,
                y + 4.0,
                self.y.label(value)
            );
        }
        for value in self.x.ticks() {
            let x = self.to_x(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="{GRID_COLOR}" stroke-width="1"/>"##,
                self.top
            );
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{bottom:.1}" x2="{x:.1}" y2="{:.1}" stroke="{AXIS_COLOR}" stroke-width="1"/>"##,
                bottom + 4.0
            );
            let _ = writeln!(
                svg,
                r##"<text x="{x:.1}" y="{:.1}" font-size="11" fill="{AXIS_COLOR}" text-anchor="middle">{}</text>"##,
                bottom + 17.0,
                self.x.label(value)
            );
        }
        let _ = writeln!(
            svg,
            r##"<polyline points="{left},{:.1} {left},{bottom:.1} {right},{bottom:.1}" fill="none" stroke="{AXIS_COLOR}" stroke-width="1"/>"##,
            self.top
        );
        let middle = self.top + PANEL_HEIGHT / 2.0;
        let _ = writeln!(
            svg,
            r##"<text x="22" y="{middle:.1}" font-size="12" fill="#333" text-anchor="middle" transform="rotate(-90 22 {middle:.1})">{}</text>"##,
            escape(y_title)
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#333" text-anchor="middle">time since start (s)</text>"##,
            LEFT + Panel::plot_width() / 2.0,
            bottom + 34.0
        );
    }

    /// Legend entries right-aligned above the panel, in the given order from left to right.
    fn legend(&self, svg: &mut String, entries: &[(&str, &str, bool)]) {
        let y = self.top - 16.0;
        let mut x = LEFT + Panel::plot_width();
        let mut parts = Vec::new();
        // Laid out right to left with an estimated text width (6.5 px per character at 12 px).
        for (label, color, dashed) in entries.iter().rev() {
            let text_width = label.len() as f64 * 6.5;
            x -= text_width;
            let text_x = x;
            x -= 30.0;
            let dash = if *dashed {
                r##" stroke-dasharray="6 3""##
            } else {
                ""
            };
            parts.push(format!(
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.5"{dash}/>"##,
                x + 2.0,
                x + 24.0
            ));
            parts.push(format!(
                r##"<text x="{text_x:.1}" y="{:.1}" font-size="12" fill="#333">{}</text>"##,
                y + 4.0,
                escape(label)
            ));
            x -= 14.0;
        }
        let _ = writeln!(svg, r##"<g class="legend">"##);
        for part in parts {
            let _ = writeln!(svg, "{part}");
        }
        let _ = writeln!(svg, "</g>");
    }

    /// One line through `points`, broken where a value is missing, with markers when few.
    fn line(
        &self,
        svg: &mut String,
        points: &[(f64, Option<f64>)],
        color: &str,
        dashed: bool,
        class: &str,
    ) {
        let dash = if dashed {
            r##" stroke-dasharray="6 3""##
        } else {
            ""
        };
        for run in points.split(|(_, value)| value.is_none()) {
            if run.is_empty() {
                continue;
            }
            let coordinates: Vec<String> = run
                .iter()
                .map(|&(x, value)| {
                    format!(
                        "{:.1},{:.1}",
                        self.to_x(x),
                        self.to_y(value.expect("split at None"))
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline class="{class}" points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round"{dash}/>"##,
                coordinates.join(" ")
            );
        }
        if points.len() <= MARKER_POINTS_MAX {
            for &(x, value) in points {
                if let Some(value) = value {
                    let _ = writeln!(
                        svg,
                        r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"##,
                        self.to_x(x),
                        self.to_y(value)
                    );
                }
            }
        }
    }
}

/// Renders the chart as a complete SVG document.
pub fn render(chart: &Chart<'_>) -> String {
    let points: Vec<&SeriesPoint> = plotted(chart.series).collect();
    // Each point sits in the middle of the second it summarizes.
    let middle = |point: &SeriesPoint| point.second as f64 + point.span_seconds / 2.0;
    let throughput: Vec<(f64, Option<f64>)> = points
        .iter()
        .map(|p| (middle(p), Some((chart.throughput)(p))))
        .collect();
    let p50: Vec<(f64, Option<f64>)> = points
        .iter()
        .map(|p| (middle(p), p.latency_ms_p50))
        .collect();
    let p99: Vec<(f64, Option<f64>)> = points
        .iter()
        .map(|p| (middle(p), p.latency_ms_p99))
        .collect();
    let x_end = points
        .iter()
        .map(|p| p.second as f64 + p.span_seconds)
        .fold(chart.elapsed_seconds, f64::max);
    let x = Axis::tight(x_end, 10.0);
    let throughput_max = throughput
        .iter()
        .filter_map(|(_, v)| *v)
        .fold(0.0, f64::max);
    let latency_max = p50
        .iter()
        .chain(&p99)
        .filter_map(|(_, v)| *v)
        .fold(0.0, f64::max);
    let upper = Panel {
        top: THROUGHPUT_TOP,
        x,
        y: Axis::covering(throughput_max, 5.0),
    };
    let lower = Panel {
        top: LATENCY_TOP,
        x,
        y: Axis::covering(latency_max, 5.0),
    };

    let mut svg = String::with_capacity(16 * 1024 + points.len() * 120);
    let _ = writeln!(svg, r##"<?xml version="1.0" encoding="UTF-8"?>"##);
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"##
    );
    let _ = writeln!(svg, "<title>{}</title>", escape(&chart.title));
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="30" font-size="17" font-weight="bold" fill="#111">{}</text>"##,
        escape(&chart.title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="52" font-size="13" fill="#555">{}</text>"##,
        escape(&chart.subtitle)
    );

    upper.frame(
        &mut svg,
        &format!("Throughput ({})", chart.throughput_label),
        chart.throughput_label,
    );
    upper.legend(
        &mut svg,
        &[(chart.throughput_label, THROUGHPUT_COLOR, false)],
    );
    if let (Some(first), Some(last)) = (throughput.first(), throughput.last()) {
        // A light area under the throughput line, closed along the time axis.
        let mut area = format!("{:.1},{:.1}", upper.to_x(first.0), upper.bottom());
        for &(x, value) in &throughput {
            let _ = write!(
                area,
                " {:.1},{:.1}",
                upper.to_x(x),
                upper.to_y(value.unwrap_or(0.0))
            );
        }
        let _ = write!(area, " {:.1},{:.1}", upper.to_x(last.0), upper.bottom());
        let _ = writeln!(
            svg,
            r##"<polygon points="{area}" fill="{THROUGHPUT_COLOR}" fill-opacity="0.12" stroke="none"/>"##
        );
    }
    upper.line(&mut svg, &throughput, THROUGHPUT_COLOR, false, "throughput");

    lower.frame(
        &mut svg,
        "Latency of requests completed in each second (ms)",
        "latency (ms)",
    );
    lower.legend(
        &mut svg,
        &[("p50", P50_COLOR, false), ("p99", P99_COLOR, true)],
    );
    lower.line(&mut svg, &p50, P50_COLOR, false, "latency-p50");
    lower.line(&mut svg, &p99, P99_COLOR, true, "latency-p99");

    if points.is_empty() {
        for panel in [&upper, &lower] {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="14" fill="#999" text-anchor="middle">no data</text>"##,
                LEFT + Panel::plot_width() / 2.0,
                panel.top + PANEL_HEIGHT / 2.0
            );
        }
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

/// Escapes text for element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::timeline::Timeline;
    use std::time::Duration;

    /// A rough XML check: every tag is closed in order, the root is `svg`, attribute values hold
    /// no raw `<`. Returns the tags in document order, each with its attribute text.
    fn tags(svg: &str) -> Vec<(String, String)> {
        let mut open: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let text_before = &rest[..start];
            assert!(!text_before.contains('>'), "stray '>' in {text_before:?}");
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "'<' inside tag {tag:?}");
            rest = &rest[end + 1..];
            if tag.starts_with('?') {
                assert!(tag.ends_with('?'));
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(name), "mismatched </{name}>");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let (name, attributes) = tag.split_once(' ').unwrap_or((tag, ""));
            assert_eq!(
                attributes.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            if open.is_empty() {
                assert!(seen.is_empty(), "second root element {name}");
                assert_eq!(name, "svg");
            }
            seen.push((name.to_string(), attributes.to_string()));
            if !self_closing {
                open.push(name.to_string());
            }
        }
        assert!(open.is_empty(), "unclosed {open:?}");
        assert!(rest.trim().is_empty());
        seen
    }

    /// The value of attribute `name`, matched as a whole word (so `x` does not match `cx`).
    fn attribute<'a>(attributes: &'a str, name: &str) -> Option<&'a str> {
        let needle = format!("{name}=\"");
        let mut from = 0;
        while let Some(found) = attributes[from..].find(&needle) {
            let at = from + found;
            if at == 0 || attributes.as_bytes()[at - 1] == b' ' {
                let start = at + needle.len();
                let end = attributes[start..].find('"')? + start;
                return Some(&attributes[start..end]);
            }
            from = at + 1;
        }
        None
    }

    fn sample_series(seconds: u64, gap_at: Option<u64>) -> Vec<SeriesPoint> {
        let mut timeline = Timeline::new();
        for second in 0..seconds {
            if Some(second) == gap_at {
                continue;
            }
            for i in 0..(50 + second * 7) {
                timeline.record(
                    Duration::from_millis(second * 1000 + i % 1000),
                    Duration::from_micros(500 + i * 40 + second * 100),
                    1000,
                );
            }
        }
        timeline.series(Duration::from_millis(seconds * 1000 + 30))
    }

    fn chart(series: &[SeriesPoint]) -> String {
        render(&Chart {
            title: "shale bench ingest: tsbs-cpu \u{2192} http://127.0.0.1:8000/?a=1&b=<2>".into(),
            subtitle: "summary".into(),
            throughput_label: "rows/s",
            throughput: |p| p.rows_per_second,
            series,
            elapsed_seconds: series.len() as f64,
        })
    }

    // Checks that the chart is well-formed XML with the expected parts, that every polyline and
    // marker lies inside the viewBox, that a second with no latency splits the latency lines, and
    // that text is escaped.
    #[test]
    fn chart_is_well_formed_and_inside_the_view_box() {
        let series = sample_series(12, Some(5));
        let svg = chart(&series);
        let tags = tags(&svg);
        let view_box = attribute(&tags[0].1, "viewBox").expect("viewBox");
        let numbers: Vec<f64> = view_box
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let [x0, y0, width, height] = numbers[..] else {
            panic!("viewBox {view_box}")
        };
        let inside = |x: f64, y: f64| {
            assert!(
                x >= x0 && x <= x0 + width && y >= y0 && y <= y0 + height,
                "({x}, {y})"
            )
        };
        let mut polylines = std::collections::HashMap::<String, usize>::new();
        let mut coordinates = 0;
        for (name, attributes) in &tags {
            if name == "polyline" || name == "polygon" {
                let points = attribute(attributes, "points").expect("points");
                for pair in points.split_whitespace() {
                    let (x, y) = pair.split_once(',').expect("x,y");
                    inside(x.parse().unwrap(), y.parse().unwrap());
                    coordinates += 1;
                }
                if let Some(class) = attribute(attributes, "class") {
                    *polylines.entry(class.to_string()).or_default() += 1;
                }
            }
            if name == "circle" {
                inside(
                    attribute(attributes, "cx").unwrap().parse().unwrap(),
                    attribute(attributes, "cy").unwrap().parse().unwrap(),
                );
            }
        }
        assert!(coordinates > 30);
        // Throughput is defined in the empty second (zero), latency is not: one throughput line,
        // two pieces of each latency line.
        assert_eq!(polylines.get("throughput"), Some(&1));
        assert_eq!(polylines.get("latency-p50"), Some(&2));
        assert_eq!(polylines.get("latency-p99"), Some(&2));
        assert!(svg.contains("&amp;b=&lt;2&gt;"));
        assert!(svg.contains(">p99<") && svg.contains(">rows/s<"));
        assert!(svg.contains("time since start (s)"));
    }

    // Checks that an empty run still gives a well-formed chart that says so.
    #[test]
    fn empty_chart() {
        let svg = chart(&[]);
        tags(&svg);
        assert!(svg.contains("no data"));
        assert!(!svg.contains("<polyline class="));
    }

    // Checks the axis steps: 1, 2, 2.5 or 5 times a power of ten, covering the maximum, and labels
    // that show the step's precision with a k or M suffix.
    impl Axis {
        fn bounds(&self) -> (f64, f64) {
            (self.max, self.step)
        }
    }

    #[test]
    fn axes() {
        assert_eq!(Axis::covering(0.0, 5.0).bounds(), (1.0, 0.2));
        assert_eq!(Axis::covering(10.0, 10.0).bounds(), (10.0, 1.0));
        assert_eq!(Axis::covering(10.03, 10.0).bounds(), (12.0, 2.0));
        let axis = Axis::covering(1_234_567.0, 5.0);
        assert_eq!(axis.bounds(), (1_250_000.0, 250_000.0));
        assert_eq!(axis.label(1_250_000.0), "1.25M");
        assert_eq!(axis.label(0.0), "0");
        let axis = Axis::covering(0.37, 5.0);
        assert_eq!(axis.bounds(), (0.4, 0.1));
        assert_eq!(axis.label(axis.step * 3.0), "0.3");
        assert_eq!(Axis::covering(45_000.0, 5.0).label(20_000.0), "20k");
        assert_eq!(Axis::covering(f64::NAN, 5.0).max, 1.0);
        assert_eq!(Axis::covering(7.0, 5.0).ticks().count(), 5);
        let time = Axis::tight(10.03, 10.0);
        assert_eq!(time.bounds(), (10.03, 2.0));
        assert_eq!(
            time.ticks().collect::<Vec<_>>(),
            [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(Axis::tight(0.0, 10.0).bounds(), (1.0, 0.1));
    }
}
