//! Checkpoints and `orbmanager restore`: a node whose disk is lost comes back from the object
//! store with its registry, attributes, device credentials, pending commands and cold history.
//! The same round trip against a real S3-compatible server (SeaweedFS, started by
//! `scripts/test.sh`).

mod common;

use common::{ADMIN, TestServer, basic_auth, history, http, http_raw, now_ms};
use serde_json::{Value, json};

const HOUR: u64 = 3_600_000;

/// Where the S3 server is: `scripts/test.sh` starts SeaweedFS and exports these.
fn s3_env() -> (String, String) {
    let endpoint = std::env::var("OM_TEST_S3_ENDPOINT").unwrap_or_default();
    let bucket = std::env::var("OM_TEST_S3_BUCKET").unwrap_or_default();
    assert!(
        !endpoint.is_empty() && !bucket.is_empty(),
        "the S3 tests need a running S3-compatible server: run `bash scripts/test.sh` (the README's test \
         command), which starts SeaweedFS and sets OM_TEST_S3_ENDPOINT and OM_TEST_S3_BUCKET"
    );
    (endpoint, bucket)
}

struct Target {
    url: String,
    s3_endpoint: Option<String>,
}

impl Target {
    fn apply(&self, c: &mut orbmanager::config::Config) {
        c.object_store = self.url.clone();
        c.storage.spill_interval_s = 0;
        c.storage.checkpoint_interval_s = 0;
        if let Some(e) = &self.s3_endpoint {
            c.storage.s3.endpoint = e.clone();
            c.storage.s3.allow_http = true;
            c.storage.s3.region = "us-east-1".into();
        }
    }
}

async fn create_command(ts: &TestServer, orb: &str, body: Value) -> Value {
    let url = ts.url(&format!("/v1/orbs/{orb}/commands?tenant_id=acme"));
    let (s, b) = http("POST", &url, Some(ADMIN), Some(body)).await;
    assert_eq!(s, 201, "{b}");
    b
}

fn restore(data_dir: &std::path::Path, target: &Target) -> Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"));
    cmd.args(["restore", "--data-dir"]).arg(data_dir).args(["--object-store", &target.url]);
    if let Some(e) = &target.s3_endpoint {
        cmd.env("ORBMANAGER_STORAGE_S3_ENDPOINT", e)
            .env("ORBMANAGER_STORAGE_S3_ALLOW_HTTP", "true")
            .env("ORBMANAGER_STORAGE_S3_REGION", "us-east-1");
    }
    let out = cmd.env("ORBMANAGER_LOG", "warn").output().expect("orbmanager restore runs");
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("restore prints a JSON report")
}

