//! Provisioning from a CSR: openssl makes a key and a CSR, registration verifies the CSR's
//! signature and issues a client certificate from the tenant's CA that `openssl verify`
//! accepts; forged and malformed CSRs are refused and register nothing; decommissioning
//! revokes the certificate.

mod common;

use std::process::Command;

use common::{ADMIN, TestServer, ensure_tenant, http};
use orbmanager::model::TenantId;
use serde_json::json;

fn openssl(args: &[&str], dir: &std::path::Path) -> String {
    let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_from_openssl_gets_a_certificate_openssl_verifies() {
    let ts = TestServer::start(false).await;
    ensure_tenant(&ts.http, "acme").await;
    let dir = tempfile::tempdir().unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "device.key",
            "-subj",
            "/CN=whatever",
            "-out",
            "device.csr",
        ],
        dir.path(),
    );
    let csr = std::fs::read_to_string(dir.path().join("device.csr")).unwrap();
    let (s, r) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "orb_id": "tls-1", "csr_pem": csr})),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    for field in ["certificate_pem", "ca_pem", "server_ca_pem", "device_token"] {
        assert!(r[field].as_str().is_some_and(|v| !v.is_empty()), "{field} missing: {r}");
    }
    std::fs::write(dir.path().join("cert.pem"), r["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), r["ca_pem"].as_str().unwrap()).unwrap();
    let out = openssl(&["verify", "-CAfile", "ca.pem", "-purpose", "sslclient", "cert.pem"], dir.path());
    assert!(out.contains("cert.pem: OK"), "{out}");
    let text = openssl(&["x509", "-in", "cert.pem", "-noout", "-text"], dir.path());
    assert!(text.contains("URI:orb://acme/tls-1"), "the SAN binds tenant and orb: {text}");
    assert!(text.contains("CN = tls-1") && !text.contains("whatever"), "the CSR's subject is not trusted");
    assert!(text.contains("TLS Web Client Authentication") && text.contains("CA:FALSE"));
    // The certificate carries the CSR's public key: it matches the device's private key.
    let cert_key = openssl(&["x509", "-in", "cert.pem", "-noout", "-pubkey"], dir.path());
    let dev_key = openssl(&["pkey", "-in", "device.key", "-pubout"], dir.path());
    assert_eq!(cert_key, dev_key);

    // Another tenant's CA does not verify it.
    ensure_tenant(&ts.http, "globex").await;
    let (_, g) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "globex", "orb_id": "g", "csr_pem": csr})),
    )
    .await;
    std::fs::write(dir.path().join("globex-ca.pem"), g["ca_pem"].as_str().unwrap()).unwrap();
    let o = Command::new("openssl")
        .args(["verify", "-CAfile", "globex-ca.pem", "cert.pem"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success(), "tenant CAs are separate");

    // Decommissioning revokes the certificate.
    let (s, _) = http("POST", &ts.url("/v1/orbs/tls-1/decommission?tenant_id=acme"), Some(ADMIN), None).await;
    assert_eq!(s, 200);
    let (_, view) = ts.get("/v1/orbs/tls-1?tenant_id=acme").await;
    let serial = view["cert_serial"].as_str().unwrap().to_string();
    assert!(ts.server().store().is_revoked(&TenantId::parse("acme").unwrap(), &serial).unwrap());
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_csrs_are_refused_and_register_nothing() {
    let ts = TestServer::start(false).await;
    ensure_tenant(&ts.http, "acme").await;
    let dir = tempfile::tempdir().unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "k.pem",
            "-subj",
            "/CN=x",
            "-outform",
            "DER",
            "-out",
            "csr.der",
        ],
        dir.path(),
    );
    let mut der = std::fs::read(dir.path().join("csr.der")).unwrap();
    let n = der.len();
    der[n - 3] ^= 0x01; // inside the signature
    let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let (s, b) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "orb_id": "f1", "csr_pem": forged})),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_argument")), "{b}");
    assert!(b["detail"].as_str().unwrap().contains("signature"), "{b}");
    let (s, b) = http(
        "POST",
        &ts.url("/v1/orbs/register"),
        Some(ADMIN),
        Some(json!({"tenant_id": "acme", "orb_id": "f2", "csr_pem": "not a csr"})),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_argument")));
    for orb in ["f1", "f2"] {
        let (s, _) = ts.get(&format!("/v1/orbs/{orb}?tenant_id=acme")).await;
        assert_eq!(s, 404, "{orb} was not registered");
    }
    ts.stop().await;
}
