//! Fleet search over registry and live state: the query language, sorting with cursor pages,
//! projections, aggregations, precise errors, tenant isolation; REST and gRPC.

mod common;

use common::{ADMIN, TestServer, V3, http, now_ms};
use orbmanager::net::grpc::pb;
use serde_json::{Value, json};

async fn search(ts: &TestServer, token: &str, params: &str) -> (u16, Value) {
    http("GET", &ts.url(&format!("/v1/orbs?{params}")), Some(token), None).await
}

fn enc(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v["orbs"].as_array().unwrap().iter().map(|o| o["orb_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_is_searchable_by_live_state_and_versions() {
    let ts = TestServer::start(false).await;
    // (orb, battery, mode, firmware, lat, lon)
    let fleet = [
        ("s01", 10.0, "mission", "2.3.1", 37.70, -122.40),
        ("s02", 15.0, "mission", "2.3.1", 37.71, -122.41),
        ("s03", 12.0, "mission", "2.3.0", 37.70, -122.40),
        ("s04", 55.0, "idle", "2.3.1", 37.70, -122.40),
        ("s05", 5.0, "mission", "2.3.1", 40.71, -74.00),
        ("s06", 90.0, "charging", "2.3.1", 37.72, -122.42),
    ];
    for (orb, battery, mode, fw, lat, lon) in fleet {
        let token = ts.register("acme", orb).await;
        let mut c = V3::connect(ts.mqtt, orb, Some((&format!("acme/{orb}"), &token))).await.unwrap();
        c.publish(&format!("state/acme/{orb}"), json!({"firmware": fw}).to_string().into_bytes()).await.unwrap();
        let point = json!({"ts": now_ms(), "battery": battery, "mode": mode, "lat": lat, "lon": lon, "speed": 1});
        c.publish(&format!("telemetry/acme/{orb}"), point.to_string().into_bytes()).await.unwrap();
        c.disconnect().await;
    }
    ts.register("acme", "never-seen").await;

    let q = r#"battery < 20 AND mode = "mission" AND version.firmware = "2.3.1" AND within(37.7, -122.4, 5km)"#;
    let (s, r) = search(&ts, ADMIN, &format!("tenant_id=acme&q={}", enc(q))).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(ids(&r), ["s01", "s02"]);
    assert_eq!(r["total"], 2);
    assert_eq!(r["orbs"][0]["versions"]["firmware"], "2.3.1");

    // Sorted pages with cursors: every match once, in order.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut p = "tenant_id=acme&sort=battery&order=desc&page_size=2".to_string();
        if let Some(t) = &token {
            p += &format!("&page_token={t}");
        }
        let (_, page) = search(&ts, ADMIN, &p).await;
        seen.extend(ids(&page));
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.into()),
            None => break,
        }
    }
    assert_eq!(seen, ["s06", "s04", "s02", "s03", "s01", "s05", "never-seen"], "missing batteries sort last");

    // Projection and aggregations.
    let (_, r) = search(&ts, ADMIN, "tenant_id=acme&q=online%20%3D%20false&fields=battery,mode&page_size=1").await;
    let first = r["orbs"][0].as_object().unwrap();
    assert_eq!(first.keys().collect::<Vec<_>>(), ["battery", "mode", "orb_id"]);
    let (_, r) = search(&ts, ADMIN, &format!("tenant_id=acme&q={}&count_by=mode", enc("status = \"active\""))).await;
    assert_eq!(r["aggregate"]["count_by"], json!({"mission": 4, "idle": 1, "charging": 1}));
    let (_, r) = search(&ts, ADMIN, &format!("tenant_id=acme&q={}&stats=battery", enc("mode = \"mission\""))).await;
    assert_eq!(
        (
            r["aggregate"]["stats"]["count"].as_u64(),
            r["aggregate"]["stats"]["min"].as_f64(),
            r["aggregate"]["stats"]["max"].as_f64()
        ),
        (Some(4), Some(5.0), Some(15.0))
    );

    // Invalid queries say where.
    let (s, r) = search(&ts, ADMIN, &format!("tenant_id=acme&q={}", enc("battery < AND"))).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid_argument")));
    assert!(r["detail"].as_str().unwrap().contains("at position 10"), "{r}");
    let (s, _) = search(&ts, ADMIN, "tenant_id=acme&sort=colour").await;
    assert_eq!(s, 400);
    let (s, _) = search(&ts, ADMIN, "tenant_id=acme&count_by=mode&stats=battery").await;
    assert_eq!(s, 400);
    let (s, _) = search(&ts, ADMIN, "tenant_id=acme&page_token=zz").await;
    assert_eq!(s, 400);

    // Another tenant sees nothing of acme, and cannot ask.
    common::ensure_tenant(&ts.http, "globex").await;
    let (_, tok) =
        http("POST", &ts.url("/v1/tenants/globex/tokens"), Some(ADMIN), Some(json!({"role": "viewer"}))).await;
    let globex = tok["secret"].as_str().unwrap().to_string();
    let (s, r) = search(&ts, &globex, "").await;
    assert_eq!((s, r["total"].as_u64()), (200, Some(0)));
    let (s, _) = search(&ts, &globex, "tenant_id=acme").await;
    assert_eq!(s, 403);

    // The same search over gRPC.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.unwrap();
    let mut req = tonic::Request::new(pb::SearchOrbsRequest {
        tenant_id: "acme".into(),
        query: q.into(),
        sort: "battery".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let r = pb::registry_service_client::RegistryServiceClient::new(ch).search_orbs(req).await.unwrap().into_inner();
    assert_eq!(r.orbs.iter().map(|o| o.orb_id.as_str()).collect::<Vec<_>>(), ["s01", "s02"]);
    assert_eq!(r.total, 2);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_is_rebuilt_from_the_store_after_a_restart() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "keep").await;
    let (s, _) = http(
        "POST",
        &ts.url("/v1/orbs/keep/telemetry?tenant_id=acme"),
        Some(ADMIN),
        Some(json!({"battery": 42, "mode": "parked"})),
    )
    .await;
    assert_eq!(s, 200);
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, false, |_| {}).await;
    let q = enc("battery = 42 AND mode = \"parked\"");
    common::wait_until("index loaded", 15, || async {
        search(&ts, ADMIN, &format!("tenant_id=acme&q={q}")).await.0 == 200
    })
    .await;
    let (_, r) = search(&ts, ADMIN, &format!("tenant_id=acme&q={q}")).await;
    assert_eq!(ids(&r), ["keep"]);
    ts.stop().await;
}
