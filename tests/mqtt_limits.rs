//! The MQTT limits are explicit and announced: MQTT 5 clients learn the packet size, receive
//! maximum, maximum QoS and granted keep-alive in CONNACK; silent connections are closed after
//! the connect timeout; an empty client id gets one assigned; publish rates (per connection,
//! per tenant) hold back and then cut off a flooder (DISCONNECT 0x96); the connection rate
//! answers CONNACK 0x9F.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::AsyncReadExt;

async fn connack(ts: &TestServer, client_id: &str, keepalive_s: u64) -> ConnAck {
    let mut o = MqttOptions::new(client_id, ts.mqtt.ip().to_string(), ts.mqtt.port());
    o.set_keep_alive(Duration::from_secs(keepalive_s));
    let (_client, mut events) = AsyncClient::new(o, 4);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("in time").expect("connects") {
            Event::Incoming(Packet::ConnAck(ack)) => return ack,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_announces_the_limits_and_caps_keepalive() {
    let ts = TestServer::start_with(true, |c| {
        c.mqtt.max_packet_size = 100_000;
        c.mqtt.receive_maximum = 32;
        c.mqtt.keepalive_max_s = 120;
    })
    .await;
    let ack = connack(&ts, "dev-orb-1", 600).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.max_packet_size, Some(100_000));
    assert_eq!(p.receive_max, Some(32));
    assert!(p.max_qos.is_none() || p.max_qos == Some(2), "QoS 2 accepted: {:?}", p.max_qos);
    assert_eq!(p.server_keep_alive, Some(120), "keep-alive above the cap is lowered");
    // Retained messages, wildcards, shared subscriptions and subscription ids are offered
    // (absent means available).
    for (what, v) in [
        ("retain", p.retain_available),
        ("wildcards", p.wildcard_subscription_available),
        ("shared subscriptions", p.shared_subscription_available),
        ("subscription ids", p.subscription_identifiers_available),
    ] {
        assert!(v.is_none() || v == Some(1), "{what} available: {v:?}");
    }

    let ack = connack(&ts, "dev-orb-2", 30).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), None, "a keep-alive within the cap is kept");

    let ack = connack(&ts, "", 30).await;
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier).expect("assigned client id");
    assert!(assigned.starts_with("om-"), "{assigned}");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_connect_timeout() {
    let ts = TestServer::start_with(true, |c| c.mqtt.connect_timeout_s = 1).await;
    let mut sock = tokio::net::TcpStream::connect(ts.mqtt).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(15), sock.read(&mut buf)).await.expect("closed by the server");
    assert!(matches!(n, Ok(0) | Err(_)), "no data, just a close: {n:?}");
    assert!(started.elapsed() >= Duration::from_millis(500), "not closed before the timeout");
    // The configured 1 s applies, not ntex's 5 s protocol-version default (generous bound).
    assert!(started.elapsed() < Duration::from_millis(4_500), "closed after {:?}", started.elapsed());
    ts.stop().await;
}

/// Sends `n` QoS 1 publishes without waiting, then collects the outcome: PUBACKs received and
/// how the connection ended (if it did).
async fn flood(p: &mut common::peer::Peer, topic: &str, n: usize) -> (usize, Option<String>) {
    for i in 0..n {
        let body = common::telemetry(common::now_ms(), &format!("{topic}-{i}-{}", fastrand::u64(..)), 50.0);
        if p.client.publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, body).await.is_err() {
            break;
        }
    }
    let mut acks = 0;
    while acks < n {
        match p.next(5.0).await {
            Some(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) => acks += 1,
            Some(_) => {}
            None => break,
        }
    }
    (acks, p.error.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_connect_rates_are_limited() {
    let ts = TestServer::start_with(true, |c| {
        c.mqtt.publish_rate_per_connection = 20;
        c.mqtt.connect_rate_per_s = 0;
    })
    .await;
    use common::peer::Peer;
    // Within the burst, then a little over it: held back, all accepted.
    let mut p = Peer::dev(ts.mqtt, "steady").await;
    let started = Instant::now();
    let (acks, ended) = flood(&mut p, "telemetry/default/steady", 25).await;
    assert_eq!((acks, ended), (25, None));
    assert!(started.elapsed() >= Duration::from_millis(200), "5 publishes over the burst wait their turn");
    // Far over it: cut off with DISCONNECT 0x96.
    let mut f = Peer::dev(ts.mqtt, "flooder").await;
    let (acks, ended) = flood(&mut f, "telemetry/default/flooder", 200).await;
    let ended = ended.expect("the flooder is disconnected");
    assert!(ended.contains("MessageRateTooHigh"), "{ended}");
    assert!(acks < 200, "{acks}");
    // Others are unaffected.
    let mut calm = Peer::dev(ts.mqtt, "calm").await;
    assert_eq!(flood(&mut calm, "telemetry/default/calm", 5).await, (5, None));
    assert!(ts.metric("orbmanager_refusals_total{reason=\"rate_limited\"}").await >= 1.0);
    ts.stop().await;

    // A tenant's connections share its rate; the connection rate refuses with 0x9F.
    let ts = TestServer::start_with(true, |c| {
        c.mqtt.publish_rate_per_connection = 0;
        c.mqtt.publish_rate_per_tenant = 10;
        c.mqtt.connect_rate_per_s = 3;
    })
    .await;
    let mut a = Peer::dev(ts.mqtt, "a").await;
    let mut b = Peer::dev(ts.mqtt, "b").await;
    let _c = Peer::dev(ts.mqtt, "c").await;
    let refused = rumqttc::v5::AsyncClient::new(common::peer::opts(ts.mqtt, "d", None), 8).1.poll().await;
    assert!(format!("{refused:?}").contains("ConnectionRateExceeded"), "{refused:?}");
    let (_, a_end) = flood(&mut a, "telemetry/default/a", 40).await;
    let (_, b_end) = flood(&mut b, "telemetry/default/b", 40).await;
    assert!(
        a_end.iter().chain(b_end.iter()).any(|e| e.contains("MessageRateTooHigh")),
        "80 publishes against a tenant rate of 10/s: {a_end:?} {b_end:?}"
    );
    ts.stop().await;
}
