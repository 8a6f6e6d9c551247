//! `kill -9` during spills: after every kill and restart, each orb's history (hot and cold
//! merged) holds every acknowledged point exactly once.
//!
//! CI size by default; a longer run: `OM_COLD_CRASH_KILLS=30 cargo test --test cold_crash -- --nocapture`.

mod common;

use std::collections::BTreeMap;

use common::{ADMIN, Proc, ensure_tenant, http, now_ms};
use serde_json::{Value, json};

const HOUR: u64 = 3_600_000;

async fn history_ts(p: &Proc, orb: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/orbs/{orb}/telemetry?tenant_id=acme&limit=5000", p.http);
        if let Some(t) = &token {
            url.push_str(&format!("&page_token={t}"));
        }
        let (s, body) = http("GET", &url, Some(ADMIN), None).await;
        assert_eq!(s, 200, "{body}");
        out.extend(body["points"].as_array().unwrap().iter().map(|p| p["ts"].as_u64().unwrap()));
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_spills_loses_and_duplicates_nothing() {
    let kills: usize = std::env::var("OM_COLD_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    // Small spill buffers: each spill writes several files, so kills land between them too.
    let config = dir.path().join("cold.toml");
    std::fs::write(&config, "[storage]\nspill_buffer_mb = 1\nspill_interval_s = 0\ncheckpoint_interval_s = 0\n")
        .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut proc = Proc::serve(dir.path(), &args).await;
    ensure_tenant(&proc.http, "acme").await;
    let orbs: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    for o in &orbs {
        let (s, b) = http(
            "POST",
            &format!("{}/v1/orbs/register", proc.http),
            Some(ADMIN),
            Some(json!({"tenant_id": "acme", "orb_id": o})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let base = now_ms() - 20 * HOUR;
    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let (mut mid_spill, mut before_spill, mut after_spill) = (0, 0, 0);
    // Kills land uniformly over ~1.5x the time a whole spill takes (measured as we go).
    let mut spill_ms = 300u64;
    for round in 0..kills {
        // 2,500 old points per orb this round, acknowledged before the spill starts.
        for o in &orbs {
            for chunk in 0..3u64 {
                let pts: Vec<Value> = (0..1000u64)
                    .filter(|i| chunk * 1000 + i < 2500)
                    .map(|i| {
                        let ts = base + (round as u64) * 13_000_000 + (chunk * 1000 + i) * 5000;
                        json!({"ts": ts, "battery": 50.0, "metrics": {"round": round}})
                    })
                    .collect();
                let url = format!("{}/v1/orbs/{o}/telemetry?tenant_id=acme", proc.http);
                let (s, b) = http("POST", &url, Some(ADMIN), Some(Value::Array(pts.clone()))).await;
                assert_eq!(s, 200, "{b}");
                acked.entry(o.clone()).or_default().extend(pts.iter().map(|p| p["ts"].as_u64().unwrap()));
            }
        }
        // The spill request dies with the server, so its transport error is expected.
        let url = format!("{}/v1/storage/spill", proc.http);
        let spill = tokio::task::spawn_blocking(move || {
            ureq::post(&url)
                .header("Authorization", &format!("Bearer {ADMIN}"))
                .header("Content-Type", "application/json")
                .send(&br#"{"hot_window":"1h"}"#[..])
                .is_ok()
        });
        tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(0..spill_ms * 3 / 2 + 50))).await;
        proc.kill9();
        let _ = spill.await;
        proc = Proc::serve(dir.path(), &args).await;
        for o in &orbs {
            let mut got = history_ts(&proc, o).await;
            let n = got.len();
            got.dedup();
            assert_eq!(got.len(), n, "round {round}: {o} has a point twice");
            let mut want = acked[o].clone();
            want.sort_unstable();
            assert_eq!(got, want, "round {round}: {o} lost or invented points");
        }
        // What the killed spill left: everything, part, or nothing (measured by spilling now).
        let (s, r) =
            http("POST", &format!("{}/v1/storage/spill", proc.http), Some(ADMIN), Some(json!({"hot_window": "1h"})))
                .await;
        assert_eq!(s, 200, "{r}");
        if r["rows"] == 10_000 {
            spill_ms = r["elapsed_ms"].as_u64().unwrap().max(50);
        }
        match r["rows"].as_u64().unwrap() {
            0 => after_spill += 1,
            10_000 => before_spill += 1,
            _ => mid_spill += 1,
        }
        for o in &orbs {
            let mut want = acked[o].clone();
            want.sort_unstable();
            assert_eq!(history_ts(&proc, o).await, want, "round {round}: {o} after the follow-up spill");
        }
    }
    eprintln!(
        "{kills} kills: {before_spill} before the spill committed anything, {mid_spill} mid-spill, {after_spill} after it finished (a whole spill took {spill_ms} ms)"
    );
    assert_eq!(proc.terminate().await.code(), Some(0));
}
