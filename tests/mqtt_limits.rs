//! The MQTT limits are explicit and announced: MQTT 5 clients learn the packet size, receive
//! maximum, maximum QoS and granted keep-alive in CONNACK; silent connections are closed after
//! the connect timeout; an empty client id gets one assigned.

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
    assert_eq!(p.max_qos, Some(1));
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
