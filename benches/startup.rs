//! Start-up with a large registry: time from `Server::start` to ready (every listener serving,
//! what `/healthz` reports) and to the fleet index fully loaded (searches answer), with N
//! registered orbs (500,000 by default; `OM_STARTUP_ORBS` for another size). Runs each start
//! `OM_STARTUP_RUNS` times (3) on the same data dir and prints each and the median.
//!
//! `cargo bench --bench startup`

use std::sync::Arc;
use std::time::{Duration, Instant};

use orbmanager::app::Server;
use orbmanager::clock::Clock;
use orbmanager::config::Config;
use orbmanager::metrics::Metrics;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TenantId};
use orbmanager::storage::{Store, StoreOptions};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that does not name this bench skips it.
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"startup".contains(a.as_str())) {
        return;
    }
    let (orbs, runs) = (env("OM_STARTUP_ORBS", 500_000), env("OM_STARTUP_RUNS", 3).max(1));
    let dir = tempfile::tempdir().unwrap();
    let tenants: Vec<TenantId> = (0..10).map(|i| TenantId::parse(&format!("t{i}")).unwrap()).collect();
    let records: Vec<OrbRecord> = (0..orbs)
        .map(|i| {
            let key = OrbKey::new(tenants[i % 10].clone(), OrbId::parse(&format!("orb-{i:07}")).unwrap());
            OrbRecord::provisioned(key, None, 1_800_000_000_000)
        })
        .collect();
    let loaded = Instant::now();
    {
        let store = Store::open(dir.path(), &StoreOptions::default(), Arc::new(Metrics::default())).unwrap();
        store.import_orbs(&records).unwrap();
        store.close();
    }
    drop(records);
    eprintln!("registered {orbs} orbs in {:.1} s", loaded.elapsed().as_secs_f64());

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (mut ready, mut indexed) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            mqtt_addr: "127.0.0.1:0".into(),
            mqtts_addr: "127.0.0.1:0".into(),
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            log: "warn".into(),
            ..Default::default()
        };
        rt.block_on(async {
            let t0 = Instant::now();
            let server = Server::start(&config, Clock::system()).await.unwrap();
            let r = t0.elapsed();
            while !server.fleet().ctx().index.is_ready() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let i = t0.elapsed();
            assert_eq!(server.fleet().ctx().index.len(), orbs);
            eprintln!(
                "run {run}: ready in {:.0} ms, fleet index loaded in {:.0} ms",
                r.as_secs_f64() * 1e3,
                i.as_secs_f64() * 1e3
            );
            ready.push(r);
            indexed.push(i);
            server.shutdown().await;
        });
    }
    println!(
        "startup with {orbs} registered orbs: ready median {:.0} ms, index loaded median {:.0} ms ({runs} runs)",
        median(ready).as_secs_f64() * 1e3,
        median(indexed).as_secs_f64() * 1e3
    );
}
