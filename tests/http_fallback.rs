//! The HTTP fallback for telemetry: device basic auth, single points and batches, the same
//! validation and durability as MQTT, and precise errors that store nothing.

mod common;

use common::{ADMIN, TestServer, basic_auth as basic, history, http, http_raw, now_ms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_post_points_and_batches_with_the_mqtt_semantics() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "h1").await;
    let other = ts.register("acme", "h2").await;
    let url = ts.url("/v1/orbs/h1/telemetry");
    let auth = basic("acme/h1", &token);
    let t = now_ms() - 1000;

    let one = serde_json::json!({"ts": t, "msg_id": "x1", "battery": 70}).to_string().into_bytes();
    let (status, body) = http_raw("POST", &url, Some(&auth), Some(one.clone())).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(1)), "{body}");
    let (status, body) = http_raw("POST", &url, Some(&auth), Some(one)).await;
    assert_eq!((status, body["duplicates"].as_u64()), (200, Some(1)), "a resend is a duplicate");

    let batch: Vec<_> =
        (0..50).map(|i| serde_json::json!({"ts": t + i + 1, "msg_id": format!("b{i}"), "speed": i})).collect();
    let (status, body) = http_raw("POST", &url, Some(&auth), Some(serde_json::to_vec(&batch).unwrap())).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(50)), "{body}");
    assert_eq!(history(&ts, "acme", "h1").await.len(), 51);

    // A batch with one bad point stores nothing and names the point.
    let mut bad = batch.clone();
    bad[3] = serde_json::json!({"ts": t, "battery": -1});
    for p in bad.iter_mut() {
        p["msg_id"] = format!("n-{}", p["msg_id"]).into();
    }
    let (status, body) = http_raw("POST", &url, Some(&auth), Some(serde_json::to_vec(&bad).unwrap())).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().starts_with("point 3:"), "{body}");
    assert_eq!(body["code"], "invalid_argument");
    assert_eq!(history(&ts, "acme", "h1").await.len(), 51);

    let (status, body) = http_raw("POST", &url, Some(&auth), Some(b"{nope".to_vec())).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("malformed_payload")));
    let big = format!(r#"{{"mode":"x"{}}}"#, " ".repeat(70_000)).into_bytes();
    let (status, body) = http_raw("POST", &url, Some(&auth), Some(big)).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("payload_too_large")));

    // Wrong token, another orb's credentials, no credentials.
    let (status, _) = http_raw("POST", &url, Some(&basic("acme/h1", "wrong")), Some(b"{}".to_vec())).await;
    assert_eq!(status, 401);
    let (status, body) = http_raw("POST", &url, Some(&basic("acme/h2", &other)), Some(b"{}".to_vec())).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("permission_denied")));
    let (status, _) = http_raw("POST", &url, None, Some(b"{}".to_vec())).await;
    assert_eq!(status, 401);
    assert_eq!(history(&ts, "acme", "h2").await.len(), 0);
    assert_eq!(history(&ts, "acme", "h1").await.len(), 51);

    // An operator may post for an orb of their tenant; unknown orbs are 404.
    let (status, _) = http(
        "POST",
        &ts.url("/v1/orbs/h2/telemetry?tenant_id=acme"),
        Some(ADMIN),
        Some(serde_json::json!({"battery": 5})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = http(
        "POST",
        &ts.url("/v1/orbs/nope/telemetry?tenant_id=acme"),
        Some(ADMIN),
        Some(serde_json::json!({"battery": 5})),
    )
    .await;
    assert_eq!(status, 404);
    ts.stop().await;
}
