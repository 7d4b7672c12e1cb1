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

use crate::ca::pki::{cert_digest, presented, Presented};

/// The server name every manager certificate carries; connecting with it
/// refuses anything that is not a manager.
pub const MANAGER_NAME: &str = "mesh-manager";

/// ALPN protocol of mesh's RPC.
pub(crate) const ALPN: &[u8] = b"mesh/1";

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
pub(crate) const DIGEST_MISMATCH: &str = "the server's CA does not match the CA digest in the join token";

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

/// What the leaf of a presented chain claims (one parse per connection's
/// request, whatever is asked of it); nothing for an empty chain.
pub fn peer_presented(certs: &[CertificateDer<'_>]) -> Presented {
    certs.first().map(|leaf| presented(leaf)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::{
        api::objects::Role,
        ca::pki::{NodeIdentity, NodeKey, RootCa},
    };

    struct Node {
        cert: String,
        key: String,
    }

    fn node(ca: &RootCa, id: u64, role: Role, valid: std::ops::Range<SystemTime>) -> Node {
        let key = NodeKey::generate().unwrap();
        let identity = NodeIdentity {
            node_id: id,
            role,
            cluster_id: "c".into(),
        };
        let cert = ca
            .issue(&key.csr_pem().unwrap(), &identity, valid.start, valid.end)
            .unwrap();
        Node {
            cert: format!("{cert}{}", ca.cert_pem()),
            key: key.key_pem().to_string(),
        }
    }

    fn now_valid() -> std::ops::Range<SystemTime> {
        let now = SystemTime::now();
        now - Duration::from_secs(60)..now + Duration::from_secs(3600)
    }

    /// One handshake and one byte each way; returns the identity the server
    /// saw, or the first error of either side.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Result<Option<NodeIdentity>, String> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let name = ServerName::try_from(name.to_string()).unwrap();
        let server = async move {
            let mut s = TlsAcceptor::from(server).accept(a).await.map_err(|e| e.to_string())?;
            let seen = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| peer_presented(c).identity);
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            s.write_all(b"y").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(seen)
        };
        let client = async move {
            let mut c = TlsConnector::from(client)
                .connect(name, b)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"x").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let (s, c) = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(server, client) })
            .await
            .map_err(|_| "timed out".to_string())?;
        c?;
        s
    }

    #[tokio::test]
    async fn mutual_tls_between_members_carries_the_client_identity() {
        let ca = RootCa::generate("c").unwrap();
        let roots = vec![ca.cert_pem().to_string()];
        let manager = node(&ca, 1, Role::Manager, now_valid());
        let worker = node(&ca, 2, Role::Worker, now_valid());
        let server = server_config(&roots, &manager.cert, &manager.key).unwrap();
        let client = client_config(&roots, Some((&worker.cert, &worker.key))).unwrap();
        let seen = handshake(server.clone(), client, MANAGER_DNS_NAME).await.unwrap();
        assert_eq!(
            seen,
            Some(NodeIdentity {
                node_id: 2,
                role: Role::Worker,
                cluster_id: "c".into()
            })
        );
        // Without a client certificate the handshake works, and no identity is seen.
        let anonymous = client_config(&roots, None).unwrap();
        assert_eq!(handshake(server, anonymous, MANAGER_DNS_NAME).await.unwrap(), None);
    }

    const MANAGER_DNS_NAME: &str = "mesh-manager";

    #[tokio::test]
    async fn a_node_that_trusts_only_the_previous_root_reaches_a_manager_renewed_under_the_next() {
        let old = RootCa::generate("c").unwrap();
        let new = RootCa::generate("c").unwrap();
        let cross = old.cross_sign(&new, "c").unwrap();
        let manager = node(&new, 1, Role::Manager, now_valid());
        let away = node(&old, 2, Role::Worker, now_valid());
        let both = vec![new.cert_pem().to_string(), old.cert_pem().to_string()];
        let only_old = vec![old.cert_pem().to_string()];
        // Without the cross-signed root, the away node cannot verify the manager.
        let plain = server_config(&both, &manager.cert, &manager.key).unwrap();
        let client = client_config(&only_old, Some((&away.cert, &away.key))).unwrap();
        assert!(handshake(plain, client.clone(), MANAGER_DNS_NAME).await.is_err());
        // With it in the manager's chain, it can, and the manager knows who it is.
        let chain = format!("{}{cross}", manager.cert);
        let crossed = server_config(&both, &chain, &manager.key).unwrap();
        let seen = handshake(crossed.clone(), client, MANAGER_DNS_NAME).await.unwrap();
        assert_eq!(seen.map(|i| i.node_id), Some(2));
        // Nodes that trust the new root only are not disturbed by it.
        let renewed = node(&new, 3, Role::Worker, now_valid());
        let client = client_config(&[new.cert_pem().to_string()], Some((&renewed.cert, &renewed.key))).unwrap();
        assert!(handshake(crossed.clone(), client, MANAGER_DNS_NAME).await.is_ok());
        // Once the previous root is dropped, the away node's certificate is refused.
        let ended = server_config(&[new.cert_pem().to_string()], &chain, &manager.key).unwrap();
        let client = client_config(&both, Some((&away.cert, &away.key))).unwrap();
        assert!(handshake(ended, client, MANAGER_DNS_NAME).await.is_err());
    }

    #[tokio::test]
    async fn a_worker_cannot_pose_as_a_manager() {
        let ca = RootCa::generate("c").unwrap();
        let roots = vec![ca.cert_pem().to_string()];
        let worker = node(&ca, 2, Role::Worker, now_valid());
        let server = server_config(&roots, &worker.cert, &worker.key).unwrap();
        let err = handshake(server, client_config(&roots, None).unwrap(), MANAGER_DNS_NAME)
            .await
            .unwrap_err();
        assert!(err.contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn expired_and_foreign_certificates_are_refused() {
        let ca = RootCa::generate("c").unwrap();
        let roots = vec![ca.cert_pem().to_string()];
        let manager = node(&ca, 1, Role::Manager, now_valid());
        let server = server_config(&roots, &manager.cert, &manager.key).unwrap();
        let now = SystemTime::now();
        let expired = node(
            &ca,
            3,
            Role::Worker,
            now - Duration::from_secs(7200)..now - Duration::from_secs(3600),
        );
        let err = handshake(
            server.clone(),
            client_config(&roots, Some((&expired.cert, &expired.key))).unwrap(),
            MANAGER_DNS_NAME,
        )
        .await
        .unwrap_err();
        assert!(err.to_lowercase().contains("expired") || err.contains("alert"), "{err}");
        let other = RootCa::generate("c").unwrap();
        let foreign = node(&other, 4, Role::Manager, now_valid());
        assert!(handshake(
            server.clone(),
            client_config(&roots, Some((&foreign.cert, &foreign.key))).unwrap(),
            MANAGER_DNS_NAME
        )
        .await
        .is_err());
        // And a client that trusts another CA refuses the server.
        let wrong_roots = vec![other.cert_pem().to_string()];
        assert!(
            handshake(server, client_config(&wrong_roots, None).unwrap(), MANAGER_DNS_NAME)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn joining_pins_the_ca_digest() {
        let ca = RootCa::generate("c").unwrap();
        let roots = vec![ca.cert_pem().to_string()];
        let manager = node(&ca, 1, Role::Manager, now_valid());
        let server = server_config(&roots, &manager.cert, &manager.key).unwrap();
        assert!(
            handshake(server.clone(), pinned_client_config(ca.digest()), MANAGER_DNS_NAME)
                .await
                .is_ok()
        );
        let mut wrong = ca.digest();
        wrong[0] ^= 1;
        let err = handshake(server, pinned_client_config(wrong), MANAGER_DNS_NAME)
            .await
            .unwrap_err();
        assert!(err.contains(DIGEST_MISMATCH), "{err}");
    }
}
