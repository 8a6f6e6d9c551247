//! Attributes and inventory: operator tags set and removed (all or nothing, searchable at
//! once, kept across a restart) and the history of reported component versions, over REST and
//! gRPC, with tenant isolation and roles.

mod common;

use common::{ADMIN, TestServer, V5, http};
use orbmanager::net::grpc::pb;
use pb::registry_service_client::RegistryServiceClient;
use serde_json::{Value, json};
use tonic::Request;

async fn api_token(ts: &TestServer, tenant: &str, role: &str) -> String {
    let url = ts.url(&format!("/v1/tenants/{tenant}/tokens"));
    let (s, body) = http("POST", &url, Some(ADMIN), Some(json!({"role": role, "name": "t"}))).await;
    assert_eq!(s, 201, "{body}");
    body["secret"].as_str().unwrap().to_string()
}

async fn state(c: &mut V5, orb: &str, report: Value) {
    let ack = c.publish(&format!("state/acme/{orb}"), report.to_string().into_bytes()).await.unwrap();
    assert_eq!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
}

fn changes(v: &Value) -> Vec<(String, Option<String>, String)> {
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["component"].as_str().unwrap().to_string(),
                c["from"].as_str().map(str::to_string),
                c["to"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ch(c: &str, from: Option<&str>, to: &str) -> (String, Option<String>, String) {
    (c.into(), from.map(str::to_string), to.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_changes_are_kept_as_history_and_paged() {
    let ts = TestServer::start(false).await;
    let device = ts.register("acme", "inv").await;
    let mut c = V5::connect(ts.mqtt, "inv", Some(("acme/inv", &device))).await.unwrap();
    state(&mut c, "inv", json!({"firmware": "1.0", "model": "yolo-6"})).await;
    state(&mut c, "inv", json!({"firmware": "1.1"})).await;
    state(&mut c, "inv", json!({"firmware": "1.1", "model": "yolo-6"})).await; // no change
    state(&mut c, "inv", json!({"components": {"lidar": "4.2"}, "model": "yolo-7"})).await;
    c.disconnect().await;

    let want = vec![
        ch("firmware", None, "1.0"),
        ch("model", None, "yolo-6"),
        ch("firmware", Some("1.0"), "1.1"),
        ch("lidar", None, "4.2"),
        ch("model", Some("yolo-6"), "yolo-7"),
    ];
    let (s, all) = ts.get("/v1/orbs/inv/versions?tenant_id=acme").await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(changes(&all), want);
    assert!(all["next_page_token"].is_null());
    let times: Vec<u64> = all["changes"].as_array().unwrap().iter().map(|c| c["at_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");

    // Pages of two: every change once, in order.
    let (mut paged, mut token) = (Vec::new(), String::new());
    loop {
        let (s, page) = ts.get(&format!("/v1/orbs/inv/versions?tenant_id=acme&page_size=2&page_token={token}")).await;
        assert_eq!(s, 200, "{page}");
        paged.extend(changes(&page));
        match page["next_page_token"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(paged, want);
    let (_, fw) = ts.get("/v1/orbs/inv/versions?tenant_id=acme&component=firmware").await;
    assert_eq!(changes(&fw), vec![ch("firmware", None, "1.0"), ch("firmware", Some("1.0"), "1.1")]);
    let (s, body) = ts.get("/v1/orbs/inv/versions?tenant_id=acme&page_token=zz").await;
    assert_eq!((s, body["code"].as_str()), (400, Some("invalid_argument")), "{body}");
    let (s, body) = ts.get("/v1/orbs/nobody/versions?tenant_id=acme").await;
    assert_eq!((s, body["code"].as_str()), (404, Some("not_found")), "{body}");

    // Another tenant's token sees nothing of it; gRPC answers the same history.
    common::ensure_tenant(&ts.http, "globex").await;
    let globex = api_token(&ts, "globex", "admin").await;
    let (s, _) = http("GET", &ts.url("/v1/orbs/inv/versions?tenant_id=acme"), Some(&globex), None).await;
    assert_eq!(s, 403, "a token never reaches another tenant");
    let (s, _) = http("GET", &ts.url("/v1/orbs/inv/versions"), Some(&globex), None).await;
    assert_eq!(s, 404, "in its own tenant there is no such orb");
    let mut reg = RegistryServiceClient::connect(format!("http://{}", ts.grpc)).await.unwrap();
    let mut req = Request::new(pb::ListVersionChangesRequest {
        tenant_id: "acme".into(),
        orb_id: "inv".into(),
        component: "model".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let r = reg.list_version_changes(req).await.unwrap().into_inner();
    let got: Vec<_> = r.changes.iter().map(|c| (c.component.clone(), c.from.clone(), c.to.clone())).collect();
    assert_eq!(got, vec![ch("model", None, "yolo-6"), ch("model", Some("yolo-6"), "yolo-7")]);

    // History outlives the process.
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    let (_, again) = ts.get("/v1/orbs/inv/versions?tenant_id=acme").await;
    assert_eq!(changes(&again), want);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_are_set_and_removed_all_or_nothing_and_searchable() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "tagged").await;
    ts.register("acme", "other").await;
    let url = ts.url("/v1/orbs/tagged/attributes?tenant_id=acme");
    let op = api_token(&ts, "acme", "operator").await;
    let viewer = api_token(&ts, "acme", "viewer").await;

    let (s, orb) = http("PATCH", &url, Some(&op), Some(json!({"set": {"depot": "sf-3", "team": "a"}}))).await;
    assert_eq!(s, 200, "{orb}");
    assert_eq!(orb["attributes"], json!({"depot": "sf-3", "team": "a"}));
    let (s, orb) =
        http("PATCH", &url, Some(&op), Some(json!({"set": {"depot": "oak-1"}, "remove": ["team", "absent"]}))).await;
    assert_eq!(s, 200, "{orb}");
    assert_eq!(orb["attributes"], json!({"depot": "oak-1"}));

    // Refusals change nothing.
    let refused = [
        (json!({"set": {"depot": "x"}, "remove": ["depot"]}), "both set and removed"),
        (json!({"set": {"": "x"}}), "keys must be"),
        (json!({"set": {"depot": "a\u{0007}b"}}), "control characters"),
        (json!({"set": {"depot": 7}}), ""),
        (json!({"sett": {}}), ""),
    ];
    for (body, why) in refused {
        let (s, err) = http("PATCH", &url, Some(&op), Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {err}");
        assert!(err["detail"].as_str().unwrap_or_default().contains(why), "{body}: {err}");
    }
    let many: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (s, err) = http("PATCH", &url, Some(&op), Some(json!({"set": many}))).await;
    assert_eq!(s, 400, "{err}");
    let (s, _) = http("PATCH", &url, Some(&viewer), Some(json!({"set": {"depot": "v"}}))).await;
    assert_eq!(s, 403, "a viewer reads but does not write");
    common::ensure_tenant(&ts.http, "globex").await;
    let globex = api_token(&ts, "globex", "admin").await;
    let (s, _) = http("PATCH", &url, Some(&globex), Some(json!({"set": {"depot": "g"}}))).await;
    assert_eq!(s, 403, "a token never reaches another tenant");
    let (s, _) =
        http("PATCH", &ts.url("/v1/orbs/tagged/attributes"), Some(&globex), Some(json!({"set": {"depot": "g"}}))).await;
    assert_eq!(s, 404, "in its own tenant there is no such orb");
    let (_, orb) = ts.get("/v1/orbs/tagged?tenant_id=acme").await;
    assert_eq!(orb["attributes"], json!({"depot": "oak-1"}), "{orb}");

    // Searchable at once.
    let q = "attr.depot%20%3D%20%22oak-1%22";
    let (s, found) = http("GET", &ts.url(&format!("/v1/orbs?tenant_id=acme&q={q}")), Some(&op), None).await;
    assert_eq!(s, 200, "{found}");
    let ids: Vec<&str> = found["orbs"].as_array().unwrap().iter().map(|o| o["orb_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tagged"]);

    // gRPC: the same update; then decommissioned orbs take no more tags.
    let mut reg = RegistryServiceClient::connect(format!("http://{}", ts.grpc)).await.unwrap();
    let mut req = Request::new(pb::UpdateAttributesRequest {
        tenant_id: "acme".into(),
        orb_id: "tagged".into(),
        set: [("shift".to_string(), "night".to_string())].into(),
        remove: vec!["depot".into()],
    });
    req.metadata_mut().insert("authorization", format!("Bearer {op}").parse().unwrap());
    let o = reg.update_attributes(req).await.unwrap().into_inner();
    assert_eq!(o.attributes, [("shift".to_string(), "night".to_string())].into());
    let (s, _) = http("POST", &ts.url("/v1/orbs/tagged/decommission?tenant_id=acme"), Some(&op), None).await;
    assert_eq!(s, 200);
    let (s, err) = http("PATCH", &url, Some(&op), Some(json!({"set": {"a": "b"}}))).await;
    assert_eq!((s, err["code"].as_str()), (403, Some("orb_decommissioned")), "{err}");

    // Kept across a restart.
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    let (_, orb) = ts.get("/v1/orbs/tagged?tenant_id=acme").await;
    assert_eq!(orb["attributes"], json!({"shift": "night"}));
    ts.stop().await;
}
