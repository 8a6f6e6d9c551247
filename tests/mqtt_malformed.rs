//! Malformed MQTT input closes only the offending connection: raw bytes over TCP, each case on
//! its own connection, while a well-behaved client keeps publishing through all of them.

mod common;

use std::time::Duration;

use common::raw::{packet, utf8};
use common::{TestServer, V5};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// CONNECT with a clean session, keep-alive 30 s; `version` 4 (3.1.1) or 5.
fn connect(version: u8, client_id: &str) -> Vec<u8> {
    let mut body = utf8(b"MQTT");
    body.extend_from_slice(&[version, 0x02, 0x00, 0x1e]);
    if version == 5 {
        body.push(0); // no properties
    }
    body.extend(utf8(client_id.as_bytes()));
    packet(0x10, &body)
}

/// PUBLISH with a raw topic (bytes as given), QoS from `flags`, an optional packet id.
fn publish(version: u8, flags: u8, topic: &[u8], packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = utf8(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if version == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | flags, &body)
}

/// Sends `bytes` (after a valid CONNECT when `version` is given) and waits until the server
/// closes the connection. Returns the bytes it sent before closing.
async fn closes(ts: &TestServer, what: &str, version: Option<u8>, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(ts.mqtt).await.unwrap();
    let mut seen = Vec::new();
    if let Some(v) = version {
        s.write_all(&connect(v, &format!("bad-{}", what.replace(' ', "-")))).await.unwrap();
        // CONNACK first.
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap_or_else(|e| panic!("{what}: no CONNACK: {e}"));
        assert_eq!(head[0], 0x20, "{what}: CONNACK");
        let mut rest = vec![0u8; head[1] as usize];
        s.read_exact(&mut rest).await.unwrap();
    }
    let _ = s.write_all(bytes).await;
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: the server kept the connection open (sent {seen:02x?})");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_their_connection() {
    let ts = TestServer::start_with(true, |c| c.mqtt.connect_timeout_s = 1).await;
    let mut calm = V5::connect(ts.mqtt, "calm", None).await.unwrap();
    let calm_ok = async |calm: &mut V5, what: &str| {
        let ack = calm.publish("calm/topic", b"still here".to_vec()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(ack.reason, PubAckReason::Success, "{what}");
    };

    // Before CONNECT.
    closes(&ts, "first packet not CONNECT", None, &packet(0xc0, &[])).await;
    closes(&ts, "publish before CONNECT", None, &publish(4, 0, b"a/b", None, b"x")).await;
    // A CONNECT cut short, and one dribbled too slowly: the connect deadline closes both.
    let full = connect(4, "slow");
    closes(&ts, "truncated CONNECT", None, &full[..5]).await;
    closes(&ts, "garbage protocol name", None, &packet(0x10, &utf8(b"XQTT"))).await;
    calm_ok(&mut calm, "after pre-CONNECT garbage").await;

    for v in [4u8, 5] {
        let case = |name: &str| format!("v{v} {name}");
        closes(&ts, &case("remaining length FF FF FF 7F"), Some(v), &[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
        closes(&ts, &case("remaining length over 4 bytes"), Some(v), &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
        closes(&ts, &case("QoS 3"), Some(v), &publish(v, 0x06, b"a/b", Some(1), b"x")).await;
        closes(&ts, &case("packet id 0"), Some(v), &publish(v, 0x02, b"a/b", Some(0), b"x")).await;
        closes(&ts, &case("wildcard in PUBLISH topic +"), Some(v), &publish(v, 0x02, b"a/+", Some(1), b"x")).await;
        closes(&ts, &case("wildcard in PUBLISH topic #"), Some(v), &publish(v, 0x00, b"a/#", None, b"x")).await;
        closes(&ts, &case("invalid UTF-8 topic"), Some(v), &publish(v, 0x02, &[b'a', 0xc3, 0x28], Some(1), b"x")).await;
        closes(&ts, &case("second CONNECT"), Some(v), &connect(v, "again")).await;
        closes(&ts, &case("reserved packet type 0"), Some(v), &packet(0x00, &[])).await;
        let no_props: &[u8] = if v == 5 { &[0x00] } else { &[] };
        closes(&ts, &case("SUBSCRIBE without filters"), Some(v), &packet(0x82, &[&[0x00, 0x01], no_props].concat()))
            .await;
        closes(&ts, &case("UNSUBSCRIBE without filters"), Some(v), &packet(0xa2, &[&[0x00, 0x02], no_props].concat()))
            .await;
        calm_ok(&mut calm, &case("after malformed packets")).await;
    }
    // An empty topic (MQTT 5: without a topic alias).
    closes(&ts, "v5 empty topic without alias", Some(5), &publish(5, 0x02, b"", Some(1), b"x")).await;
    closes(&ts, "v3 empty topic", Some(4), &publish(4, 0x02, b"", Some(1), b"x")).await;
    calm_ok(&mut calm, "at the end").await;
    calm.disconnect().await;
    ts.stop().await;
}

/// The packets in `bytes` as (first byte, body).
fn packets(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let b = bytes[i];
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        out.push((bytes[0], bytes[i..i + len].to_vec()));
        bytes = &bytes[i + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_receive_maximum_gets_disconnect_0x93() {
    let ts = TestServer::start_with(true, |c| c.mqtt.receive_maximum = 2).await;
    // Three QoS 1 telemetry publishes in one write: each waits for its fsync'd commit, so the
    // third arrives while two are unacknowledged.
    let mut burst = Vec::new();
    for id in 1..=3u16 {
        let body = common::telemetry(common::now_ms(), &format!("rm-{id}"), 50.0);
        burst.extend(publish(5, 0x02, b"telemetry/default/rm", Some(id), &body));
    }
    let seen = closes(&ts, "receive maximum exceeded", Some(5), &burst).await;
    let disconnect = packets(&seen).into_iter().find(|(h, _)| *h == 0xe0).expect("a DISCONNECT before the close");
    assert_eq!(disconnect.1.first(), Some(&0x93), "reason: receive maximum exceeded ({seen:02x?})");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_is_processed_once_even_when_resent_before_pubrel() {
    let ts = TestServer::start(true).await;
    let mut sub = common::peer::Peer::dev(ts.mqtt, "q2-sub").await;
    sub.sub("q2/#").await;
    let mut s = TcpStream::connect(ts.mqtt).await.unwrap();
    s.write_all(&connect(5, "q2-pub")).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(packets(&buf[..n])[0].0, 0x20, "CONNACK");
    let read_packet = async |s: &mut TcpStream| -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; head[1] as usize];
        s.read_exact(&mut body).await.unwrap();
        (head[0], body)
    };
    // PUBLISH QoS 2 id 7; PUBREC.
    s.write_all(&publish(5, 0x04, b"q2/raw", Some(7), b"once")).await.unwrap();
    let (h, body) = read_packet(&mut s).await;
    assert_eq!((h, &body[..2]), (0x50, &[0u8, 7][..]), "PUBREC for id 7");
    // The same PUBLISH again (DUP) before PUBREL: acknowledged, not delivered again.
    s.write_all(&publish(5, 0x04 | 0x08, b"q2/raw", Some(7), b"once")).await.unwrap();
    let (h, body) = read_packet(&mut s).await;
    assert_eq!((h, &body[..2]), (0x50, &[0u8, 7][..]), "PUBREC again for id 7");
    // PUBREL; PUBCOMP.
    s.write_all(&[0x62, 0x02, 0x00, 0x07]).await.unwrap();
    let (h, body) = read_packet(&mut s).await;
    assert_eq!((h, &body[..2]), (0x70, &[0u8, 7][..]), "PUBCOMP for id 7");
    let m = sub.next_publish(5.0).await.expect("delivered");
    assert_eq!(&m.payload[..], b"once");
    sub.silent(1.0, "a QoS 2 message resent before PUBREL").await;

    // A telemetry point at QoS 2 through a real client: stored once.
    let mut o = common::peer::opts(ts.mqtt, "q2-orb", None);
    o.set_keep_alive(Duration::from_secs(30));
    let (p, _) = common::peer::Peer::connect(o).await;
    let point = common::telemetry(common::now_ms(), "q2-point", 12.0);
    p.client.publish("telemetry/default/q2orb", rumqttc::v5::mqttbytes::QoS::ExactlyOnce, false, point).await.unwrap();
    // Registered on first contact: the orb exists only once the point is being applied.
    common::wait_until("the QoS 2 point is stored", 10, || async {
        ts.get("/v1/orbs/q2orb?tenant_id=default").await.0 == 200
            && common::history(&ts, "default", "q2orb").await.len() == 1
    })
    .await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dribbled_byte_by_byte_is_cut_off_by_the_deadline() {
    let ts = TestServer::start_with(true, |c| c.mqtt.connect_timeout_s = 1).await;
    let mut s = TcpStream::connect(ts.mqtt).await.unwrap();
    let started = std::time::Instant::now();
    let full = connect(4, "slowloris");
    let mut sent = 0;
    // One byte every 200 ms: the whole CONNECT would take 3+ s; the deadline is 1 s.
    for b in &full {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut probe = [0u8; 8];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => panic!("the server answered a dribbled CONNECT: {:02x?}", &probe[..n]),
            Err(_) => {}
        }
    }
    assert!(sent < full.len(), "the connection outlived the whole dribble ({sent} bytes)");
    assert!(started.elapsed() < Duration::from_secs(10));
    ts.stop().await;
}
