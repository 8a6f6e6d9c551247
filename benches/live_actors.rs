//! Memory per live orb actor: activates N registered orbs (10,000 and 100,000 by default) and
//! reports resident memory before and after, as JSON. Not a timed test.
//! `cargo bench --bench live_actors` (or `-- 10000 100000 500000` for other sizes)

use std::sync::Arc;

use orbmanager::actors::{Fleet, OrbCtx};
use orbmanager::clock::Clock;
use orbmanager::metrics::Metrics;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TenantId};
use orbmanager::storage::{Store, StoreOptions};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 100_000] } else { sizes };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut results = Vec::new();
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let store = Store::open(dir.path(), &StoreOptions::default(), metrics.clone()).unwrap();
        let tenant = TenantId::parse("mem").unwrap();
        let records: Vec<OrbRecord> = (0..n)
            .map(|i| {
                OrbRecord::provisioned(
                    OrbKey::new(tenant.clone(), OrbId::parse(&format!("orb-{i:07}")).unwrap()),
                    Some([1; 32]),
                    1,
                )
            })
            .collect();
        store.import_orbs(&records).unwrap();
        let keys: Vec<OrbKey> = records.iter().map(OrbRecord::key).collect();
        drop(records);
        let (fleet, before, after, secs) = rt.block_on(async {
            let ctx = OrbCtx::new(store.clone(), Clock::system(), metrics.clone(), false, 1, 3_600_000);
            let fleet = Fleet::start(ctx, 16).await.unwrap();
            let before = rss_bytes();
            let t = std::time::Instant::now();
            for chunk in keys.chunks(2_000) {
                let mut set = tokio::task::JoinSet::new();
                for k in chunk {
                    let (f, k) = (fleet.clone(), k.clone());
                    set.spawn(async move { f.touch(&k).await.unwrap() });
                }
                while set.join_next().await.is_some() {}
            }
            let secs = t.elapsed().as_secs_f64();
            (fleet, before, rss_bytes(), secs)
        });
        assert_eq!(metrics.live_actors.get() as usize, n);
        let r = serde_json::json!({
            "live_orbs": n,
            "rss_before_mib": before as f64 / 1048576.0,
            "rss_after_mib": after as f64 / 1048576.0,
            "bytes_per_live_orb": (after.saturating_sub(before)) as f64 / n as f64,
            "activation_rate_per_s": n as f64 / secs,
        });
        eprintln!("{r}");
        results.push(r);
        rt.block_on(fleet.stop());
        store.close();
    }
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
}
