//! The MQTTS listener with device certificates from provisioning (mTLS, rustls): the
//! certificate is the identity; wrong CA, another tenant's CA, expired, not yet valid,
//! superseded and revoked certificates are refused, and a revocation closes a live session.

mod common;

use std::time::Duration;

use common::{ADMIN, TestServer, ensure_tenant, http};
use orbmanager::model::{OrbId, TenantId};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::json;

/// A device identity: its key and certificate (PEM).
struct Device {
    key_pem: String,
    cert_pem: String,
}

fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

/// Registers `tenant/orb` with a CSR; returns the device and the server CA to trust.
async fn register(ts: &TestServer, tenant: &str, orb: &str) -> (Device, String) {
    ensure_tenant(&ts.http, tenant).await;
    let (key_pem, csr) = csr();
    let (code, body) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": tenant, "orb_id": orb, "csr_pem": csr})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let cert_pem = body["certificate_pem"].as_str().unwrap().to_string();
    (Device { key_pem, cert_pem }, body["server_ca_pem"].as_str().unwrap().to_string())
}

fn options(ts: &TestServer, client_id: &str, dev: &Device, server_ca: &str) -> MqttOptions {
    let addr = ts.mqtts.expect("mqtts listener");
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: server_ca.as_bytes().to_vec(),
        alpn: None,
        client_auth: Some((dev.cert_pem.as_bytes().to_vec(), dev.key_pem.as_bytes().to_vec())),
    }));
    o
}

/// Connects; the CONNACK or the error that prevented it.
async fn connect(o: MqttOptions) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (client, mut events) = AsyncClient::new(o, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("an answer in time")? {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, events)),
            _ => continue,
        }
    }
}

/// A refusal in the TLS handshake (not a CONNACK).
fn tls_refused(r: Result<(AsyncClient, EventLoop), ConnectionError>, what: &str) {
    match r {
        Ok(_) => panic!("{what}: connected"),
        Err(ConnectionError::ConnectionRefused(code)) => panic!("{what}: refused at CONNACK ({code:?}), not in TLS"),
        Err(_) => {}
    }
}

async fn publish(client: &AsyncClient, events: &mut EventLoop, topic: &str, payload: Vec<u8>) -> PubAckReason {
    client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("puback in time").unwrap() {
            Event::Incoming(Packet::PubAck(a)) => return a.reason,
            _ => continue,
        }
    }
}

/// The tenant CA's certificate and key, as the server stores them.
fn tenant_ca(ts: &TestServer, tenant: &str) -> orbmanager::pki::StoredCa {
    ts.server().store().ca(Some(&TenantId::parse(tenant).unwrap())).unwrap().expect("tenant CA")
}

