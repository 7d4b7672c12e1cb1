//! The swarm's PKI: a root CA made at `swarm init`, node certificates
//! issued from CSRs (the CA, not the node, decides the identity written into
//! them), and reading identities back out of presented certificates.
//!
//! A node certificate carries: CN = node ID, OU = `mesh-manager` or
//! `mesh-worker`, O = cluster ID, and DNS names `mesh-manager` (managers
//! only) or `mesh-worker`, plus `<node-id>.mesh-node`. Callers that need a
//! manager verify the server as `mesh-manager`, so a worker certificate can
//! never pose as one.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use zeroize::Zeroizing;

use crate::api::cert_records::Issued;
use crate::api::objects::{node_id_text, parse_node_id, NodeId, Role};

/// DNS name in every manager certificate.
pub(crate) const MANAGER_DNS: &str = "mesh-manager";
/// DNS name in every worker certificate.
pub(crate) const WORKER_DNS: &str = "mesh-worker";
const MANAGER_OU: &str = "mesh-manager";
/// OU of operator (client-only) certificates for `meshctl --host`.
const OPERATOR_OU: &str = "mesh-operator";
const WORKER_OU: &str = "mesh-worker";
/// Root CA lifetime (as Swarm: 20 years).
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 86400);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM or DER input did not parse.
    #[error("{what} does not parse: {why}")]
    Parse {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        why: String,
    },
    /// The certificate is not a mesh node certificate.
    #[error("not a mesh node certificate: {0}")]
    NotANodeCertificate(String),
}

fn parse_err(what: &'static str, why: impl ToString) -> PkiError {
    PkiError::Parse {
        what,
        why: why.to_string(),
    }
}

/// The identity the CA writes into a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its swarm.
    pub cluster_id: String,
}

/// SHA-256 of a certificate's DER: what join tokens pin.
pub fn cert_digest(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A root's fields: every root of a swarm has the same name, so a
/// cross-signed root stands in for the root of the same key.
fn root_params(cluster_id: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mesh-root-ca");
    dn.push(DnType::OrganizationName, cluster_id);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + CA_LIFETIME).into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// The swarm's root certificate authority.
pub struct RootCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("digest", &hex::encode(self.digest()))
            .finish_non_exhaustive()
    }
}

impl RootCa {
    /// A new self-signed ECDSA P-256 root for `cluster_id`.
    pub fn generate(cluster_id: &str) -> Result<RootCa, PkiError> {
        let key = KeyPair::generate()?;
        let cert = root_params(cluster_id)?.self_signed(&key)?;
        Ok(RootCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            key,
        })
    }

    /// The CA from its stored PEMs.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<RootCa, PkiError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| parse_err("the CA certificate", e))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| parse_err("the CA key", e))?;
        Ok(RootCa {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
            key_pem: Zeroizing::new(key_pem.to_string()),
        })
    }

    /// `next`'s root key certified by this root (PEM), for a rotation:
    /// a node that trusts only this root verifies a chain through it to a
    /// certificate `next` issued, so a node away during the rotation can
    /// still reach the managers and renew.
    pub fn cross_sign(&self, next: &RootCa, cluster_id: &str) -> Result<String, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(root_params(cluster_id)?.signed_by(&next.key, &issuer)?.pem())
    }

    /// The root certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root key (PEM). Secret: only ever stored sealed.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// SHA-256 of the root certificate.
    pub fn digest(&self) -> [u8; 32] {
        cert_digest(&self.cert_der)
    }

    /// Signs the key in `csr_pem` into a certificate for `identity`, valid
    /// from `not_before` to `not_after`. Whatever subject the CSR asks for is
    /// ignored; its signature must verify (proof the caller holds the key).
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &NodeIdentity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| parse_err("the CSR", e))?;
        let id = node_id_text(identity.node_id);
        let (ou, dns) = match identity.role {
            Role::Manager => (MANAGER_OU, MANAGER_DNS),
            Role::Worker => (WORKER_OU, WORKER_DNS),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.as_str());
        dn.push(DnType::OrganizationalUnitName, ou);
        dn.push(DnType::OrganizationName, identity.cluster_id.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::DnsName(dns.try_into()?),
            SanType::DnsName(format!("{id}.mesh-node").try_into()?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        self.sign(csr, params)
    }
}

