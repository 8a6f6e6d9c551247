//! The server as a child process: `kill -9` after PUBACKs loses nothing acknowledged, and
//! SIGTERM drains, exits 0 and keeps everything.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{ADMIN, Proc, V3, http, now_ms, telemetry};
use serde_json::Value;

const ORBS: usize = 6;

async fn register(p: &Proc, orb: &str) -> String {
    common::ensure_tenant(&p.http, "acme").await;
    let (status, body) = http(
        "POST",
        &format!("{}/v1/orbs/register", p.http),
        Some(ADMIN),
        Some(serde_json::json!({"tenant_id": "acme", "orb_id": orb})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["device_token"].as_str().unwrap().to_string()
}

async fn register_all(p: &Proc) -> Vec<String> {
    let mut tokens = Vec::new();
    for i in 0..ORBS {
        tokens.push(register(p, &format!("orb-{i}")).await);
    }
    tokens
}

async fn history_ids(p: &Proc, orb: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/orbs/{orb}/telemetry?tenant_id=acme&limit=1000", p.http);
        if let Some(t) = &token {
            url += &format!("&page_token={t}");
        }
        let (status, body) = http("GET", &url, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{body}");
        ids.extend(body["points"].as_array().unwrap().iter().map(|v| v["msg_id"].as_str().unwrap().to_string()));
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => return ids,
        }
    }
}

/// Publishers that each wait for their PUBACK before the next message, so the set of
/// acknowledged msg_ids is exact. Runs until `stop`; returns the acknowledged ids per orb.
fn start_publishers(p: &Proc, tokens: &[String], stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..ORBS)
        .map(|i| {
            let (addr, token, stop) = (p.mqtt, tokens[i].clone(), stop.clone());
            tokio::spawn(async move {
                let orb = format!("orb-{i}");
                let mut acked = Vec::new();
                let Ok(mut c) = V3::connect(addr, &orb, Some((&format!("acme/{orb}"), &token))).await else {
                    return acked;
                };
                let base = now_ms();
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("{orb}-{n}");
                    match c.publish(&format!("telemetry/acme/{orb}"), telemetry(base + n, &id, 50.0)).await {
                        Ok(()) => acked.push(id),
                        Err(_) => break, // the server died mid-flight: this one was not acknowledged
                    }
                }
                acked
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_pubacks_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::serve(dir.path(), &[]).await;
    let tokens = register_all(&p).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publishers = start_publishers(&p, &tokens, stop.clone());
    // Kill while every publisher is mid-stream, after a good number of acknowledgements.
    let metrics = format!("{}/metrics", p.http);
    common::wait_until("400 points acknowledged", 60, || {
        let m = metrics.clone();
        async move { common::metric(m.trim_end_matches("/metrics"), "orbmanager_telemetry_stored_total").await >= 400.0 }
    })
    .await;
    p.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<Vec<String>> = Vec::new();
    for h in publishers {
        acked.push(h.await.unwrap());
    }
    assert!(acked.iter().map(Vec::len).sum::<usize>() >= 400);

    let p2 = Proc::serve(dir.path(), &[]).await;
    for (i, ids) in acked.iter().enumerate() {
        let stored = history_ids(&p2, &format!("orb-{i}")).await;
        let mut unique = stored.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), stored.len(), "orb-{i}: no point stored twice");
        for id in ids {
            assert!(stored.contains(id), "orb-{i}: acknowledged {id} lost after kill -9");
        }
        // At most the one in-flight message per publisher may be stored without an ack.
        assert!(stored.len() <= ids.len() + 1, "orb-{i}: {} stored vs {} acked", stored.len(), ids.len());
    }
    // The orbs' presence from the killed process is not shown as online.
    let (_, view) = http("GET", &format!("{}/v1/orbs/orb-0?tenant_id=acme", p2.http), Some(ADMIN), None).await;
    assert_eq!(view["connectivity"]["online"], Value::Bool(false), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_exits_zero_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::serve(dir.path(), &[]).await;
    let tokens = register_all(&p).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publishers = start_publishers(&p, &tokens, stop.clone());
    let base = p.http.clone();
    common::wait_until("200 points acknowledged", 60, || {
        let b = base.clone();
        async move { common::metric(&b, "orbmanager_telemetry_stored_total").await >= 200.0 }
    })
    .await;
    let status = p.terminate().await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for h in publishers {
        acked.push(h.await.unwrap());
    }

    let p2 = Proc::serve(dir.path(), &[]).await;
    for (i, ids) in acked.iter().enumerate() {
        let stored = history_ids(&p2, &format!("orb-{i}")).await;
        for id in ids {
            assert!(stored.contains(id), "orb-{i}: acknowledged {id} lost after SIGTERM");
        }
    }
    let (_, view) = http("GET", &format!("{}/v1/orbs/orb-0?tenant_id=acme", p2.http), Some(ADMIN), None).await;
    assert_eq!(view["connectivity"]["online"], Value::Bool(false));
    assert_eq!(view["connectivity"]["disconnect_reason"], "server_shutdown", "{view}");
}
