//! Devices publish QoS 1 telemetry over MQTT 3.1.1 and 5; the state API shows the latest
//! values and the history API returns every acknowledged point, in order, exactly once.

mod common;

use common::{TestServer, V3, V5, history, now_ms, telemetry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_points_are_all_in_history_in_order_once() {
    let ts = TestServer::start(false).await;
    let t3 = ts.register("acme", "orb-v3").await;
    let t5 = ts.register("acme", "orb-v5").await;
    let mut a = V3::connect(ts.mqtt, "orb-v3", Some(("acme/orb-v3", &t3))).await.expect("v3 connects");
    let mut b = V5::connect(ts.mqtt, "orb-v5", Some(("acme/orb-v5", &t5))).await.expect("v5 connects");

    let base = now_ms() - 60_000;
    // Out-of-order device times: history is ordered by device time, not arrival.
    let order = [3u64, 0, 4, 1, 2, 7, 5, 6, 9, 8];
    for (n, i) in order.iter().enumerate() {
        a.publish("telemetry/acme/orb-v3", telemetry(base + i * 1000, &format!("a-{i}"), 90.0 - *i as f64))
            .await
            .expect("puback v3");
        let ack = b
            .publish("telemetry/acme/orb-v5", telemetry(base + i * 1000, &format!("b-{i}"), 50.0 + n as f64))
            .await
            .expect("puback v5");
        assert_eq!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    }
    // A QoS 1 resend of an acknowledged message (same msg_id) is stored once.
    a.publish("telemetry/acme/orb-v3", telemetry(base + 4000, "a-4", 1.0)).await.expect("puback for duplicate");

    for (orb, prefix) in [("orb-v3", "a"), ("orb-v5", "b")] {
        let points = history(&ts, "acme", orb).await;
        let ids: Vec<&str> = points.iter().map(|p| p["msg_id"].as_str().unwrap()).collect();
        let want: Vec<String> = (0..10).map(|i| format!("{prefix}-{i}")).collect();
        assert_eq!(ids, want, "{orb}: every point, in device-time order, once");
    }
    assert_eq!(ts.metric("orbmanager_telemetry_duplicates_total").await, 1.0);
    // The 21 acknowledgements were answered through the MQTT workers' reply hubs.
    assert!(ts.metric("orbmanager_commit_hub_answers_total").await >= 21.0);

    // Latest values by device time (not arrival): point 9.
    let (status, orb) = ts.get("/v1/orbs/orb-v3?tenant_id=acme").await;
    assert_eq!(status, 200);
    assert_eq!(orb["battery"], 81.0);
    assert_eq!(orb["telemetry"]["msg_id"], "a-9");
    assert_eq!(orb["status"], "active");
    assert_eq!(orb["connectivity"]["online"], true);
    assert_eq!(orb["connectivity"]["protocol"], "3.1.1");
    let (_, orb5) = ts.get("/v1/orbs/orb-v5?tenant_id=acme").await;
    assert_eq!(orb5["connectivity"]["protocol"], "5.0");
    assert_eq!(orb5["telemetry"]["msg_id"], "b-9");
    assert_eq!(orb5["position"]["lat"], 37.7);
    assert_eq!(orb5["mode"], "mission");

    // Reported versions from state/{tenant}/{orb}.
    b.publish("state/acme/orb-v5", br#"{"firmware":"2.3.1","model":"yolo-7","config":{"max_speed":12}}"#.to_vec())
        .await
        .expect("state puback");
    let (_, orb5) = ts.get("/v1/orbs/orb-v5?tenant_id=acme").await;
    assert_eq!(orb5["reported"]["versions"]["firmware"], "2.3.1");
    assert_eq!(orb5["reported"]["config"]["max_speed"], 12);

    a.disconnect().await;
    b.disconnect().await;
    common::wait_until("orb-v3 offline", 15, || async {
        let (_, v) = ts.get("/v1/orbs/orb-v3?tenant_id=acme").await;
        v["connectivity"]["online"] == false && v["connectivity"]["disconnect_reason"] == "client_disconnect"
    })
    .await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_time_ranges() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "pager").await;
    let mut c = V3::connect(ts.mqtt, "pager", Some(("acme/pager", &token))).await.unwrap();
    let base = now_ms() - 100_000;
    // Two points share a millisecond: both are kept and paging does not split or repeat them.
    for i in 0..25u64 {
        let t = base + (i / 2) * 1000;
        c.publish("telemetry/acme/pager", telemetry(t, &format!("p-{i}"), 50.0)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = "/v1/orbs/pager/telemetry?tenant_id=acme&limit=4".to_string();
        if let Some(t) = &token {
            path += &format!("&page_token={t}");
        }
        let (status, body) = ts.get(&path).await;
        assert_eq!(status, 200);
        let page = body["points"].as_array().unwrap();
        assert!(page.len() <= 4);
        seen.extend(page.iter().map(|p| p["msg_id"].as_str().unwrap().to_string()));
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => break,
        }
    }
    seen.sort();
    let mut want: Vec<String> = (0..25).map(|i| format!("p-{i}")).collect();
    want.sort();
    assert_eq!(seen, want);

    let (_, body) =
        ts.get(&format!("/v1/orbs/pager/telemetry?tenant_id=acme&from={}&to={}", base + 2000, base + 3000)).await;
    assert_eq!(body["points"].as_array().unwrap().len(), 4, "{body}");
    let (status, body) = ts.get("/v1/orbs/pager/telemetry?tenant_id=acme&from=10&to=5").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")));
    let (status, _) = ts.get("/v1/orbs/pager/telemetry?tenant_id=acme&page_token=zz").await;
    assert_eq!(status, 400);
    c.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msg_id_is_remembered_across_a_restart() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "again").await;
    let mut c = V5::connect(ts.mqtt, "again", Some(("acme/again", &token))).await.unwrap();
    let t = now_ms() - 1000;
    c.publish("telemetry/acme/again", telemetry(t, "once", 10.0)).await.unwrap();
    c.publish("telemetry/acme/again", telemetry(t + 1, "twice", 11.0)).await.unwrap();
    c.disconnect().await;
    let dir = ts.stop().await;

    let ts = TestServer::start_in(dir, false, |_| {}).await;
    let mut c = V5::connect(ts.mqtt, "again", Some(("acme/again", &token))).await.unwrap();
    // The same msg_id with a different device time (a device that re-stamps on resend).
    let ack = c.publish("telemetry/acme/again", telemetry(t + 500, "once", 12.0)).await.unwrap();
    assert_eq!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success, "a duplicate is acknowledged");
    c.publish("telemetry/acme/again", telemetry(t + 600, "thrice", 13.0)).await.unwrap();
    let ids: Vec<String> =
        history(&ts, "acme", "again").await.iter().map(|p| p["msg_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec!["once", "twice", "thrice"]);
    assert_eq!(ts.metric("orbmanager_telemetry_duplicates_total").await, 1.0);
    c.disconnect().await;
    ts.stop().await;
}

/// The node-wide bound on points queued for orb actors holds (a backlog slows acknowledgements
/// instead of growing mailboxes) and never deadlocks, even at its smallest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_of_one_queued_point_still_applies_every_point_in_order() {
    let ts = TestServer::start_with(false, |c| c.actors.telemetry_in_flight_max = 1).await;
    // A rule makes every point also wait for its rule partition.
    let rule =
        serde_json::json!({"tenant_id": "acme", "name": "low", "condition": "battery < 1.0", "severity": "minor"});
    let mut devices = Vec::new();
    for i in 0..4 {
        let orb = format!("b{i}");
        let token = ts.register("acme", &orb).await;
        devices.push((orb, token));
    }
    let (s, _) = common::http("POST", &ts.url("/v1/alerts/rules"), Some(common::ADMIN), Some(rule)).await;
    assert_eq!(s, 201);
    let base = now_ms() - 60_000;
    let mut tasks = Vec::new();
    for (orb, token) in devices.clone() {
        let addr = ts.mqtt;
        tasks.push(tokio::spawn(async move {
            let mut d = V3::connect(addr, &orb, Some((&format!("acme/{orb}"), &token))).await.unwrap();
            for n in 0..50u64 {
                d.publish(
                    &format!("telemetry/acme/{orb}"),
                    telemetry(base + n, &format!("{orb}-{n}"), 50.0 + n as f64),
                )
                .await
                .unwrap();
            }
            d.disconnect().await;
        }));
    }
    let mut peak = 0.0f64;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak = peak.max(ts.metric("orbmanager_telemetry_in_flight").await);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak <= 1.0, "at most one point queued for the actors, saw {peak}");
    for (orb, _) in &devices {
        assert_eq!(history(&ts, "acme", orb).await.len(), 50, "{orb}: every acknowledged point stored");
        common::wait_until("the live state has the last point", 10, || async {
            ts.get(&format!("/v1/orbs/{orb}?tenant_id=acme")).await.1["battery"] == 99.0
        })
        .await;
    }
    assert_eq!(ts.metric("orbmanager_telemetry_in_flight").await, 0.0);
    ts.stop().await;
}
