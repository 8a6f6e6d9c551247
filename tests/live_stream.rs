//! The live stream: SSE and the gRPC server stream deliver an orb's changes as devices
//! publish; another tenant cannot subscribe; a subscriber that stops reading is told it lagged
//! and resynchronised instead of growing the server's memory.

mod common;

use std::time::Duration;

use common::{ADMIN, TestServer, V3, basic_auth, http_raw, now_ms, telemetry};
use orbmanager::net::grpc::pb;
use pb::telemetry_service_client::TelemetryServiceClient;
use tonic::Request;

/// Opens an SSE stream and returns a reader of its `data:` payloads.
async fn sse(ts: &TestServer, path: &str, token: &str) -> (u16, tokio::sync::mpsc::Receiver<String>) {
    let (status, mut frames) = common::sse(&ts.http, path, token, None).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(f) = frames.recv().await {
            if tx.send(f.data).await.is_err() {
                return;
            }
        }
    });
    (status, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_grpc_streams_follow_devices_live() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "s1").await;
    let (status, mut events) = sse(&ts, "/v1/orbs/stream?tenant_id=acme&orb_ids=s1", ADMIN).await;
    assert_eq!(status, 200);
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.unwrap();
    let mut req = Request::new(pb::StreamOrbsRequest { tenant_id: "acme".into(), orb_ids: vec![] });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let mut grpc = TelemetryServiceClient::new(ch.clone()).stream_orbs(req).await.unwrap().into_inner();

    let mut dev = V3::connect(ts.mqtt, "s1", Some(("acme/s1", &token))).await.unwrap();
    dev.publish("telemetry/acme/s1", telemetry(now_ms(), "live-1", 42.5)).await.unwrap();
    // SSE: presence first (the connect), then the telemetry.
    let mut got_battery = false;
    while let Ok(Some(data)) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["orb_id"], "s1");
        if v["kind"] == "telemetry" {
            assert_eq!(v["battery"], 42.5);
            assert_eq!(v["online"], true);
            got_battery = true;
            break;
        }
    }
    assert!(got_battery, "the SSE stream delivered the telemetry change");
    let mut kinds = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(10), grpc.message()).await {
        kinds.push(e.kind.clone());
        if e.kind == "telemetry" {
            assert_eq!((e.orb_id.as_str(), e.battery), ("s1", Some(42.5)));
            break;
        }
    }
    assert_eq!(kinds.last().map(String::as_str), Some("telemetry"), "{kinds:?}");

    // Another tenant's token cannot subscribe to acme.
    common::ensure_tenant(&ts.http, "globex").await;
    let (_, tok) = common::http(
        "POST",
        &ts.url("/v1/tenants/globex/tokens"),
        Some(ADMIN),
        Some(serde_json::json!({"role": "viewer"})),
    )
    .await;
    let globex = tok["secret"].as_str().unwrap().to_string();
    let (status, _) = sse(&ts, "/v1/orbs/stream?tenant_id=acme", &globex).await;
    assert_eq!(status, 403);
    let mut req = Request::new(pb::StreamOrbsRequest { tenant_id: "acme".into(), orb_ids: vec![] });
    req.metadata_mut().insert("authorization", format!("Bearer {globex}").parse().unwrap());
    let denied = TelemetryServiceClient::new(ch).stream_orbs(req).await;
    assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
    dev.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_told_it_lagged_and_resynced() {
    let ts = TestServer::start_with(false, |c| c.stream.buffer = 16).await;
    let token = ts.register("acme", "fast").await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.unwrap();
    let mut req = Request::new(pb::StreamOrbsRequest { tenant_id: "acme".into(), orb_ids: vec!["fast".into()] });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let mut stream = TelemetryServiceClient::new(ch).stream_orbs(req).await.unwrap().into_inner();

    // 3,000 changes while the subscriber reads nothing.
    let auth = basic_auth("acme/fast", &token);
    let t0 = now_ms() - 10_000;
    for b in 0..3 {
        let batch: Vec<serde_json::Value> = (0..1000)
            .map(|i| serde_json::json!({"ts": t0 + b * 1000 + i, "battery": ((b * 1000 + i) % 100) as f64}))
            .collect();
        let (s, body) = http_raw(
            "POST",
            &ts.url("/v1/orbs/fast/telemetry"),
            Some(&auth),
            Some(serde_json::to_vec(&batch).unwrap()),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let mut seen = 0;
    let mut lagged = None;
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        seen += 1;
        if e.kind == "lagged" {
            lagged = Some(e.lagged);
            break;
        }
        assert!(seen < 3_000, "never told it lagged");
    }
    assert!(lagged.is_some_and(|n| n > 0), "told it lagged");
    let snap = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(snap.kind, "snapshot");
    assert_eq!(snap.orb_id, "fast");
    // The snapshot is the state when the lag was noticed; reading on, the subscriber converges
    // on the newest state (by later changes or later resyncs), never on a stale one.
    let newest = t0 + 2999;
    let mut ts_seen = snap.ts.unwrap();
    while ts_seen != newest {
        let e =
            tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("converges").unwrap().unwrap();
        if let Some(t) = e.ts {
            ts_seen = t;
        }
    }
    ts.stop().await;
}
