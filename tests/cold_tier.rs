//! The cold tier on a local directory: spill moves exactly the points past the hot window into
//! Parquet files an independent reader (pyarrow) reads back value for value; history across
//! both tiers returns every point exactly once, across pages and a restart; playback
//! (trajectories, fleet time travel); export jobs; refusals that change nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{ADMIN, TestServer, history, http, now_ms};
use serde_json::{Value, json};

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

fn cold_config(c: &mut orbmanager::config::Config) {
    c.storage.spill_interval_s = 0;
    c.storage.checkpoint_interval_s = 0;
}

/// A point as devices send it; the metric and battery depend on the index so every value is
/// checkable after the round trip.
pub fn point(ts: u64, i: usize) -> Value {
    json!({
        "ts": ts,
        "msg_id": format!("m-{ts}-{i}"),
        "battery": (i % 100) as f64 + 0.25,
        "lat": 37.7 + i as f64 * 1e-4,
        "lon": -122.4 - i as f64 * 1e-4,
        "speed": (i % 17) as f64,
        "mode": if i.is_multiple_of(2) { "mission" } else { "idle" },
        "metrics": {"temp": 20.0 + (i % 7) as f64, "load": i as f64},
    })
}

/// Sends points through the HTTP fallback as the operator, in batches of 1,000.
pub async fn ingest(ts: &TestServer, tenant: &str, orb: &str, points: &[Value]) {
    for chunk in points.chunks(1000) {
        let url = ts.url(&format!("/v1/orbs/{orb}/telemetry?tenant_id={tenant}"));
        let (s, body) = http("POST", &url, Some(ADMIN), Some(Value::Array(chunk.to_vec()))).await;
        assert_eq!(s, 200, "{body}");
    }
}

