//! rustls configurations for node-to-node mutual TLS (TLS 1.3 only, ring
//! provider, ALPN `mesh/1`).
//!
//! Servers present `[node certificate, root CA]` so a joining node can pin
//! the CA by the digest in its token; client certificates are verified
//! against the swarm's roots but optional, because a joining node has none
//! yet: the RPC layer authorizes every call by the identity it presented.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

use super::pki::{cert_digest, identity_from_cert, NodeIdentity};

/// ALPN protocol of mesh's RPC.
pub const ALPN: &[u8] = b"mesh/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key did not parse.
    #[error("{0} does not parse as PEM")]
    Pem(&'static str),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built.
    #[error("certificate verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn roots(roots_pem: &[String]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for pem in roots_pem {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem("a root certificate"))?;
        store.add(der)?;
    }
    Ok(Arc::new(store))
}

fn chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem("the certificate chain"))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("the certificate chain"));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem("the private key"))
}

/// The server side of a node: presents `cert_chain_pem` (node certificate
/// then CA), accepts clients with a certificate from `roots_pem` or none.
pub fn server_config(roots_pem: &[String], cert_chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(roots_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(cert_chain_pem)?, key(key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The client side: verifies servers against `roots_pem`, presents the
/// node's certificate when given.
pub fn client_config(roots_pem: &[String], identity: Option<(&str, &str)>) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(roots_pem)?);
    let mut config = match identity {
        Some((cert, k)) => builder.with_client_auth_cert(chain(cert)?, key(k)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// For joining: trusts only a server whose chain contains the CA with
/// `ca_digest` and whose certificate that CA signed.
pub fn pinned_client_config(ca_digest: [u8; 32]) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        digest: ca_digest,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("reason: the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
}

/// The message a join shows when the manager's CA is not the token's.
pub const DIGEST_MISMATCH: &str = "the server's CA does not match the CA digest in the join token";

#[derive(Debug)]
struct PinnedCa {
    digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_digest(c) == self.digest)
            .ok_or_else(|| rustls::Error::General(DIGEST_MISMATCH.into()))?;
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

/// The identity in the leaf of a presented chain, if it is a node certificate.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<NodeIdentity> {
    certs
        .first()
        .and_then(|leaf| identity_from_cert(leaf).ok())
        .map(|(identity, _)| identity)
}
