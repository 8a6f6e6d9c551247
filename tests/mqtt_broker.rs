//! The broker inside a tenant's namespace, with real MQTT 3.1.1 and 5 clients (rumqttc):
//! wildcards and overlapping subscriptions, `$` topics, retained messages (durable), wills with
//! delay, persistent sessions with offline queueing and redelivery, shared subscriptions,
//! no-local / retain-as-published / retain handling, v5 properties, topic policies, tenant
//! isolation and slow subscribers.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::peer::{Peer, opts};
use common::{ADMIN, TestServer, ensure_tenant, http};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, LastWillProperties, Packet, PubAckReason, PublishProperties, RetainForwardRule,
    SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, MqttOptions};
use serde_json::json;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn filter(path: &str, f: impl FnOnce(&mut Filter)) -> Filter {
    let mut x = Filter::new(path, QoS::AtLeastOnce);
    f(&mut x);
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_overlaps_and_dollar_topics() {
    let ts = TestServer::start(true).await;
    let mut a = Peer::dev(ts.mqtt, "sub-a").await;
    // Overlapping filters: one copy, at the highest QoS, carrying both subscription ids.
    a.subscribe(vec![Filter::new("fleet/+/status", QoS::AtLeastOnce)], Some(1)).await;
    a.subscribe(vec![Filter::new("fleet/#", QoS::AtMostOnce)], Some(2)).await;
    let mut b = Peer::dev(ts.mqtt, "sub-b").await;
    b.sub("#").await;
    let mut c = Peer::dev(ts.mqtt, "sub-c").await;
    c.sub("$app/#").await;
    let mut p = Peer::dev(ts.mqtt, "pub").await;

    assert_eq!(p.publish("fleet/r1/status", b"up").await, PubAckReason::Success);
    let got = a.next_publish(5.0).await.expect("a gets fleet/r1/status");
    assert_eq!(
        (text(&got.topic), text(&got.payload), got.qos),
        ("fleet/r1/status".into(), "up".into(), QoS::AtLeastOnce)
    );
    let mut ids = got.properties.expect("properties").subscription_identifiers;
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    a.silent(0.5, "one copy per session").await;
    assert_eq!(text(&b.next_publish(5.0).await.expect("# matches").topic), "fleet/r1/status");

    // `fleet/#` matches `fleet` itself; `fleet/+/status` does not match a deeper topic.
    p.publish("fleet", b"parent").await;
    assert_eq!(text(&a.next_publish(5.0).await.unwrap().topic), "fleet");
    p.publish("fleet/r1/status/extra", b"deep").await;
    let got = a.next_publish(5.0).await.unwrap();
    assert_eq!(got.properties.unwrap().subscription_identifiers, vec![2], "only fleet/# matched");

    // `#` does not match `$` topics; a filter naming `$app` does.
    p.publish("$app/x", b"dollar").await;
    assert_eq!(text(&c.next_publish(5.0).await.expect("$app/# matches").payload), "dollar");
    while let Some(got) = b.next_publish(0.5).await {
        assert!(!got.topic.starts_with(b"$"), "# matched {:?}", got.topic);
    }

    // A topic alias set by one PUBLISH names the topic of the next one.
    let alias = PublishProperties { topic_alias: Some(1), ..Default::default() };
    assert_eq!(p.publish_props("fleet/r2/status", b"aliased", false, alias.clone()).await, PubAckReason::Success);
    assert_eq!(p.publish_props("", b"via alias", false, alias).await, PubAckReason::Success);
    for want in ["aliased", "via alias"] {
        let got = a.next_publish(5.0).await.expect("aliased publish");
        assert_eq!((text(&got.topic), text(&got.payload)), ("fleet/r2/status".into(), want.into()));
    }

    // Unsubscribe: nothing more on that filter; v5 says whether it existed.
    a.client.unsubscribe("fleet/#").await.unwrap();
    loop {
        if let Packet::UnsubAck(u) = a.next(5.0).await.expect("unsuback") {
            assert_eq!(format!("{:?}", u.reasons), "[Success]");
            break;
        }
    }
    p.publish("fleet/r1/status/extra", b"deep").await;
    a.silent(0.5, "after unsubscribe").await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_durable_and_follow_retain_handling() {
    let ts = TestServer::start(true).await;
    let mut p = Peer::dev(ts.mqtt, "pub").await;
    p.retain("cfg/a", b"A1").await;
    p.retain("cfg/a", b"A2").await; // replaces
    p.retain("cfg/b", b"B").await;
    p.retain("cfg/c", b"C").await;
    p.retain("cfg/c", b"").await; // an empty payload clears
    let expiring = PublishProperties { message_expiry_interval: Some(1), ..Default::default() };
    assert_eq!(p.publish_props("cfg/brief", b"gone soon", true, expiring).await, PubAckReason::Success);
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut s = Peer::dev(ts.mqtt, "sub").await;
    s.sub("cfg/+").await;
    let mut got = Vec::new();
    while let Some(m) = s.next_publish(1.0).await {
        assert!(m.retain, "retained messages carry the retain flag at subscribe");
        got.push((text(&m.topic), text(&m.payload)));
    }
    got.sort();
    assert_eq!(got, vec![("cfg/a".into(), "A2".into()), ("cfg/b".into(), "B".into())], "expired and cleared are gone");

    // Retain handling 2: none at subscribe; 1: only for a new subscription.
    let mut n = Peer::dev(ts.mqtt, "never").await;
    n.subscribe(vec![filter("cfg/#", |f| f.retain_forward_rule = RetainForwardRule::Never)], None).await;
    n.silent(0.7, "retain handling 2").await;
    let mut once = Peer::dev(ts.mqtt, "once").await;
    let f = || filter("cfg/a", |f| f.retain_forward_rule = RetainForwardRule::OnNewSubscribe);
    once.subscribe(vec![f()], None).await;
    assert_eq!(text(&once.next_publish(3.0).await.expect("new subscription gets it").payload), "A2");
    once.subscribe(vec![f()], None).await;
    once.silent(0.7, "retain handling 1 on an existing subscription").await;

    // Live delivery of a retained publish: retain flag only with retain-as-published.
    let mut rap = Peer::dev(ts.mqtt, "rap").await;
    rap.subscribe(
        vec![filter("live/#", |f| {
            f.preserve_retain = true;
            f.retain_forward_rule = RetainForwardRule::Never
        })],
        None,
    )
    .await;
    let mut plain = Peer::dev(ts.mqtt, "plain").await;
    plain.subscribe(vec![filter("live/#", |f| f.retain_forward_rule = RetainForwardRule::Never)], None).await;
    p.retain("live/x", b"now").await;
    assert!(rap.next_publish(3.0).await.unwrap().retain);
    assert!(!plain.next_publish(3.0).await.unwrap().retain);
    let view = ts.get("/v1/tenants/default/mqtt").await.1;
    let topics: Vec<&str> = view["retained"].as_array().unwrap().iter().map(|r| r["topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["cfg/a", "cfg/b", "live/x"]);
    for c in [p, s, n, once, rap, plain] {
        c.disconnect().await;
    }

    // Acknowledged retained messages survive a restart.
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let mut s = Peer::dev(ts.mqtt, "after").await;
    s.sub("cfg/a").await;
    let m = s.next_publish(5.0).await.expect("retained after restart");
    assert_eq!((text(&m.payload), m.retain), ("A2".into(), true));
    ts.stop().await;
}

fn will_opts(addr: SocketAddr, id: &str, topic: &str, delay: u32, expiry: u32) -> MqttOptions {
    let mut o = opts(addr, id, None);
    let props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    };
    o.set_last_will(LastWill::new(topic, format!("{id} gone"), QoS::AtLeastOnce, false, Some(props)));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_honour_delay_session_expiry_and_normal_disconnects() {
    let ts = TestServer::start(true).await;
    let mut watcher = Peer::dev(ts.mqtt, "watcher").await;
    watcher.sub("status/#").await;

    // No delay: the will goes out as soon as the connection is lost.
    let (w, _) = Peer::connect(will_opts(ts.mqtt, "w0", "status/w0", 0, 0)).await;
    w.vanish().await;
    assert_eq!(text(&watcher.next_publish(5.0).await.expect("immediate will").payload), "w0 gone");

    // Delay 2 s within a 30 s session: not before the delay, then once.
    let (w, _) = Peer::connect(will_opts(ts.mqtt, "w2", "status/w2", 2, 30)).await;
    let lost = Instant::now();
    w.vanish().await;
    let m = watcher.next_publish(6.0).await.expect("delayed will");
    assert_eq!(text(&m.payload), "w2 gone");
    assert!(lost.elapsed() >= Duration::from_millis(1500), "will after {:?}", lost.elapsed());

    // Delay 30 s but a 1 s session: the session ending sends it.
    let (w, _) = Peer::connect(will_opts(ts.mqtt, "w30", "status/w30", 30, 1)).await;
    w.vanish().await;
    assert_eq!(text(&watcher.next_publish(5.0).await.expect("will at session end").payload), "w30 gone");

    // Reconnecting to the session before the delay cancels the will.
    let (w, _) = Peer::connect(will_opts(ts.mqtt, "wr", "status/wr", 2, 30)).await;
    w.vanish().await;
    let (back, ack) = Peer::connect(will_opts(ts.mqtt, "wr", "status/wr", 2, 30)).await;
    assert!(ack.session_present);
    watcher.silent(3.0, "a resumed session's will").await;

    // A normal DISCONNECT discards the will, for v5 and for 3.1.1.
    back.disconnect().await;
    let mut o3 = rumqttc::MqttOptions::new("v3-will", ts.mqtt.ip().to_string(), ts.mqtt.port());
    o3.set_last_will(rumqttc::LastWill::new("status/v3", "v3 gone", rumqttc::QoS::AtLeastOnce, false));
    common::V3::connect_opts(o3.clone()).await.0.disconnect().await;
    watcher.silent(1.0, "wills after normal disconnects").await;

    // A 3.1.1 client that vanishes: its will.
    let (v3, _) = common::V3::connect_opts(o3).await;
    drop(v3);
    assert_eq!(text(&watcher.next_publish(5.0).await.expect("v3 will").payload), "v3 gone");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_queue_offline_and_redeliver_unacknowledged() {
    let ts = TestServer::start(true).await;
    let persistent = |id: &str, expiry: u32| {
        let mut o = opts(ts.mqtt, id, None);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(expiry));
        o
    };
    let mut p = Peer::dev(ts.mqtt, "pub").await;

    // Subscribe, go away, miss five messages, come back: all five, in order.
    let (mut s, ack) = Peer::connect(persistent("worker", 60)).await;
    assert!(!ack.session_present);
    s.sub("jobs/#").await;
    s.disconnect().await;
    for i in 0..5 {
        p.publish(&format!("jobs/{i}"), format!("job {i}").as_bytes()).await;
    }
    let (mut s, ack) = Peer::connect(persistent("worker", 60)).await;
    assert!(ack.session_present, "the session was kept");
    for i in 0..5 {
        let m = s.next_publish(5.0).await.unwrap_or_else(|| panic!("queued job {i}"));
        assert_eq!(text(&m.payload), format!("job {i}"));
    }

    // Received but not acknowledged when the connection dies: sent again, marked DUP.
    s.disconnect().await;
    let mut o = persistent("worker", 60);
    o.set_manual_acks(true);
    let (mut s, _) = Peer::connect(o.clone()).await;
    p.publish("jobs/unacked", b"again").await;
    let first = s.next_publish(5.0).await.expect("delivered");
    assert!(!first.dup);
    s.vanish().await;
    let (mut s, ack) = Peer::connect(o).await;
    assert!(ack.session_present);
    let again = s.next_publish(5.0).await.expect("redelivered");
    assert_eq!((text(&again.payload), again.dup), ("again".into(), true));
    s.client.ack(&again).await.unwrap();
    s.disconnect().await;

    // A 3.1.1 client without clean session gets the same.
    let mut o3 = rumqttc::MqttOptions::new("v3-worker", ts.mqtt.ip().to_string(), ts.mqtt.port());
    o3.set_clean_session(false);
    let (mut v3, present) = common::V3::connect_opts(o3.clone()).await;
    assert!(!present);
    v3.subscribe("jobs/#").await;
    v3.disconnect().await;
    p.publish("jobs/v3", b"for v3").await;
    let (mut v3, present) = common::V3::connect_opts(o3).await;
    assert!(present);
    assert_eq!(v3.next_publish(5).await.expect("queued for v3").1, b"for v3");
    v3.disconnect().await;

    // An expired session is gone: nothing queued, no session present.
    let (mut e, _) = Peer::connect(persistent("brief", 1)).await;
    e.sub("jobs/#").await;
    e.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    p.publish("jobs/late", b"late").await;
    let (mut e, ack) = Peer::connect(persistent("brief", 1)).await;
    assert!(!ack.session_present);
    e.silent(0.7, "an expired session").await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_the_stream_and_no_local_and_properties_hold() {
    let ts = TestServer::start(true).await;
    let mut m1 = Peer::dev(ts.mqtt, "m1").await;
    let mut m2 = Peer::dev(ts.mqtt, "m2").await;
    let mut all = Peer::dev(ts.mqtt, "all").await;
    m1.sub("$share/workers/work/+").await;
    m2.sub("$share/workers/work/+").await;
    all.sub("work/+").await;
    let mut p = Peer::dev(ts.mqtt, "pub").await;
    for i in 0..20 {
        p.publish(&format!("work/{i}"), b"w").await;
    }
    let mut counts = [0, 0, 0];
    for (i, c) in [&mut m1, &mut m2, &mut all].into_iter().enumerate() {
        while c.next_publish(0.7).await.is_some() {
            counts[i] += 1;
        }
    }
    assert_eq!(counts[0] + counts[1], 20, "each message to one member: {counts:?}");
    assert!(counts[0] > 0 && counts[1] > 0, "both members work: {counts:?}");
    assert_eq!(counts[2], 20, "a plain subscription gets everything");

    // No-local: a client does not get its own messages on such a subscription.
    let mut chat = Peer::dev(ts.mqtt, "chat").await;
    chat.subscribe(vec![filter("chat/#", |f| f.nolocal = true)], None).await;
    let mut other = Peer::dev(ts.mqtt, "other").await;
    other.sub("chat/#").await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        response_topic: Some("chat/replies".into()),
        correlation_data: Some(b"corr-1".to_vec().into()),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    chat.publish_props("chat/a", b"hello", false, props).await;
    chat.silent(0.7, "no-local").await;
    let m = other.next_publish(5.0).await.expect("other gets it");
    let pp = m.properties.expect("properties");
    assert_eq!(pp.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(pp.content_type.as_deref(), Some("text/plain"));
    assert_eq!(pp.response_topic.as_deref(), Some("chat/replies"));
    assert_eq!(pp.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(pp.payload_format_indicator, Some(1));
    assert!(matches!(pp.message_expiry_interval, Some(58..=60)), "{:?}", pp.message_expiry_interval);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_policies_gate_devices_and_tenants_never_cross() {
    let ts = TestServer::start(false).await;
    let mut tokens = std::collections::HashMap::new();
    for t in ["acme", "beta"] {
        ensure_tenant(&ts.http, t).await;
        for o in ["o1", "o2", "o3"] {
            tokens.insert(format!("{t}/{o}"), ts.register(t, o).await);
        }
    }
    let login = |t: &str, o: &str, id: &str| {
        let user = format!("{t}/{o}");
        opts(ts.mqtt, id, Some((&user, tokens[&user].as_str())))
    };

    // The default policy: platform topics only.
    let (mut a1, _) = Peer::connect(login("acme", "o1", "a1")).await;
    assert_eq!(a1.publish("fleet/o1/status", b"x").await, PubAckReason::NotAuthorized);
    let codes = a1.subscribe(vec![Filter::new("fleet/#", QoS::AtLeastOnce)], None).await;
    assert_eq!(codes, vec![SubscribeReasonCode::NotAuthorized]);
    assert!(ts.metric("orbmanager_broker_denied_total").await >= 2.0);

    // Bad policies are refused with the entry named; viewers and other tenants may not set one.
    let url = |t: &str| ts.url(&format!("/v1/tenants/{t}/mqtt/policy"));
    let (code, body) = http("PUT", &url("acme"), Some(ADMIN), Some(json!({"publish": ["a/#/b"]}))).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("a/#/b"), "{body}");
    let (code, _) = http("PUT", &url("acme"), Some(ADMIN), Some(json!({"publish": ["x"], "extra": 1}))).await;
    assert_eq!(code, 400);
    let token = async |t: &str, role: &str| {
        let (code, body) =
            http("POST", &ts.url(&format!("/v1/tenants/{t}/tokens")), Some(ADMIN), Some(json!({"role": role}))).await;
        assert_eq!(code, 201, "{body}");
        body["secret"].as_str().unwrap().to_string()
    };
    let acme_viewer = token("acme", "viewer").await;
    let beta_admin = token("beta", "admin").await;
    let (code, body) = http("PUT", &url("acme"), Some(&acme_viewer), Some(json!({"publish": ["x"]}))).await;
    assert_eq!(code, 403, "a viewer sets no policy: {body}");
    let (code, body) = http("PUT", &url("acme"), Some(&beta_admin), Some(json!({"publish": ["x"]}))).await;
    assert_eq!(code, 403, "another tenant's admin sets no policy: {body}");
    let (code, _) = http("GET", &ts.url("/v1/tenants/acme/mqtt"), Some(&beta_admin), None).await;
    assert_eq!(code, 403, "nor reads its sessions");
    let (code, view) = http("GET", &ts.url("/v1/tenants/acme/mqtt"), Some(&acme_viewer), None).await;
    assert_eq!(code, 200, "{view}");
    assert_eq!(view["policy"], json!({"publish": [], "subscribe": []}), "nothing refused changed the policy");

    // Both tenants get the same policy; each device publishes under its own id and reads all.
    let policy =
        json!({"publish": ["fleet/{orb}/#", "shared/#"], "subscribe": ["fleet/+/status", "shared/#", "telemetry/+/+"]});
    for t in ["acme", "beta"] {
        let (code, body) = http("PUT", &url(t), Some(ADMIN), Some(policy.clone())).await;
        assert_eq!(code, 200, "{body}");
    }
    let (mut a2, _) = Peer::connect(login("acme", "o2", "a2")).await;
    a2.sub("fleet/+/status").await;
    a2.sub("telemetry/acme/+").await;
    assert_eq!(a1.publish("fleet/o1/status", b"acme o1 up").await, PubAckReason::Success);
    assert_eq!(a1.publish("fleet/o2/status", b"spoof").await, PubAckReason::NotAuthorized);
    assert_eq!(text(&a2.next_publish(5.0).await.expect("policy allows it").payload), "acme o1 up");
    // A platform telemetry point, once durable, reaches the tenant's subscribers.
    let point = common::telemetry(common::now_ms(), "m1", 50.0);
    assert_eq!(a1.publish("telemetry/acme/o1", &point).await, PubAckReason::Success);
    let m = a2.next_publish(5.0).await.expect("telemetry forwarded");
    assert_eq!((text(&m.topic), m.payload.to_vec()), ("telemetry/acme/o1".to_string(), point));
    a2.silent(0.5, "nothing else").await;

    // beta: same orb ids, same client ids, same topics. Nothing crosses.
    let (mut b1, _) = Peer::connect(login("beta", "o1", "a1")).await;
    let (mut b2, _) = Peer::connect(login("beta", "o2", "a2")).await;
    for f in ["shared/#", "fleet/+/status"] {
        b2.sub(f).await;
    }
    b2.sub("$share/g/shared/#").await;
    // (One connection per orb: a second connection of acme/o1 would take over a1's.)
    let mut o = login("acme", "o3", "a3-will");
    o.set_last_will(LastWill::new("shared/will", "acme will", QoS::AtLeastOnce, false, None));
    let (aw, _) = Peer::connect(o).await;
    a1.retain("shared/cfg", b"acme retained").await;
    a1.publish("fleet/o1/status", b"acme again").await;
    aw.vanish().await;
    b2.silent(1.5, "acme's messages, retained and will in beta").await;
    let mut b3_opts = login("beta", "o3", "b3-late");
    b3_opts.set_clean_start(true);
    let (mut b3, _) = Peer::connect(b3_opts).await;
    b3.sub("shared/#").await;
    b3.silent(0.7, "acme's retained message for a new beta subscriber").await;
    assert_eq!(b1.publish("fleet/o1/status", b"beta o1 up").await, PubAckReason::Success);
    assert_eq!(text(&b2.next_publish(5.0).await.unwrap().payload), "beta o1 up");
    a2.next_publish(0.5).await; // acme's own "acme again"
    a2.silent(0.7, "beta's message in acme").await;
    let (code, view) = ts.get("/v1/tenants/beta/mqtt").await;
    assert_eq!(code, 200);
    assert_eq!(view["retained"], json!([]));

    // A client id of one identity cannot be taken by another (same tenant).
    let err = AsyncClient::new(login("acme", "o2", "a1"), 8).1.poll().await;
    assert!(err.is_err(), "o2 may not take o1's client id: {err:?}");
    assert_eq!(a1.publish("fleet/o1/status", b"still here").await, PubAckReason::Success);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_cannot_keep_up_is_disconnected_with_quota_exceeded() {
    let ts = TestServer::start(true).await;
    // Manual acks and a receive maximum of 1: the server can send one message, then queues.
    let mut o = opts(ts.mqtt, "slow", None);
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(1));
    let (mut slow, _) = Peer::connect(o).await;
    slow.sub("flood/#").await;
    let mut fast = Peer::dev(ts.mqtt, "fast").await;
    fast.sub("flood/#").await;
    let mut p = Peer::dev(ts.mqtt, "pub").await;
    let n = orbmanager::limits::BROKER_SESSION_QUEUE_MAX + 50;
    for i in 0..n {
        assert_eq!(p.publish("flood/x", i.to_string().as_bytes()).await, PubAckReason::Success);
    }
    while slow.next(5.0).await.is_some() {}
    let why = slow.error.clone().expect("the slow subscriber was disconnected");
    assert!(why.contains("ServerDisconnect") && why.contains("QuotaExceeded"), "{why}");
    let mut got = 0;
    while fast.next_publish(2.0).await.is_some() {
        got += 1;
    }
    assert_eq!(got, n, "a subscriber that keeps up gets everything");
    assert!(ts.metric("orbmanager_broker_shed_total").await >= 1.0);
    ts.stop().await;
}
