//! Commands that are never lost: creation with idempotency, delivery over MQTT in sequence
//! order (also to orbs that were offline), acknowledgements, expiry that is never delivered,
//! timeouts, cancel and supersede, the HTTP fallback, and deadlines that survive a restart.

mod common;

use std::time::Duration;

use common::{ADMIN, TestServer, V3, basic_auth, http, http_raw, now_ms, wait_until};
use serde_json::{Value, json};

async fn create(ts: &TestServer, orb: &str, body: Value) -> (u16, Value) {
    http("POST", &ts.url(&format!("/v1/orbs/{orb}/commands?tenant_id=acme")), Some(ADMIN), Some(body)).await
}

async fn command(ts: &TestServer, orb: &str, id: &str) -> Value {
    let (status, body) = ts.get(&format!("/v1/orbs/{orb}/commands/{id}?tenant_id=acme")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_status(ts: &TestServer, orb: &str, id: &str, want: &str) -> Value {
    wait_until(&format!("{id} {want}"), 15, || async { command(ts, orb, id).await["status"] == want }).await;
    command(ts, orb, id).await
}

fn statuses(c: &Value) -> Vec<String> {
    c["history"].as_array().unwrap().iter().map(|t| t["status"].as_str().unwrap().to_string()).collect()
}

/// Receives the next command on the device and returns (command_id, seq, command_type).
async fn receive(dev: &mut V3) -> (String, u64, String) {
    let (topic, payload) = dev.next_publish(10).await.expect("a command arrives");
    assert!(topic.starts_with("commands/"), "{topic}");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    (v["command_id"].as_str().unwrap().into(), v["seq"].as_u64().unwrap(), v["command_type"].as_str().unwrap().into())
}

async fn ack(dev: &mut V3, orb: &str, id: &str, status: &str) {
    dev.publish(
        &format!("commands/acme/{orb}/ack"),
        json!({"command_id": id, "status": status, "detail": "ok"}).to_string().into_bytes(),
    )
    .await
    .expect("ack acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_goes_through_its_whole_lifecycle_over_mqtt() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "r1").await;
    let (status, created) =
        create(&ts, "r1", json!({"command_type": "go_to", "payload": {"lat": 1.5}, "timeout_s": 60})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["seq"], 1);
    let id = created["command_id"].as_str().unwrap().to_string();

    let mut dev = V3::connect(ts.mqtt, "r1", Some(("acme/r1", &token))).await.unwrap();
    let early = dev.subscribe("commands/acme/r1").await;
    let (got_id, seq, ctype) = match early.first() {
        Some((_, p)) => {
            let v: Value = serde_json::from_slice(p).unwrap();
            (
                v["command_id"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
                v["command_type"].as_str().unwrap().to_string(),
            )
        }
        None => receive(&mut dev).await,
    };
    assert_eq!((got_id.as_str(), seq, ctype.as_str()), (id.as_str(), 1, "go_to"));
    wait_status(&ts, "r1", &id, "delivered").await;
    ack(&mut dev, "r1", &id, "in_progress").await;
    ack(&mut dev, "r1", &id, "succeeded").await;
    let done = command(&ts, "r1", &id).await;
    assert_eq!(done["status"], "succeeded", "durable before the PUBACK of the ack");
    assert_eq!(statuses(&done), ["queued", "sent", "delivered", "in_progress", "succeeded"]);
    // Late and duplicate acknowledgements are harmless and change nothing.
    ack(&mut dev, "r1", &id, "failed").await;
    ack(&mut dev, "r1", &id, "succeeded").await;
    let after = command(&ts, "r1", &id).await;
    assert_eq!(after["status"], "succeeded");
    assert_eq!(statuses(&after).len(), 5);

    let (_, pending) = ts.get("/v1/orbs/r1/commands?tenant_id=acme&status=pending").await;
    assert_eq!(pending["commands"].as_array().unwrap().len(), 0);
    let (_, all) = ts.get("/v1/orbs/r1/commands?tenant_id=acme").await;
    assert_eq!(all["commands"].as_array().unwrap().len(), 1);
    assert_eq!(ts.metric("orbmanager_commands_terminal_total{status=\"succeeded\"}").await, 1.0);
    dev.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_orb_gets_its_queue_in_order_and_expired_commands_never() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "r2").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut body = json!({"command_type": format!("step{i}"), "payload": {"i": i}});
        if i == 2 {
            body["expiry_ts"] = json!(now_ms() + 300);
        }
        let (status, c) = create(&ts, "r2", body).await;
        assert_eq!(status, 201);
        ids.push(c["command_id"].as_str().unwrap().to_string());
    }
    let expired = wait_status(&ts, "r2", &ids[2], "expired").await;
    assert_eq!(statuses(&expired), ["queued", "expired"]);

    let mut dev = V3::connect(ts.mqtt, "r2", Some(("acme/r2", &token))).await.unwrap();
    let mut got: Vec<(String, u64)> = dev
        .subscribe("commands/acme/r2")
        .await
        .iter()
        .map(|(_, p)| {
            let v: Value = serde_json::from_slice(p).unwrap();
            (v["command_id"].as_str().unwrap().to_string(), v["seq"].as_u64().unwrap())
        })
        .collect();
    while got.len() < 5 {
        let (id, seq, _) = receive(&mut dev).await;
        got.push((id, seq));
    }
    let want: Vec<(String, u64)> = [0usize, 1, 3, 4, 5].iter().map(|i| (ids[*i].clone(), *i as u64 + 1)).collect();
    assert_eq!(got, want, "in sequence order, without the expired one");
    assert!(dev.next_publish(1).await.is_none(), "nothing else, ever: the expired command is never delivered");

    // Acknowledge two, then reconnect: the other three come again, in order, same ids.
    ack(&mut dev, "r2", &ids[0], "succeeded").await;
    ack(&mut dev, "r2", &ids[1], "rejected").await;
    dev.disconnect().await;
    let mut dev = V3::connect(ts.mqtt, "r2", Some(("acme/r2", &token))).await.unwrap();
    let mut again: Vec<String> = dev
        .subscribe("commands/acme/r2")
        .await
        .iter()
        .map(|(_, p)| serde_json::from_slice::<Value>(p).unwrap()["command_id"].as_str().unwrap().to_string())
        .collect();
    while again.len() < 3 {
        again.push(receive(&mut dev).await.0);
    }
    assert_eq!(again, vec![ids[3].clone(), ids[4].clone(), ids[5].clone()]);
    let redelivered = command(&ts, "r2", &ids[3]).await;
    assert!(redelivered["attempts"].as_u64().unwrap() >= 2, "{redelivered}");
    assert_eq!(command(&ts, "r2", &ids[1]).await["status"], "rejected");
    dev.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_answer_as_specified() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "r3").await;
    ts.register("acme", "r4").await;
    let body = json!({"command_type": "reboot", "payload": {"delay": 5}, "idempotency_key": "op-42"});
    let (s1, a) = create(&ts, "r3", body.clone()).await;
    let (s2, b) = create(&ts, "r3", body.clone()).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a["command_id"], b["command_id"], "same key + same body returns the original");
    let mut other = body.clone();
    other["payload"] = json!({"delay": 6});
    let (s3, c) = create(&ts, "r3", other).await;
    assert_eq!((s3, c["code"].as_str()), (409, Some("already_exists")));
    let (s4, d) = create(&ts, "r4", body.clone()).await;
    assert_eq!(s4, 201, "keys are per orb");
    assert_ne!(d["command_id"], a["command_id"]);
    let (_, all) = ts.get("/v1/orbs/r3/commands?tenant_id=acme").await;
    assert_eq!(all["commands"].as_array().unwrap().len(), 1, "nothing created twice");

    // The key survives a restart.
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    let (s5, e) = create(&ts, "r3", body).await;
    assert_eq!((s5, &e["command_id"]), (200, &a["command_id"]));
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_precisely_and_create_nothing() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "r5").await;
    let cases = [
        (json!({"command_type": "a b"}), 400, "invalid_argument"),
        (json!({"command_type": "x", "payload": "y".repeat(20_000)}), 413, "payload_too_large"),
        (json!({"command_type": "x", "expiry_ts": 5}), 400, "invalid_argument"),
        (json!({"command_type": "x", "timeout_s": 0}), 400, "invalid_argument"),
        (json!({"command_type": "x", "colour": 1}), 400, "invalid_argument"),
        (json!({"payload": 1}), 400, "invalid_argument"),
    ];
    for (body, status, code) in cases {
        let (s, b) = create(&ts, "r5", body.clone()).await;
        assert_eq!((s, b["code"].as_str()), (status, Some(code)), "{body}");
    }
    let (s, _) = create(&ts, "nobody", json!({"command_type": "x"})).await;
    assert_eq!(s, 404);
    let (s, _) =
        http("POST", &ts.url("/v1/orbs/r5/commands?tenant_id=globex"), Some(ADMIN), Some(json!({"command_type": "x"})))
            .await;
    assert_eq!(s, 404, "another tenant's id is not found");
    let (s, _) =
        http("POST", &ts.url("/v1/orbs/r5/commands?tenant_id=acme"), None, Some(json!({"command_type": "x"}))).await;
    assert_eq!(s, 401);
    let (_, all) = ts.get("/v1/orbs/r5/commands?tenant_id=acme").await;
    assert_eq!(all["commands"].as_array().unwrap().len(), 0);
    let (s, b) = ts.get("/v1/orbs/r5/commands?tenant_id=acme&status=bogus").await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_argument")));
    let (s, _) = ts.get("/v1/orbs/r5/commands/cmd-1-000000000000?tenant_id=acme").await;
    assert_eq!(s, 404);

    // The per-orb queue is bounded: the 1,001st pending command is refused with 429.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..orbmanager::limits::COMMANDS_PENDING_MAX {
        let url = ts.url("/v1/orbs/r5/commands?tenant_id=acme");
        set.spawn(async move {
            http("POST", &url, Some(ADMIN), Some(json!({"command_type": "fill", "payload": i}))).await.0
        });
        if set.len() >= 32 {
            assert_eq!(set.join_next().await.unwrap().unwrap(), 201);
        }
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), 201);
    }
    let (s, b) = create(&ts, "r5", json!({"command_type": "one_more"})).await;
    assert_eq!((s, b["code"].as_str()), (429, Some("overloaded")), "{b}");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_fallback_pulls_and_acknowledges() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "h1").await;
    let (_, a) = create(&ts, "h1", json!({"command_type": "a"})).await;
    let (_, b) = create(&ts, "h1", json!({"command_type": "b", "timeout_s": 1})).await;
    let auth = basic_auth("acme/h1", &token);
    let (s, pulled) = http_raw("GET", &ts.url("/v1/orbs/h1/commands?status=pending"), Some(&auth), None).await;
    assert_eq!(s, 200, "{pulled}");
    let got: Vec<&str> =
        pulled["commands"].as_array().unwrap().iter().map(|c| c["command_id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![a["command_id"].as_str().unwrap(), b["command_id"].as_str().unwrap()]);
    assert!(pulled["commands"].as_array().unwrap().iter().all(|c| c["status"] == "sent"));

    let ack_url = |id: &str| ts.url(&format!("/v1/orbs/h1/commands/{id}/ack"));
    let a_id = a["command_id"].as_str().unwrap();
    let b_id = b["command_id"].as_str().unwrap();
    let (s, _) = http_raw("POST", &ack_url(a_id), Some(&auth), Some(br#"{"status":"succeeded"}"#.to_vec())).await;
    assert_eq!(s, 200);
    let (s, _) = http_raw("POST", &ack_url(a_id), Some(&auth), Some(br#"{"status":"failed"}"#.to_vec())).await;
    assert_eq!(s, 200, "a late ack is harmless");
    assert_eq!(command(&ts, "h1", a_id).await["status"], "succeeded");
    let (s, e) = http_raw("POST", &ack_url(b_id), Some(&auth), Some(br#"{"status":"expired"}"#.to_vec())).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")));
    let (s, _) =
        http_raw("POST", &ack_url("cmd-99-000000000000"), Some(&auth), Some(br#"{"status":"succeeded"}"#.to_vec()))
            .await;
    assert_eq!(s, 404);
    let operator_url = ts.url(&format!("/v1/orbs/h1/commands/{b_id}/ack?tenant_id=acme"));
    let (s, _) = http("POST", &operator_url, Some(ADMIN), Some(json!({"status": "succeeded"}))).await;
    assert_eq!(s, 403, "operators do not acknowledge for devices");

    // In progress, then no result within timeout_s: timed out.
    let (s, _) = http_raw("POST", &ack_url(b_id), Some(&auth), Some(br#"{"status":"in_progress"}"#.to_vec())).await;
    assert_eq!(s, 200);
    let timed_out = wait_status(&ts, "h1", b_id, "timed_out").await;
    assert_eq!(statuses(&timed_out), ["queued", "sent", "in_progress", "timed_out"]);
    let (s, _) = http_raw("POST", &ack_url(b_id), Some(&auth), Some(br#"{"status":"succeeded"}"#.to_vec())).await;
    assert_eq!(s, 200);
    assert_eq!(command(&ts, "h1", b_id).await["status"], "timed_out", "terminal states are final");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_supersede() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "c1").await;
    let (_, a) = create(&ts, "c1", json!({"command_type": "setpoint", "payload": 1})).await;
    let (_, b) = create(&ts, "c1", json!({"command_type": "setpoint", "payload": 2, "supersede": true})).await;
    assert_eq!(command(&ts, "c1", a["command_id"].as_str().unwrap()).await["status"], "superseded");
    let url = ts.url(&format!("/v1/orbs/c1/commands/{}/cancel?tenant_id=acme", b["command_id"].as_str().unwrap()));
    let (s, c) = http("POST", &url, Some(ADMIN), None).await;
    assert_eq!((s, c["status"].as_str()), (200, Some("canceled")));
    let (s, c) = http("POST", &url, Some(ADMIN), None).await;
    assert_eq!((s, c["code"].as_str()), (409, Some("already_exists")), "a terminal command cannot be canceled");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_fires_after_a_restart_without_any_traffic() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "e1").await;
    let (_, c) = create(&ts, "e1", json!({"command_type": "late", "expiry_ts": now_ms() + 2_000})).await;
    let id = c["command_id"].as_str().unwrap().to_string();
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let done = wait_status(&ts, "e1", &id, "expired").await;
    let fired_at = done["history"][1]["at_ms"].as_u64().unwrap();
    let expiry = done["expiry_ts"].as_u64().unwrap();
    assert!(fired_at >= expiry, "never early");
    ts.stop().await;
}
