//! A panicking orb actor is restarted by its shard from durable state; its neighbours do not
//! notice.

mod common;

use common::{TestServer, V3, now_ms, telemetry};
use orbmanager::model::OrbKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_orb_actor_restarts_with_its_state_intact() {
    let ts = TestServer::start(false).await;
    let t1 = ts.register("acme", "victim").await;
    let t2 = ts.register("acme", "neighbour").await;
    let mut victim = V3::connect(ts.mqtt, "victim", Some(("acme/victim", &t1))).await.unwrap();
    let mut neighbour = V3::connect(ts.mqtt, "neighbour", Some(("acme/neighbour", &t2))).await.unwrap();
    let t0 = now_ms() - 5_000;
    victim.publish("telemetry/acme/victim", telemetry(t0, "v-1", 42.0)).await.unwrap();
    victim.publish("state/acme/victim", br#"{"firmware":"9.9.9"}"#.to_vec()).await.unwrap();
    neighbour.publish("telemetry/acme/neighbour", telemetry(t0, "n-1", 77.0)).await.unwrap();
    let (_, before) = ts.get("/v1/orbs/victim?tenant_id=acme").await;

    ts.server().fleet().inject_panic(&OrbKey::parse_path("acme/victim").unwrap());
    common::wait_until("the shard restarts the actor", 15, || async {
        ts.metric("orbmanager_actor_restarts_total").await == 1.0
    })
    .await;

    let (_, after) = ts.get("/v1/orbs/victim?tenant_id=acme").await;
    for field in ["battery", "telemetry", "reported", "status", "position", "mode"] {
        assert_eq!(after[field], before[field], "{field} survives the restart");
    }
    assert_eq!(after["reported"]["versions"]["firmware"], "9.9.9");
    assert_eq!(after["connectivity"]["online"], true, "the live connection is still known");
    assert_eq!(after["connectivity"]["conn_seq"], before["connectivity"]["conn_seq"]);

    // The victim keeps working on the same connection; the neighbour never noticed.
    victim.publish("telemetry/acme/victim", telemetry(t0 + 1, "v-2", 41.0)).await.expect("victim still served");
    neighbour.publish("telemetry/acme/neighbour", telemetry(t0 + 1, "n-2", 76.0)).await.expect("neighbour unaffected");
    common::wait_until("new point applied after restart", 15, || async {
        ts.get("/v1/orbs/victim?tenant_id=acme").await.1["battery"] == 41.0
    })
    .await;
    assert_eq!(ts.metric("orbmanager_actor_restarts_total").await, 1.0);
    assert_eq!(ts.metric("orbmanager_live_actors").await, 2.0);
    victim.disconnect().await;
    neighbour.disconnect().await;
    ts.stop().await;
}

/// A connection that gave up waiting for its orb's actor (its call timed out under load and
/// it dropped the channel the actor would close it through) is not admitted later: the orb
/// does not stay online with a connection nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_whose_caller_gave_up_is_not_admitted() {
    use orbmanager::error::ErrorCode;
    use orbmanager::model::orb::{ConnectRequest, Credential};
    use orbmanager::model::{OrbId, TenantId};

    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "late").await;
    let key = OrbKey::new(TenantId::parse("acme").unwrap(), OrbId::parse("late").unwrap());
    let request = || ConnectRequest {
        credential: Credential::Token(token.as_bytes().to_vec()),
        protocol: 4,
        client_id: "late".into(),
        dev: false,
    };
    let (kick, gone) = tokio::sync::oneshot::channel();
    drop(gone);
    assert_eq!(ts.server().fleet().connect(&key, request(), kick).await, Err(ErrorCode::Unavailable));
    let (_, view) = ts.get("/v1/orbs/late?tenant_id=acme").await;
    assert_eq!(view["connectivity"]["online"], false, "{view}");

    // The same request from a caller that is still there is admitted.
    let (kick, _held) = tokio::sync::oneshot::channel();
    assert!(ts.server().fleet().connect(&key, request(), kick).await.is_ok());
    let (_, view) = ts.get("/v1/orbs/late?tenant_id=acme").await;
    assert_eq!(view["connectivity"]["online"], true, "{view}");
    ts.stop().await;
}
