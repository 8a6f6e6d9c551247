//! QoS 2 to subscribers and persistent sessions that survive a restart, with real MQTT 3.1.1
//! and 5 clients (rumqttc) and raw packets where the packet ids matter.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestServer;
use common::peer::{Peer, opts};
use common::raw::{packet, utf8};
use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn persistent(addr: SocketAddr, id: &str, expiry: u32) -> MqttOptions {
    let mut o = opts(addr, id, None);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_reaches_subscribers_exactly_once_in_order_with_qos1_between() {
    let ts = TestServer::start(true).await;
    let mut p = Peer::dev(ts.mqtt, "q2-pub").await;

    // A v5 subscriber granted QoS 2 gets QoS 2 messages through the full exchange (its PUBREC
    // is answered with a PUBREL), QoS 1 ones at QoS 1, all in publish order.
    let mut s = Peer::dev(ts.mqtt, "q2-sub").await;
    let codes = s.subscribe(vec![Filter::new("orders/#", QoS::ExactlyOnce)], None).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]);
    p.publish_qos2("orders/1", b"two-a").await;
    p.publish("orders/2", b"one-b").await;
    p.publish_qos2("orders/3", b"two-c").await;
    p.publish("orders/4", b"one-d").await;
    let mut got = Vec::new();
    let mut pubrels = 0;
    while got.len() < 4 || pubrels < 2 {
        match s.next(5.0).await.unwrap_or_else(|| panic!("after {got:?} and {pubrels} PUBRELs")) {
            Packet::Publish(m) => got.push((text(&m.payload), m.qos)),
            Packet::PubRel(_) => pubrels += 1,
            _ => {}
        }
    }
    let expected = [
        ("two-a", QoS::ExactlyOnce),
        ("one-b", QoS::AtLeastOnce),
        ("two-c", QoS::ExactlyOnce),
        ("one-d", QoS::AtLeastOnce),
    ]
    .map(|(t, q)| (t.to_string(), q));
    assert_eq!(got, expected);
    s.silent(0.7, "each message once").await;

    // A QoS 1 subscription downgrades a QoS 2 message; a QoS 2 subscription does not upgrade
    // a QoS 1 message (checked above).
    let mut low = Peer::dev(ts.mqtt, "q1-sub").await;
    low.sub("orders/#").await;
    p.publish_qos2("orders/5", b"two-e").await;
    let m = low.next_publish(5.0).await.expect("downgraded");
    assert_eq!((text(&m.payload), m.qos), ("two-e".into(), QoS::AtLeastOnce));

    // A 3.1.1 subscriber at QoS 2.
    let o3 = rumqttc::MqttOptions::new("q2-v3", ts.mqtt.ip().to_string(), ts.mqtt.port());
    let (c3, mut ev3) = rumqttc::AsyncClient::new(o3, 16);
    c3.subscribe("orders/#", rumqttc::QoS::ExactlyOnce).await.unwrap();
    let mut granted = None;
    while granted.is_none() {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) =
            tokio::time::timeout(Duration::from_secs(10), ev3.poll()).await.expect("suback in time").unwrap()
        {
            granted = Some(a.return_codes);
        }
    }
    assert_eq!(granted.unwrap(), vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::ExactlyOnce)]);
    p.publish_qos2("orders/6", b"two-f").await;
    let (mut got, mut released) = (None, false);
    while got.is_none() || !released {
        match tokio::time::timeout(Duration::from_secs(10), ev3.poll()).await.expect("in time").unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(m)) => got = Some((text(&m.payload), m.qos)),
            rumqttc::Event::Incoming(rumqttc::Packet::PubRel(_)) => released = true,
            _ => {}
        }
    }
    assert_eq!(got.unwrap(), ("two-f".into(), rumqttc::QoS::ExactlyOnce));
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_and_their_queues_survive_a_restart() {
    let ts = TestServer::start(true).await;
    // A v5 session (QoS 1 and QoS 2 filters), a 3.1.1 session without clean session, a
    // session expiring in 2 s, and a clean session: all subscribe, then go away.
    let (mut w, _) = Peer::connect(persistent(ts.mqtt, "worker", 300)).await;
    let codes = w
        .subscribe(vec![Filter::new("jobs/#", QoS::AtLeastOnce), Filter::new("exact/#", QoS::ExactlyOnce)], None)
        .await;
    assert_eq!(codes.len(), 2);
    w.sub("telemetry/default/+").await;
    w.disconnect().await;
    let mut o3 = rumqttc::MqttOptions::new("v3-worker", ts.mqtt.ip().to_string(), ts.mqtt.port());
    o3.set_clean_session(false);
    let (mut v3, _) = common::V3::connect_opts(o3).await;
    v3.subscribe("jobs/#").await;
    v3.disconnect().await;
    let (mut brief, _) = Peer::connect(persistent(ts.mqtt, "brief", 2)).await;
    brief.sub("jobs/#").await;
    brief.disconnect().await;
    let mut clean = Peer::dev(ts.mqtt, "clean").await;
    clean.sub("jobs/#").await;
    clean.disconnect().await;

    // Acknowledged publishes while they are away, including a device's telemetry (forwarded
    // from the platform topic once durable).
    let mut p = Peer::dev(ts.mqtt, "pub").await;
    for i in 0..5 {
        p.publish(&format!("jobs/{i}"), format!("job {i}").as_bytes()).await;
    }
    p.publish_qos2("exact/1", b"exactly").await;
    let point = common::telemetry(common::now_ms(), "fwd-1", 42.0);
    p.publish("telemetry/default/truck7", &point).await;
    p.disconnect().await;

    let dir = ts.stop().await;
    // Longer than the brief session's expiry, with the server down.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let view = ts.get("/v1/tenants/default/mqtt").await.1;
    let sessions: Vec<String> =
        view["sessions"].as_array().unwrap().iter().map(|s| s["client_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(sessions, ["v3-worker", "worker"], "{view}");

    let (mut w, ack) = Peer::connect(persistent(ts.mqtt, "worker", 300)).await;
    assert!(ack.session_present, "the session came back from the store");
    let mut got = Vec::new();
    while got.len() < 7 {
        let m = w.next_publish(5.0).await.unwrap_or_else(|| panic!("queued before the restart; got {got:?}"));
        got.push((String::from_utf8_lossy(&m.topic).into_owned(), m.qos));
    }
    let mut expected: Vec<(String, QoS)> = (0..5).map(|i| (format!("jobs/{i}"), QoS::AtLeastOnce)).collect();
    expected.push(("exact/1".into(), QoS::ExactlyOnce));
    expected.push(("telemetry/default/truck7".into(), QoS::AtLeastOnce));
    assert_eq!(got, expected);
    // Its subscriptions came back too: new messages arrive without a new SUBSCRIBE.
    let mut p = Peer::dev(ts.mqtt, "pub").await;
    p.publish("jobs/new", b"after").await;
    assert_eq!(text(&w.next_publish(5.0).await.expect("live after restart").payload), "after");
    w.disconnect().await;

    let mut o3 = rumqttc::MqttOptions::new("v3-worker", ts.mqtt.ip().to_string(), ts.mqtt.port());
    o3.set_clean_session(false);
    let (mut v3, present) = common::V3::connect_opts(o3).await;
    assert!(present);
    for i in 0..5 {
        assert_eq!(v3.next_publish(5).await.expect("queued for v3").1, format!("job {i}").into_bytes());
    }
    assert_eq!(v3.next_publish(5).await.expect("and the new one").1, b"after");
    v3.disconnect().await;

    // The expired and the clean session did not come back.
    for id in ["brief", "clean"] {
        let (mut c, ack) = Peer::connect(persistent(ts.mqtt, id, 60)).await;
        assert!(!ack.session_present, "{id}");
        c.silent(0.5, id).await;
        c.disconnect().await;
    }

    // What was acknowledged is not delivered again after another restart.
    p.disconnect().await;
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let (mut w, ack) = Peer::connect(persistent(ts.mqtt, "worker", 300)).await;
    assert!(ack.session_present);
    w.silent(1.0, "acknowledged before the restart").await;
    w.disconnect().await;
    ts.stop().await;
}

/// A raw v5 subscriber with a persistent session (expiry 300 s, clean start 0).
struct Raw(TcpStream);

impl Raw {
    /// Connects; returns it with the CONNACK's session-present flag.
    async fn connect(addr: SocketAddr, client_id: &str) -> (Raw, bool) {
        let mut body = utf8(b"MQTT");
        body.extend_from_slice(&[5, 0x00, 0x00, 0x1e]);
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x01, 0x2c]);
        body.extend(utf8(client_id.as_bytes()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&packet(0x10, &body)).await.unwrap();
        let mut raw = Raw(s);
        let (h, body) = raw.read().await;
        assert_eq!((h, body[1]), (0x20, 0), "CONNACK success");
        (raw, body[0] & 1 == 1)
    }

    async fn read(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), self.0.read_exact(&mut head)).await.expect("a packet").unwrap();
        assert!(head[1] < 0x80, "short packets only");
        let mut body = vec![0u8; head[1] as usize];
        self.0.read_exact(&mut body).await.unwrap();
        (head[0], body)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.unwrap();
    }

    /// The next PUBLISH: (DUP, QoS, packet id, payload).
    async fn publish(&mut self) -> (bool, u8, u16, Vec<u8>) {
        let (h, body) = self.read().await;
        assert_eq!(h & 0xf0, 0x30, "PUBLISH, got {h:#x}");
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let at = 2 + topic_len;
        let id = u16::from_be_bytes([body[at], body[at + 1]]);
        let props = body[at + 2] as usize;
        (h & 0x08 != 0, (h >> 1) & 3, id, body[at + 3 + props..].to_vec())
    }

    /// Answers PUBREC for `id` and expects the PUBREL.
    async fn receive(&mut self, id: u16) {
        let [a, b] = id.to_be_bytes();
        self.send(&[0x50, 0x02, a, b]).await;
        let (h, body) = self.read().await;
        assert_eq!((h, &body[..2]), (0x62, &[a, b][..]), "PUBREL for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_qos2_delivery_is_resent_with_its_packet_id_across_reconnects_and_restarts() {
    let ts = TestServer::start(true).await;
    let (mut r, present) = Raw::connect(ts.mqtt, "raw-q2").await;
    assert!(!present);
    // SUBSCRIBE id 1, `q2/#` at QoS 2; SUBACK granting 2.
    let mut sub = vec![0, 1, 0];
    sub.extend(utf8(b"q2/#"));
    sub.push(0x02);
    r.send(&packet(0x82, &sub)).await;
    let (h, body) = r.read().await;
    assert_eq!((h, body.last()), (0x90, Some(&2)), "SUBACK granting QoS 2");

    let mut p = Peer::dev(ts.mqtt, "q2-pub").await;
    p.publish_qos2("q2/a", b"exactly once").await;
    let (dup, qos, id, payload) = r.publish().await;
    assert_eq!((dup, qos, payload.as_slice()), (false, 2, &b"exactly once"[..]));
    // PUBREC, PUBREL; then the connection dies before PUBCOMP.
    r.receive(id).await;
    drop(r);

    // Reconnect: the PUBLISH again with DUP and the same packet id (a receiver still holding
    // the id answers PUBREC without delivering it twice).
    let (mut r, present) = Raw::connect(ts.mqtt, "raw-q2").await;
    assert!(present);
    let (dup, qos, again, payload) = r.publish().await;
    assert_eq!((dup, qos, again, payload.as_slice()), (true, 2, id, &b"exactly once"[..]));
    r.receive(id).await;
    drop(r);
    p.disconnect().await;

    // Across a restart: the same packet id again, and once PUBCOMP is sent it is gone for good.
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let (mut r, present) = Raw::connect(ts.mqtt, "raw-q2").await;
    assert!(present, "the session came back from the store");
    let (_, qos, again, payload) = r.publish().await;
    assert_eq!((qos, again, payload.as_slice()), (2, id, &b"exactly once"[..]));
    r.receive(id).await;
    let [a, b] = id.to_be_bytes();
    r.send(&[0x70, 0x02, a, b]).await;
    // A PINGREQ answered proves the server read the PUBCOMP before the restart below.
    r.send(&[0xc0, 0x00]).await;
    assert_eq!(r.read().await.0, 0xd0, "PINGRESP");
    drop(r);
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let (mut r, present) = Raw::connect(ts.mqtt, "raw-q2").await;
    assert!(present);
    r.send(&[0xc0, 0x00]).await;
    let (h, _) = r.read().await;
    assert_eq!(h, 0xd0, "nothing but the PINGRESP: the completed delivery is not resent");
    ts.stop().await;
}

/// A v5 PUBLISH at QoS 2 (DUP when `dup`), no properties.
fn publish_qos2(topic: &[u8], id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = utf8(topic);
    body.extend_from_slice(&id.to_be_bytes());
    body.push(0);
    body.extend_from_slice(payload);
    packet(0x34 | if dup { 0x08 } else { 0 }, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_resent_after_a_reconnect_before_pubrel_is_taken_once() {
    let ts = TestServer::start(true).await;
    let mut sub = Peer::dev(ts.mqtt, "q2in-sub").await;
    sub.sub("in/#").await;

    let (mut r, _) = Raw::connect(ts.mqtt, "q2in-pub").await;
    r.send(&publish_qos2(b"in/a", 9, false, b"first")).await;
    let (h, body) = r.read().await;
    assert_eq!((h, &body[..2]), (0x50, &[0u8, 9][..]), "PUBREC for 9: {body:02x?}");
    // The connection dies before the PUBREL; the client resends on its next connection.
    drop(r);
    let (mut r, present) = Raw::connect(ts.mqtt, "q2in-pub").await;
    assert!(present);
    r.send(&publish_qos2(b"in/a", 9, true, b"first")).await;
    let (h, body) = r.read().await;
    assert_eq!((h, &body[..2]), (0x50, &[0u8, 9][..]), "PUBREC again, for the resend");
    r.send(&[0x62, 0x02, 0x00, 0x09]).await;
    let (h, body) = r.read().await;
    assert_eq!((h, &body[..2]), (0x70, &[0u8, 9][..]), "PUBCOMP for 9");
    assert_eq!(&sub.next_publish(5.0).await.expect("delivered").payload[..], b"first");
    sub.silent(1.0, "a QoS 2 publish resent after a reconnect").await;

    // Released: the id is free again and names a new message.
    r.send(&publish_qos2(b"in/a", 9, false, b"second")).await;
    assert_eq!(r.read().await.0, 0x50);
    r.send(&[0x62, 0x02, 0x00, 0x09]).await;
    assert_eq!(r.read().await.0, 0x70);
    assert_eq!(&sub.next_publish(5.0).await.expect("the next message").payload[..], b"second");
    ts.stop().await;
}

/// ntex-mqtt 8 never frees a v5 client's QoS 2 packet id after PUBREL; the framing guard runs
/// that side of QoS 2 (see `net::mqtt::framing`). Without it the 33rd publish below (receive
/// maximum 32) is refused with DISCONNECT 0x93, and a reused packet id gets PUBACK 0x91.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publishers_keep_going_past_the_receive_maximum_and_reuse_packet_ids() {
    let ts = TestServer::start_with(true, |c| c.mqtt.receive_maximum = 32).await;
    let mut sub = Peer::dev(ts.mqtt, "many-sub").await;
    let codes = sub.subscribe(vec![Filter::new("many/#", QoS::ExactlyOnce)], None).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]);
    // rumqttc reuses packet ids once their exchange is complete (at most 10 in flight here).
    let mut o = opts(ts.mqtt, "many-pub", None);
    o.set_outgoing_inflight_upper_limit(10);
    let (mut p, _) = Peer::connect(o).await;
    for i in 0..200 {
        p.publish_qos2("many/v5", format!("m{i}").as_bytes()).await;
    }
    for i in 0..200 {
        let m = sub.next_publish(5.0).await.unwrap_or_else(|| panic!("m{i}"));
        assert_eq!((text(&m.payload), m.qos), (format!("m{i}"), QoS::ExactlyOnce));
    }
    // The same from a 3.1.1 publisher.
    let o3 = rumqttc::MqttOptions::new("many-v3", ts.mqtt.ip().to_string(), ts.mqtt.port());
    let (mut v3, _) = common::V3::connect_opts(o3).await;
    for i in 0..100 {
        v3.client.publish("many/v3", rumqttc::QoS::ExactlyOnce, false, format!("n{i}")).await.unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), v3.events.poll()).await.expect("in time");
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)) = ev.expect("connected") {
                break;
            }
        }
    }
    for i in 0..100 {
        assert_eq!(text(&sub.next_publish(5.0).await.unwrap_or_else(|| panic!("n{i}")).payload), format!("n{i}"));
    }
    sub.silent(0.5, "each once").await;
    ts.stop().await;
}

