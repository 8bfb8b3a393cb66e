//! Line-protocol parser throughput on the two load shapes of the design brief.
//!
//! - `arc_narrow`: Arc's benchmark shape, `cpu,host=serverNNN value=..,cpu_idle=..,cpu_user=.. <ns>`,
//!   1000 hosts, one 1000-line request (about 80 bytes a line).
//! - `tsbs_cpu_only`: TSBS cpu-only, 10 tags and 10 integer fields (random walks in [0, 100]),
//!   1000 hosts, one 1000-line request (about 350 bytes a line).
//!
//! Each shape is measured twice, once reported in bytes per second and once in lines per second.
//! Bodies are generated with a fixed-seed generator, so every run parses the same bytes. The
//! parser reuses its buffers between iterations, as a shard does between requests.

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shale::line_protocol::{parse_with, ParseBuffers, ParseLimits, Precision};

const HOST_COUNT: usize = 1_000;
const START_TIME_NS: i64 = 1_700_000_000_000_000_000;

/// A small deterministic generator (SplitMix64), so bodies do not depend on a crate's version.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A float in [0, 100) with two decimals, as the narrow shape's agents send.
    fn percent(&mut self) -> f64 {
        self.below(10_000) as f64 / 100.0
    }
}

fn arc_narrow_body() -> String {
    let mut generator = Generator(42);
    let mut body = String::new();
    for host in 0..HOST_COUNT {
        let _ = writeln!(
            body,
            "cpu,host=server{host:03} value={},cpu_idle={},cpu_user={} {}",
            generator.percent(),
            generator.percent(),
            generator.percent(),
            START_TIME_NS + host as i64 * 1_000,
        );
    }
    body
}

fn tsbs_cpu_only_body() -> String {
    const REGIONS: [(&str, [&str; 3]); 3] = [
        ("us-east-1", ["us-east-1a", "us-east-1b", "us-east-1c"]),
        (
            "eu-central-1",
            ["eu-central-1a", "eu-central-1b", "eu-central-1c"],
        ),
        (
            "ap-southeast-2",
            ["ap-southeast-2a", "ap-southeast-2b", "ap-southeast-2c"],
        ),
    ];
    const OPERATING_SYSTEMS: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
    const ARCHITECTURES: [&str; 2] = ["x64", "x86"];
    const TEAMS: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
    const ENVIRONMENTS: [&str; 3] = ["production", "staging", "test"];
    const FIELDS: [&str; 10] = [
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

    let mut generator = Generator(7);
    let mut body = String::new();
    for host in 0..HOST_COUNT {
        let (region, datacenters) = REGIONS[generator.below(3) as usize];
        let _ = write!(
            body,
            "cpu,hostname=host_{host},region={region},datacenter={},rack={},os={},arch={},team={},\
             service={},service_version={},service_environment={}",
            datacenters[generator.below(3) as usize],
            generator.below(100),
            OPERATING_SYSTEMS[generator.below(3) as usize],
            ARCHITECTURES[generator.below(2) as usize],
            TEAMS[generator.below(4) as usize],
            generator.below(20),
            generator.below(2),
            ENVIRONMENTS[generator.below(3) as usize],
        );
        // One step of each field's random walk, clamped to [0, 100].
        for (index, field) in FIELDS.iter().enumerate() {
            let start = generator.below(101) as i64;
            let step = generator.below(11) as i64 - 5;
            let value = (start + step).clamp(0, 100);
            let separator = if index == 0 { ' ' } else { ',' };
            let _ = write!(body, "{separator}{field}={value}i");
        }
        let _ = writeln!(body, " {}", START_TIME_NS + 10_000_000_000);
    }
    body
}

fn bench_shape(criterion: &mut Criterion, name: &str, body: &str) {
    let limits = ParseLimits::default();
    let line_count = body.lines().count() as u64;
    let mut buffers = Some(ParseBuffers::new());
    let mut run = || {
        let taken = buffers.take().unwrap_or_default();
        let batch = parse_with(
            taken,
            black_box(body.as_bytes()),
            Precision::Nanoseconds,
            0,
            &limits,
        )
        .expect("benchmark body parses");
        let points = batch.len();
        buffers = Some(batch.into_buffers());
        points
    };
    assert_eq!(run() as u64, line_count);

    let mut group = criterion.benchmark_group("parse_bytes");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(name, |bencher| bencher.iter(&mut run));
    group.finish();

    let mut group = criterion.benchmark_group("parse_lines");
    group.throughput(Throughput::Elements(line_count));
    group.bench_function(name, |bencher| bencher.iter(&mut run));
    group.finish();
}

fn parse_benches(criterion: &mut Criterion) {
    let narrow = arc_narrow_body();
    let tsbs = tsbs_cpu_only_body();
    let line_bytes = |body: &str| body.len() / body.lines().count();
    eprintln!(
        "arc_narrow: {} bytes, {} bytes a line; tsbs_cpu_only: {} bytes, {} bytes a line",
        narrow.len(),
        line_bytes(&narrow),
        tsbs.len(),
        line_bytes(&tsbs),
    );
    bench_shape(criterion, "arc_narrow", &narrow);
    bench_shape(criterion, "tsbs_cpu_only", &tsbs);
}

criterion_group!(benches, parse_benches);
criterion_main!(benches);
