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
