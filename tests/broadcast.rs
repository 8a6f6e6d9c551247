//! Broadcasts: a command fanned out as per-orb commands tracked individually, at a bounded
//! rate, with a live summary; aborted past a failure threshold; canceled; resumed after a
//! restart without creating any orb's command twice.

mod common;

use std::time::Duration;

use common::{ADMIN, TestServer, V3, http, wait_until};
use serde_json::{Value, json};

async fn start(ts: &TestServer, body: Value) -> (u16, Value) {
    http("POST", &ts.url("/v1/commands/broadcasts?tenant_id=acme"), Some(ADMIN), Some(body)).await
}

async fn summary(ts: &TestServer, id: &str) -> Value {
    let (s, b) = ts.get(&format!("/v1/commands/broadcasts/{id}?tenant_id=acme")).await;
    assert_eq!(s, 200, "{b}");
    b
}

/// A device that answers every command with `status`.
fn device(addr: std::net::SocketAddr, orb: String, token: String, status: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = V3::connect(addr, &orb, Some((&format!("acme/{orb}"), &token))).await.unwrap();
        let topic = format!("commands/acme/{orb}");
        let mut early = c.subscribe(&topic).await;
        loop {
            let (_, payload) = match early.pop() {
                Some(p) => p,
                None => match c.next_publish(30).await {
                    Some(p) => p,
                    None => return,
                },
            };
            let v: Value = serde_json::from_slice(&payload).unwrap();
            let ack = json!({"command_id": v["command_id"], "status": status}).to_string().into_bytes();
            if c.publish(&format!("{topic}/ack"), ack).await.is_err() {
                return;
            }
        }
    })
}

