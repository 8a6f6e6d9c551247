//! The tenant event stream: command status changes and presence become events with
//! per-tenant increasing ids; SSE and the gRPC stream resume from an event id without a gap
//! (also across a server restart); paging and type filters; bad ids and other tenants are
//! refused.

mod common;

use std::time::Duration;

use common::{ADMIN, SseFrame, TestServer, V3, http, sse};
use orbmanager::net::grpc::pb;
use pb::event_service_client::EventServiceClient;
use serde_json::{Value, json};
use tonic::Request;

async fn command(ts: &TestServer, orb: &str, kind: &str) -> String {
    let url = ts.url(&format!("/v1/orbs/{orb}/commands?tenant_id=acme"));
    let (s, body) = http("POST", &url, Some(ADMIN), Some(json!({"command_type": kind, "payload": {}}))).await;
    assert_eq!(s, 201, "{body}");
    body["command_id"].as_str().unwrap().to_string()
}

async fn next_frames(rx: &mut tokio::sync::mpsc::Receiver<SseFrame>, n: usize) -> Vec<SseFrame> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(f)) => out.push(f),
            other => panic!("expected {n} frames, got {} then {other:?}", out.len()),
        }
    }
    out
}

fn id(f: &SseFrame) -> u64 {
    f.id.as_deref().expect("every event frame has an id").parse().unwrap()
}

fn body(f: &SseFrame) -> Value {
    serde_json::from_str(&f.data).unwrap()
}

