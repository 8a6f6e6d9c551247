//! Actor dispatch: applying a durable telemetry point to live state, routed through a shard
//! to the orb's actor (the per-message actor cost of ingest). Measured as the time for a batch
//! of casts to be processed, ended by a call that queues behind them.
//! `cargo bench --bench actor_dispatch`

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orbmanager::actors::{Fleet, OrbCtx};
use orbmanager::clock::Clock;
use orbmanager::metrics::Metrics;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TelemetryPoint, TenantId};
use orbmanager::storage::{Store, StoreOptions};

const ORBS: usize = 1_000;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(dir.path(), &StoreOptions::default(), metrics.clone()).unwrap();
    let tenant = TenantId::parse("bench").unwrap();
    let records: Vec<OrbRecord> = (0..ORBS)
        .map(|i| {
            OrbRecord::provisioned(OrbKey::new(tenant.clone(), OrbId::parse(&format!("orb-{i}")).unwrap()), None, 1)
        })
        .collect();
    store.import_orbs(&records).unwrap();
    let keys: Vec<OrbKey> = records.iter().map(OrbRecord::key).collect();
    let fleet = rt.block_on(async {
        let ctx = OrbCtx::new(store.clone(), Clock::system(), metrics, false, 1, 3_600_000);
        let fleet = Fleet::start(ctx, 16).await.unwrap();
        for k in &keys {
            fleet.touch(k).await.unwrap();
        }
        fleet
    });
    let point = Arc::new(TelemetryPoint {
        ts: 1,
        msg_id: None,
        battery: Some(50.0),
        position: Some((37.7, -122.4)),
        speed: Some(1.0),
        mode: Some("mission".into()),
        metrics: orbmanager::model::telemetry::MetricSet::from_pairs([("t", 1.0)]).unwrap(),
    });
    let mut g = c.benchmark_group("actor_dispatch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("telemetry_cast_via_shard", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    fleet.telemetry(&keys[i as usize % ORBS], point.clone()).await;
                }
                // A call on every shard-orb path queues behind the casts: when all answer,
                // every cast has been applied.
                for k in keys.iter().take(64) {
                    fleet.touch(k).await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(fleet.stop());
    store.close();
}

criterion_group!(benches, bench);
criterion_main!(benches);
