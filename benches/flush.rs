//! Arrow buffering and Parquet flush: rows/s into the buffers from parsed line protocol, and
//! rows/s (and MB/s of Parquet) through freeze + hour split + sort + encode.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shale::buffer::{MeasurementBuffer, Value};
use shale::config::Config;
use shale::line_protocol::{parse, ParseLimits, Precision};
use shale::storage::{encode, FileOrigin};
use shale::workload::{Generator, Shape};

const ROWS: usize = 100_000;

fn filled_buffer(body: &str) -> MeasurementBuffer {
    let batch = parse(
        body.as_bytes(),
        Precision::Nanoseconds,
        0,
        &ParseLimits::default(),
    )
    .unwrap();
    let mut buffer = MeasurementBuffer::new();
    for line in batch.lines() {
        buffer.append_row(
            1,
            line.time_us(),
            line.tags(),
            line.fields().map(|(key, value)| (key, Value::from(value))),
        );
    }
    buffer
}

fn bench(c: &mut Criterion) {
    let config = Config::default().parquet;
    let origin = FileOrigin {
        database: "bench",
        measurement: "cpu",
        node: 1,
        shard: 0,
        taker: None,
    };
    for shape in [Shape::ArcNarrow, Shape::TsbsCpu] {
        let body = Generator::new(shape, 1000, 1, 1_700_000_000_000_000_000).batch(ROWS);
        let mut group = c.benchmark_group(format!("flush/{}", shape.name()));
        group.sample_size(10);
        group.throughput(Throughput::Elements(ROWS as u64));
        group.bench_function("buffer_append_rows", |b| {
            b.iter(|| filled_buffer(&body).rows())
        });
        group.bench_function("freeze_sort_encode_rows", |b| {
            b.iter_batched(
                || filled_buffer(&body),
                |mut buffer| {
                    let frozen = buffer.freeze().unwrap();
                    encode(&frozen, &origin, &config).unwrap()
                },
                BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
