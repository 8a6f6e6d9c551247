//! Registry basics: registration and its conflicts, decommissioning (refused everywhere, live
//! session closed, history kept), and connection takeover.

mod common;

use common::{ADMIN, TestServer, V3, V5, history, http, now_ms, telemetry};
use orbmanager::sim::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_and_conflicts_are_409() {
    let ts = TestServer::start(false).await;
    let url = ts.url("/v1/orbs/register");
    // Tenants are created first; registering into an unknown tenant is 404.
    let (status, body) =
        http("POST", &url, Some(ADMIN), Some(serde_json::json!({"tenant_id": "acme", "orb_id": "r0"}))).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    common::ensure_tenant(&ts.http, "acme").await;
    common::ensure_tenant(&ts.http, "globex").await;
    let (status, body) = http(
        "POST",
        &url,
        Some(ADMIN),
        Some(serde_json::json!({"tenant_id": "acme", "orb_id": "r1", "attributes": {"depot": "sf-3"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["device_token"].as_str().unwrap().starts_with("omd_"));
    assert_eq!(body["mqtt_username"], "acme/r1");

    let (status, body) =
        http("POST", &url, Some(ADMIN), Some(serde_json::json!({"tenant_id": "acme", "orb_id": "r1"}))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("already_exists")));
    // The same id in another tenant is a different orb.
    let (status, _) =
        http("POST", &url, Some(ADMIN), Some(serde_json::json!({"tenant_id": "globex", "orb_id": "r1"}))).await;
    assert_eq!(status, 201);
    // A generated id when none is given.
    let (status, body) = http("POST", &url, Some(ADMIN), Some(serde_json::json!({"tenant_id": "acme"}))).await;
    assert_eq!(status, 201);
    assert!(body["orb_id"].as_str().unwrap().starts_with("orb-"));

    for (req, code) in [
        (serde_json::json!({"tenant_id": "acme", "orb_id": "a/b"}), "invalid_argument"),
        (serde_json::json!({"tenant_id": "ac me", "orb_id": "x"}), "invalid_argument"),
        (serde_json::json!({"tenant_id": "acme", "orb_id": "x", "colour": 1}), "invalid_argument"),
        (serde_json::json!({"orb_id": "x"}), "invalid_argument"),
        (serde_json::json!({"tenant_id": "acme", "orb_id": "x", "csr_pem": "-----BEGIN"}), "invalid_argument"),
    ] {
        let (status, body) = http("POST", &url, Some(ADMIN), Some(req.clone())).await;
        assert_eq!(body["code"], code, "{req} -> {status} {body}");
    }
    let (status, _) =
        http("POST", &url, Some("wrong-token-wrong-token"), Some(serde_json::json!({"tenant_id": "acme"}))).await;
    assert_eq!(status, 401);
    let (status, _) = http("POST", &url, None, Some(serde_json::json!({"tenant_id": "acme"}))).await;
    assert_eq!(status, 401);
    let (status, view) = ts.get("/v1/orbs/r1?tenant_id=acme").await;
    assert_eq!((status, view["attributes"]["depot"].as_str()), (200, Some("sf-3")));
    let (status, _) = ts.get("/v1/orbs/x?tenant_id=acme").await;
    assert_eq!(status, 404, "refused registrations stored nothing");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioned_orbs_are_refused_everywhere_and_keep_history() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "old").await;
    let mut c = V5::connect(ts.mqtt, "old", Some(("acme/old", &token))).await.unwrap();
    c.publish("telemetry/acme/old", telemetry(now_ms(), "o1", 30.0)).await.unwrap();

    let (status, view) = http("POST", &ts.url("/v1/orbs/old/decommission?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert_eq!(view["status"], "decommissioned");
    assert_eq!(view["connectivity"]["disconnect_reason"], "decommissioned");
    // The live session was closed by the server.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if c.events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the decommissioned orb's connection is closed");

    assert!(V3::connect(ts.mqtt, "old", Some(("acme/old", &token))).await.is_err(), "MQTT refused");
    let (status, body) = common::http_raw(
        "POST",
        &ts.url("/v1/orbs/old/telemetry"),
        Some(&common::basic_auth("acme/old", &token)),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("orb_decommissioned")));
    assert_eq!(history(&ts, "acme", "old").await.len(), 1, "history is kept");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_takes_over_and_the_first_is_told_why() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "dup").await;
    let addr = ts.mqtt.to_string();
    let (mut r1, _w1) = client::connect(&addr, 5, "dup", Some("acme/dup"), Some(token.as_bytes()), 30)
        .await
        .unwrap()
        .expect("first connects");
    let mut second = V3::connect(ts.mqtt, "dup", Some(("acme/dup", &token))).await.expect("second connects");
    let mut buf = Vec::new();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), client::read_packet(&mut r1, 5, &mut buf))
        .await
        .expect("in time");
    assert!(matches!(got, Ok(client::Incoming::Disconnect { reason: 0x8E })), "session taken over: {got:?}");
    second.publish("telemetry/acme/dup", telemetry(now_ms(), "d1", 10.0)).await.unwrap();
    let (_, view) = ts.get("/v1/orbs/dup?tenant_id=acme").await;
    assert_eq!(view["connectivity"]["online"], true, "the late disconnect of the first did not flip presence");
    assert_eq!(view["connectivity"]["conn_seq"], 2);
    assert_eq!(view["connectivity"]["protocol"], "3.1.1");
    second.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_every_connection_with_its_reason_and_releases_the_store() {
    let ts = TestServer::start(false).await;
    let t5 = ts.register("acme", "stay5").await;
    let t3 = ts.register("acme", "stay3").await;
    let addr = ts.mqtt.to_string();
    // Two devices that would stay connected forever: the drain must not wait for them.
    let (mut r5, _w5) = client::connect(&addr, 5, "stay5", Some("acme/stay5"), Some(t5.as_bytes()), 300)
        .await
        .unwrap()
        .expect("v5 connects");
    let (mut r3, _w3) = client::connect(&addr, 4, "stay3", Some("acme/stay3"), Some(t3.as_bytes()), 300)
        .await
        .unwrap()
        .expect("v3 connects");
    let stopping = tokio::spawn(ts.stop());
    let mut buf = Vec::new();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), client::read_packet(&mut r5, 5, &mut buf))
        .await
        .expect("the v5 client hears of the drain in time");
    assert!(matches!(got, Ok(client::Incoming::Disconnect { reason: 0x8B })), "server shutting down: {got:?}");
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), client::read_packet(&mut r3, 4, &mut buf))
        .await
        .expect("the v3 connection is closed in time");
    assert!(got.is_err(), "MQTT 3.1.1 has no server DISCONNECT: the connection just closes ({got:?})");
    let dir = stopping.await.unwrap();

    // Everything was released: the same data directory opens again in this process.
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    for orb in ["stay5", "stay3"] {
        let (_, view) = ts.get(&format!("/v1/orbs/{orb}?tenant_id=acme")).await;
        assert_eq!(view["connectivity"]["online"], false, "{view}");
        assert_eq!(view["connectivity"]["disconnect_reason"], "server_shutdown", "{view}");
    }
    ts.stop().await;
}
