//! Rules, alerts and webhooks end to end: telemetry -> rule actor -> alert -> signed webhook
//! received by a real local HTTP receiver that checks the signature itself; hysteresis and the
//! alert lifecycle; a receiver that is down loses nothing and gets everything in order; dead
//! letters and redelivery; a duration window that survives a restart; heartbeat absence;
//! invalid rules and tenant isolation.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::{ADMIN, TestServer, http, now_ms, wait_until};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};

const SECRET: &str = "whsec-0123456789abcdef";

/// A webhook receiver: records every request whose signature verifies; answers 503 while
/// `down` is set (for the path `/down`-prefixed, too).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, Value)>>>,
    bad_signatures: Arc<Mutex<u32>>,
    down: Arc<AtomicBool>,
    addr: String,
}

async fn handle(State(r): State<Receiver>, Path(path): Path<String>, headers: HeaderMap, body: String) -> StatusCode {
    if r.down.load(Ordering::Acquire) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let ts = headers.get("x-orbmanager-timestamp").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let sig = headers.get("x-orbmanager-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let fresh = ts.parse::<u64>().is_ok_and(|t| now_ms() / 1000 - t < 300);
    if sig != want || !fresh {
        *r.bad_signatures.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    r.got.lock().unwrap().push((path, serde_json::from_str(&body).unwrap()));
    StatusCode::NO_CONTENT
}

async fn receiver() -> Receiver {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = Receiver { addr: format!("http://{}", l.local_addr().unwrap()), ..Default::default() };
    let app = axum::Router::new().route("/{*path}", axum::routing::post(handle)).with_state(r.clone());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    r.addr = r.addr.clone();
    r
}

impl Receiver {
    fn events(&self) -> Vec<(String, Value)> {
        self.got.lock().unwrap().clone()
    }

    fn types(&self, path: &str) -> Vec<(String, String)> {
        self.events()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| (v["type"].as_str().unwrap().to_string(), v["orb_id"].as_str().unwrap().to_string()))
            .collect()
    }
}

async fn point(ts: &TestServer, tenant: &str, orb: &str, battery: f64) {
    let url = ts.url(&format!("/v1/orbs/{orb}/telemetry?tenant_id={tenant}"));
    let (s, body) = http("POST", &url, Some(ADMIN), Some(json!({"ts": now_ms(), "battery": battery}))).await;
    assert_eq!(s, 200, "{body}");
}

async fn rule(ts: &TestServer, body: Value) -> Value {
    let (s, r) = http("POST", &ts.url("/v1/alerts/rules"), Some(ADMIN), Some(body)).await;
    assert_eq!(s, 201, "{r}");
    r
}

async fn webhook(ts: &TestServer, url: String, tenant: &str, max_attempts: u32) -> Value {
    let body = json!({
        "tenant_id": tenant, "url": url, "secret": SECRET, "max_attempts": max_attempts,
        "events": ["orb.alert.triggered", "orb.alert.acknowledged", "orb.alert.resolved"],
    });
    let (s, w) = http("POST", &ts.url("/v1/webhooks"), Some(ADMIN), Some(body)).await;
    assert_eq!(s, 201, "{w}");
    w
}

async fn alerts(ts: &TestServer, query: &str) -> Vec<Value> {
    let (s, body) = ts.get(&format!("/v1/alerts?{query}")).await;
    assert_eq!(s, 200, "{body}");
    body["alerts"].as_array().unwrap().clone()
}

fn s(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_raises_an_alert_that_reaches_a_signed_webhook_and_follows_its_lifecycle() {
    let ts = TestServer::start(false).await;
    let rx = receiver().await;
    ts.register("acme", "r1").await;
    let r = rule(
        &ts,
        json!({"tenant_id": "acme", "name": "low battery", "condition": "battery < 15",
               "clear_condition": "battery > 25", "severity": "critical"}),
    )
    .await;
    webhook(&ts, format!("{}/hooks/a", rx.addr), "acme", 12).await;

    point(&ts, "acme", "r1", 10.0).await;
    wait_until("the triggered webhook", 10, || async { rx.types("hooks/a").len() == 1 }).await;
    let (_, ev) = rx.events()[0].clone();
    assert_eq!(ev["type"], "orb.alert.triggered");
    assert_eq!(ev["data"]["rule_id"], r["rule_id"]);
    assert_eq!(ev["data"]["severity"], "critical");
    assert_eq!(ev["data"]["values"]["battery"], 10.0);
    let open = alerts(&ts, "tenant_id=acme&state=open").await;
    assert_eq!(open.len(), 1);
    let id = open[0]["alert_id"].as_str().unwrap().to_string();

    // Repeats update the open alert; between the thresholds nothing changes (hysteresis).
    point(&ts, "acme", "r1", 12.0).await;
    point(&ts, "acme", "r1", 20.0).await;
    wait_until("the repeat is counted", 10, || async { alerts(&ts, "tenant_id=acme").await[0]["repeats"] == 1 }).await;
    assert_eq!(alerts(&ts, "tenant_id=acme&state=open").await.len(), 1, "20 is not above the clear threshold");
    point(&ts, "acme", "r1", 30.0).await;
    wait_until("the resolved webhook", 10, || async { rx.types("hooks/a").len() == 2 }).await;
    let a = &alerts(&ts, "tenant_id=acme").await[0];
    assert_eq!(
        (a["alert_id"].as_str(), a["state"].as_str(), a["resolved_by"].as_str()),
        (Some(&*id), Some("resolved"), Some("rule"))
    );

    // A new episode: an operator acknowledges, then resolves.
    point(&ts, "acme", "r1", 5.0).await;
    wait_until("the second alert", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 1 }).await;
    let second = alerts(&ts, "tenant_id=acme&state=open").await[0]["alert_id"].as_str().unwrap().to_string();
    assert_ne!(second, id);
    let (st, body) = http("POST", &ts.url(&format!("/v1/alerts/{second}/ack?tenant_id=acme")), Some(ADMIN), None).await;
    assert_eq!((st, body["state"].as_str()), (200, Some("acknowledged")), "{body}");
    let (st, body) = http("POST", &ts.url(&format!("/v1/alerts/{second}/ack?tenant_id=acme")), Some(ADMIN), None).await;
    assert_eq!(st, 400, "acknowledged twice: {body}");
    let (st, body) =
        http("POST", &ts.url(&format!("/v1/alerts/{second}/resolve?tenant_id=acme")), Some(ADMIN), None).await;
    assert_eq!((st, body["resolved_by"].as_str()), (200, Some("operator")), "{body}");
    let (st, _) = http("POST", &ts.url("/v1/alerts/000000000000deadbeef/ack?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(st, 404);

    wait_until("all five events", 10, || async { rx.types("hooks/a").len() == 5 }).await;
    assert_eq!(
        rx.types("hooks/a"),
        vec![
            s("orb.alert.triggered", "r1"),
            s("orb.alert.resolved", "r1"),
            s("orb.alert.triggered", "r1"),
            s("orb.alert.acknowledged", "r1"),
            s("orb.alert.resolved", "r1"),
        ]
    );
    assert_eq!(*rx.bad_signatures.lock().unwrap(), 0);
    // Outcomes are recorded in batches after the responses: the receiver can count a POST
    // before the server's counter moves.
    wait_until("five deliveries recorded", 10, || async {
        ts.metric("orbmanager_webhook_delivered_total").await >= 5.0
    })
    .await;
    assert_eq!(ts.metric("orbmanager_webhook_delivered_total").await, 5.0);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_gets_everything_in_order_and_dead_letters_can_be_redelivered() {
    let ts = TestServer::start(false).await;
    let rx = receiver().await;
    for orb in ["d1", "d2"] {
        ts.register("acme", orb).await;
    }
    rule(&ts, json!({"tenant_id": "acme", "name": "low", "condition": "battery < 15", "severity": "major"})).await;
    webhook(&ts, format!("{}/hooks/patient", rx.addr), "acme", 30).await;
    let impatient = webhook(&ts, format!("{}/hooks/impatient", rx.addr), "acme", 1).await;

    rx.down.store(true, Ordering::Release);
    for round in 0..3 {
        for orb in ["d1", "d2"] {
            point(&ts, "acme", orb, 5.0).await;
            point(&ts, "acme", orb, 50.0 + round as f64).await;
        }
    }
    // While down: every event waits in the outbox (patient) or is dead-lettered (impatient).
    let url = ts.url(&format!("/v1/webhooks/{}/deliveries?tenant_id=acme", impatient["webhook_id"].as_str().unwrap()));
    wait_until("impatient deliveries are dead", 10, || async {
        let (_, d) = http("GET", &url, Some(ADMIN), None).await;
        let d = d["deliveries"].as_array().unwrap().clone();
        d.len() == 12 && d.iter().all(|x| x["state"] == "dead")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.events().is_empty());
    rx.down.store(false, Ordering::Release);

    wait_until("all twelve events after the receiver returns", 30, || async { rx.types("hooks/patient").len() == 12 })
        .await;
    for orb in ["d1", "d2"] {
        let per_orb: Vec<String> =
            rx.types("hooks/patient").into_iter().filter(|(_, o)| o == orb).map(|(t, _)| t).collect();
        let want: Vec<String> =
            (0..3).flat_map(|_| ["orb.alert.triggered", "orb.alert.resolved"]).map(String::from).collect();
        assert_eq!(per_orb, want, "in order for {orb}");
    }
    assert!(ts.metric("orbmanager_webhook_failed_attempts_total").await >= 13.0);

    // Redeliver one dead letter of the impatient webhook: it arrives now.
    let (_, d) = http("GET", &url, Some(ADMIN), None).await;
    let seq = d["deliveries"][11]["seq"].as_u64().unwrap();
    let id = impatient["webhook_id"].as_str().unwrap();
    let redeliver = ts.url(&format!("/v1/webhooks/{id}/deliveries/{seq}/redeliver?tenant_id=acme"));
    let (st, body) = http("POST", &redeliver, Some(ADMIN), None).await;
    assert_eq!((st, body["state"].as_str()), (202, Some("pending")), "{body}");
    wait_until("the redelivered event", 10, || async { rx.types("hooks/impatient").len() == 1 }).await;
    let (st, _) = http("POST", &redeliver, Some(ADMIN), None).await;
    assert_eq!(st, 404, "it left the dead letters");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_window_survives_a_restart_and_silence_raises_an_absence_alert() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "slow").await;
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "low for 3s", "condition": "battery < 15", "for_s": 3,
                     "severity": "minor", "scope": "orb_id = \"slow\""}),
    )
    .await;
    let started = now_ms();
    point(&ts, "acme", "slow", 10.0).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(alerts(&ts, "tenant_id=acme").await.is_empty(), "not before its window");
    let dir = ts.stop().await;

    let ts = TestServer::start_in(dir, false, |_| {}).await;
    wait_until("the window fires after the restart", 15, || async { !alerts(&ts, "tenant_id=acme").await.is_empty() })
        .await;
    let a = &alerts(&ts, "tenant_id=acme").await[0];
    assert!(a["opened_ms"].as_u64().unwrap() >= started + 3000, "{a}");
    assert_eq!(a["orb_id"], "slow");

    // Heartbeat absence: an orb in scope that says nothing.
    let (s, _) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "orb_id": "quiet", "attributes": {"kind": "watched"}})),
    )
    .await;
    assert_eq!(s, 201);
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "silent", "absent_s": 2, "severity": "warning",
                     "scope": "attr.kind = \"watched\""}),
    )
    .await;
    wait_until("the absence alert", 15, || async {
        alerts(&ts, "tenant_id=acme&orb_id=quiet&state=open").await.len() == 1
    })
    .await;
    point(&ts, "acme", "quiet", 80.0).await;
    wait_until("telemetry ends the absence", 10, || async {
        alerts(&ts, "tenant_id=acme&orb_id=quiet&state=resolved").await.len() == 1
    })
    .await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rules_are_refused_and_rules_never_cross_tenants() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "x1").await;
    common::ensure_tenant(&ts.http, "globex").await;
    let bad = [
        (json!({"tenant_id": "acme", "name": "n", "condition": "battery <", "severity": "major"}), "condition:"),
        (json!({"tenant_id": "acme", "name": "n", "condition": "batery < 1", "severity": "major"}), "unknown variable"),
        (json!({"tenant_id": "acme", "name": "n", "condition": "online", "severity": "loud"}), "severity"),
        (
            json!({"tenant_id": "acme", "name": "n", "condition": "online", "severity": "major", "scope": "x ="}),
            "scope",
        ),
        (
            json!({"tenant_id": "acme", "name": "n", "condition": "online", "severity": "major", "extra": 1}),
            "unknown field",
        ),
    ];
    for (body, why) in bad {
        let (s, err) = http("POST", &ts.url("/v1/alerts/rules"), Some(ADMIN), Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {err}");
        assert!(err["detail"].as_str().unwrap().contains(why), "{body}: {err}");
    }
    let (_, list) = ts.get("/v1/alerts/rules?tenant_id=acme").await;
    assert_eq!(list["rules"].as_array().unwrap().len(), 0, "nothing stored");
    let (s, err) = http(
        "POST",
        &ts.url("/v1/webhooks"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "url": "http://127.0.0.1:1/x", "events": ["orb.exploded"], "secret": SECRET})),
    )
    .await;
    assert_eq!(s, 400, "{err}");

    // A globex rule that matches everything never sees acme's orbs.
    rule(&ts, json!({"tenant_id": "globex", "name": "all", "condition": "battery >= 0", "severity": "major"})).await;
    point(&ts, "acme", "x1", 50.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alerts(&ts, "tenant_id=globex").await.is_empty());
    assert!(alerts(&ts, "tenant_id=acme").await.is_empty());

    let url = ts.url("/v1/tenants/globex/tokens");
    let (_, tok) = http("POST", &url, Some(ADMIN), Some(json!({"role": "admin", "name": "g"}))).await;
    let globex = tok["secret"].as_str().unwrap();
    let (s, _) = http("GET", &ts.url("/v1/alerts?tenant_id=acme"), Some(globex), None).await;
    assert_eq!(s, 403);
    let (s, body) = http("GET", &ts.url("/v1/alerts/rules"), Some(globex), None).await;
    assert_eq!((s, body["rules"].as_array().unwrap().len()), (200, 1), "only its own rule");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geofences_rates_and_anomalies_raise_alerts() {
    let ts = TestServer::start(false).await;
    for orb in ["geo", "drain", "hot"] {
        ts.register("acme", orb).await;
    }
    // Leaving a square around (37.75, -122.45) fires; coming back clears.
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "left depot", "severity": "major", "scope": "orb_id = \"geo\"",
        "condition": "!in_polygon(lat, lon, [37.7, -122.5, 37.8, -122.5, 37.8, -122.4, 37.7, -122.4])"}),
    )
    .await;
    // Draining faster than 5 % per second.
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "fast drain", "severity": "minor", "scope": "orb_id = \"drain\"",
        "condition": "rate.battery < -5.0"}),
    )
    .await;
    // A motor temperature far outside the orb's own normal.
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "motor anomaly", "severity": "warning", "scope": "orb_id = \"hot\"",
        "condition": "zscore.motor_temp_c > 4.0"}),
    )
    .await;
    let post = |orb: &'static str, body: Value| {
        let url = ts.url(&format!("/v1/orbs/{orb}/telemetry?tenant_id=acme"));
        async move {
            let (s, b) = http("POST", &url, Some(ADMIN), Some(body)).await;
            assert_eq!(s, 200, "{b}");
        }
    };
    post("geo", json!({"ts": now_ms(), "lat": 37.75, "lon": -122.45})).await;
    post("drain", json!({"ts": now_ms(), "battery": 90})).await;
    for i in 0..25 {
        post("hot", json!({"ts": now_ms(), "metrics": {"motor_temp_c": 40.0 + (i % 3) as f64}})).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alerts(&ts, "tenant_id=acme").await.is_empty(), "nothing unusual yet");

    post("geo", json!({"ts": now_ms(), "lat": 37.9, "lon": -122.45})).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    post("drain", json!({"ts": now_ms(), "battery": 70})).await;
    post("hot", json!({"ts": now_ms(), "metrics": {"motor_temp_c": 95.0}})).await;
    wait_until("three alerts", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 3 }).await;
    let names: std::collections::BTreeSet<String> = alerts(&ts, "tenant_id=acme&state=open")
        .await
        .iter()
        .map(|a| a["rule_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["fast drain", "left depot", "motor anomaly"].map(String::from).into());

    post("geo", json!({"ts": now_ms(), "lat": 37.76, "lon": -122.44})).await;
    wait_until("back inside clears", 10, || async {
        alerts(&ts, "tenant_id=acme&orb_id=geo&state=resolved").await.len() == 1
    })
    .await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_alerts_over_grpc() {
    use orbmanager::net::grpc::pb;
    use pb::alert_service_client::AlertServiceClient;
    let ts = TestServer::start(false).await;
    ts.register("acme", "g1").await;
    let mut svc = AlertServiceClient::connect(format!("http://{}", ts.grpc)).await.unwrap();
    fn authed<T>(m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
        r
    }
    let bad = pb::CreateRuleRequest {
        tenant_id: "acme".into(),
        name: "n".into(),
        condition: "battery <".into(),
        severity: "major".into(),
        ..Default::default()
    };
    let err = svc.create_rule(authed(bad)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let ok = pb::CreateRuleRequest {
        tenant_id: "acme".into(),
        name: "hot".into(),
        condition: "metrics.temp_c > 70.0".into(),
        severity: "critical".into(),
        ..Default::default()
    };
    let rule = svc.create_rule(authed(ok)).await.unwrap().into_inner();
    assert_eq!(rule.severity, "critical");
    let url = ts.url("/v1/orbs/g1/telemetry?tenant_id=acme");
    let (s, _) = http("POST", &url, Some(ADMIN), Some(json!({"ts": now_ms(), "metrics": {"temp_c": 90}}))).await;
    assert_eq!(s, 200);
    let mut open = Vec::new();
    for _ in 0..100 {
        let req = pb::ListAlertsRequest { tenant_id: "acme".into(), state: "open".into(), ..Default::default() };
        open = svc.list_alerts(authed(req)).await.unwrap().into_inner().alerts;
        if !open.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open.len(), 1);
    let values: Value = serde_json::from_str(&open[0].values_json).unwrap();
    assert_eq!(values["metrics"]["temp_c"], 90.0);
    let req = pb::AlertRequest { tenant_id: "acme".into(), alert_id: open[0].alert_id.clone() };
    let acked = svc.acknowledge_alert(authed(req)).await.unwrap().into_inner();
    assert_eq!(acked.state, "acknowledged");
    let req = pb::AssignAlertRequest {
        tenant_id: "acme".into(),
        alert_id: acked.alert_id.clone(),
        assignee: "night-shift".into(),
    };
    assert_eq!(svc.assign_alert(authed(req)).await.unwrap().into_inner().assignee, "night-shift");
    let req =
        pb::CommentAlertRequest { tenant_id: "acme".into(), alert_id: acked.alert_id.clone(), text: "fan swap".into() };
    let commented = svc.comment_alert(authed(req)).await.unwrap().into_inner();
    assert_eq!(
        commented.comments.iter().map(|c| (c.author.as_str(), c.text.as_str())).collect::<Vec<_>>(),
        vec![("root", "fan swap")]
    );
    let req = pb::CommentAlertRequest { tenant_id: "acme".into(), alert_id: acked.alert_id.clone(), text: " ".into() };
    assert_eq!(svc.comment_alert(authed(req)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let req = pb::DeleteRuleRequest { tenant_id: "acme".into(), rule_id: rule.rule_id.clone() };
    svc.delete_rule(authed(req)).await.unwrap();
    let rules = svc.list_rules(authed(pb::ListRulesRequest { tenant_id: "acme".into() })).await.unwrap().into_inner();
    assert!(rules.rules.is_empty());
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rule_partition_restarts_from_the_store_and_keeps_its_open_alerts() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "p1").await;
    rule(&ts, json!({"tenant_id": "acme", "name": "low", "condition": "battery < 15", "severity": "major"})).await;
    point(&ts, "acme", "p1", 10.0).await;
    wait_until("the alert", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 1 }).await;
    let opened = alerts(&ts, "tenant_id=acme&state=open").await[0]["alert_id"].clone();

    let alerting = ts.server().fleet().ctx().alerting.get().expect("rule engine running").clone();
    alerting.inject_panic().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next observation restarts the partition; the open alert was restored, so a repeat
    // counts on it instead of opening a second one, and the clear resolves it.
    point(&ts, "acme", "p1", 11.0).await;
    point(&ts, "acme", "p1", 50.0).await;
    wait_until("resolved after the restart", 10, || async {
        alerts(&ts, "tenant_id=acme&state=resolved").await.len() == 1
    })
    .await;
    let all = alerts(&ts, "tenant_id=acme").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!((&all[0]["alert_id"], all[0]["repeats"].as_u64()), (&opened, Some(1)));
    assert!(ts.metric("orbmanager_rule_partition_restarts_total").await >= 1.0);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_and_alert_requests_are_refused_and_change_nothing() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "b1").await;
    common::ensure_tenant(&ts.http, "globex").await;
    let hook = |over: Value| {
        let mut body = json!({"tenant_id": "acme", "url": "http://127.0.0.1:1/h", "secret": SECRET,
                              "events": ["orb.alert.triggered"]});
        for (k, v) in over.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let bad = [
        (hook(json!({"url": "ftp://x/h"})), 400, "http://"),
        (hook(json!({"url": "http://"})), 400, "url must be"),
        (hook(json!({"url": "http://a b/h"})), 400, "url must be"),
        (hook(json!({"url": format!("http://h/{}", "x".repeat(2100))})), 400, "url must be"),
        (hook(json!({"url": "https://"})), 400, "url must be"),
        (hook(json!({"secret": "short"})), 400, "secret"),
        (hook(json!({"events": []})), 400, "at least one"),
        (hook(json!({"max_attempts": 0})), 400, "max_attempts"),
        (hook(json!({"concurrency": 500})), 400, "concurrency"),
        (hook(json!({"colour": "red"})), 400, "unknown field"),
    ];
    for (body, status, why) in bad {
        let (s, err) = http("POST", &ts.url("/v1/webhooks"), Some(ADMIN), Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {err}");
        assert!(err["detail"].as_str().unwrap_or_default().contains(why), "{body}: {err}");
    }
    let (_, list) = ts.get("/v1/webhooks?tenant_id=acme").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 0, "nothing stored");

    // Alert queries and operations with bad input or another tenant's ids.
    for q in ["state=closed", "page_token=zz", "page_size=5000"] {
        let (s, err) = ts.get(&format!("/v1/alerts?tenant_id=acme&{q}")).await;
        assert_eq!(s, 400, "{q}: {err}");
    }
    rule(&ts, json!({"tenant_id": "acme", "name": "low", "condition": "battery < 15", "severity": "major"})).await;
    let w = webhook(&ts, "http://127.0.0.1:1/h".into(), "acme", 1).await;
    point(&ts, "acme", "b1", 5.0).await;
    wait_until("the alert", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 1 }).await;
    let id = alerts(&ts, "tenant_id=acme").await[0]["alert_id"].as_str().unwrap().to_string();
    let url = ts.url("/v1/tenants/globex/tokens");
    let (_, tok) = http("POST", &url, Some(ADMIN), Some(json!({"role": "admin", "name": "g"}))).await;
    let globex = tok["secret"].as_str().unwrap();
    let (s, _) = http("POST", &ts.url(&format!("/v1/alerts/{id}/ack")), Some(globex), None).await;
    assert_eq!(s, 404, "another tenant's alert id does not exist for globex");
    let wid = w["webhook_id"].as_str().unwrap();
    let (s, _) = http("GET", &ts.url(&format!("/v1/webhooks/{wid}/deliveries")), Some(globex), None).await;
    assert_eq!(s, 404);
    let (s, _) = http("DELETE", &ts.url(&format!("/v1/webhooks/{wid}")), Some(globex), None).await;
    assert_eq!(s, 404);
    let (s, _) = http(
        "POST",
        &ts.url(&format!("/v1/webhooks/{wid}/deliveries/999/redeliver?tenant_id=acme")),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, 404, "no such delivery");
    assert_eq!(alerts(&ts, "tenant_id=acme").await[0]["state"], "open", "nothing changed");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_rule_fires_on_the_nth_match_in_its_window_and_clears_after_a_quiet_one() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "brk").await;
    rule(
        &ts,
        json!({"tenant_id": "acme", "name": "hard braking", "severity": "minor",
               "condition": "metrics.decel_g > 0.5", "repeat_count": 3, "repeat_window_s": 2}),
    )
    .await;
    let post = |g: f64| {
        let url = ts.url("/v1/orbs/brk/telemetry?tenant_id=acme");
        async move {
            let (s, b) =
                http("POST", &url, Some(ADMIN), Some(json!({"ts": now_ms(), "metrics": {"decel_g": g}}))).await;
            assert_eq!(s, 200, "{b}");
        }
    };
    post(0.7).await;
    post(0.1).await;
    post(0.8).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alerts(&ts, "tenant_id=acme").await.is_empty(), "two matches are not three");
    post(0.9).await;
    wait_until("the third match fires", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 1 })
        .await;
    // A whole window without a match: the next observation clears it.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    post(0.1).await;
    wait_until("a quiet window clears", 10, || async { alerts(&ts, "tenant_id=acme&state=resolved").await.len() == 1 })
        .await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_assign_and_comment_alerts_and_every_change_is_an_event() {
    let ts = TestServer::start(false).await;
    let rx = receiver().await;
    ts.register("acme", "c1").await;
    rule(&ts, json!({"tenant_id": "acme", "name": "low", "condition": "battery < 15", "severity": "major"})).await;
    let body = json!({"tenant_id": "acme", "url": format!("{}/hooks/ops", rx.addr), "secret": SECRET,
                      "events": ["orb.alert.assigned", "orb.alert.commented"]});
    let (s, w) = http("POST", &ts.url("/v1/webhooks"), Some(ADMIN), Some(body)).await;
    assert_eq!(s, 201, "{w}");
    point(&ts, "acme", "c1", 5.0).await;
    wait_until("the alert", 10, || async { alerts(&ts, "tenant_id=acme&state=open").await.len() == 1 }).await;
    let id = alerts(&ts, "tenant_id=acme").await[0]["alert_id"].as_str().unwrap().to_string();
    let post = |path: String, body: Value| {
        let url = ts.url(&path);
        async move { http("POST", &url, Some(ADMIN), Some(body)).await }
    };

    let (s, a) = post(format!("/v1/alerts/{id}/assign"), json!({"tenant_id": "acme", "assignee": "ana"})).await;
    assert_eq!((s, a["assignee"].as_str()), (200, Some("ana")), "{a}");
    let (s, a) = post(format!("/v1/alerts/{id}/comments"), json!({"tenant_id": "acme", "text": "on my way"})).await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["comments"][0]["text"], "on my way");
    assert_eq!(a["comments"][0]["author"], "root");

    // Refusals change nothing.
    let (s, e) = post(format!("/v1/alerts/{id}/comments"), json!({"tenant_id": "acme", "text": ""})).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")), "{e}");
    let (s, e) = post(format!("/v1/alerts/{id}/assign"), json!({"tenant_id": "acme", "assignee": "a\u{7}b"})).await;
    assert_eq!(s, 400, "{e}");
    let (s, _) = post("/v1/alerts/nope/comments".into(), json!({"tenant_id": "acme", "text": "x"})).await;
    assert_eq!(s, 404);
    let (s, e) = post(format!("/v1/alerts/{id}/comments"), json!({"tenant_id": "acme", "text": "x", "extra": 1})).await;
    assert_eq!(s, 400, "unknown fields are refused: {e}");
    common::ensure_tenant(&ts.http, "globex").await;
    let (_, tok) =
        http("POST", &ts.url("/v1/tenants/globex/tokens"), Some(ADMIN), Some(json!({"role": "operator"}))).await;
    let globex = tok["secret"].as_str().unwrap().to_string();
    let (s, _) =
        http("POST", &ts.url(&format!("/v1/alerts/{id}/comments")), Some(&globex), Some(json!({"text": "mine"}))).await;
    assert_eq!(s, 404, "another tenant's alert id is not found");
    let (_, tok) = http("POST", &ts.url("/v1/tenants/acme/tokens"), Some(ADMIN), Some(json!({"role": "viewer"}))).await;
    let viewer = tok["secret"].as_str().unwrap().to_string();
    let (s, _) =
        http("POST", &ts.url(&format!("/v1/alerts/{id}/comments")), Some(&viewer), Some(json!({"text": "hi"}))).await;
    assert_eq!(s, 403, "a viewer cannot comment");

    // Unassign, resolve; a resolved alert takes comments but no assignee.
    let (s, a) = post(format!("/v1/alerts/{id}/assign"), json!({"tenant_id": "acme", "assignee": null})).await;
    assert_eq!((s, a["assignee"].is_null()), (200, true), "{a}");
    let (s, _) = post(format!("/v1/alerts/{id}/resolve?tenant_id=acme"), json!({})).await;
    assert_eq!(s, 200);
    let (s, e) = post(format!("/v1/alerts/{id}/assign"), json!({"tenant_id": "acme", "assignee": "bo"})).await;
    assert_eq!(s, 400, "{e}");
    let (s, a) = post(format!("/v1/alerts/{id}/comments"), json!({"tenant_id": "acme", "text": "post-mortem"})).await;
    assert_eq!(s, 201, "{a}");
    let stored = &alerts(&ts, "tenant_id=acme").await[0];
    let texts: Vec<&str> = stored["comments"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["on my way", "post-mortem"]);
    assert!(stored["assignee"].is_null());

    // Each change reached the webhook (signed), in order.
    wait_until("four deliveries", 10, || async { rx.types("hooks/ops").len() == 4 }).await;
    let kinds: Vec<String> = rx.types("hooks/ops").into_iter().map(|(t, _)| t).collect();
    assert_eq!(kinds, ["orb.alert.assigned", "orb.alert.commented", "orb.alert.assigned", "orb.alert.commented"]);
    assert_eq!(*rx.bad_signatures.lock().unwrap(), 0);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_status_and_presence_reach_webhooks() {
    let ts = TestServer::start(false).await;
    let rx = receiver().await;
    let token = ts.register("acme", "w1").await;
    let body = json!({"tenant_id": "acme", "url": format!("{}/hooks/fleet", rx.addr), "secret": SECRET,
                      "events": ["orb.command.status", "orb.presence.online", "orb.presence.offline"]});
    let (s, w) = http("POST", &ts.url("/v1/webhooks"), Some(ADMIN), Some(body)).await;
    assert_eq!(s, 201, "{w}");

    let mut dev = common::V3::connect(ts.mqtt, "w1", Some(("acme/w1", &token))).await.unwrap();
    let early = dev.subscribe("commands/acme/w1").await;
    assert!(early.is_empty());
    let url = ts.url("/v1/orbs/w1/commands?tenant_id=acme");
    let (s, c) = http("POST", &url, Some(ADMIN), Some(json!({"command_type": "reboot", "payload": {}}))).await;
    assert_eq!(s, 201, "{c}");
    let (topic, _) = dev.next_publish(10).await.expect("the command is delivered");
    assert_eq!(topic, "commands/acme/w1");
    let ack = json!({"command_id": c["command_id"], "status": "succeeded"}).to_string().into_bytes();
    dev.publish("commands/acme/w1/ack", ack).await.unwrap();
    dev.disconnect().await;

    wait_until("the offline event", 10, || async {
        rx.types("hooks/fleet").last().is_some_and(|(t, _)| t == "orb.presence.offline")
    })
    .await;
    let got = rx.events();
    let kinds: Vec<&str> = got.iter().map(|(_, v)| v["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"orb.presence.online"), "{kinds:?}");
    let statuses: Vec<&str> =
        got[1..got.len() - 1].iter().map(|(_, v)| v["data"]["status"].as_str().unwrap()).collect();
    // The device's PUBACK (delivered) and its ack (succeeded) race; a late `delivered` never
    // moves a terminal command, so it is either between them or absent.
    assert!(
        statuses == ["queued", "sent", "delivered", "succeeded"] || statuses == ["queued", "sent", "succeeded"],
        "{statuses:?}"
    );
    let last = &got.last().unwrap().1;
    assert_eq!(last["data"]["disconnect_reason"], "client_disconnect");
    assert!(got.iter().all(|(_, v)| v["orb_id"] == "w1" && v["event_id"].as_str().is_some()));
    ts.stop().await;
}

/// `(path, event)` of each verified delivery.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// An HTTPS webhook endpoint (rustls, blocking) with a certificate for 127.0.0.1 from its own
/// CA. Records `(path, event)` for each request whose signature verifies; answers 204 (401 for a
/// bad signature). Returns the base URL and the CA's PEM.
fn tls_receiver() -> (String, String, Received) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "webhook test CA");
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (config, g) = (config.clone(), g.clone());
            std::thread::spawn(move || serve_tls(stream, config, g));
        }
    });
    (base, ca_pem, got)
}

