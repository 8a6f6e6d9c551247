//! Broadcast fan-out to a mostly offline fleet: N registered orbs (100,000 by default), one
//! broadcast to all of them; reports the fan-out time, resident memory and live actors as JSON.
//! `cargo bench --bench broadcast_fanout` (or `-- 20000` for another size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use orbmanager::actors::{Fleet, OrbCtx};
use orbmanager::clock::Clock;
use orbmanager::metrics::Metrics;
use orbmanager::model::broadcast::BroadcastRequest;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TenantId};
use orbmanager::storage::{Store, StoreOptions};

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / 1048576.0
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(dir.path(), &StoreOptions::default(), metrics.clone()).unwrap();
    let tenant = TenantId::parse("fleet").unwrap();
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
    drop(records);
    let result = rt.block_on(async {
        let ctx = OrbCtx::new(store.clone(), Clock::system(), metrics.clone(), false, 1, 3_600_000);
        let fleet = Fleet::start(ctx, 16).await.unwrap();
        let before = rss_mib();
        let req: BroadcastRequest = serde_json::from_value(serde_json::json!({
            "command_type": "firmware_check", "payload": {"channel": "stable"}, "all_orbs": true, "rate_per_s": 100000
        }))
        .unwrap();
        let (b, target) = req.validate(tenant.clone(), Clock::system().now_ms()).unwrap();
        let t = Instant::now();
        let summary = fleet.start_broadcast(b, target).await.unwrap();
        let id = summary["broadcast_id"].as_str().unwrap().to_string();
        let mut peak = before;
        let s = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peak = peak.max(rss_mib());
            let s = fleet.broadcast(&tenant, &id).await.unwrap();
            if s["status"] == "completed" && s["counts"]["queued"].as_u64() == Some(n as u64) {
                break s;
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let r = serde_json::json!({
            "orbs": n,
            "fan_out_seconds": secs,
            "commands_per_second": n as f64 / secs,
            "rss_before_mib": before,
            "rss_peak_mib": peak,
            "rss_after_mib": rss_mib(),
            "live_actors_after": metrics.live_actors.get(),
            "queued": s["counts"]["queued"],
            "create_errors": s["create_errors"],
        });
        fleet.stop().await;
        r
    });
    store.close();
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
}
