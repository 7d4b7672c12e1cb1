//! The node's files under its data directory: its settings (`node.json`)
//! and its credentials (certificate, sealed key, roots, WireGuard key).

use std::{path::PathBuf, sync::Arc};

use rustls::pki_types::pem::PemObject;
use rustls::{pki_types::CertificateDer, ServerConfig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::error::NodeError;

use crate::{
    api::objects::{NodeId, Role},
    ca::{
        keystore::write_private,
        pki::{self},
        seal::DataKey,
    },
    wire::tls,
};

/// The non-secret facts a node keeps in `node.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node.
    pub(crate) node_id: NodeId,
    /// Its swarm.
    pub cluster_id: String,
    /// Where its cluster port listens.
    pub(crate) listen_addr: String,
    /// Managers it knows (id, address), refreshed by heartbeats.
    pub(crate) managers: Vec<(NodeId, String)>,
}

/// The node's certificate, key and trusted roots.
#[derive(Clone)]
pub(super) struct Credentials {
    pub(super) cert_pem: String,
    pub(super) key_pem: Zeroizing<String>,
    pub(super) roots: Vec<String>,
    pub(super) role: Role,
    /// The certificate's serial (hex), as the store records it.
    pub(super) serial: String,
    pub(super) not_before: u64,
    pub(super) not_after: u64,
}

impl Credentials {
    pub(super) fn new(cert_pem: String, key_pem: Zeroizing<String>, roots: Vec<String>) -> Result<Self, NodeError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| NodeError::corrupt("the node certificate", format!("not PEM: {e}")))?;
        let (identity, _) = pki::identity_from_cert(&der)?;
        let (not_before, not_after) = validity(&der)?;
        Ok(Credentials {
            cert_pem,
            key_pem,
            roots,
            role: identity.role,
            serial: pki::serial_of(&der).unwrap_or_default(),
            not_before,
            not_after,
        })
    }

    pub(super) fn chain_pem(&self) -> String {
        format!(
            "{}{}",
            self.cert_pem,
            self.roots.first().map(String::as_str).unwrap_or("")
        )
    }

    pub(super) fn server_config(&self) -> Result<Arc<ServerConfig>, NodeError> {
        Ok(tls::server_config(&self.roots, &self.chain_pem(), &self.key_pem)?)
    }

    pub(super) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, NodeError> {
        Ok(tls::client_config(&self.roots, Some((&self.cert_pem, &self.key_pem)))?)
    }
}

pub(super) fn validity(der: &CertificateDer<'_>) -> Result<(u64, u64), NodeError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| NodeError::corrupt("the node certificate", format!("it does not parse: {e}")))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

/// Files of a node's data directory.
pub(super) struct Files {
    pub(super) dir: PathBuf,
}

impl Files {
    pub(super) fn config(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    pub(super) fn read_config(&self) -> Result<Option<NodeConfig>, NodeError> {
        match std::fs::read(self.config()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| NodeError::corrupt(self.config().display().to_string(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NodeError::io(self.config())(e)),
        }
    }

    pub(super) fn write_config(&self, config: &NodeConfig) -> Result<(), NodeError> {
        let bytes = serde_json::to_vec_pretty(config).map_err(|e| NodeError::corrupt("the node's settings", e))?;
        Ok(write_private(&self.config(), &bytes)?)
    }

    pub(super) fn write_credentials(&self, creds: &Credentials, dek: &DataKey) -> Result<(), NodeError> {
        let certs = self.dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(NodeError::io(&certs))?;
        write_private(
            &certs.join("node.key.sealed"),
            &dek.seal(b"node-key", creds.key_pem.as_bytes()),
        )?;
        write_private(&certs.join("node.pem"), creds.cert_pem.as_bytes())?;
        Ok(write_private(&certs.join("ca.pem"), creds.roots.concat().as_bytes())?)
    }

    pub(super) fn read_credentials(&self, dek: &DataKey) -> Result<Credentials, NodeError> {
        let certs = self.dir.join("certs");
        let read = |name: &str| std::fs::read(certs.join(name)).map_err(NodeError::io(certs.join(name)));
        let key = dek
            .open(b"node-key", &read("node.key.sealed")?)
            .map_err(|e| NodeError::corrupt("the node key", format!("it cannot be opened: {e}")))?;
        let key_pem =
            Zeroizing::new(String::from_utf8(key).map_err(|_| NodeError::corrupt("the node key", "not PEM"))?);
        let cert_pem = String::from_utf8(read("node.pem")?).map_err(|_| NodeError::corrupt("node.pem", "not PEM"))?;
        let roots =
            split_pem(&String::from_utf8(read("ca.pem")?).map_err(|_| NodeError::corrupt("ca.pem", "not PEM"))?);
        Credentials::new(cert_pem, key_pem, roots)
    }

    /// The node's WireGuard private key (sealed with the DEK), made on
    /// first use.
    pub(super) fn wireguard_key(&self, dek: &DataKey) -> Result<[u8; 32], NodeError> {
        let path = self.dir.join("certs").join("wireguard.key.sealed");
        match std::fs::read(&path) {
            Ok(sealed) => {
                let key = zeroize::Zeroizing::new(
                    dek.open(b"wireguard-key", &sealed)
                        .map_err(|e| NodeError::corrupt("the WireGuard key", format!("it cannot be opened: {e}")))?,
                );
                <[u8; 32]>::try_from(key.as_slice())
                    .map_err(|_| NodeError::corrupt(path.display().to_string(), "it does not hold a 32-byte key"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                write_private(&path, &dek.seal(b"wireguard-key", &key))?;
                Ok(key)
            }
            Err(e) => Err(NodeError::io(&path)(e)),
        }
    }

    /// Removes everything the swarm left in the data directory.
    pub(super) fn wipe(&self) {
        for sub in ["raft", "certs", "keys"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
        let _ = std::fs::remove_file(self.config());
    }
}

pub(super) fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN"))
        .map(str::to_string)
        .collect()
}