/// Serves signed webhook POSTs on one TLS connection until the client closes it.
fn serve_tls(stream: std::net::TcpStream, config: Arc<rustls::ServerConfig>, got: Received) {
    use std::io::{Read, Write};
    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut buf: Vec<u8> = Vec::new();
    let fill = |tls: &mut rustls::StreamOwned<_, _>, buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 4096];
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut tls, &mut buf) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
                .unwrap_or_default()
                .to_string()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        while buf.len() < head_end + len {
            if !fill(&mut tls, &mut buf) {
                return;
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
        buf.drain(..head_end + len);
        let path = head.split_whitespace().nth(1).unwrap_or_default().trim_start_matches('/').to_string();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{}.{body}", header("x-orbmanager-timestamp")).as_bytes());
        let ok = header("x-orbmanager-signature") == format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        if ok {
            got.lock().unwrap().push((path, serde_json::from_str(&body).unwrap()));
        }
        let status = if ok { "204 No Content" } else { "401 Unauthorized" };
        if tls.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).is_err() {
            return;
        }
        let _ = tls.flush();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_verify_the_endpoint_against_the_given_ca() {
    let ts = TestServer::start(false).await;
    let (base, ca_pem, got) = tls_receiver();
    ts.register("acme", "tls1").await;
    rule(&ts, json!({"tenant_id": "acme", "name": "low", "condition": "battery < 15", "severity": "major"})).await;
    let hook = |path: &str, ca: Option<&str>, attempts: u32| {
        json!({"tenant_id": "acme", "url": format!("{base}/{path}"), "secret": SECRET, "max_attempts": attempts,
               "events": ["orb.alert.triggered"], "ca_pem": ca})
    };
    // Refused specs: a CA for plain http, a CA that is not PEM, a private key instead of a CA.
    let post = |body: Value| {
        let url = ts.url("/v1/webhooks");
        async move { http("POST", &url, Some(ADMIN), Some(body)).await }
    };
    let mut plain = hook("x", Some(&ca_pem), 1);
    plain["url"] = json!("http://127.0.0.1:9/x");
    let (s, e) = post(plain).await;
    assert_eq!(s, 400, "{e}");
    assert!(e["detail"].as_str().unwrap().contains("https:// URLs only"), "{e}");
    let (s, e) = post(hook("x", Some("not a certificate"), 1)).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = post(hook("x", Some(&ca_pem.repeat(200)), 1)).await;
    assert!(s == 400 && e["detail"].as_str().unwrap().contains("longer than"), "oversized ca_pem: {e}");
    let key_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let (s, e) = post(hook("x", Some(&key_pem), 1)).await;
    assert!(s == 400 && e["detail"].as_str().unwrap().contains("certificates only"), "{e}");
    let (_, listed) = ts.get("/v1/webhooks?tenant_id=acme").await;
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 0, "nothing stored");

    // Trusting the endpoint's CA: delivered over TLS. The same endpoint checked against the
    // public roots: refused by certificate verification, dead-lettered with the reason.
    let (s, trusted) = post(hook("trusted", Some(&ca_pem), 3)).await;
    assert_eq!(s, 201, "{trusted}");
    let (s, public) = post(hook("public", None, 1)).await;
    assert_eq!(s, 201, "{public}");
    point(&ts, "acme", "tls1", 5.0).await;
    wait_until("delivered over https", 10, || async { got.lock().unwrap().len() == 1 }).await;
    let (path, ev) = got.lock().unwrap()[0].clone();
    assert_eq!(
        (path.as_str(), ev["type"].as_str(), ev["orb_id"].as_str()),
        ("trusted", Some("orb.alert.triggered"), Some("tls1"))
    );
    let url = ts.url(&format!("/v1/webhooks/{}/deliveries?tenant_id=acme", public["webhook_id"].as_str().unwrap()));
    wait_until("the untrusted delivery is dead", 10, || async {
        let (_, d) = http("GET", &url, Some(ADMIN), None).await;
        d["deliveries"].as_array().is_some_and(|d| d.len() == 1 && d[0]["state"] == "dead")
    })
    .await;
    let (_, d) = http("GET", &url, Some(ADMIN), None).await;
    let why = d["deliveries"][0]["last_error"].as_str().unwrap().to_lowercase();
    assert!(why.contains("certificate") || why.contains("issuer"), "{why}");
    assert_eq!(got.lock().unwrap().len(), 1, "nothing reached the endpoint without trust");
    ts.stop().await;
}