async fn register_many(ts: &TestServer, n: usize, prefix: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    for i in 0..n {
        tokens.push(ts.register("acme", &format!("{prefix}{i}")).await);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_tracks_every_orb_and_reaches_offline_ones_later() {
    let ts = TestServer::start(false).await;
    let tokens = register_many(&ts, 30, "b").await;
    let devices: Vec<_> = (0..5).map(|i| device(ts.mqtt, format!("b{i}"), tokens[i].clone(), "succeeded")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    ids.push("ghost".into());
    let (s, b) =
        start(&ts, json!({"command_type": "update", "payload": {"v": 2}, "orb_ids": ids, "rate_per_s": 1000})).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["total"], 31);
    let id = b["broadcast_id"].as_str().unwrap().to_string();
    wait_until("fan-out complete and online orbs done", 15, || async {
        let s = summary(&ts, &id).await;
        s["status"] == "completed" && s["counts"]["succeeded"] == 5 && s["counts"]["queued"] == 25
    })
    .await;
    let s = summary(&ts, &id).await;
    assert_eq!(s["fanned_out"], 31);
    assert_eq!(s["create_errors"], 1, "the unknown orb is reported, not fatal: {s}");
    assert!(s["last_create_error"].as_str().unwrap().contains("ghost"));

    // Each orb has its own tracked command, tagged with the broadcast.
    let (_, list) = ts.get("/v1/orbs/b17/commands?tenant_id=acme").await;
    let cmds = list["commands"].as_array().unwrap();
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0]["broadcast_id"], id.as_str());

    // An offline orb comes online and gets it; the summary follows live.
    let late = device(ts.mqtt, "b17".into(), tokens[17].clone(), "succeeded");
    wait_until("late orb counted", 15, || async { summary(&ts, &id).await["counts"]["succeeded"] == 6 }).await;
    for d in devices {
        d.abort();
    }
    late.abort();
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_abort_and_undelivered_commands_are_canceled() {
    let ts = TestServer::start(false).await;
    let tokens = register_many(&ts, 40, "f").await;
    let devices: Vec<_> = (0..10).map(|i| device(ts.mqtt, format!("f{i}"), tokens[i].clone(), "failed")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Online (failing) and offline orbs interleaved, so some offline ones are fanned out
    // before the abort.
    let ids: Vec<String> = (0..10)
        .flat_map(|i| [format!("f{}", 10 + i), format!("f{i}")])
        .chain((20..40).map(|i| format!("f{i}")))
        .collect();
    let (s, b) = start(
        &ts,
        json!({"command_type": "update", "orb_ids": ids, "rate_per_s": 10, "abort": {"failure_pct": 50, "min_samples": 5}}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let id = b["broadcast_id"].as_str().unwrap().to_string();
    wait_until("aborted", 20, || async { summary(&ts, &id).await["status"] == "aborted" }).await;
    let s = summary(&ts, &id).await;
    assert!(s["reason"].as_str().unwrap().contains("failed"), "{s}");
    let fanned = s["fanned_out"].as_u64().unwrap();
    assert!(fanned < 40, "fan-out stopped early: {fanned}");
    // Offline orbs' commands end canceled; none is left queued.
    wait_until("undelivered canceled", 15, || async {
        let s = summary(&ts, &id).await;
        s["counts"]["queued"] == 0 && s["counts"]["canceled"].as_u64().unwrap() > 0
    })
    .await;
    let s = summary(&ts, &id).await;
    let total: u64 = s["counts"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, s["fanned_out"].as_u64().unwrap(), "every fanned-out orb is counted once: {s}");
    let (s2, _) =
        http("POST", &ts.url(&format!("/v1/commands/broadcasts/{id}/cancel?tenant_id=acme")), Some(ADMIN), None).await;
    assert_eq!(s2, 409, "an aborted broadcast cannot be canceled");
    for d in devices {
        d.abort();
    }
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_resumes_after_a_restart_without_duplicates_and_can_be_canceled() {
    let ts = TestServer::start(false).await;
    register_many(&ts, 120, "r").await;
    let (s, b) = start(&ts, json!({"command_type": "sync", "all_orbs": true, "rate_per_s": 40})).await;
    assert_eq!((s, b["total"].as_u64()), (201, Some(120)), "{b}");
    let id = b["broadcast_id"].as_str().unwrap().to_string();
    wait_until("some fan-out", 15, || async { summary(&ts, &id).await["fanned_out"].as_u64().unwrap() >= 20 }).await;
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    wait_until("completed after restart", 30, || async { summary(&ts, &id).await["status"] == "completed" }).await;
    let s = summary(&ts, &id).await;
    assert_eq!((s["fanned_out"].as_u64(), s["counts"]["queued"].as_u64()), (Some(120), Some(120)), "{s}");
    for i in [0, 37, 119] {
        let (_, list) = ts.get(&format!("/v1/orbs/r{i}/commands?tenant_id=acme")).await;
        assert_eq!(list["commands"].as_array().unwrap().len(), 1, "r{i}: exactly one command");
    }

    // A second, slow broadcast is canceled midway: fan-out stops, what went out is canceled.
    let (_, b2) = start(&ts, json!({"command_type": "sync2", "all_orbs": true, "rate_per_s": 20})).await;
    let id2 = b2["broadcast_id"].as_str().unwrap().to_string();
    wait_until("some fan-out", 15, || async { summary(&ts, &id2).await["fanned_out"].as_u64().unwrap() >= 4 }).await;
    let (s, c) =
        http("POST", &ts.url(&format!("/v1/commands/broadcasts/{id2}/cancel?tenant_id=acme")), Some(ADMIN), None).await;
    assert_eq!((s, c["status"].as_str()), (200, Some("canceled")));
    wait_until("all canceled", 15, || async {
        let s = summary(&ts, &id2).await;
        s["counts"]["canceled"] == s["fanned_out"] && s["counts"]["queued"] == 0
    })
    .await;
    assert!(summary(&ts, &id2).await["fanned_out"].as_u64().unwrap() < 120);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_broadcasts_are_refused() {
    let ts = TestServer::start(false).await;
    for (body, code) in [
        (json!({"command_type": "x"}), "invalid_argument"),
        (json!({"command_type": "x", "all_orbs": true, "orb_ids": ["a"]}), "invalid_argument"),
        (json!({"command_type": "x", "orb_ids": []}), "invalid_argument"),
        (json!({"command_type": "x", "orb_ids": ["a", "a"]}), "invalid_argument"),
        (json!({"command_type": "x", "all_orbs": true, "rate_per_s": 0}), "invalid_argument"),
        (
            json!({"command_type": "x", "all_orbs": true, "abort": {"failure_pct": 0, "min_samples": 1}}),
            "invalid_argument",
        ),
        (json!({"command_type": "bad type", "all_orbs": true}), "invalid_argument"),
    ] {
        let (s, b) = start(&ts, body.clone()).await;
        assert_eq!((s, b["code"].as_str()), (400, Some(code)), "{body}");
    }
    let (s, _) = ts.get("/v1/commands/broadcasts/bc-nope?tenant_id=acme").await;
    assert_eq!(s, 404);
    let (s, _) = http(
        "POST",
        &ts.url("/v1/commands/broadcasts?tenant_id=acme"),
        None,
        Some(json!({"command_type": "x", "all_orbs": true})),
    )
    .await;
    assert_eq!(s, 401);
    ts.stop().await;
}
