//! Group commit: 1 KB telemetry points made durable (fsync) by N concurrent writers. The
//! per-point time falls as concurrency grows because one fsync covers a whole group.
//! `cargo bench --bench group_commit`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orbmanager::metrics::Metrics;
use orbmanager::model::{OrbKey, telemetry};
use orbmanager::sim::Workload;
use orbmanager::storage::{Batch, Store, StoreOptions};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default(), Arc::new(Metrics::default())).unwrap();
    let w = Workload::Synthetic { payload_bytes: 1024 };
    let mut m = w.start(0);
    let now = 1_800_000_000_000u64;
    let payload = w.payload("b", 0, &mut m, Duration::from_secs(2));
    let point = telemetry::parse(&payload, now, 64 * 1024).unwrap();
    let mut g = c.benchmark_group("group_commit_1KiB");
    g.sample_size(10);
    for writers in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(writers as u64));
        g.bench_function(format!("{writers}_writers"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                rt.block_on(async {
                    let mut set = tokio::task::JoinSet::new();
                    for wi in 0..writers {
                        let (store, point, payload) = (store.clone(), point.clone(), payload.clone());
                        set.spawn(async move {
                            let key = OrbKey::parse_path(&format!("bench/orb-{wi}")).unwrap();
                            for i in 0..iters {
                                let mut p = point.clone();
                                p.ts = now + i;
                                p.msg_id = Some(format!("{wi}-{i}-{}", fastrand::u64(..)));
                                let mut batch = Batch::new();
                                Store::add_telemetry(&mut batch, &key, &p, now, &payload);
                                store.commit(batch).await.unwrap();
                            }
                        });
                    }
                    while set.join_next().await.is_some() {}
                });
                start.elapsed()
            })
        });
    }
    g.finish();
    store.close();
}

criterion_group!(benches, bench);
criterion_main!(benches);
