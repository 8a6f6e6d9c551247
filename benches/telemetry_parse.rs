//! Telemetry JSON parse + validate, per payload size (the per-message CPU floor of ingest), and
//! the same payloads through the general parser alone (`_general`: without the fast path).
//! `cargo bench --bench telemetry_parse`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orbmanager::model::telemetry;
use orbmanager::sim::Workload;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("telemetry_parse");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    for size in [256usize, 1024, 4096] {
        let w = Workload::Synthetic { payload_bytes: size };
        let mut m = w.start(0);
        let payload = w.payload("sim-00001", 1, &mut m, std::time::Duration::from_secs(2));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| telemetry::parse(std::hint::black_box(&payload), now, 64 * 1024).unwrap())
        });
        // The same payload through the general (serde_json) parser alone: the fast path's
        // baseline in the same run.
        g.bench_function(format!("{size}B_general"), |b| {
            b.iter(|| telemetry::parse_general(std::hint::black_box(&payload), now, 64 * 1024).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
