//! The fleet simulator against a real dev server: one connection per orb, and the same fleet
//! through edge gateways. Every sent message is acknowledged and lands in the orbs' history.

mod common;

use std::collections::HashMap;

use common::TestServer;
use orbmanager::sim::{self, SimConfig, Workload};

fn config(ts: &TestServer, orbs: usize, gateway_children: usize, prefix: &str) -> SimConfig {
    SimConfig {
        addr: ts.mqtt.to_string(),
        orbs,
        interval_ms: 200,
        qos: 1,
        duration_s: 2,
        tenant: "default".into(),
        prefix: prefix.into(),
        protocol: 5,
        connect_rate: 1_000,
        tokens: HashMap::new(),
        anonymous: false,
        workload: Workload::Synthetic { payload_bytes: 256 },
        inflight_max: 16,
        stream: None,
        webhook: None,
        gateway_children,
        state_every: 0,
        commands_per_s: 0.0,
        api: None,
        warmup_s: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_drives_orbs_directly_and_through_gateways() {
    let ts = TestServer::start(true).await;
    let direct = sim::run(config(&ts, 20, 0, "d-"), None).await;
    assert_eq!((direct.connected, direct.connect_failures), (20, 0), "{}", direct.table());
    assert!(direct.sent >= 100 && direct.acked == direct.sent, "{}", direct.table());
    assert_eq!((direct.refused, direct.errors, direct.unacked), (0, 0, 0), "{}", direct.table());

    let gw = sim::run(config(&ts, 60, 25, "g-"), None).await;
    assert_eq!((gw.connected, gw.connect_failures), (60, 0), "{}", gw.table());
    assert!(gw.sent >= 300 && gw.acked == gw.sent, "{}", gw.table());
    assert_eq!((gw.refused, gw.errors, gw.unacked), (0, 0, 0), "{}", gw.table());
    // The last child belongs to the third gateway, registered under it on first contact.
    let (code, orb) = ts.get("/v1/orbs/g-00059?tenant_id=default").await;
    assert_eq!(code, 200, "{orb}");
    assert_eq!(orb["attributes"]["gateway"], "g-gw0002");
    let points = common::history(&ts, "default", "g-00059").await;
    assert!(points.len() >= 5, "{} points", points.len());
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_leave_out_the_warm_up_and_counts_do_not() {
    let ts = TestServer::start(true).await;
    let mut cfg = config(&ts, 20, 0, "w-");
    cfg.duration_s = 3;
    cfg.warmup_s = 1;
    cfg.stream = Some((ts.http.trim_start_matches("http://").to_string(), None));
    let s = sim::run(cfg, None).await;
    // Every orb's first intended send falls in [0, 200 ms) of publishing, so exactly five of
    // its fifteen messages are intended inside the 1-s warm-up.
    assert_eq!((s.scheduled, s.sent, s.acked), (300, 300, 300), "{}", s.table());
    assert_eq!(s.warmup_s, 1);
    assert_eq!(s.puback_latency_ms.samples, 300 - 20 * 5, "{}", s.table());
    let stream = s.stream_latency_ms.as_ref().expect("the stream was measured");
    // Stream samples are picked by device timestamp, set when a message is built, at or just
    // after its intended time: at most the 200 later ones, plus per orb the warm-up's last
    // message if it was built after the warm-up ended.
    assert!(stream.samples > 0 && stream.samples <= 200 + 20, "{}", s.table());
    assert!(s.table().contains("latencies after a 1 s warm-up"), "{}", s.table());
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_mixes_state_reports_and_acknowledged_commands() {
    let ts = TestServer::start(true).await;
    let mut cfg = config(&ts, 10, 0, "c-");
    cfg.duration_s = 3;
    cfg.state_every = 4;
    cfg.commands_per_s = 20.0;
    cfg.api = Some((ts.grpc.to_string(), None));
    let s = sim::run(cfg, None).await;
    assert_eq!((s.connected, s.refused, s.errors, s.unacked), (10, 0, 0, 0), "{}", s.table());
    assert!(s.acked == s.sent && s.sent >= 100, "{}", s.table());
    // Every 4th message of each orb is a state report.
    assert!(s.state_reports * 4 <= s.sent && s.state_reports * 4 + 40 >= s.sent, "{}", s.table());
    let c = s.commands.clone().expect("command summary");
    assert!(c.created >= 30 && c.create_failures == 0, "{}", s.table());
    assert_eq!((c.delivered, c.acked), (c.created, c.created), "{}", s.table());
    assert_eq!(c.round_trip_ms.samples, c.acked);
    assert!(c.delivery_ms.p50 <= c.round_trip_ms.p50, "{}", s.table());

    // The server saw the same: state reports applied, every command succeeded.
    let (_, orb) = ts.get("/v1/orbs/c-00003?tenant_id=default").await;
    assert_eq!(orb["reported"]["versions"]["firmware"], "sim-1.0", "{orb}");
    let mut done = 0;
    for i in 0..10 {
        let (_, pending) = ts.get(&format!("/v1/orbs/c-{i:05}/commands?tenant_id=default&status=pending")).await;
        assert_eq!(pending["commands"].as_array().map(Vec::len), Some(0), "{pending}");
        let (_, all) = ts.get(&format!("/v1/orbs/c-{i:05}/commands?tenant_id=default")).await;
        done += all["commands"].as_array().unwrap().iter().filter(|c| c["status"] == "succeeded").count() as u64;
    }
    assert_eq!(done, c.created);
    ts.stop().await;
}

/// The demo runs the simulator without an end and stops it on Ctrl-C: every part of a run,
/// the command creator included, ends when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_an_end_stops_when_told_to() {
    let ts = TestServer::start(true).await;
    let mut cfg = config(&ts, 5, 0, "s-");
    cfg.duration_s = 3_600;
    cfg.commands_per_s = 5.0;
    cfg.api = Some((ts.grpc.to_string(), None));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(sim::run(cfg, Some(stopped)));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let s = tokio::time::timeout(std::time::Duration::from_secs(15), run).await.expect("stopped in time").unwrap();
    assert!(s.acked > 0 && s.acked == s.sent, "{}", s.table());
    assert!(s.commands.expect("commands").created > 0);
    ts.stop().await;
}
