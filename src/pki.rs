//! Device identities: a certificate authority per tenant, and device certificates issued from
//! a CSR whose signature is verified. Only the CSR's public key is used: subject, SANs, key
//! usages and validity are set here, so a CSR cannot ask for a CA certificate or another orb's
//! name.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::model::{OrbId, TenantId};

/// Validity of a device certificate.
pub const DEVICE_CERT_DAYS: i64 = 365;
/// Validity of a tenant CA.
pub const CA_CERT_DAYS: i64 = 3650;
/// Largest CSR accepted, in bytes of PEM.
pub const CSR_PEM_MAX_BYTES: usize = 16 * 1024;

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("csr_pem is {0} bytes; the limit is {CSR_PEM_MAX_BYTES}")]
    TooLarge(usize),
    #[error("csr_pem is not a PEM certificate signing request")]
    Unparsable,
    #[error("csr_pem: its signature does not verify against its own public key")]
    BadSignature,
    #[error("csr_pem: {0}")]
    Unsupported(String),
    #[error("certificate authority: {0}")]
    Ca(String),
}

/// A CA as stored: its certificate and signing key (PEM).
///
/// The key is stored in the data directory like everything else; a KMS-backed key is future
/// work (see the issue notes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredCa {
    pub cert_pem: String,
    pub key_pem: String,
    pub created_ms: u64,
}

/// A certificate issued to a device.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// Hex serial number (what revocation lists name).
    pub serial: String,
}

fn datetime(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> (SerialNumber, String) {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system random source failed");
    b[0] &= 0x7f; // positive
    (SerialNumber::from(b.to_vec()), hex::encode(b))
}

/// A new self-signed CA named `common_name`.
pub fn new_ca(common_name: &str, now_ms: u64) -> Result<StoredCa, PkiError> {
    let key = KeyPair::generate().map_err(|e| PkiError::Ca(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "OrbManager");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = datetime(now_ms) - Duration::hours(1);
    params.not_after = datetime(now_ms) + Duration::days(CA_CERT_DAYS);
    params.serial_number = Some(random_serial().0);
    let cert = params.self_signed(&key).map_err(|e| PkiError::Ca(e.to_string()))?;
    Ok(StoredCa { cert_pem: cert.pem(), key_pem: key.serialize_pem(), created_ms: now_ms })
}

/// The CA that issues a tenant's device certificates.
pub fn new_tenant_ca(tenant: &TenantId, now_ms: u64) -> Result<StoredCa, PkiError> {
    new_ca(&format!("OrbManager tenant {tenant} device CA"), now_ms)
}

/// The URI SAN that names an orb: `orb://<tenant>/<orb>`.
pub fn orb_uri(tenant: &TenantId, orb: &OrbId) -> String {
    format!("orb://{tenant}/{orb}")
}

/// Verifies `csr_pem`'s signature and issues a client certificate for `tenant/orb` with the
/// CSR's public key.
pub fn issue_device_cert(
    ca: &StoredCa,
    tenant: &TenantId,
    orb: &OrbId,
    csr_pem: &str,
    now_ms: u64,
) -> Result<IssuedCert, PkiError> {
    if csr_pem.len() > CSR_PEM_MAX_BYTES {
        return Err(PkiError::TooLarge(csr_pem.len()));
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => PkiError::BadSignature,
        rcgen::Error::CouldNotParseCertificationRequest => PkiError::Unparsable,
        other => PkiError::Unsupported(other.to_string()),
    })?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::Ca(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| PkiError::Ca(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, orb.as_str());
    dn.push(DnType::OrganizationName, tenant.as_str());
    params.distinguished_name = dn;
    let uri = orb_uri(tenant, orb).try_into().map_err(|e: rcgen::Error| PkiError::Ca(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = datetime(now_ms) - Duration::minutes(5);
    params.not_after = datetime(now_ms) + Duration::days(DEVICE_CERT_DAYS);
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    let signed = CertificateSigningRequestParams { params, public_key: csr.public_key }
        .signed_by(&issuer)
        .map_err(|e| PkiError::Unsupported(e.to_string()))?;
    Ok(IssuedCert { cert_pem: signed.pem(), serial: serial_hex })
}

/// Validity of a server certificate (issued again at every start).
pub const SERVER_CERT_DAYS: i64 = 397;

/// A TLS server certificate from `ca` for `dns` names and `ips`, with a new key.
/// Returns (certificate PEM, private key PEM).
pub fn issue_server_cert(
    ca: &StoredCa,
    dns: &[String],
    ips: &[std::net::IpAddr],
    now_ms: u64,
) -> Result<(String, String), PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::Ca(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| PkiError::Ca(e.to_string()))?;
    let key = KeyPair::generate().map_err(|e| PkiError::Ca(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns.first().map_or("orbmanager", String::as_str));
    dn.push(DnType::OrganizationName, "OrbManager");
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    for d in dns {
        sans.push(SanType::DnsName(
            d.clone().try_into().map_err(|e: rcgen::Error| PkiError::Unsupported(e.to_string()))?,
        ));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = datetime(now_ms) - Duration::minutes(5);
    params.not_after = datetime(now_ms) + Duration::days(SERVER_CERT_DAYS);
    params.serial_number = Some(random_serial().0);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(|e| PkiError::Ca(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn csr_for(cn: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        // A CSR asking to be a CA: ignored.
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn issues_a_client_certificate_naming_the_orb_whatever_the_csr_asks() {
        let t = TenantId::parse("acme").unwrap();
        let o = OrbId::parse("r1").unwrap();
        let ca = new_tenant_ca(&t, NOW).unwrap();
        let cert = issue_device_cert(&ca, &t, &o, &csr_for("someone-else"), NOW).unwrap();
        let der = pem::parse(&cert.cert_pem).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        assert!(!x.is_ca());
        assert_eq!(x.subject().iter_common_name().next().unwrap().as_str().unwrap(), "r1");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(format!("{:?}", san.value.general_names), "[URI(\"orb://acme/r1\")]");
        assert_eq!(hex::encode(x.raw_serial()), cert.serial);
    }

    #[test]
    fn forged_or_garbage_csrs_are_refused() {
        let t = TenantId::parse("acme").unwrap();
        let o = OrbId::parse("r1").unwrap();
        let ca = new_tenant_ca(&t, NOW).unwrap();
        let good = csr_for("r1");
        let mut der = pem::parse(&good).unwrap().contents().to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55; // inside the signature
        let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(issue_device_cert(&ca, &t, &o, &forged, NOW), Err(PkiError::BadSignature)));
        assert!(matches!(issue_device_cert(&ca, &t, &o, "hello", NOW), Err(PkiError::Unparsable)));
        let big = "x".repeat(CSR_PEM_MAX_BYTES + 1);
        assert!(matches!(issue_device_cert(&ca, &t, &o, &big, NOW), Err(PkiError::TooLarge(_))));
    }
}
