//! The MQTTS listener's TLS (rustls, TLS 1.2 and 1.3 only): a server certificate issued by the
//! platform's server CA (the `server_ca_pem` devices get at registration), and client
//! certificates verified against the CA of the tenant they name.
//!
//! A device certificate names its orb in a URI SAN `orb://<tenant>/<orb>` (see `pki`). The
//! verifier reads that name, then checks the chain against *that tenant's* CA only, the
//! validity period, the client-auth usage and the revocation list; so a certificate from
//! another tenant's CA, or from any other CA, naming a tenant is refused in the handshake.
//! The MQTT layer then requires the certificate to be the orb's current one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::model::{OrbKey, TenantId};
use crate::pki::StoredCa;
use crate::storage::Store;

/// The identity a verified device certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCert {
    pub key: OrbKey,
    /// Hex serial (what revocation names).
    pub serial: String,
}

/// Reads the orb identity (URI SAN `orb://<tenant>/<orb>`) and serial of a certificate.
pub fn device_identity(der: &[u8]) -> Result<DeviceCert, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative name: {e}"))?
        .ok_or("the certificate names no orb (no subject alternative name)")?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("orb://"),
        _ => None,
    });
    let path = names.next().ok_or("the certificate names no orb (no orb:// URI)")?;
    if names.next().is_some() {
        return Err("the certificate names more than one orb".into());
    }
    let key = OrbKey::parse_path(path).map_err(|e| format!("the certificate's orb name: {e}"))?;
    Ok(DeviceCert { key, serial: hex::encode(cert.raw_serial()) })
}

fn bad_cert(e: CertificateError) -> rustls::Error {
    rustls::Error::InvalidCertificate(e)
}

/// Verifies client certificates against the CA of the tenant they name.
pub struct TenantCaVerifier {
    store: Store,
    provider: Arc<CryptoProvider>,
    /// One webpki verifier per tenant, built from its CA on first use (tenant CAs do not change).
    by_tenant: Mutex<HashMap<TenantId, Arc<dyn ClientCertVerifier>>>,
}

impl std::fmt::Debug for TenantCaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCaVerifier").finish_non_exhaustive()
    }
}

impl TenantCaVerifier {
    pub fn new(store: Store, provider: Arc<CryptoProvider>) -> Self {
        TenantCaVerifier { store, provider, by_tenant: Mutex::new(HashMap::new()) }
    }

    fn for_tenant(&self, tenant: &TenantId) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        if let Some(v) = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner()).get(tenant) {
            return Ok(v.clone());
        }
        let ca = self
            .store
            .ca(Some(tenant))
            .map_err(|e| rustls::Error::General(format!("reading the tenant CA: {e}")))?
            .ok_or_else(|| bad_cert(CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        for der in pem_certs(&ca.cert_pem) {
            roots.add(der).map_err(|e| rustls::Error::General(format!("tenant CA: {e}")))?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("tenant CA verifier: {e}")))?;
        self.by_tenant.lock().unwrap_or_else(|e| e.into_inner()).insert(tenant.clone(), v.clone());
        Ok(v)
    }
}

impl ClientCertVerifier for TenantCaVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Devices hold exactly one certificate; no hints needed (and tenants are many).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = device_identity(end_entity).map_err(|_| bad_cert(CertificateError::BadEncoding))?;
        self.for_tenant(&id.key.tenant)?.verify_client_cert(end_entity, intermediates, now)?;
        let revoked = self
            .store
            .is_revoked(&id.key.tenant, &id.serial)
            .map_err(|e| rustls::Error::General(format!("reading revocations: {e}")))?;
        if revoked {
            return Err(bad_cert(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn pem_certs(pem_text: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem_text.as_bytes()).filter_map(Result::ok).collect()
}

/// The MQTTS server configuration: a fresh server certificate from `server_ca` for
/// `localhost`, `ip` and `names`, and client certificates required and verified per tenant.
pub fn server_config(
    store: Store,
    server_ca: &StoredCa,
    ip: IpAddr,
    names: &[String],
    now_ms: u64,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut dns = vec!["localhost".to_string()];
    dns.extend(names.iter().cloned());
    let (cert_pem, key_pem) = crate::pki::issue_server_cert(server_ca, &dns, &[ip], now_ms)
        .map_err(|e| format!("server certificate: {e}"))?;
    let mut chain = pem_certs(&cert_pem);
    chain.extend(pem_certs(&server_ca.cert_pem));
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("server key: {e}"))?;
    let verifier = Arc::new(TenantCaVerifier::new(store, provider.clone()));
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_identity_reads_the_orb_uri_and_serial() {
        let t = TenantId::parse("acme").unwrap();
        let o = crate::model::OrbId::parse("r1").unwrap();
        let ca = crate::pki::new_tenant_ca(&t, 1_800_000_000_000).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
        let issued = crate::pki::issue_device_cert(&ca, &t, &o, &csr, 1_800_000_000_000).unwrap();
        let der = pem_certs(&issued.cert_pem).remove(0);
        let id = device_identity(&der).unwrap();
        assert_eq!(id.key.to_string(), "acme/r1");
        assert_eq!(id.serial, issued.serial);
        // A CA certificate names no orb.
        assert!(device_identity(&pem_certs(&ca.cert_pem).remove(0)).is_err());
        assert!(device_identity(b"not a certificate").is_err());
    }
}
