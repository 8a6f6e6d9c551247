//! A node holds far more registered orbs than live actors: actors exist only for orbs in use,
//! and idle offline ones are passivated.

mod common;

use common::{TestServer, V3, now_ms, telemetry};
use orbmanager::metrics::Metrics;
use orbmanager::model::orb::OrbRecord;
use orbmanager::model::{OrbId, OrbKey, TenantId};
use orbmanager::storage::{Store, StoreOptions};

const REGISTERED: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_orbs_in_use_have_live_actors_and_idle_ones_passivate() {
    let dir = tempfile::tempdir().unwrap();
    // Register 100,000 orbs straight into the store, as a bulk import would.
    let token = "omd_shared-token-for-the-bulk-import";
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path, &StoreOptions::default(), std::sync::Arc::new(Metrics::default())).unwrap();
        let tenant = TenantId::parse("fleet").unwrap();
        let records: Vec<OrbRecord> = (0..REGISTERED)
            .map(|i| {
                OrbRecord::provisioned(
                    OrbKey::new(tenant.clone(), OrbId::parse(&format!("orb-{i:06}")).unwrap()),
                    Some(orbmanager::auth::hash_token(token.as_bytes())),
                    1,
                )
            })
            .collect();
        store.import_orbs(&records).unwrap();
        assert_eq!(store.orb_count().unwrap(), REGISTERED);
        store.close();
    })
    .await
    .unwrap();

    let ts = TestServer::start_in(dir, false, |c| c.actors.idle_passivate_s = 1).await;
    assert_eq!(ts.metric("orbmanager_live_actors").await, 0.0, "nothing is activated at start");
    // The telemetry keyspace's backlog is read at each scrape: nothing flushed yet.
    for gauge in ["l0_tables", "l0_runs", "sealed_memtables", "blob_files", "blob_stale_bytes"] {
        assert_eq!(ts.metric(&format!("orbmanager_storage_telemetry_{gauge}")).await, 0.0, "{gauge}");
    }

    let mut clients = Vec::new();
    for i in [7usize, 4242, 99_999] {
        let orb = format!("orb-{i:06}");
        let mut c =
            V3::connect(ts.mqtt, &orb, Some((&format!("fleet/{orb}"), token))).await.expect("registered orb connects");
        c.publish(&format!("telemetry/fleet/{orb}"), telemetry(now_ms(), "m1", 60.0)).await.unwrap();
        clients.push(c);
    }
    assert_eq!(ts.metric("orbmanager_live_actors").await, 3.0);
    assert_eq!(ts.server().fleet().live_count().await, 3);

    // Reading an orb that is not live does not activate it.
    let (status, view) = ts.get("/v1/orbs/orb-000123?tenant_id=fleet").await;
    assert_eq!(status, 200);
    assert_eq!(view["status"], "provisioned");
    assert_eq!(ts.metric("orbmanager_live_actors").await, 3.0);

    // Connected orbs are never passivated; once they leave and stay idle, their actors go.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    assert_eq!(ts.metric("orbmanager_live_actors").await, 3.0, "online orbs stay live");
    for c in clients {
        c.disconnect().await;
    }
    common::wait_until("idle actors passivated", 15, || async { ts.metric("orbmanager_live_actors").await == 0.0 })
        .await;
    assert_eq!(ts.metric("orbmanager_actor_passivations_total").await, 3.0);

    // A passivated orb comes back with its state from the store.
    let (_, view) = ts.get("/v1/orbs/orb-004242?tenant_id=fleet").await;
    assert_eq!(view["battery"], 60.0);
    assert_eq!(view["status"], "active");
    assert_eq!(view["connectivity"]["disconnect_reason"], "client_disconnect");
    ts.stop().await;
}
