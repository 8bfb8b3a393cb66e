//! Deterministic load shapes for benchmarks (`shale bench`, criterion benches): TSBS cpu-only
//! and Arc's narrow shape, as line protocol with nanosecond timestamps.

/// Which benchmark shape to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// TSBS "cpu-only": 10 tags, 10 integer fields as random walks, about 350 bytes a line.
    TsbsCpu,
    /// Arc's narrow shape: `cpu,host=serverNNN value=..,cpu_idle=..,cpu_user=..`, ~85 bytes.
    ArcNarrow,
}

impl Shape {
    pub fn parse(text: &str) -> Option<Shape> {
        match text {
            "tsbs-cpu" | "tsbs" | "cpu-only" => Some(Shape::TsbsCpu),
            "arc-narrow" | "narrow" => Some(Shape::ArcNarrow),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Shape::TsbsCpu => "tsbs-cpu",
            Shape::ArcNarrow => "arc-narrow",
        }
    }
}

const TSBS_FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];
const REGIONS: [&str; 9] = [
    "us-east-1",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-northeast-1",
    "sa-east-1",
];

/// A small, fast, deterministic generator (xorshift64*), so runs are reproducible.
#[derive(Clone)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Generates batches of one shape: `hosts` series, one line per host per step.
pub struct Generator {
    shape: Shape,
    /// The first host's number; a generator may own a slice of the hosts (`for_hosts`).
    first_host: usize,
    hosts: usize,
    random: Random,
    /// Per host and field, the random walk's current value.
    walks: Vec<f64>,
    time_ns: i64,
    step_ns: i64,
    next_host: usize,
}

impl Generator {
    /// `start_ns` is the first timestamp; every full round over the hosts advances by 10 s
    /// (TSBS) or 1 s (narrow).
    pub fn new(shape: Shape, hosts: usize, seed: u64, start_ns: i64) -> Generator {
        Generator::for_hosts(shape, 0..hosts, seed, start_ns)
    }

    /// A generator of the hosts numbered `hosts` only, so that generators of disjoint ranges
    /// write disjoint series (the seed should differ per range).
    pub fn for_hosts(
        shape: Shape,
        hosts: std::ops::Range<usize>,
        seed: u64,
        start_ns: i64,
    ) -> Generator {
        let first_host = hosts.start;
        let hosts = hosts.len().max(1);
        let fields = match shape {
            Shape::TsbsCpu => TSBS_FIELDS.len(),
            Shape::ArcNarrow => 3,
        };
        let mut random = Random::new(seed);
        let walks = (0..hosts * fields)
            .map(|_| random.next_f64() * 100.0)
            .collect();
        Generator {
            shape,
            first_host,
            hosts,
            random,
            walks,
            time_ns: start_ns,
            step_ns: match shape {
                Shape::TsbsCpu => 10_000_000_000,
                Shape::ArcNarrow => 1_000_000_000,
            },
            next_host: 0,
        }
    }

    /// The time between two rounds over the hosts.
    pub fn step_ns(&self) -> i64 {
        self.step_ns
    }

    /// Appends `lines` lines to `out`.
    pub fn fill(&mut self, out: &mut String, lines: usize) {
        for _ in 0..lines {
            let local = self.next_host;
            match self.shape {
                Shape::TsbsCpu => self.tsbs_line(out, local),
                Shape::ArcNarrow => self.narrow_line(out, local),
            }
            self.next_host += 1;
            if self.next_host == self.hosts {
                self.next_host = 0;
                self.time_ns += self.step_ns;
            }
        }
    }

    /// One batch of `lines` lines as a new string.
    pub fn batch(&mut self, lines: usize) -> String {
        let mut out = String::with_capacity(lines * 360);
        self.fill(&mut out, lines);
        out
    }

    fn step_walk(&mut self, index: usize) -> f64 {
        let value = (self.walks[index] + (self.random.next_f64() - 0.5) * 2.0).clamp(0.0, 100.0);
        self.walks[index] = value;
        value
    }

    /// `local` indexes this generator's hosts; names use the global host number.
    fn tsbs_line(&mut self, out: &mut String, local: usize) {
        use std::fmt::Write;
        let host = self.first_host + local;
        let region = REGIONS[host % REGIONS.len()];
        let _ = write!(
            out,
            "cpu,hostname=host_{host},region={region},datacenter={region}{dc},rack={rack},\
             os=Ubuntu{os},arch=x{arch},team={team},service={service},service_version={version},\
             service_environment={environment} ",
            dc = ['a', 'b', 'c'][host % 3],
            rack = host % 100,
            os = ["15.10", "16.04", "16.10"][host % 3],
            arch = ["64", "86"][host % 2],
            team = ["SF", "NYC", "LON", "CHI"][host % 4],
            service = host % 20,
            version = host % 2,
            environment = ["production", "staging", "test"][host % 3],
        );
        for (index, field) in TSBS_FIELDS.iter().enumerate() {
            let value = self.step_walk(local * TSBS_FIELDS.len() + index) as i64;
            let separator = if index == 0 { "" } else { "," };
            let _ = write!(out, "{separator}{field}={value}i");
        }
        let _ = writeln!(out, " {}", self.time_ns);
    }

    fn narrow_line(&mut self, out: &mut String, local: usize) {
        use std::fmt::Write;
        let host = self.first_host + local;
        let value = self.step_walk(local * 3);
        let idle = self.step_walk(local * 3 + 1);
        let user = self.step_walk(local * 3 + 2);
        let _ = writeln!(
            out,
            "cpu,host=server{host:03} value={value:.2},cpu_idle={idle:.2},cpu_user={user:.2} {}",
            self.time_ns
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::{parse, ParseLimits, Precision};

    // Checks that both shapes parse, have the documented columns and sizes, and are
    // deterministic for a seed.
    #[test]
    fn shapes_parse_and_match_their_description() {
        for (shape, tags, fields, bytes_per_line) in [
            (Shape::TsbsCpu, 10, 10, 250..400),
            (Shape::ArcNarrow, 1, 3, 60..100),
        ] {
            let body = Generator::new(shape, 1000, 7, 1_700_000_000_000_000_000).batch(1000);
            assert_eq!(
                body,
                Generator::new(shape, 1000, 7, 1_700_000_000_000_000_000).batch(1000)
            );
            assert!(
                bytes_per_line.contains(&(body.len() / 1000)),
                "{shape:?}: {}",
                body.len() / 1000
            );
            let batch = parse(
                body.as_bytes(),
                Precision::Nanoseconds,
                0,
                &ParseLimits::default(),
            )
            .unwrap();
            assert_eq!(batch.len(), 1000);
            let line = batch.line(0).unwrap();
            assert_eq!(line.tags().count(), tags);
            assert_eq!(line.fields().count(), fields);
        }
    }

    // Generators of disjoint host ranges write disjoint series, each host once per step.
    #[test]
    fn host_slices_are_disjoint_series() {
        let mut seen = std::collections::HashSet::new();
        for range in [0..3, 3..7] {
            let seed = range.start as u64;
            let mut generator = Generator::for_hosts(Shape::ArcNarrow, range.clone(), seed, 0);
            let body = generator.batch(range.len() * 2);
            for line in body.lines() {
                let (series, rest) = line.split_once(' ').unwrap();
                let time = rest.rsplit_once(' ').unwrap().1.to_string();
                assert!(seen.insert((series.to_string(), time)), "{line}");
            }
        }
        let hosts: std::collections::HashSet<_> = seen.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(hosts.len(), 7);
        assert_eq!(seen.len(), 14);
    }
}
