//! The cold tier: Parquet encode, spill throughput (MB of 1 KiB JSON telemetry per second; a spill
//! runs on one core at a time), and a 24 h trajectory query across both tiers against the same
//! query on a store that was never spilled (the baseline, same run). The spill and a page of
//! one orb's hot history are measured with the points' values in blob files (the default) and
//! in the tree (`storage.telemetry_blob_min_bytes = 0`, the `_inline` rows), read from flushed
//! tables.
//!
//! `cargo bench --bench cold_tier`

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use orbmanager::metrics::Metrics;
use orbmanager::model::downsample;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TenantId, telemetry};
use orbmanager::sim::workload::synthetic;
use orbmanager::storage::cold::columns::{self, ColdRow};
use orbmanager::storage::cold::{Cold, ObjectTarget, SpillOptions};
use orbmanager::storage::{Batch, Store, StoreOptions, StoredPoint};

const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A store with `orbs` orbs of `per_orb` points of `size` JSON bytes each, one every `step_ms`
/// up to `end_ms`, flushed. Returns the store, its dir and the JSON bytes written.
fn filled(
    opts: &StoreOptions,
    orbs: usize,
    per_orb: usize,
    step_ms: u64,
    end_ms: u64,
    size: usize,
) -> (Store, tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts, Arc::new(Metrics::default())).unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let records: Vec<OrbRecord> = (0..orbs)
        .map(|i| {
            OrbRecord::provisioned(OrbKey::new(tenant.clone(), OrbId::parse(&format!("orb-{i:05}")).unwrap()), None, 1)
        })
        .collect();
    store.import_orbs(&records).unwrap();
    let mut bytes = 0u64;
    for r in &records {
        let key = r.key();
        let mut batch = Batch::new();
        for i in 0..per_orb {
            let ts = end_ms - (per_orb - i) as u64 * step_ms;
            // No msg_id: one batch may carry many points (a batch holds one dedupe probe).
            let raw = synthetic(key.orb.as_str(), i as u64, ts, size);
            let mut point = telemetry::parse(&raw, ts, 64 * 1024).unwrap();
            point.msg_id = None;
            bytes += raw.len() as u64;
            Store::add_telemetry(&mut batch, &key, &point, ts, &raw);
            if batch.len() >= 2000 {
                store.commit_blocking(std::mem::take(&mut batch)).unwrap();
            }
        }
        if !batch.is_empty() {
            store.commit_blocking(batch).unwrap();
        }
    }
    store.flush_telemetry().unwrap();
    (store, dir, bytes)
}

fn rows(n: usize) -> Vec<ColdRow> {
    let now = now_ms();
    (0..n)
        .map(|i| {
            let raw = synthetic("orb-00001", i as u64, now - HOUR + i as u64 * 100, 1024);
            ColdRow {
                orb: OrbId::parse(&format!("orb-{:05}", i / 1800)).unwrap(),
                suffix: i as u64,
                point: StoredPoint { point: telemetry::parse(&raw, now, 64 * 1024).unwrap(), received_ms: now },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let mut g = c.benchmark_group("cold_tier");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));

    // Parquet encode of 10,000 rows of 1 KiB points (~80 metrics each).
    let r = rows(10_000);
    g.throughput(Throughput::Elements(r.len() as u64));
    g.bench_function("parquet_encode_10k_rows", |b| b.iter(|| columns::encode(std::hint::black_box(&r)).unwrap()));

    // Spill of 100 orbs x 500 points (50,000 points, ~50 MB of JSON), all past the window;
    // one page of one orb's hot history (500 points) from the same store.
    let per_point = synthetic("orb-00000", 0, now_ms(), 1024).len() as u64;
    let inline = StoreOptions { telemetry_blob_min_bytes: 0, ..StoreOptions::default() };
    for (name, opts) in [("", StoreOptions::default()), ("_inline", inline)] {
        g.throughput(Throughput::Bytes(per_point * 50_000));
        g.bench_function(format!("spill_50k_points_1KiB{name}"), |b| {
            b.iter_batched(
                || {
                    let (store, dir, _) = filled(&opts, 100, 500, 2000, now_ms() - 2 * HOUR, 1024);
                    let cold = Cold::open(store.clone(), &ObjectTarget::Local(dir.path().join("objects"))).unwrap();
                    (store, dir, cold)
                },
                |(store, dir, cold)| {
                    let spill = SpillOptions { hot_window_ms: HOUR, tenant_windows: false, buffer_bytes: 64 << 20 };
                    let report = rt.block_on(cold.spill(now_ms(), &spill, None)).unwrap();
                    assert_eq!(report.rows, 50_000);
                    store.close();
                    drop(dir);
                },
                BatchSize::PerIteration,
            )
        });
        let (store, _dir, _) = filled(&opts, 100, 500, 2000, now_ms(), 1024);
        let key = OrbKey::parse_path("bench/orb-00042").unwrap();
        g.throughput(Throughput::Elements(500));
        g.bench_function(format!("hot_history_500_points_1KiB{name}"), |b| {
            b.iter(|| {
                let page = store.points(&key, 0, u64::MAX, None, 500).unwrap();
                assert_eq!(page.len(), 500);
                page
            })
        });
        store.close();
    }

    // A 24 h trajectory (one point every 2 s: 43,200) downsampled to 1,000 points: 23 h cold +
    // 1 h hot, against the same query on a store never spilled.
    let end = now_ms();
    let (hot_store, _hot_dir, _) = filled(&StoreOptions::default(), 1, 43_200, 2000, end, 256);
    let hot_cold = Cold::open(hot_store.clone(), &ObjectTarget::Local(_hot_dir.path().join("objects"))).unwrap();
    let (store, dir, json_bytes) = filled(&StoreOptions::default(), 1, 43_200, 2000, end, 256);
    let cold = Cold::open(store.clone(), &ObjectTarget::Local(dir.path().join("objects"))).unwrap();
    let opts = SpillOptions { hot_window_ms: HOUR, tenant_windows: false, buffer_bytes: 64 << 20 };
    let report = rt.block_on(cold.spill(end, &opts, None)).unwrap();
    assert!(report.rows > 40_000, "{report:?}");
    eprintln!(
        "spilled {} points of 256 B JSON into {} files: {} Parquet bytes for {} JSON bytes ({:.1}x) and {} LSM bytes",
        report.rows,
        report.objects,
        report.bytes,
        json_bytes * report.rows / 43_200,
        (json_bytes * report.rows / 43_200) as f64 / report.bytes as f64,
        report.hot_bytes
    );
    let key = OrbKey::parse_path("bench/orb-00000").unwrap();
    g.throughput(Throughput::Elements(43_200));
    let trajectory = |c: &Cold| {
        let all = rt.block_on(c.range(&key, end - 25 * HOUR, end, 1_000_000)).unwrap();
        assert_eq!(all.len(), 43_200);
        let xy: Vec<(f64, f64)> = all.iter().map(|(_, p)| (p.point.ts as f64, p.point.speed.unwrap_or(0.0))).collect();
        downsample::lttb(&xy, 1000)
    };
    g.bench_function("trajectory_24h_hot_only_baseline", |b| b.iter(|| trajectory(&hot_cold)));
    g.bench_function("trajectory_24h_23h_cold", |b| b.iter(|| trajectory(&cold)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
