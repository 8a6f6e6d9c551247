//! `--dev`: anonymous clients (stock tools such as mosquitto_pub) publish into tenant
//! `default`, orbs register on first contact, anonymous API calls act in `default` only.
//! Without `--dev` none of that is possible.

mod common;

use common::{TestServer, V3, history, http, now_ms, telemetry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_publish_into_the_dev_tenant() {
    let ts = TestServer::start(true).await;
    // Like mosquitto_pub: random client id, no credentials, the orb named by the topic.
    let mut c = V3::connect(ts.mqtt, "mosq-7f3a9", None).await.expect("anonymous client admitted");
    c.publish("telemetry/default/robot-1", telemetry(now_ms(), "r1", 88.0)).await.unwrap();
    c.publish("telemetry/default/robot-2", br#"{"battery": 12}"#.to_vec()).await.unwrap();
    c.publish("some/other/topic", b"anything".to_vec()).await.expect("dev policy allows any topic");

    let (status, view) = http("GET", &ts.url("/v1/orbs/robot-1"), None, None).await;
    assert_eq!(status, 200, "anonymous API call acts in tenant default");
    assert_eq!(view["auto_registered"], true);
    assert_eq!(view["battery"], 88.0);
    assert_eq!(history(&ts, "default", "robot-2").await.len(), 1);

    // The dev tenant is the only open one.
    let (status, _) = http("GET", &ts.url("/v1/orbs/robot-1?tenant_id=acme"), None, None).await;
    assert_eq!(status, 401);
    c.publish("telemetry/acme/robot-1", telemetry(now_ms(), "x", 1.0)).await.expect_err("other tenants stay closed");

    // Identified dev clients get presence.
    let d = V3::connect(ts.mqtt, "robot-3", Some(("default/robot-3", ""))).await.expect("dev orb without token");
    let (_, view) = http("GET", &ts.url("/v1/orbs/robot-3"), None, None).await;
    assert_eq!(view["connectivity"]["online"], true);
    d.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dev_nothing_is_open_and_nothing_registers_itself() {
    let ts = TestServer::start(false).await;
    assert!(V3::connect(ts.mqtt, "anon", None).await.is_err());
    assert!(V3::connect(ts.mqtt, "x", Some(("default/robot-1", "t"))).await.is_err());
    let (status, body) = http("GET", &ts.url("/v1/orbs/robot-1"), None, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthenticated")));
    let (status, _) = ts.get("/v1/orbs/robot-1?tenant_id=default").await;
    assert_eq!(status, 404, "no auto-registration outside --dev");
    ts.stop().await;
}
