//! Bad input from devices: malformed JSON, oversized payloads, wrong credentials, another
//! orb's topic. Each is refused with the right reason, stores nothing, and leaves other
//! clients' connections untouched.

mod common;

use common::{TestServer, V3, V5, history, now_ms, telemetry};
use orbmanager::sim::client;
use rumqttc::v5::mqttbytes::v5::PubAckReason;

const REFUSALS: &str = "orbmanager_refusals_total{reason=";

async fn refusals(ts: &TestServer, reason: &str) -> f64 {
    ts.metric(&format!("{REFUSALS}\"{reason}\"}}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_is_refused_with_its_reason_and_stores_nothing() {
    let ts = TestServer::start(false).await;
    let good_token = ts.register("acme", "good").await;
    let bad_token = ts.register("acme", "bad").await;
    let v3_token = ts.register("acme", "bad3").await;
    let mut good = V3::connect(ts.mqtt, "good", Some(("acme/good", &good_token))).await.unwrap();
    let base = now_ms() - 10_000;
    let mut good_n = 0u64;
    let mut good_publish = async |good: &mut V3| {
        good.publish("telemetry/acme/good", telemetry(base + good_n, &format!("g-{good_n}"), 50.0))
            .await
            .expect("good client unaffected");
        good_n += 1;
    };
    good_publish(&mut good).await;

    // --- MQTT 5: refusals come back as PUBACK reason codes with a reason string.
    let mut bad = V5::connect(ts.mqtt, "bad", Some(("acme/bad", &bad_token))).await.unwrap();
    let ack = bad.publish("telemetry/acme/bad", b"{\"battery\": 5".to_vec()).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::PayloadFormatInvalid);
    let reason = ack.properties.and_then(|p| p.reason_string).unwrap_or_default();
    assert!(reason.contains("not a telemetry JSON object"), "{reason}");
    good_publish(&mut good).await;

    let ack = bad.publish("telemetry/acme/bad", br#"{"battery": 140}"#.to_vec()).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::PayloadFormatInvalid);
    assert!(ack.properties.and_then(|p| p.reason_string).unwrap_or_default().contains("battery"));

    let big = format!(r#"{{"mode":"x","pad":1{}}}"#, " ".repeat(70 * 1024)).into_bytes();
    let ack = bad.publish("telemetry/acme/bad", big).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::PayloadFormatInvalid);
    assert!(ack.properties.and_then(|p| p.reason_string).unwrap_or_default().contains("limit"));

    let ack = bad.publish("telemetry/acme/good", telemetry(base, "spoof", 1.0)).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::NotAuthorized, "another orb's topic");
    let ack = bad.publish("telemetry/other-tenant/bad", telemetry(base, "spoof2", 1.0)).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::NotAuthorized, "another tenant's topic");
    let ack = bad.publish("telemetry/acme/bad/extra", telemetry(base, "t", 1.0)).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::TopicNameInvalid);
    good_publish(&mut good).await;

    assert_eq!(refusals(&ts, "malformed_payload").await, 1.0);
    assert_eq!(refusals(&ts, "invalid_argument").await, 1.0);
    assert_eq!(refusals(&ts, "payload_too_large").await, 1.0);
    assert_eq!(refusals(&ts, "permission_denied").await, 2.0);
    assert_eq!(refusals(&ts, "topic_invalid").await, 1.0);
    let (_, view) = ts.get("/v1/orbs/bad?tenant_id=acme").await;
    assert_eq!(view["refusals"]["count"], 3, "{view}");
    assert_eq!(view["refusals"]["last_code"], "payload_too_large");

    // --- MQTT 3.1.1 has no PUBACK reasons: invalid payloads are acknowledged, counted and
    // shown on the orb; nothing is stored.
    let mut bad3 = V3::connect(ts.mqtt, "bad3", Some(("acme/bad3", &v3_token))).await.unwrap();
    bad3.publish("telemetry/acme/bad3", b"not json at all".to_vec()).await.expect("v3 refusal is acknowledged");
    common::wait_until("refusal visible on the orb", 15, || async {
        let (_, v) = ts.get("/v1/orbs/bad3?tenant_id=acme").await;
        v["refusals"]["last_code"] == "malformed_payload"
    })
    .await;
    assert_eq!(refusals(&ts, "malformed_payload").await, 2.0);
    // ... and publishing for another orb closes the connection (the only v3 refusal).
    let spoof = bad3.publish("telemetry/acme/good", telemetry(base, "spoof3", 1.0)).await;
    assert!(spoof.is_err(), "v3 client publishing to another orb's topic must be disconnected");
    good_publish(&mut good).await;

    // Nothing of the refused traffic is stored anywhere.
    assert!(history(&ts, "acme", "bad").await.is_empty());
    assert!(history(&ts, "acme", "bad3").await.is_empty());
    let good_points = history(&ts, "acme", "good").await;
    assert_eq!(good_points.len() as u64, good_n, "only the good client's points");
    assert!(good_points.iter().all(|p| p["msg_id"].as_str().unwrap().starts_with("g-")));
    assert_eq!(ts.metric("orbmanager_telemetry_stored_total").await, good_n as f64);

    bad.disconnect().await;
    good.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_at_connect() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "o1").await;

    let refused = |r: Result<V3, rumqttc::ConnectionError>| match r {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("expected a CONNACK refusal, got a connection"),
    };
    use rumqttc::ConnectReturnCode as C;
    assert_eq!(refused(V3::connect(ts.mqtt, "o1", Some(("acme/o1", "wrong-token"))).await), C::BadUserNamePassword);
    assert_eq!(
        refused(V3::connect(ts.mqtt, "o1", Some(("acme/nobody", &token))).await),
        C::BadUserNamePassword,
        "unknown orb looks the same"
    );
    assert_eq!(
        refused(V3::connect(ts.mqtt, "o1", Some(("other/o1", &token))).await),
        C::BadUserNamePassword,
        "another tenant's id looks the same"
    );
    assert_eq!(refused(V3::connect(ts.mqtt, "o1", None).await), C::BadUserNamePassword, "anonymous outside --dev");
    assert_eq!(
        refused(V3::connect(ts.mqtt, "o1+", Some(("acme/o1", &token))).await),
        C::BadClientId,
        "wildcard in client id"
    );

    match V5::connect(ts.mqtt, "o1", Some(("acme/o1", "wrong"))).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword)
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal"),
    }
    assert_eq!(ts.metric("orbmanager_mqtt_connect_refused_total{reason=\"unauthenticated\"}").await, 5.0);
    assert_eq!(ts.metric("orbmanager_mqtt_connections").await, 0.0);

    // The right token still works, and the orb's state was not touched by the failures.
    let (_, before) = ts.get("/v1/orbs/o1?tenant_id=acme").await;
    assert_eq!(before["status"], "provisioned");
    let ok = V3::connect(ts.mqtt, "o1", Some(("acme/o1", &token))).await.expect("right token connects");
    ok.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_over_the_maximum_size_closes_only_that_connection() {
    let ts = TestServer::start_with(false, |c| c.mqtt.max_packet_size = 128 * 1024).await;
    let t1 = ts.register("acme", "big").await;
    let t2 = ts.register("acme", "calm").await;
    let mut calm = V3::connect(ts.mqtt, "calm", Some(("acme/calm", &t2))).await.unwrap();

    // A raw client, so nothing on our side refuses to send the oversized packet.
    let addr = ts.mqtt.to_string();
    let (mut r, mut w) =
        client::connect(&addr, 5, "big", Some("acme/big"), Some(t1.as_bytes()), 30).await.unwrap().expect("connack");
    let mut pkt = Vec::new();
    client::publish_packet(&mut pkt, 5, "telemetry/acme/big", &vec![b' '; 200 * 1024], 1, 1);
    use tokio::io::AsyncWriteExt;
    w.write_all(&pkt).await.unwrap();
    let mut buf = Vec::new();
    match tokio::time::timeout(std::time::Duration::from_secs(5), client::read_packet(&mut r, 5, &mut buf))
        .await
        .expect("answer in time")
    {
        Ok(client::Incoming::Disconnect { reason }) => assert_eq!(reason, 0x95, "DISCONNECT: packet too large"),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    calm.publish("telemetry/acme/calm", telemetry(now_ms(), "c1", 50.0)).await.expect("other connection unaffected");
    assert!(history(&ts, "acme", "big").await.is_empty());
    calm.disconnect().await;
    ts.stop().await;
}
