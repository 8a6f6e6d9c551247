//! An edge gateway carrying 10,000 child orbs over one MQTT connection: children connect
//! through it (only those registered under it), publish through it, get their commands
//! through it and go offline with it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::peer::{Peer, opts};
use common::{ADMIN, TestServer, http};
use orbmanager::model::orb::{GATEWAY_ATTR, OrbRecord};
use orbmanager::model::{OrbId, OrbKey, TenantId};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde_json::json;

const CHILDREN: usize = 10_000;

fn child(i: usize) -> String {
    format!("c{i:05}")
}

/// Waits for `n` PUBACKs; returns how many were not successes.
async fn pubacks(p: &mut Peer, n: usize) -> usize {
    let mut failed = 0;
    for i in 0..n {
        loop {
            match p.next(30.0).await.unwrap_or_else(|| panic!("PUBACK {i} of {n}: {:?}", p.error)) {
                Packet::PubAck(a) => {
                    if a.reason != PubAckReason::Success {
                        failed += 1;
                    }
                    break;
                }
                _ => continue,
            }
        }
    }
    failed
}

async fn online(ts: &TestServer, orb: &str) -> (bool, Option<String>) {
    let (code, o) = ts.get(&format!("/v1/orbs/{orb}?tenant_id=acme")).await;
    assert_eq!(code, 200, "{o}");
    (o["connectivity"]["online"] == json!(true), o["connectivity"]["disconnect_reason"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_carries_ten_thousand_orbs_on_one_connection() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "gw1").await;
    let _ = ts.register("acme", "loner").await; // not under the gateway
    // The children: registered under gw1 (bulk import; the `gateway` attribute is what counts).
    let tenant = TenantId::parse("acme").unwrap();
    let now = common::now_ms();
    let records: Vec<OrbRecord> = (0..CHILDREN)
        .map(|i| {
            let mut r =
                OrbRecord::provisioned(OrbKey::new(tenant.clone(), OrbId::parse(&child(i)).unwrap()), None, now);
            r.attributes = BTreeMap::from([(GATEWAY_ATTR.to_string(), "gw1".to_string())]);
            r
        })
        .collect();
    ts.server().store().import_orbs(&records).unwrap();

    let (mut gw, _) = Peer::connect(opts(ts.mqtt, "gw1", Some(("acme/gw1", &token)))).await;
    gw.sub("commands/acme/+").await;

    // Not connected yet: publishing for a child is refused.
    let point = common::telemetry(now, "early", 50.0);
    assert_eq!(gw.publish("telemetry/acme/c00001", &point).await, PubAckReason::NotAuthorized);

    // Connect all children, 1,000 per message.
    for batch in (0..CHILDREN).collect::<Vec<_>>().chunks(1_000) {
        let orbs: Vec<String> = batch.iter().map(|i| child(*i)).collect();
        let body = serde_json::to_vec(&json!({ "orbs": orbs })).unwrap();
        assert_eq!(gw.publish("gateway/acme/gw1/connect", &body).await, PubAckReason::Success);
    }
    // An orb that is not its child is refused, and named.
    let body = serde_json::to_vec(&json!({"orbs": ["loner"]})).unwrap();
    assert_eq!(gw.publish("gateway/acme/gw1/connect", &body).await, PubAckReason::NotAuthorized);
    assert_eq!(gw.publish("telemetry/acme/loner", &point).await, PubAckReason::NotAuthorized);
    assert!(online(&ts, "c09999").await.0);

    // One point per child, pipelined over the one connection.
    for i in 0..CHILDREN {
        let p = common::telemetry(now + i as u64, &format!("m{i}"), (i % 100) as f64);
        gw.client.publish(format!("telemetry/acme/{}", child(i)), QoS::AtLeastOnce, false, p).await.unwrap();
    }
    assert_eq!(pubacks(&mut gw, CHILDREN).await, 0, "every child's point accepted");
    for i in [0, 4_321, CHILDREN - 1] {
        let h = common::history(&ts, "acme", &child(i)).await;
        assert_eq!(h.len(), 1, "{}", child(i));
        assert_eq!(h[0]["msg_id"], json!(format!("m{i}")));
    }

    // A command for a child arrives on the gateway and is acknowledged through it.
    let (code, cmd) = http(
        "POST",
        &ts.url("/v1/orbs/c05000/commands?tenant_id=acme"),
        Some(ADMIN),
        Some(json!({"command_type": "reboot", "payload": {}})),
    )
    .await;
    assert_eq!(code, 201, "{cmd}");
    let m = gw.next_publish(10.0).await.expect("the child's command");
    assert_eq!(String::from_utf8_lossy(&m.topic), "commands/acme/c05000");
    let delivered: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(delivered["command_id"], cmd["command_id"]);
    let ack = serde_json::to_vec(&json!({"command_id": cmd["command_id"], "status": "succeeded"})).unwrap();
    assert_eq!(gw.publish("commands/acme/c05000/ack", &ack).await, PubAckReason::Success);
    let url = ts.url(&format!("/v1/orbs/c05000/commands/{}?tenant_id=acme", cmd["command_id"].as_str().unwrap()));
    common::wait_until("command succeeded", 10, || async {
        http("GET", &url, Some(ADMIN), None).await.1["status"] == json!("succeeded")
    })
    .await;

    // An explicit child disconnect; then the gateway's own end takes the rest offline.
    let body = serde_json::to_vec(&json!({"orbs": ["c00007"]})).unwrap();
    assert_eq!(gw.publish("gateway/acme/gw1/disconnect", &body).await, PubAckReason::Success);
    common::wait_until("c00007 offline", 10, || async { !online(&ts, "c00007").await.0 }).await;
    assert_eq!(online(&ts, "c00007").await.1.as_deref(), Some("client_disconnect"));
    assert_eq!(gw.publish("telemetry/acme/c00007", &point).await, PubAckReason::NotAuthorized);
    assert!(online(&ts, "c00008").await.0);
    gw.vanish().await;
    common::wait_until("children offline with their gateway", 20, || async {
        !online(&ts, "c00008").await.0 && !online(&ts, "c09999").await.0
    })
    .await;
    assert_eq!(online(&ts, "c00008").await.1.as_deref(), Some("connection_lost"));

    // Malformed control messages are refused with a reason and change nothing.
    let (mut gw, _) = Peer::connect(opts(ts.mqtt, "gw1", Some(("acme/gw1", &token)))).await;
    assert_eq!(gw.publish("gateway/acme/gw1/connect", b"[1,2]").await, PubAckReason::PayloadFormatInvalid);
    let many: Vec<String> = (0..1_001).map(child).collect();
    let body = serde_json::to_vec(&json!({ "orbs": many })).unwrap();
    assert_ne!(gw.publish("gateway/acme/gw1/connect", &body).await, PubAckReason::Success);
    // Another tenant's gateway topic, then another orb's.
    assert_eq!(gw.publish("gateway/beta/gw1/connect", br#"{"orbs":["c00001"]}"#).await, PubAckReason::NotAuthorized);
    assert_eq!(gw.publish("gateway/acme/loner/connect", br#"{"orbs":["c00001"]}"#).await, PubAckReason::NotAuthorized);
    assert!(!online(&ts, "c00001").await.0);
    gw.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_connecting_directly_leaves_its_gateway() {
    let ts = TestServer::start(false).await;
    let gw_token = ts.register("acme", "gw2").await;
    let (code, body) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "orb_id": "kid", "attributes": {"gateway": "gw2"}})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let kid_token = body["device_token"].as_str().unwrap().to_string();
    let (mut gw, _) = Peer::connect(opts(ts.mqtt, "gw2", Some(("acme/gw2", &gw_token)))).await;
    assert_eq!(gw.publish("gateway/acme/gw2/connect", br#"{"orbs":["kid"]}"#).await, PubAckReason::Success);
    let p = common::telemetry(common::now_ms(), "via-gw", 40.0);
    assert_eq!(gw.publish("telemetry/acme/kid", &p).await, PubAckReason::Success);
    // The child connects on its own: it takes over, and the gateway may no longer speak for it.
    let (mut kid, _) = Peer::connect(opts(ts.mqtt, "kid", Some(("acme/kid", &kid_token)))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = common::telemetry(common::now_ms(), "after", 40.0);
        if gw.publish("telemetry/acme/kid", &p).await == PubAckReason::NotAuthorized {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway still speaks for kid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kid.publish("telemetry/acme/kid", &common::telemetry(common::now_ms(), "own", 41.0)).await,
        PubAckReason::Success
    );
    kid.disconnect().await;
    gw.disconnect().await;
    ts.stop().await;
}