impl RootCa {
    /// Signs an operator certificate for `meshctl --host`: CN = `name`,
    /// OU = `mesh-operator`, client authentication only, so it can call the
    /// cluster API but can never serve as or pose as a node.
    pub fn issue_operator(
        &self,
        csr_pem: &str,
        name: &str,
        cluster_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| parse_err("the CSR", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, OPERATOR_OU);
        dn.push(DnType::OrganizationName, cluster_id);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        self.sign(csr, params)
    }
}

impl RootCa {
    /// Signs the CSR's key with `params` (the CSR's own subject and
    /// extensions are dropped), with a random serial.
    fn sign(
        &self,
        mut csr: CertificateSigningRequestParams,
        mut params: CertificateParams,
    ) -> Result<String, PkiError> {
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }
}

/// The operator name and cluster ID in an operator certificate, if it is one.
fn operator_of(cert: &X509Certificate<'_>) -> Option<(String, String)> {
    let subject = cert.subject();
    let ou = subject.iter_organizational_unit().next()?.as_str().ok()?;
    if ou != OPERATOR_OU {
        return None;
    }
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let o = subject.iter_organization().next()?.as_str().ok()?.to_string();
    Some((cn, o))
}

/// A certificate's serial number (hex), as the store records it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(cert.tbs_certificate.raw_serial()))
}

/// What a presented certificate claims, read in one parse: a node's
/// identity or an operator's name, and the serial the store knows it by.
/// Claims only: what the holder may do is decided from the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Presented {
    /// The node it names, if it is a node certificate.
    pub identity: Option<NodeIdentity>,
    /// (operator name, cluster ID), if it is an operator certificate.
    pub operator: Option<(String, String)>,
    /// Its serial number (hex); empty if it does not parse.
    pub serial: String,
}

/// What `der` claims; nothing if it is no certificate.
pub fn presented(der: &[u8]) -> Presented {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Presented::default();
    };
    Presented {
        identity: identity_of(&cert).ok().map(|(identity, _)| identity),
        operator: operator_of(&cert),
        serial: hex::encode(cert.tbs_certificate.raw_serial()),
    }
}

impl RootCa {
    /// The store's record of `cert_pem`, just issued by this CA at `now`
    /// (unix seconds).
    pub fn record(&self, cert_pem: &str, now: u64) -> Result<Issued, PkiError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| parse_err("the certificate", e))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| parse_err("the certificate", e))?;
        Ok(Issued {
            serial: hex::encode(cert.tbs_certificate.raw_serial()),
            ca: hex::encode(self.digest()),
            issued_at: now,
            not_after: cert.validity().not_after.timestamp().max(0) as u64,
        })
    }
}

/// Operator names: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_operator_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A node's private key.
pub struct NodeKey {
    key: KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

impl NodeKey {
    /// A new ECDSA P-256 key.
    pub fn generate() -> Result<NodeKey, PkiError> {
        Ok(NodeKey {
            key: KeyPair::generate()?,
        })
    }