async fn list(ts: &TestServer, query: &str) -> (u16, Value) {
    ts.get(&format!("/v1/events?tenant_id=acme&{query}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_from_an_event_id_without_a_gap() {
    let ts = TestServer::start(false).await;
    let token = ts.register("acme", "e1").await;

    // Live from now: five commands queued, five events with consecutive ids.
    let (status, mut live) = sse(&ts.http, "/v1/events/stream?tenant_id=acme", ADMIN, None).await;
    assert_eq!(status, 200);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(command(&ts, "e1", &format!("step-{i}")).await);
    }
    let first = next_frames(&mut live, 5).await;
    for (i, f) in first.iter().enumerate() {
        let b = body(f);
        assert_eq!(f.event.as_deref(), Some("orb.command.status"));
        assert_eq!((b["type"].as_str(), b["orb_id"].as_str()), (Some("orb.command.status"), Some("e1")));
        assert_eq!(b["data"]["command_id"], ids[i]);
        assert_eq!(b["data"]["status"], "queued");
        assert_eq!(b["event_id"].as_str(), f.id.as_deref(), "the envelope carries the frame's id");
        if i > 0 {
            assert_eq!(id(f), id(&first[i - 1]) + 1, "ids are consecutive");
        }
    }
    let last_seen = id(&first[4]);
    drop(live);

    // While the client is away: the device comes and goes, two commands are canceled.
    let mut dev = V3::connect(ts.mqtt, "e1", Some(("acme/e1", &token))).await.unwrap();
    for c in &ids[..2] {
        let url = ts.url(&format!("/v1/orbs/e1/commands/{c}/cancel?tenant_id=acme"));
        let (s, b) = http("POST", &url, Some(ADMIN), None).await;
        assert_eq!(s, 200, "{b}");
    }
    dev.publish("telemetry/acme/e1", common::telemetry(common::now_ms(), "m1", 50.0)).await.unwrap();
    dev.disconnect().await;
    common::wait_until("the disconnect is recorded", 10, || async {
        list(&ts, "types=orb.presence.offline").await.1["events"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    // Resuming with Last-Event-ID replays exactly what was missed, in order, then goes live.
    let (status, mut resumed) =
        sse(&ts.http, "/v1/events/stream?tenant_id=acme", ADMIN, Some(&last_seen.to_string())).await;
    assert_eq!(status, 200);
    let missed = next_frames(&mut resumed, 4).await;
    let got: Vec<(u64, String)> = missed.iter().map(|f| (id(f), f.event.clone().unwrap())).collect();
    assert_eq!(
        got,
        vec![
            (last_seen + 1, "orb.presence.online".to_string()),
            (last_seen + 2, "orb.command.status".to_string()),
            (last_seen + 3, "orb.command.status".to_string()),
            (last_seen + 4, "orb.presence.offline".to_string()),
        ]
    );
    assert_eq!(body(&missed[1])["data"]["status"], "canceled");
    assert_eq!(body(&missed[3])["data"]["online"], false);
    command(&ts, "e1", "after-resume").await;
    let live_again = next_frames(&mut resumed, 1).await;
    assert_eq!(id(&live_again[0]), last_seen + 5, "no gap between the replay and live events");

    // The same log over the gRPC stream, filtered to one type, from the first id.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.unwrap();
    let mut req = Request::new(pb::StreamEventsRequest {
        tenant_id: "acme".into(),
        after: (id(&first[0]) - 1).to_string(),
        types: vec!["orb.presence.online".into(), "orb.presence.offline".into()],
    });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let mut grpc = EventServiceClient::new(ch.clone()).stream_events(req).await.unwrap().into_inner();
    let mut presence = Vec::new();
    while presence.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), grpc.message()).await.unwrap().unwrap().unwrap();
        let b: Value = serde_json::from_str(&e.body_json).unwrap();
        assert_eq!(b["event_id"].as_str(), Some(e.event_id.as_str()));
        presence.push((e.event_id.parse::<u64>().unwrap(), e.r#type));
    }
    assert_eq!(
        presence,
        vec![(last_seen + 1, "orb.presence.online".into()), (last_seen + 4, "orb.presence.offline".into())]
    );

    // Paging: everything once, in order, three at a time.
    let (mut after, mut paged) = (String::new(), Vec::new());
    loop {
        let (s, page) = list(&ts, &format!("page_size=3&after={after}")).await;
        assert_eq!(s, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        assert!(events.len() <= 3);
        paged.extend(events.iter().map(|e| e["event_id"].as_str().unwrap().parse::<u64>().unwrap()));
        after = page["next_after"].as_str().unwrap().to_string();
    }
    // The registration came first (id 1), before the stream was opened.
    let want: Vec<u64> = (1..=last_seen + 5).collect();
    assert_eq!(paged, want);
    assert_eq!(id(&first[0]), 2);
    let (_, reg) = list(&ts, "types=orb.registered").await;
    assert_eq!(reg["events"][0]["orb_id"], "e1");
    assert_eq!(reg["events"][0]["data"]["auto_registered"], false);

    // Registry changes are events too, in the same batch as the record.
    let url = ts.url("/v1/orbs/e1/attributes?tenant_id=acme");
    let (s, b) = http("PATCH", &url, Some(ADMIN), Some(json!({"set": {"depot": "sf-3"}}))).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = http("POST", &ts.url("/v1/orbs/e1/decommission?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(s, 200, "{b}");
    let (_, reg) = list(&ts, "types=orb.attributes.updated,orb.decommissioned").await;
    let got: Vec<(&str, &str)> = reg["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["data"]["status"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [("orb.attributes.updated", "active"), ("orb.decommissioned", "decommissioned")]);
    assert_eq!(reg["events"][0]["data"]["attributes"]["depot"], "sf-3");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_continue_across_a_restart_and_a_client_resumes_over_it() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "e2").await;
    command(&ts, "e2", "before").await;
    let (_, page) = list(&ts, "").await;
    let before = page["events"].as_array().unwrap().clone();
    let last: u64 = before.last().unwrap()["event_id"].as_str().unwrap().parse().unwrap();
    let dir = ts.stop().await;

    let ts = TestServer::start_in(dir, false, |_| {}).await;
    command(&ts, "e2", "after").await;
    let (status, mut rx) = sse(&ts.http, "/v1/events/stream?tenant_id=acme", ADMIN, Some(&last.to_string())).await;
    assert_eq!(status, 200);
    let f = next_frames(&mut rx, 1).await;
    assert_eq!(id(&f[0]), last + 1, "the first event after the restart follows the last one before it");
    assert_eq!(body(&f[0])["data"]["command_type"], "after");
    let (_, all) = list(&ts, "").await;
    assert_eq!(all["events"].as_array().unwrap().len(), before.len() + 1, "the log survived the restart");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_ids_types_and_other_tenants_are_refused() {
    let ts = TestServer::start(false).await;
    ts.register("acme", "e3").await;
    command(&ts, "e3", "x").await;

    let (s, b) = list(&ts, "after=abc").await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_argument")), "{b}");
    assert!(b["detail"].as_str().unwrap().contains("not an event id"), "{b}");
    let (s, b) = list(&ts, "after=100000").await;
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("newer than the latest event"), "{b}");
    let (s, b) = list(&ts, "types=orb.nope").await;
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("unknown event type \"orb.nope\""), "{b}");
    let (s, _) = sse(&ts.http, "/v1/events/stream?tenant_id=acme&after=100000", ADMIN, None).await;
    assert_eq!(s, 400);

    // Another tenant's token: acme's events are not reachable, its own log is empty.
    common::ensure_tenant(&ts.http, "globex").await;
    let (_, tok) =
        http("POST", &ts.url("/v1/tenants/globex/tokens"), Some(ADMIN), Some(json!({"role": "viewer"}))).await;
    let globex = tok["secret"].as_str().unwrap().to_string();
    let (s, _) = http("GET", &ts.url("/v1/events?tenant_id=acme"), Some(&globex), None).await;
    assert_eq!(s, 403);
    let (s, _) = sse(&ts.http, "/v1/events/stream?tenant_id=acme", &globex, None).await;
    assert_eq!(s, 403);
    let (s, own) = http("GET", &ts.url("/v1/events"), Some(&globex), None).await;
    assert_eq!(s, 200);
    assert_eq!(own["events"].as_array().unwrap().len(), 0, "{own}");
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.unwrap();
    let mut req = Request::new(pb::ListEventsRequest { tenant_id: "acme".into(), ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {globex}").parse().unwrap());
    let denied = EventServiceClient::new(ch).list_events(req).await;
    assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
    ts.stop().await;
}