/// Device times `start + i * step` for `n` points.
fn times(start: u64, step: u64, n: usize) -> Vec<u64> {
    (0..n).map(|i| start + i as u64 * step).collect()
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads Parquet with pyarrow in a separate process.
pub fn pyarrow_read(dir: &Path, mode: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/read_parquet.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(dir)
        .arg(mode)
        .output()
        .expect("python3 runs (scripts/test.sh installs pyarrow)");
    assert!(out.status.success(), "pyarrow reader failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reader prints JSON")
}

async fn spill(ts: &TestServer, body: Value) -> Value {
    let (s, r) = http("POST", &ts.url("/v1/storage/spill"), Some(ADMIN), Some(body)).await;
    assert_eq!(s, 200, "{r}");
    r
}

/// Hot points of an orb, straight from the LSM (not the merged history).
fn hot_count(ts: &TestServer, tenant: &str, orb: &str) -> usize {
    let key = orbmanager::model::OrbKey::parse_path(&format!("{tenant}/{orb}")).unwrap();
    ts.server().store().points(&key, 0, u64::MAX, None, usize::MAX).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_moves_old_points_and_history_spans_both_tiers_exactly_once() {
    let ts = TestServer::start_with(false, cold_config).await;
    let now = now_ms();
    // 400 points per orb, one every 3 minutes over the last 20 hours; with a 6 h window the
    // first 280 of each orb are cold. No point lies within 90 s of the cutoff.
    let stamps = times(now - 20 * HOUR + 90_000, 3 * MIN, 400);
    let orbs = ["o1", "o2", "o3"];
    for orb in orbs {
        ts.register("acme", orb).await;
        let pts: Vec<Value> = stamps.iter().enumerate().map(|(i, t)| point(*t, i)).collect();
        ingest(&ts, "acme", orb, &pts).await;
    }
    ts.register("other", "o1").await;
    ingest(&ts, "other", "o1", &[point(now - 10 * HOUR, 7)]).await;
    let mut before = Vec::new();
    for orb in orbs {
        before.push(history(&ts, "acme", orb).await);
        assert_eq!(before.last().unwrap().len(), 400);
    }

    let report = spill(&ts, json!({"hot_window": "6h"})).await;
    let cold_each = stamps.iter().filter(|t| **t < now - 6 * HOUR).count();
    assert_eq!(cold_each, 280);
    assert_eq!(report["rows"], (3 * cold_each + 1) as u64, "{report}");
    assert_eq!(report["tenants"], 2);
    assert_eq!(ts.metric("orbmanager_spill_rows_total").await, (3 * cold_each + 1) as f64);
    assert_eq!(ts.metric("orbmanager_spill_files_total").await, report["objects"].as_f64().unwrap());
    for orb in orbs {
        assert_eq!(hot_count(&ts, "acme", orb), 400 - cold_each, "the hot tier keeps only the last 6 h");
    }

    // Files: hive partitions by tenant, date and hour, plus one manifest mirror per file.
    let objects = ts.dir.path().join("objects");
    let files = parquet_files(&objects.join("telemetry"));
    assert_eq!(files.len() as u64, report["objects"].as_u64().unwrap());
    assert!(files.iter().all(|f| {
        let s = f.to_string_lossy();
        s.contains("/telemetry/tenant=") && s.contains("/date=") && s.contains("/hour=")
    }));
    let mirrors = std::fs::read_dir(objects.join("telemetry/tenant=acme/_manifest")).unwrap().count();
    let acme_files = files.iter().filter(|f| f.to_string_lossy().contains("tenant=acme")).count();
    assert_eq!(mirrors, acme_files);

    // History is the same as before the spill: every point once, in order, values intact.
    for (i, orb) in orbs.iter().enumerate() {
        assert_eq!(history(&ts, "acme", orb).await, before[i], "{orb} history changed by the spill");
    }
    // Small pages that cross the tier boundary.
    let mut paged = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = "/v1/orbs/o2/telemetry?tenant_id=acme&limit=37".to_string();
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={t}"));
        }
        let (s, body) = ts.get(&path).await;
        assert_eq!(s, 200, "{body}");
        paged.extend(body["points"].as_array().unwrap().iter().cloned());
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => break,
        }
    }
    assert_eq!(paged, before[1]);
    // A time range inside the cold tier only.
    let (from, to) = (stamps[10], stamps[20]);
    let (s, body) = ts.get(&format!("/v1/orbs/o3/telemetry?tenant_id=acme&from={from}&to={to}")).await;
    assert_eq!(s, 200);
    assert_eq!(body["points"].as_array().unwrap().as_slice(), &before[2][10..=20]);

    // An independent reader sees exactly the spilled rows with the same values.
    let read = pyarrow_read(&objects.join("telemetry"), "dataset");
    assert_eq!(read["rows"], (3 * cold_each + 1) as u64);
    assert_eq!(read["schema"]["ts"], "timestamp[ms, tz=UTC]");
    assert_eq!(read["schema"]["battery"], "double");
    let rows = read["points"].as_array().unwrap();
    let acme: Vec<&Value> = rows.iter().filter(|r| r["tenant"] == "acme").collect();
    assert_eq!(acme.len(), 3 * cold_each);
    for (i, orb) in orbs.iter().enumerate() {
        for p in &before[i][..cold_each] {
            let r = acme
                .iter()
                .find(|r| r["orb_id"] == *orb && r["ts"] == p["ts"])
                .unwrap_or_else(|| panic!("{orb} {} missing from the files", p["ts"]));
            for f in ["msg_id", "battery", "lat", "lon", "speed", "mode", "metrics", "received_ms"] {
                let col = if f == "received_ms" { "received_at" } else { f };
                assert_eq!(r[col], p[f], "{orb} {} field {f}", p["ts"]);
            }
        }
    }

    // Nothing left to spill; a restart keeps the merged view.
    assert_eq!(spill(&ts, json!({"hot_window": "6h"})).await["rows"], 0);
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, cold_config).await;
    for (i, orb) in orbs.iter().enumerate() {
        assert_eq!(history(&ts, "acme", orb).await, before[i], "{orb} after restart");
    }
    let (_, other) = ts.get("/v1/orbs/o1/telemetry?tenant_id=other").await;
    assert_eq!(other["points"].as_array().unwrap().len(), 1, "tenants stay apart: {other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_present_in_both_tiers_is_returned_once() {
    let ts = TestServer::start_with(false, cold_config).await;
    ts.register("acme", "d1").await;
    let now = now_ms();
    // Points without msg_id: an exact resend is the same point (same key).
    let pts: Vec<Value> =
        (0..50u64).map(|i| json!({"ts": now - 10 * HOUR + i * MIN, "battery": 50.0, "metrics": {"i": i}})).collect();
    ingest(&ts, "acme", "d1", &pts).await;
    let before = history(&ts, "acme", "d1").await;
    assert_eq!(spill(&ts, json!({"hot_window": "1h"})).await["rows"], 50);
    // The device resends ten of them after the spill (a replayed buffer): hot again.
    ingest(&ts, "acme", "d1", &pts[20..30]).await;
    assert_eq!(hot_count(&ts, "acme", "d1"), 10);
    let after: Vec<Value> = history(&ts, "acme", "d1").await;
    let strip = |v: &[Value]| -> Vec<Value> {
        v.iter()
            .map(|p| {
                let mut p = p.clone();
                p.as_object_mut().unwrap().remove("received_ms");
                p
            })
            .collect()
    };
    assert_eq!(strip(&after), strip(&before), "each key once, whichever tier holds it");
    // Spilling the resends writes a second file with the same keys: still once.
    assert_eq!(spill(&ts, json!({"hot_window": "1h"})).await["rows"], 10);
    assert_eq!(strip(&history(&ts, "acme", "d1").await), strip(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_reads_trajectories_and_the_fleet_at_a_past_time() {
    let ts = TestServer::start_with(false, cold_config).await;
    let now = now_ms();
    let stamps = times(now - 24 * HOUR + MIN, 30_000, 24 * 120 - 4);
    for orb in ["p1", "p2"] {
        ts.register("acme", orb).await;
        let pts: Vec<Value> = stamps.iter().enumerate().map(|(i, t)| point(*t, i)).collect();
        ingest(&ts, "acme", orb, &pts).await;
    }
    // p3 is silent in the window asked about.
    ts.register("acme", "p3").await;
    ingest(&ts, "acme", "p3", &[point(now - 2 * HOUR, 1)]).await;
    spill(&ts, json!({"hot_window": "3h"})).await;

    // A 24 h trajectory, downsampled to 200 points, first and last kept.
    let (s, t) = ts
        .get(&format!("/v1/orbs/p1/trajectory?tenant_id=acme&from={}&to={now}&max_points=200", now - 25 * HOUR))
        .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["total_points"], stamps.len() as u64);
    let pts = t["points"].as_array().unwrap();
    assert_eq!(pts.len(), 200);
    assert_eq!(pts[0]["ts"], stamps[0]);
    assert_eq!(pts[199]["ts"], *stamps.last().unwrap());
    assert!(pts.windows(2).all(|w| w[0]["ts"].as_u64() < w[1]["ts"].as_u64()));
    assert_eq!(t["method"], "lttb");
    let (s, mm) = ts
        .get(&format!(
            "/v1/orbs/p1/trajectory?tenant_id=acme&from=0&to={now}&max_points=100&method=minmax&field=battery"
        ))
        .await;
    assert_eq!(s, 200, "{mm}");
    let vals: Vec<f64> = mm["points"].as_array().unwrap().iter().map(|p| p["value"].as_f64().unwrap()).collect();
    assert!(vals.contains(&0.25) && vals.contains(&99.25), "min/max keeps the extremes");

    // The fleet 20 hours ago: the newest point at or before T, found in the cold tier.
    let at = now - 20 * HOUR;
    let expect = *stamps.iter().filter(|s| **s <= at).max().unwrap();
    let (s, f) = ts.get(&format!("/v1/fleet/at?tenant_id=acme&t={at}&lookback_s=3600")).await;
    assert_eq!(s, 200, "{f}");
    let orbs = f["orbs"].as_array().unwrap();
    assert_eq!(orbs.len(), 3);
    for o in &orbs[..2] {
        assert_eq!(o["point"]["ts"], expect, "{o}");
        assert_eq!(o["tier"], "cold");
    }
    assert!(orbs[2]["point"].is_null(), "p3 sent nothing in that hour: {}", orbs[2]);
    // Now: from the hot tier; one orb per page.
    let (_, f) = ts.get(&format!("/v1/fleet/at?tenant_id=acme&t={now}&page_size=1&q=orb_id%20%3D%20%22p3%22")).await;
    let o = &f["orbs"][0];
    assert_eq!((o["orb_id"].as_str(), o["tier"].as_str()), (Some("p3"), Some("hot")), "{f}");
}

async fn wait_export(ts: &TestServer, id: &str) -> Value {
    for _ in 0..500 {
        let (s, j) = ts.get(&format!("/v1/exports/{id}?tenant_id=acme")).await;
        assert_eq!(s, 200, "{j}");
        if j["status"] != "running" {
            return j;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("export {id} did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_jobs_write_every_point_in_range_once() {
    let ts = TestServer::start_with(false, cold_config).await;
    let now = now_ms();
    let stamps = times(now - 12 * HOUR, 2 * MIN, 360);
    for orb in ["e1", "e2", "e3"] {
        ts.register("acme", orb).await;
        let pts: Vec<Value> = stamps.iter().enumerate().map(|(i, t)| point(*t, i)).collect();
        ingest(&ts, "acme", orb, &pts).await;
    }
    spill(&ts, json!({"hot_window": "4h"})).await;
    let (from, to) = (stamps[50], stamps[300]);
    let expected_per_orb = 251;

    let (s, job) = http(
        "POST",
        &ts.url("/v1/exports"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "from": from, "to": to, "query": "orb_id != \"e3\"", "format": "jsonl", "destination": "daily/2026-11-27"})),
    )
    .await;
    assert_eq!(s, 201, "{job}");
    assert_eq!(job["orbs_total"], 2);
    let done = wait_export(&ts, job["export_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["rows"], 2 * expected_per_orb);
    let dir = ts.dir.path().join("objects/exports/tenant=acme/daily/2026-11-27");
    let mut seen = BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let t = v["ts"].as_u64().unwrap();
            assert!(t >= from && t <= to);
            assert!(seen.insert((v["orb_id"].as_str().unwrap().to_string(), t)), "duplicate {v}");
        }
    }
    assert_eq!(seen.len(), 2 * expected_per_orb);
    assert!(seen.iter().all(|(o, _)| o != "e3"));

    let (s, job) = http(
        "POST",
        &ts.url("/v1/exports"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "from": 0, "to": now, "destination": "all"})),
    )
    .await;
    assert_eq!(s, 201, "{job}");
    let done = wait_export(&ts, job["export_id"].as_str().unwrap()).await;
    assert_eq!(done["rows"], 3 * 360, "{done}");
    let read = pyarrow_read(&ts.dir.path().join("objects/exports/tenant=acme/all"), "files");
    assert_eq!(read["rows"], 3 * 360);
    let (_, list) = ts.get("/v1/exports?tenant_id=acme").await;
    assert_eq!(list["exports"].as_array().unwrap().len(), 2);
    // A finished job cannot be canceled.
    let (s, e) = http(
        "POST",
        &ts.url(&format!("/v1/exports/{}/cancel?tenant_id=acme", job["export_id"].as_str().unwrap())),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (409, Some("failed_precondition")), "{e}");
}

async fn api_token(ts: &TestServer, tenant: &str, role: &str) -> String {
    let url = ts.url(&format!("/v1/tenants/{tenant}/tokens"));
    let (s, body) = http("POST", &url, Some(ADMIN), Some(json!({"role": role, "name": "t"}))).await;
    assert_eq!(s, 201, "{body}");
    body["secret"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_refusals_name_the_problem_and_change_nothing() {
    let ts = TestServer::start_with(false, cold_config).await;
    ts.register("acme", "r1").await;
    ts.register("beta", "r1").await;
    let now = now_ms();
    ingest(&ts, "acme", "r1", &[point(now - 10 * HOUR, 1)]).await;
    ingest(&ts, "beta", "r1", &[point(now - 10 * HOUR, 2)]).await;
    let viewer = api_token(&ts, "acme", "viewer").await;
    let admin = api_token(&ts, "acme", "admin").await;
    let post = |path: &str, tok: &str, body: Value| {
        let (url, tok) = (ts.url(path), tok.to_string());
        async move { http("POST", &url, Some(&tok), Some(body)).await }
    };
    let cases = [
        ("/v1/storage/spill", viewer.clone(), json!({}), 403, "permission_denied"),
        ("/v1/storage/spill", admin.clone(), json!({"tenant_id": "beta"}), 403, "permission_denied"),
        ("/v1/storage/spill", ADMIN.to_string(), json!({"hot_window": "soon"}), 400, "invalid_argument"),
        ("/v1/storage/spill", ADMIN.to_string(), json!({"hot_windw": "1h"}), 400, "invalid_argument"),
        ("/v1/storage/checkpoint", admin.clone(), json!({}), 403, "permission_denied"),
        ("/v1/exports", viewer.clone(), json!({"from": 0, "to": now, "destination": "x"}), 403, "permission_denied"),
        ("/v1/exports", admin.clone(), json!({"from": 0, "to": now, "destination": "../x"}), 400, "invalid_argument"),
        (
            "/v1/exports",
            admin.clone(),
            json!({"from": 0, "to": now, "destination": "x", "format": "csv"}),
            400,
            "invalid_argument",
        ),
        ("/v1/exports", admin.clone(), json!({"from": 9, "to": 1, "destination": "x"}), 400, "invalid_argument"),
        (
            "/v1/exports",
            admin.clone(),
            json!({"from": 0, "to": now, "destination": "x", "query": "battery <"}),
            400,
            "invalid_argument",
        ),
    ];
    for (path, tok, body, status, code) in cases {
        let (s, e) = post(path, &tok, body.clone()).await;
        assert_eq!((s, e["code"].as_str()), (status, Some(code)), "{path} {body}: {e}");
        assert!(!e["detail"].as_str().unwrap_or("").is_empty());
    }
    for (path, status) in [
        ("/v1/orbs/r1/trajectory?max_points=20000", 400),
        ("/v1/orbs/r1/trajectory?method=spline", 400),
        ("/v1/orbs/r1/trajectory?from=5&to=1", 400),
        ("/v1/orbs/nope/trajectory", 404),
        ("/v1/fleet/at?t=1&page_size=5000", 400),
        ("/v1/fleet/at?t=1&lookback_s=999999999", 400),
        ("/v1/exports/exp-0000000000000000", 404),
    ] {
        let (s, e) = http("GET", &ts.url(path), Some(&admin), None).await;
        assert_eq!(s, status, "{path}: {e}");
    }
    // Malformed and unknown query parameters are problem documents too.
    for path in
        ["/v1/fleet/at?t=abc", "/v1/fleet/at", "/v1/orbs/r1/trajectory?max_points=-1", "/v1/orbs/r1/telemetry?frm=1"]
    {
        let (s, e) = http("GET", &ts.url(path), Some(&admin), None).await;
        assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")), "{path}: {e}");
        assert!(!e["detail"].as_str().unwrap_or("").is_empty(), "{path}: {e}");
    }
    // Nothing moved, nothing was created.
    assert_eq!(hot_count(&ts, "acme", "r1"), 1);
    assert_eq!(hot_count(&ts, "beta", "r1"), 1);
    let (_, list) = http("GET", &ts.url("/v1/exports"), Some(&admin), None).await;
    assert_eq!(list["exports"].as_array().unwrap().len(), 0);
    assert!(parquet_files(&ts.dir.path().join("objects")).is_empty());
    // A tenant admin spills their own tenant only; another tenant's export id is not found.
    let (s, r) = post("/v1/storage/spill", &admin, json!({"hot_window": "1h"})).await;
    assert_eq!((s, r["rows"].as_u64()), (200, Some(1)), "{r}");
    assert_eq!(hot_count(&ts, "beta", "r1"), 1);
    let (s, job) = post("/v1/exports", &admin, json!({"from": 0, "to": now, "destination": "mine"})).await;
    assert_eq!(s, 201, "{job}");
    let beta = api_token(&ts, "beta", "admin").await;
    let (s, _) =
        http("GET", &ts.url(&format!("/v1/exports/{}", job["export_id"].as_str().unwrap())), Some(&beta), None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_retention_and_the_maintenance_loop() {
    // The maintenance loop runs every second: spill, retention, orphan collection.
    let ts = TestServer::start_with(false, |c| {
        c.storage.spill_interval_s = 1;
        c.storage.checkpoint_interval_s = 0;
    })
    .await;
    ts.register("acme", "t1").await;
    ts.register("beta", "t1").await;
    let admin = api_token(&ts, "acme", "admin").await;
    let viewer = api_token(&ts, "acme", "viewer").await;
    let url = ts.url("/v1/tenants/acme/retention");
    let (s, r) = http("GET", &url, Some(&viewer), None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!((r["hot_window_ms"].as_u64(), r["hot_window_is_default"].as_bool()), (Some(6 * HOUR), Some(true)));
    for (body, status) in [
        (json!({"hot_window": "10s"}), 400),
        (json!({"hot_window": "2h", "cold_retention": "1h"}), 400),
        (json!({"hot_window": "two hours"}), 400),
        (json!({"hot_windows": "2h"}), 400),
    ] {
        let (s, e) = http("PUT", &url, Some(&admin), Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {e}");
    }
    let (s, _) = http("PUT", &url, Some(&viewer), Some(json!({"hot_window": "2h"}))).await;
    assert_eq!(s, 403);
    let (s, _) =
        http("PUT", &ts.url("/v1/tenants/beta/retention"), Some(&admin), Some(json!({"hot_window": "2h"}))).await;
    assert_eq!(s, 403);
    let (_, r) = http("GET", &url, Some(&viewer), None).await;
    assert_eq!(r["hot_window_is_default"], true, "refusals changed nothing: {r}");

    // Unreferenced files: one left by an interrupted spill two hours ago (collected), one
    // written just now (could be a spill in progress elsewhere: kept).
    let part = ts.dir.path().join("objects/telemetry/tenant=acme/date=2020-01-01/hour=00");
    std::fs::create_dir_all(&part).unwrap();
    let (old, fresh) = (part.join("part-1-0000dead.parquet"), part.join("part-2-0000beef.parquet"));
    std::fs::write(&old, b"PAR1 interrupted").unwrap();
    std::fs::write(&fresh, b"PAR1 in progress").unwrap();
    assert!(std::process::Command::new("touch").args(["-d", "2 hours ago"]).arg(&old).status().unwrap().success());

    let (s, r) = http("PUT", &url, Some(&admin), Some(json!({"hot_window": "2h", "cold_retention": "1d"}))).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!((r["hot_window_ms"].as_u64(), r["cold_retention_ms"].as_u64()), (Some(2 * HOUR), Some(24 * HOUR)));
    let now = now_ms();
    for tenant in ["acme", "beta"] {
        ingest(&ts, tenant, "t1", &[point(now - 30 * HOUR, 1), point(now - 3 * HOUR, 2), point(now - 10 * MIN, 3)])
            .await;
    }
    let hot = |t: &str| hot_count(&ts, t, "t1");
    common::wait_until("acme's 3 h old point spilled and its 30 h old file expired", 20, || {
        let ts = &ts;
        async move { hot_count(ts, "acme", "t1") == 1 && history(ts, "acme", "t1").await.len() == 2 }
    })
    .await;
    let acme: Vec<u64> = history(&ts, "acme", "t1").await.iter().map(|p| p["ts"].as_u64().unwrap()).collect();
    assert_eq!(acme, vec![now - 3 * HOUR, now - 10 * MIN], "the 30 h old point is past acme's retention");
    // beta: the node defaults (6 h hot, cold kept forever).
    common::wait_until("beta's 30 h old point spilled", 20, || async { hot("beta") == 2 }).await;
    assert_eq!(history(&ts, "beta", "t1").await.len(), 3);
    common::wait_until("the old orphan collected", 20, || {
        let old = old.clone();
        async move { !old.exists() }
    })
    .await;
    assert!(fresh.exists(), "a recent unreferenced file is left alone");
    // Referenced files and their mirrors are never collected, however old.
    let acme_dir = ts.dir.path().join("objects/telemetry/tenant=acme");
    let mut referenced: Vec<PathBuf> = parquet_files(&acme_dir).into_iter().filter(|p| !p.starts_with(&part)).collect();
    referenced.extend(std::fs::read_dir(acme_dir.join("_manifest")).unwrap().map(|e| e.unwrap().path()));
    assert!(referenced.len() >= 2, "{referenced:?}");
    for f in &referenced {
        assert!(std::process::Command::new("touch").args(["-d", "3 hours ago"]).arg(f).status().unwrap().success());
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for f in &referenced {
        assert!(f.exists(), "{} was collected", f.display());
    }
    assert_eq!(history(&ts, "acme", "t1").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_interrupted_by_a_restart_resumes_and_writes_each_point_once() {
    let tweak = |c: &mut orbmanager::config::Config| {
        cold_config(c);
        c.storage.export_file_rows = 100;
    };
    let ts = TestServer::start_with(false, tweak).await;
    let now = now_ms();
    let stamps = times(now - 5 * HOUR, 1000, 1500);
    for orb in ["x1", "x2", "x3", "x4"] {
        ts.register("acme", orb).await;
        let pts: Vec<Value> = stamps.iter().enumerate().map(|(i, t)| point(*t, i)).collect();
        ingest(&ts, "acme", orb, &pts).await;
    }
    spill(&ts, json!({"hot_window": "2h"})).await;
    let (s, job) = http(
        "POST",
        &ts.url("/v1/exports"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "from": 0, "to": now, "format": "jsonl", "destination": "resume"})),
    )
    .await;
    assert_eq!(s, 201, "{job}");
    let id = job["export_id"].as_str().unwrap().to_string();
    // Stop the server as soon as the first files are written (60 are due).
    let mut interrupted = false;
    for _ in 0..2000 {
        let (_, j) = ts.get(&format!("/v1/exports/{id}?tenant_id=acme")).await;
        if j["files"].as_u64().unwrap() >= 1 {
            interrupted = j["status"] == "running";
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, tweak).await;
    let done = wait_export(&ts, &id).await;
    assert_eq!((done["status"].as_str(), done["rows"].as_u64()), (Some("succeeded"), Some(4 * 1500)), "{done}");
    assert_eq!(done["files"], 60);
    let out = ts.dir.path().join("objects/exports/tenant=acme/resume");
    let mut seen = BTreeSet::new();
    let mut files = 0;
    for e in std::fs::read_dir(&out).unwrap() {
        files += 1;
        for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(seen.insert((v["orb_id"].as_str().unwrap().to_string(), v["ts"].as_u64().unwrap())), "twice: {v}");
        }
    }
    assert_eq!((files, seen.len()), (60, 4 * 1500));
    eprintln!("export interrupted mid-way by the restart: {interrupted}");
}
