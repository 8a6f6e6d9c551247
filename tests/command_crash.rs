//! The command crash test: many orbs get thousands of commands while simulated devices (real
//! MQTT clients that dedupe on `command_id`) execute and acknowledge them, and the server is
//! killed with SIGKILL at random moments and restarted. The checker then asserts that every
//! command that got a 2xx exists and reaches a terminal state (none lost), that no command is
//! executed twice, that each orb executed its commands in sequence order, and that terminal
//! states never changed.
//!
//! CI-sized by default; `OM_CRASH_KILLS=50 OM_CRASH_ORBS=50` for a long run.
//! The seed of the random kill times is printed; `OM_TEST_SEED` replays it.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use common::{ADMIN, Proc, V3, http};
use serde_json::{Value, json};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone)]
struct Endpoints {
    http: String,
    mqtt: std::net::SocketAddr,
}

/// What one simulated device remembers (it survives reconnects, as device memory would).
#[derive(Default)]
struct Device {
    /// command_id -> seq of everything received (redeliveries included).
    received: HashMap<String, u64>,
    /// Executions per command_id (the device dedupes, so every count must be 1).
    executions: HashMap<String, u32>,
    /// Sequence numbers in the order of first execution.
    order: Vec<u64>,
}

async fn run_device(
    orb: String,
    token: String,
    ep: Arc<RwLock<Endpoints>>,
    dev: Arc<Mutex<Device>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let e = ep.read().unwrap().clone();
        let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(3),
            V3::connect(e.mqtt, &orb, Some((&format!("acme/{orb}"), &token))),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let topic = format!("commands/acme/{orb}");
        c.client.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await.expect("queue");
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let ev = tokio::time::timeout(Duration::from_millis(500), c.events.poll()).await;
            let publish = match ev {
                Err(_) => continue,
                Ok(Err(_)) => break, // connection lost: reconnect (the server was killed)
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => p,
                Ok(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_slice(&publish.payload).expect("command JSON");
            let id = v["command_id"].as_str().unwrap().to_string();
            let seq = v["seq"].as_u64().unwrap();
            {
                let mut d = dev.lock().unwrap();
                if let Some(prev) = d.received.insert(id.clone(), seq) {
                    assert_eq!(prev, seq, "{orb}: {id} redelivered with another seq");
                }
                if !d.executions.contains_key(&id) {
                    d.order.push(seq);
                }
                // Dedupe on command_id: a redelivery is acknowledged, not executed again.
                d.executions.entry(id.clone()).or_insert(1);
            }
            let ack = json!({"command_id": id, "status": "succeeded"}).to_string();
            if c.client.publish(format!("{topic}/ack"), rumqttc::QoS::AtLeastOnce, false, ack).await.is_err() {
                break;
            }
        }
    }
}

/// Creates commands with unique idempotency keys until `stop`, retrying each (same key) until
/// it gets a 2xx. Returns (orb, command_id, seq) of every acknowledged creation.
async fn run_creator(
    id: u64,
    orbs: usize,
    ep: Arc<RwLock<Endpoints>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> Vec<(String, String, u64)> {
    let mut accepted = Vec::new();
    let mut rng = fastrand::Rng::with_seed(id);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let orb = format!("orb-{}", rng.usize(0..orbs));
        let body = json!({"command_type": "step", "payload": {"creator": id, "n": n}, "idempotency_key": format!("c{id}-{n}")});
        loop {
            let http_base = ep.read().unwrap().http.clone();
            let url = format!("{http_base}/v1/orbs/{orb}/commands?tenant_id=acme");
            let res = tokio::time::timeout(Duration::from_secs(5), try_post(&url, body.clone())).await;
            match res {
                Ok(Some((201 | 200, c))) => {
                    accepted.push((
                        orb.clone(),
                        c["command_id"].as_str().unwrap().to_string(),
                        c["seq"].as_u64().unwrap(),
                    ));
                    count.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Some((s, c))) if s < 500 && s != 429 => panic!("unexpected {s}: {c}"),
                _ => {
                    if stop.load(Ordering::Relaxed) {
                        return accepted; // never acknowledged: not counted
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        }
        n += 1;
    }
    accepted
}

/// A POST that survives a dead server (connection refused is `None`).
async fn try_post(url: &str, body: Value) -> Option<(u16, Value)> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(4)))
            .build()
            .into();
        let auth = format!("Bearer {ADMIN}");
        let mut r = agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .ok()?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().ok()?;
        Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    })
    .await
    .ok()
    .flatten()
}