    /// PKCS#8 PEM. Secret: only ever stored sealed.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// A CSR for this key (its subject is left to the CA).
    pub fn csr_pem(&self) -> Result<String, PkiError> {
        let params = CertificateParams::new(Vec::<String>::new())?;
        Ok(params.serialize_request(&self.key)?.pem()?)
    }
}

/// Reads the identity and expiry out of a node certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<(NodeIdentity, SystemTime), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| parse_err("the certificate", e))?;
    identity_of(&cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Result<(NodeIdentity, SystemTime), PkiError> {
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let cn = first(&mut subject.iter_common_name()).ok_or_else(|| PkiError::NotANodeCertificate("no CN".into()))?;
    let ou =
        first(&mut subject.iter_organizational_unit()).ok_or_else(|| PkiError::NotANodeCertificate("no OU".into()))?;
    let o = first(&mut subject.iter_organization()).ok_or_else(|| PkiError::NotANodeCertificate("no O".into()))?;
    let node_id =
        parse_node_id(&cn).ok_or_else(|| PkiError::NotANodeCertificate(format!("CN {cn:?} is not a node ID")))?;
    let role = match ou.as_str() {
        MANAGER_OU => Role::Manager,
        WORKER_OU => Role::Worker,
        other => return Err(PkiError::NotANodeCertificate(format!("unknown OU {other:?}"))),
    };
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    Ok((
        NodeIdentity {
            node_id,
            role,
            cluster_id: o,
        },
        not_after,
    ))
}

/// How far back a certificate's validity starts, to absorb clock skew
/// between nodes: 5 minutes, but at most a tenth of the lifetime, so short
/// lifetimes do not look two-thirds spent when issued.
pub fn backdate(lifetime: Duration) -> Duration {
    Duration::from_secs(300).min(lifetime / 10)
}

/// Whether a certificate valid from `not_before` to `not_after` should be
/// renewed at `now`: once two thirds of its lifetime have passed.
pub fn needs_renewal(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    match not_before.checked_add(lifetime / 3 * 2) {
        Some(renew_at) => now >= renew_at,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn issue(ca: &RootCa, id: NodeId, role: Role, cluster: &str, key: &NodeKey) -> String {
        let now = SystemTime::now();
        let identity = NodeIdentity {
            node_id: id,
            role,
            cluster_id: cluster.into(),
        };
        ca.issue(
            &key.csr_pem().unwrap(),
            &identity,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap()
    }

    #[test]
    fn issued_certificates_carry_the_identity_the_ca_chose() {
        let ca = RootCa::generate("cluster1").unwrap();
        let key = NodeKey::generate().unwrap();
        let pem = issue(&ca, 42, Role::Worker, "cluster1", &key);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (identity, not_after) = identity_from_cert(&der).unwrap();
        assert_eq!(
            identity,
            NodeIdentity {
                node_id: 42,
                role: Role::Worker,
                cluster_id: "cluster1".into()
            }
        );
        assert!(not_after > SystemTime::now());
        // The CA round-trips through its PEMs and keeps its digest.
        let again = RootCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.digest(), ca.digest());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_csr_claiming_to_be_a_manager_gets_what_the_ca_decides() {
        let ca = RootCa::generate("c").unwrap();
        let key = NodeKey::generate().unwrap();
        let mut params = CertificateParams::new(vec![MANAGER_DNS.to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, MANAGER_OU);
        let csr = params.serialize_request(&key.key).unwrap().pem().unwrap();
        let now = SystemTime::now();
        let identity = NodeIdentity {
            node_id: 7,
            role: Role::Worker,
            cluster_id: "c".into(),
        };
        let pem = ca.issue(&csr, &identity, now, now + Duration::from_secs(60)).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(identity_from_cert(&der).unwrap().0.role, Role::Worker);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value);
        assert!(!sans.contains(MANAGER_DNS), "{sans}");
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let ca = RootCa::generate("c").unwrap();
        let csr = NodeKey::generate().unwrap().csr_pem().unwrap();
        let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55; // inside the signature
        let b64 = base64_pem(&der);
        let now = SystemTime::now();
        let identity = NodeIdentity {
            node_id: 7,
            role: Role::Worker,
            cluster_id: "c".into(),
        };
        assert!(ca.issue(&b64, &identity, now, now + Duration::from_secs(60)).is_err());
        assert!(ca.issue("garbage", &identity, now, now).is_err());
    }

    fn base64_pem(der: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in der.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        let lines: Vec<String> = s
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn operator_certificates_are_not_node_certificates() {
        let ca = RootCa::generate("c").unwrap();
        let key = NodeKey::generate().unwrap();
        let now = SystemTime::now();
        let pem = ca
            .issue_operator(
                &key.csr_pem().unwrap(),
                "alice",
                "c",
                now,
                now + Duration::from_secs(60),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let operator = presented(&der);
        assert_eq!(operator.operator, Some(("alice".into(), "c".into())));
        assert!(operator.identity.is_none() && !operator.serial.is_empty());
        assert!(identity_from_cert(&der).is_err(), "an operator is no node");
        let node = issue(&ca, 1, Role::Manager, "c", &key);
        let node = presented(&CertificateDer::from_pem_slice(node.as_bytes()).unwrap());
        assert_eq!((node.operator, node.identity.map(|i| i.node_id)), (None, Some(1)));
        assert!(presented(b"not a certificate") == Presented::default());
        assert!(valid_operator_name("ops-team.alice_1"));
        assert!(!valid_operator_name("") && !valid_operator_name("a b") && !valid_operator_name(&"x".repeat(65)));
    }

    #[test]
    fn renewal_after_two_thirds() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(900);
        assert!(!needs_renewal(t0, t1, t0 + Duration::from_secs(599)));
        assert!(needs_renewal(t0, t1, t0 + Duration::from_secs(600)));
        assert!(needs_renewal(t0, t1, t1 + Duration::from_secs(1)));
        // A start after the end (a bogus report) means renew now.
        assert!(needs_renewal(t1, t0, t1));
    }
}
