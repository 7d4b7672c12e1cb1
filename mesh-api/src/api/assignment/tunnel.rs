//! The node-to-node WireGuard tunnels that encrypted overlays travel in:
//! each node's tunnel address, and what a node is told about its tunnel.

use crate::api::error::Invalid;
use std::{
    fmt,
    net::{Ipv6Addr, SocketAddr},
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::objects::NodeId;

/// WireGuard's UDP port on every node (open it between nodes, as 4789).
pub const WIREGUARD_PORT: u16 = 51820;

/// The tunnel addresses' prefix length: the cluster's /48.
pub const TUNNEL_PREFIX_LEN: u8 = 48;

/// The cluster's tunnel prefix (`fdXX:XXXX:XXXX::/48`, from its ID).
pub fn tunnel_prefix(cluster_id: &str) -> Ipv6Addr {
    let h = Sha256::new()
        .chain_update(b"mesh tunnel prefix")
        .chain_update(cluster_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes[0] = 0xfd;
    bytes[1..6].copy_from_slice(&h[..5]);
    Ipv6Addr::from(bytes)
}

/// Node `node`'s tunnel address: the cluster's prefix and 64 bits of the
/// node's digest.
pub fn tunnel_address(cluster_id: &str, node: NodeId) -> Ipv6Addr {
    let h = Sha256::new()
        .chain_update(b"mesh tunnel node")
        .chain_update(cluster_id.as_bytes())
        .chain_update(node.to_be_bytes())
        .finalize();
    let mut bytes = tunnel_prefix(cluster_id).octets();
    bytes[8..].copy_from_slice(&h[..8]);
    Ipv6Addr::from(bytes)
}

/// A WireGuard public key as `wg` prints it (base64 of 32 bytes).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], Invalid> {
    BASE64
        .decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| crate::invalid!("{text:?} is not a WireGuard public key (base64 of 32 bytes)"))
}

/// Base64, as `wg` prints keys.
pub fn key_text(key: &[u8; 32]) -> String {
    BASE64.encode(key)
}

/// A preshared key in an assignment (hex; never printed).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct PairKey(pub [u8; 32]);

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairKey(..)")
    }
}

/// Another node as this node's tunnel needs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TunnelPeerInfo {
    /// Its node ID.
    pub node: NodeId,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Its WireGuard socket.
    pub endpoint: SocketAddr,
    /// Its tunnel address.
    pub address: Ipv6Addr,
    /// The pair's preshared key.
    pub psk: PairKey,
}

/// What a node running tasks on encrypted overlays is told about its
/// tunnel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TunnelAssignment {
    /// Its own tunnel address.
    pub address: Ipv6Addr,
    /// The cluster's tunnel prefix (routed into the tunnel device).
    pub prefix: Ipv6Addr,
    /// Its length.
    pub prefix_len: u8,
    /// The WireGuard port.
    pub port: u16,
    /// The swarm's VXLAN port: the encrypted networks' VXLAN devices listen
    /// on it over IPv6, and only the tunnel device may feed them.
    #[serde(default = "crate::api::objects::default_data_path_port")]
    pub vxlan_port: u16,
    /// The overlay key's epoch the preshared keys come from.
    pub key_epoch: u64,
    /// The nodes its encrypted networks have endpoints on.
    pub peers: Vec<TunnelPeerInfo>,
}