async fn all_commands(http_base: &str, orb: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{http_base}/v1/orbs/{orb}/commands?tenant_id=acme&limit=1000");
        if let Some(t) = &token {
            url += &format!("&page_token={t}");
        }
        let (status, body) = http("GET", &url, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{body}");
        out.extend(body["commands"].as_array().unwrap().iter().cloned());
        match body["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_repeated_kill_9() {
    let kills = env("OM_CRASH_KILLS", 10);
    let orbs = env("OM_CRASH_ORBS", 20) as usize;
    let seed = env("OM_TEST_SEED", fastrand::u64(..));
    eprintln!("command crash test: {kills} kills, {orbs} orbs, OM_TEST_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Proc::serve(dir.path(), &[]).await;
    common::ensure_tenant(&proc.http, "acme").await;
    let mut tokens = Vec::new();
    for i in 0..orbs {
        let (s, b) = http(
            "POST",
            &format!("{}/v1/orbs/register", proc.http),
            Some(ADMIN),
            Some(json!({"tenant_id": "acme", "orb_id": format!("orb-{i}")})),
        )
        .await;
        assert_eq!(s, 201);
        tokens.push(b["device_token"].as_str().unwrap().to_string());
    }
    let ep = Arc::new(RwLock::new(Endpoints { http: proc.http.clone(), mqtt: proc.mqtt }));
    let stop_devices = Arc::new(AtomicBool::new(false));
    let stop_creators = Arc::new(AtomicBool::new(false));
    let devices: Vec<Arc<Mutex<Device>>> = (0..orbs).map(|_| Arc::default()).collect();
    let mut device_tasks = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        device_tasks.push(tokio::spawn(run_device(
            format!("orb-{i}"),
            tokens[i].clone(),
            ep.clone(),
            d.clone(),
            stop_devices.clone(),
        )));
    }
    let created = Arc::new(AtomicU64::new(0));
    let creators: Vec<_> = (0..4)
        .map(|i| tokio::spawn(run_creator(i, orbs, ep.clone(), stop_creators.clone(), created.clone())))
        .collect();

    // Terminal states seen between kills, to check they never change afterwards.
    let mut seen_terminal: HashMap<String, String> = HashMap::new();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1_500))).await;
        proc.kill9();
        proc = Proc::serve(dir.path(), &[]).await;
        *ep.write().unwrap() = Endpoints { http: proc.http.clone(), mqtt: proc.mqtt };
        let sample = format!("orb-{}", rng.usize(0..orbs));
        for c in all_commands(&proc.http, &sample).await {
            let status = c["status"].as_str().unwrap().to_string();
            if !matches!(status.as_str(), "queued" | "sent" | "delivered" | "in_progress") {
                seen_terminal.insert(c["command_id"].as_str().unwrap().to_string(), status);
            }
        }
        eprintln!("kill {}: {} commands acknowledged so far", k + 1, created.load(Ordering::Relaxed));
    }
    stop_creators.store(true, Ordering::Relaxed);
    let mut accepted = Vec::new();
    for c in creators {
        accepted.extend(c.await.unwrap());
    }
    let total = accepted.len();
    eprintln!("{kills} kills, {total} commands acknowledged with a 2xx");
    assert!(total >= 500, "the run created too few commands to mean anything: {total}");

    // Settle: every acknowledged command reaches a terminal state (the devices ack them all).
    let by_orb: BTreeMap<String, Vec<(String, u64)>> = accepted.iter().fold(BTreeMap::new(), |mut m, (o, id, seq)| {
        m.entry(o.clone()).or_default().push((id.clone(), *seq));
        m
    });
    let http_base = proc.http.clone();
    common::wait_until("every command terminal", 90, || {
        let (by_orb, http_base) = (by_orb.clone(), http_base.clone());
        async move {
            for orb in by_orb.keys() {
                let cmds = all_commands(&http_base, orb).await;
                if cmds.iter().any(|c| !["succeeded"].contains(&c["status"].as_str().unwrap())) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    stop_devices.store(true, Ordering::Relaxed);
    for t in device_tasks {
        let _ = t.await;
    }

    for (orb, ids) in &by_orb {
        let stored = all_commands(&http_base, orb).await;
        let stored_ids: HashMap<&str, &Value> = stored.iter().map(|c| (c["command_id"].as_str().unwrap(), c)).collect();
        let idx: usize = orb.trim_start_matches("orb-").parse().unwrap();
        let dev = devices[idx].lock().unwrap();
        for (id, seq) in ids {
            let c = stored_ids.get(id.as_str()).unwrap_or_else(|| panic!("{orb}: acknowledged command {id} lost"));
            assert_eq!(c["seq"].as_u64(), Some(*seq));
            let history: Vec<&str> =
                c["history"].as_array().unwrap().iter().map(|t| t["status"].as_str().unwrap()).collect();
            let terminal =
                history.iter().filter(|s| !matches!(**s, "queued" | "sent" | "delivered" | "in_progress")).count();
            assert_eq!(terminal, 1, "{orb}/{id}: exactly one terminal transition, last: {history:?}");
            assert_eq!(history.last(), Some(&"succeeded"));
            assert_eq!(dev.executions.get(id.as_str()), Some(&1), "{orb}/{id} executed once");
        }
        // No command was created twice for one idempotent request.
        let unique: HashSet<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(unique.len(), ids.len(), "{orb}: duplicate acknowledgements of one command");
        assert_eq!(stored.len(), ids.len(), "{orb}: commands nobody asked for");
        // Per-orb delivery order: first executions in strictly increasing sequence order.
        assert!(dev.order.windows(2).all(|w| w[0] < w[1]), "{orb}: executed out of order: {:?}", dev.order);
    }
    for (id, status) in &seen_terminal {
        let seq = orbmanager::model::command::seq_of(id).unwrap();
        let (orb, _) =
            accepted.iter().map(|(o, i, _)| (o, i)).find(|(_, i)| *i == id).expect("sampled commands were accepted");
        let c = all_commands(&http_base, orb).await.into_iter().find(|c| c["seq"].as_u64() == Some(seq)).unwrap();
        assert_eq!(c["status"].as_str(), Some(status.as_str()), "{id}: a terminal state changed");
    }
    eprintln!(
        "checked: {total} commands over {} orbs, {kills} kills, {} terminal states sampled between kills",
        by_orb.len(),
        seen_terminal.len()
    );
}