/// A message larger than the subscriber's maximum packet size is discarded as if sent
/// [MQTT-3.1.2-25]: the next ones arrive, and it is not queued again for the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_clients_maximum_packet_size_is_discarded_not_retried() {
    let ts = TestServer::start(true).await;
    let small = |addr: SocketAddr| {
        let mut o = persistent(addr, "tiny", 300);
        o.set_max_packet_size(Some(256));
        o
    };
    let (mut s, _) = Peer::connect(small(ts.mqtt)).await;
    let codes = s
        .subscribe(vec![Filter::new("sized/1", QoS::AtLeastOnce), Filter::new("sized/2", QoS::ExactlyOnce)], None)
        .await;
    assert_eq!(codes.len(), 2);
    let mut p = Peer::dev(ts.mqtt, "sized-pub").await;
    p.publish("sized/1", &[b'x'; 1024]).await;
    p.publish_qos2("sized/2", &[b'y'; 1024]).await;
    p.publish("sized/1", b"fits").await;
    assert_eq!(&s.next_publish(5.0).await.expect("the small one").payload[..], b"fits");
    s.silent(0.5, "too large for the client").await;
    p.disconnect().await;
    s.disconnect().await;
    // Nothing is left for the session, in memory or in the store.
    let queued = |view: &serde_json::Value| view["sessions"][0]["queued"].as_u64();
    assert_eq!(queued(&ts.get("/v1/tenants/default/mqtt").await.1), Some(0));
    let dir = ts.stop().await;
    let ts = TestServer::start_in(dir, true, |_| {}).await;
    let view = ts.get("/v1/tenants/default/mqtt").await.1;
    assert_eq!((view["sessions"][0]["client_id"].as_str(), queued(&view)), (Some("tiny"), Some(0)), "{view}");
    let (mut s, ack) = Peer::connect(small(ts.mqtt)).await;
    assert!(ack.session_present);
    s.silent(1.0, "a discarded message is not sent again").await;
    ts.stop().await;
}