/// Fills a node, checkpoints it, loses the disk, restores and compares.
async fn lose_the_disk_and_restore(target: Target) {
    let ts = TestServer::start_with(false, |c| target.apply(c)).await;
    let token = ts.register("acme", "o1").await;
    ts.register("acme", "o2").await;
    let (s, _) = http(
        "PATCH",
        &ts.url("/v1/orbs/o2/attributes?tenant_id=acme"),
        Some(ADMIN),
        Some(json!({"set": {"depot": "sf-3"}})),
    )
    .await;
    assert_eq!(s, 200);
    let mut created = Vec::new();
    for t in ["reboot", "calibrate", "ping"] {
        created.push(
            create_command(&ts, "o1", json!({"command_type": t})).await["command_id"].as_str().unwrap().to_string(),
        );
    }
    // Old telemetry goes cold before the checkpoint; newer telemetry is spilled after it.
    let now = now_ms();
    let old: Vec<Value> = (0..100u64).map(|i| json!({"ts": now - 20 * HOUR + i * 1000, "battery": 40.0})).collect();
    let url = ts.url("/v1/orbs/o2/telemetry?tenant_id=acme");
    assert_eq!(http("POST", &url, Some(ADMIN), Some(Value::Array(old))).await.0, 200);
    let (s, r) = http("POST", &ts.url("/v1/storage/spill"), Some(ADMIN), Some(json!({"hot_window": "1h"}))).await;
    assert_eq!((s, r["rows"].as_u64()), (200, Some(100)), "{r}");
    let (s, ck) = http("POST", &ts.url("/v1/storage/checkpoint"), Some(ADMIN), None).await;
    assert_eq!(s, 200, "{ck}");
    assert!(ck["entries"].as_u64().unwrap() > 5 && ck["sha256"].as_str().unwrap().len() == 64, "{ck}");
    let later: Vec<Value> = (0..50u64).map(|i| json!({"ts": now - 10 * HOUR + i * 1000, "battery": 41.0})).collect();
    assert_eq!(http("POST", &url, Some(ADMIN), Some(Value::Array(later))).await.0, 200);
    let (s, r) = http("POST", &ts.url("/v1/storage/spill"), Some(ADMIN), Some(json!({"hot_window": "1h"}))).await;
    assert_eq!((s, r["rows"].as_u64()), (200, Some(50)), "{r}");
    let (_, o2_before) = ts.get("/v1/orbs/o2?tenant_id=acme").await;
    let history_before = history(&ts, "acme", "o2").await;
    assert_eq!(history_before.len(), 150);
    let old_dir = ts.stop().await;

    // A new, empty disk.
    let fresh = tempfile::tempdir().unwrap();
    let report = restore(fresh.path(), &target);
    assert_eq!(report["orbs"], 2, "{report}");
    drop(old_dir);
    // Restoring over data is refused.
    let mut again = std::process::Command::new(env!("CARGO_BIN_EXE_orbmanager"));
    again.args(["restore", "--data-dir"]).arg(fresh.path()).args(["--object-store", &target.url]);
    if let Some(e) = &target.s3_endpoint {
        again.env("ORBMANAGER_STORAGE_S3_ENDPOINT", e).env("ORBMANAGER_STORAGE_S3_ALLOW_HTTP", "true");
    }
    let out = again.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already holds data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ts = TestServer::start_in(fresh, false, |c| target.apply(c)).await;
    let (s, o2) = ts.get("/v1/orbs/o2?tenant_id=acme").await;
    assert_eq!(s, 200, "{o2}");
    assert_eq!(o2["attributes"], o2_before["attributes"]);
    assert_eq!(o2["status"], o2_before["status"]);
    // The device's credentials still work, and its queue is intact, in order.
    let auth = basic_auth("acme/o1", &token);
    let (s, pulled) = http_raw("GET", &ts.url("/v1/orbs/o1/commands?status=pending"), Some(&auth), None).await;
    assert_eq!(s, 200, "{pulled}");
    let got: Vec<&str> =
        pulled["commands"].as_array().unwrap().iter().map(|c| c["command_id"].as_str().unwrap()).collect();
    assert_eq!(got, created.iter().map(String::as_str).collect::<Vec<_>>());
    // History: the files from before and after the checkpoint (found through their manifest
    // mirrors).
    assert_eq!(history(&ts, "acme", "o2").await, history_before);
    // New commands continue the sequence.
    let next = create_command(&ts, "o1", json!({"command_type": "after"})).await;
    assert_eq!(next["seq"], 4, "{next}");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_a_local_object_store_rebuilds_registry_state_and_queues() {
    let objects = tempfile::tempdir().unwrap();
    lose_the_disk_and_restore(Target { url: format!("file://{}", objects.path().display()), s3_endpoint: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tier_round_trip_against_a_real_s3_server() {
    let (endpoint, bucket) = s3_env();
    let prefix = format!("test-{:016x}", fastrand::u64(..));
    lose_the_disk_and_restore(Target { url: format!("s3://{bucket}/{prefix}"), s3_endpoint: Some(endpoint) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_s3_credentials_fail_the_spill_and_keep_the_points_hot() {
    let (endpoint, bucket) = s3_env();
    let target = Target { url: format!("s3://{bucket}/bad-{:016x}", fastrand::u64(..)), s3_endpoint: Some(endpoint) };
    let ts = TestServer::start_with(false, |c| {
        target.apply(c);
        c.storage.s3.access_key_id = "test".into();
        c.storage.s3.secret_access_key = "not-the-secret".into();
    })
    .await;
    ts.register("acme", "k1").await;
    let pts: Vec<Value> = (0..10u64).map(|i| json!({"ts": now_ms() - 5 * HOUR + i, "battery": 1.0})).collect();
    let url = ts.url("/v1/orbs/k1/telemetry?tenant_id=acme");
    assert_eq!(http("POST", &url, Some(ADMIN), Some(Value::Array(pts))).await.0, 200);
    let before = history(&ts, "acme", "k1").await;
    let (s, e) = http("POST", &ts.url("/v1/storage/spill"), Some(ADMIN), Some(json!({"hot_window": "1h"}))).await;
    assert_eq!((s, e["code"].as_str()), (503, Some("unavailable")), "{e}");
    assert!(e["detail"].as_str().unwrap().contains("object store"), "{e}");
    assert_eq!(history(&ts, "acme", "k1").await, before, "a failed spill moves nothing");
    let key = orbmanager::model::OrbKey::parse_path("acme/k1").unwrap();
    assert_eq!(ts.server().store().points(&key, 0, u64::MAX, None, 100).unwrap().len(), 10);
}