fn issue(ca: &orbmanager::pki::StoredCa, tenant: &str, orb: &str, now_ms: u64) -> Device {
    let (key_pem, csr) = csr();
    let cert = orbmanager::pki::issue_device_cert(
        ca,
        &TenantId::parse(tenant).unwrap(),
        &OrbId::parse(orb).unwrap(),
        &csr,
        now_ms,
    )
    .unwrap();
    Device { key_pem, cert_pem: cert.cert_pem }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_certificates_are_the_identity_on_mqtts() {
    let ts = TestServer::start(false).await;
    let (dev, server_ca) = register(&ts, "acme", "o1").await;
    let _ = register(&ts, "beta", "b1").await;

    // The issued certificate connects; telemetry is accepted for its own orb only.
    let (client, mut events) = connect(options(&ts, "o1", &dev, &server_ca)).await.expect("mTLS connect");
    let point = common::telemetry(common::now_ms(), "tls-1", 77.0);
    assert_eq!(publish(&client, &mut events, "telemetry/acme/o1", point).await, PubAckReason::Success);
    assert_eq!(
        publish(&client, &mut events, "telemetry/acme/o2", common::telemetry(common::now_ms(), "x", 1.0)).await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(common::history(&ts, "acme", "o1").await.len(), 1);
    let (_, orb) = ts.get("/v1/orbs/o1?tenant_id=acme").await;
    assert_eq!(orb["connectivity"]["online"], json!(true), "{orb}");

    // Another identity may not use the client id of the connected device.
    let token = ts.register("acme", "o2").await;
    let mut o = MqttOptions::new("o1", ts.mqtt.ip().to_string(), ts.mqtt.port());
    o.set_credentials("acme/o2", token);
    assert!(connect(o).await.is_err(), "o2 took o1's client id");
    assert_eq!(
        publish(&client, &mut events, "telemetry/acme/o1", common::telemetry(common::now_ms(), "tls-2", 70.0)).await,
        PubAckReason::Success,
        "o1 unaffected"
    );

    // The client id must be the certificate's orb id.
    match connect(options(&ts, "not-o1", &dev, &server_ca)).await {
        Err(ConnectionError::ConnectionRefused(_)) => {}
        other => panic!("client id mismatch: {:?}", other.map(|_| ())),
    }

    // Refused in the handshake: a look-alike CA, another tenant's CA, expired, not yet valid.
    let now = common::now_ms();
    let fake_ca = orbmanager::pki::new_tenant_ca(&TenantId::parse("acme").unwrap(), now).unwrap();
    tls_refused(connect(options(&ts, "o1", &issue(&fake_ca, "acme", "o1", now), &server_ca)).await, "fake CA");
    let beta_ca = tenant_ca(&ts, "beta");
    tls_refused(connect(options(&ts, "o1", &issue(&beta_ca, "acme", "o1", now), &server_ca)).await, "beta's CA");
    let acme_ca = tenant_ca(&ts, "acme");
    let day = 86_400_000;
    tls_refused(
        connect(options(&ts, "o1", &issue(&acme_ca, "acme", "o1", now - 400 * day), &server_ca)).await,
        "expired",
    );
    tls_refused(
        connect(options(&ts, "o1", &issue(&acme_ca, "acme", "o1", now + 2 * day), &server_ca)).await,
        "not yet valid",
    );
    // Valid and from the right CA, but not the orb's current certificate.
    match connect(options(&ts, "o1", &issue(&acme_ca, "acme", "o1", now), &server_ca)).await {
        Err(ConnectionError::ConnectionRefused(_)) => {}
        other => panic!("a certificate that is not the current one: {:?}", other.map(|_| ())),
    }

    // Refused renewals and revocations change nothing: a garbage CSR, another tenant's orb id.
    let url = |path: &str| ts.url(path);
    let (code, body) = http(
        "POST",
        &url("/v1/orbs/o1/certificate?tenant_id=acme"),
        Some(ADMIN),
        Some(json!({"csr_pem": "not a csr"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = http("POST", &url("/v1/orbs/o1/certificate/revoke?tenant_id=beta"), Some(ADMIN), None).await;
    assert_eq!(code, 404, "beta has no o1");
    assert_eq!(
        publish(&client, &mut events, "telemetry/acme/o1", common::telemetry(common::now_ms(), "tls-3", 71.0)).await,
        PubAckReason::Success,
        "the certificate still works"
    );

    // Rotation: a new certificate replaces the old one and closes the live connection.
    let (new_key, csr) = csr();
    let (code, body) =
        http("POST", &ts.url("/v1/orbs/o1/certificate?tenant_id=acme"), Some(ADMIN), Some(json!({"csr_pem": csr})))
            .await;
    assert_eq!(code, 200, "{body}");
    let renewed = Device { key_pem: new_key, cert_pem: body["certificate_pem"].as_str().unwrap().into() };
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = events.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the old connection is closed");
    assert!(format!("{ended:?}").contains("NotAuthorized"), "{ended:?}");
    match connect(options(&ts, "o1", &dev, &server_ca)).await {
        Err(ConnectionError::ConnectionRefused(_)) => {}
        other => panic!("the superseded certificate: {:?}", other.map(|_| ())),
    }
    let (client, mut events) = connect(options(&ts, "o1", &renewed, &server_ca)).await.expect("renewed certificate");

    // Revocation closes the live session, and the certificate is refused from then on.
    let (code, body) = http("POST", &ts.url("/v1/orbs/o1/certificate/revoke?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(code, 200, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = events.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the revoked device is disconnected");
    assert!(format!("{ended:?}").contains("NotAuthorized"), "{ended:?}");
    drop(client);
    tls_refused(connect(options(&ts, "o1", &renewed, &server_ca)).await, "revoked");
    let (_, orb) = ts.get("/v1/orbs/o1?tenant_id=acme").await;
    assert_eq!(orb["connectivity"]["disconnect_reason"], json!("auth_revoked"), "{orb}");
    // Revoking again: nothing to revoke.
    let (code, _) = http("POST", &ts.url("/v1/orbs/o1/certificate/revoke?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(code, 409);
    ts.stop().await;
}
