//! The node-to-node WireGuard tunnels that encrypted overlays travel in,
//! as the managers decide them (pure functions over the cluster state).
//!
//! - Each node has its own WireGuard key pair; the private key never
//!   leaves it, the public key is reported in its heartbeats and kept in
//!   its node record.
//! - Each node has a tunnel address, an IPv6 unique-local address derived
//!   from the cluster and node IDs (nothing to allocate, and the same on
//!   every manager). Encrypted networks' VXLAN devices encapsulate from it,
//!   so their traffic is routed into the tunnel device.
//! - Each pair of nodes shares a preshared key derived from the swarm's
//!   overlay key, which lives in Raft (encrypted at rest with the rest of
//!   the store), rotates on a schedule and whenever a node is removed, and
//!   never leaves the managers: a node gets only its own pairs' keys, and
//!   only while it runs a task on an encrypted network.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    overlay::{Encryption, NetworkPeers},
    service::Assignment,
    state::{ClusterState, NodeId},
};

/// WireGuard's UDP port on every node (open it between nodes, as 4789).
pub const WIREGUARD_PORT: u16 = 51820;

/// The tunnel addresses' prefix length: the cluster's /48.
pub const TUNNEL_PREFIX_LEN: u8 = 48;

/// How often the overlay key rotates unless the swarm says otherwise
/// (Swarm rotates its overlay keys every 12 hours).
pub const DEFAULT_KEY_ROTATION_SECS: u64 = 12 * 3600;

/// The swarm's overlay key: the secret the pairs' preshared keys are
/// derived from.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct OverlayKey {
    /// Increases by one at each rotation.
    pub epoch: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// A node that held it was removed: rotate now.
    #[serde(default)]
    pub stale: bool,
    /// The secret.
    secret: [u8; 32],
}

impl fmt::Debug for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverlayKey")
            .field("epoch", &self.epoch)
            .field("created_at", &self.created_at)
            .field("stale", &self.stale)
            .finish_non_exhaustive()
    }
}

impl OverlayKey {
    /// A fresh key following `previous`.
    pub fn next(previous: Option<&OverlayKey>, secret: [u8; 32], now: u64) -> OverlayKey {
        OverlayKey {
            epoch: previous.map_or(1, |k| k.epoch + 1),
            created_at: now,
            stale: false,
            secret,
        }
    }

    /// The preshared key of nodes `a` and `b` (the same both ways).
    pub fn pair_key(&self, a: NodeId, b: NodeId) -> [u8; 32] {
        let (low, high) = (a.min(b), a.max(b));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("reason: HMAC takes any key length");
        mac.update(b"mesh wireguard psk");
        mac.update(&self.epoch.to_be_bytes());
        mac.update(&low.to_be_bytes());
        mac.update(&high.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The ESP security association nodes `src` -> `dst` send with: its
    /// SPI (the low bit of the epoch in the top bit, so consecutive keys'
    /// SPIs differ; never below 256, which the RFC reserves) and its
    /// AES-GCM key with the 4-byte salt after it.
    pub fn esp_sa(&self, src: NodeId, dst: NodeId) -> (u32, [u8; 20]) {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("reason: HMAC takes any key length");
            mac.update(label);
            mac.update(&self.epoch.to_be_bytes());
            mac.update(&src.to_be_bytes());
            mac.update(&dst.to_be_bytes());
            mac.finalize().into_bytes().into()
        };
        let spi_bytes = derive(b"mesh esp spi");
        let spi = u32::from_be_bytes(spi_bytes[..4].try_into().expect("reason: 4 of 32 bytes"));
        let spi = (spi & 0x7fff_ffff) | ((self.epoch as u32 & 1) << 31) | 0x100;
        let mut key = [0u8; 20];
        key.copy_from_slice(&derive(b"mesh esp key")[..20]);
        (spi, key)
    }
}

/// Whether the leader should propose a new overlay key: none yet, a
/// holder was removed, or the current one is older than `rotation_secs`.
pub fn key_rotation_due(key: Option<&OverlayKey>, now: u64, rotation_secs: u64) -> bool {
    match key {
        None => true,
        Some(k) => k.stale || now.saturating_sub(k.created_at) >= rotation_secs.max(1),
    }
}

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
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    BASE64
        .decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("{text:?} is not a WireGuard public key (base64 of 32 bytes)"))
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
    #[serde(default = "super::state::default_data_path_port")]
    pub vxlan_port: u16,
    /// The overlay key's epoch the preshared keys come from.
    pub key_epoch: u64,
    /// The nodes its encrypted networks have endpoints on.
    pub peers: Vec<TunnelPeerInfo>,
}

/// The other nodes with an endpoint on the networks encrypted with
/// `encryption` that `tasks` are on; `None` if no task is on one.
pub fn encrypted_peers(
    state: &ClusterState,
    node: NodeId,
    tasks: &[Assignment],
    networks: &[NetworkPeers],
    encryption: Encryption,
) -> Option<BTreeSet<NodeId>> {
    let encrypted: BTreeSet<u64> = tasks
        .iter()
        .flat_map(|t| &t.spec.networks)
        .filter(|n| n.encryption == encryption)
        .map(|n| n.network)
        .collect();
    if encrypted.is_empty() {
        return None;
    }
    let by_addr: BTreeMap<&str, NodeId> = state
        .nodes
        .values()
        .map(|n| (n.data_path_addr.as_str(), n.id))
        .collect();
    Some(
        networks
            .iter()
            .filter(|n| encrypted.contains(&n.network))
            .flat_map(|n| n.peers.iter())
            .filter_map(|p| by_addr.get(p.vtep.as_str()).copied())
            .filter(|id| *id != node)
            .collect(),
    )
}

/// Node `node`'s tunnel: `None` unless one of `tasks` is on a
/// WireGuard-encrypted network. Its peers are the other nodes with an
/// endpoint on those networks that have reported a key.
pub fn tunnel_assignment(
    state: &ClusterState,
    node: NodeId,
    tasks: &[Assignment],
    networks: &[NetworkPeers],
) -> Option<TunnelAssignment> {
    let cluster = state.cluster.as_ref()?;
    let remote = encrypted_peers(state, node, tasks, networks, Encryption::WireGuard)?;
    let key = state.overlay_key.as_ref();
    let peers = remote
        .into_iter()
        .filter_map(|id| {
            let n = state.nodes.get(&id)?;
            parse_public_key(&n.wireguard_key).ok()?;
            let ip: IpAddr = n.data_path_addr.parse().ok()?;
            Some(TunnelPeerInfo {
                node: id,
                public_key: n.wireguard_key.clone(),
                endpoint: SocketAddr::new(ip, WIREGUARD_PORT),
                address: tunnel_address(&cluster.id, id),
                psk: PairKey(key?.pair_key(node, id)),
            })
        })
        .collect();
    Some(TunnelAssignment {
        address: tunnel_address(&cluster.id, node),
        prefix: tunnel_prefix(&cluster.id),
        prefix_len: TUNNEL_PREFIX_LEN,
        port: WIREGUARD_PORT,
        vxlan_port: cluster.data_path_port,
        key_epoch: key.map_or(0, |k| k.epoch),
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_keys_are_symmetric_and_change_with_the_epoch() {
        let k1 = OverlayKey::next(None, [7; 32], 100);
        assert_eq!(k1.epoch, 1);
        assert_eq!(k1.pair_key(3, 9), k1.pair_key(9, 3));
        assert_ne!(k1.pair_key(3, 9), k1.pair_key(3, 8));
        let k2 = OverlayKey::next(Some(&k1), [7; 32], 200);
        assert_eq!(k2.epoch, 2);
        assert_ne!(k1.pair_key(3, 9), k2.pair_key(3, 9), "same secret, new epoch: new keys");
        assert!(!format!("{k1:?}").contains('7'), "the secret is never printed");
    }

    #[test]
    fn a_key_rotates_when_missing_old_or_stale() {
        assert!(key_rotation_due(None, 0, 100));
        let mut k = OverlayKey::next(None, [1; 32], 1000);
        assert!(!key_rotation_due(Some(&k), 1099, 100));
        assert!(key_rotation_due(Some(&k), 1100, 100));
        k.stale = true;
        assert!(key_rotation_due(Some(&k), 1000, 100));
    }

    #[test]
    fn tunnel_addresses_are_unique_local_in_the_cluster_prefix() {
        let p = tunnel_prefix("abc");
        let a = tunnel_address("abc", 1);
        assert_eq!(a.octets()[0], 0xfd);
        assert_eq!(a.octets()[..6], p.octets()[..6]);
        assert_ne!(a, tunnel_address("abc", 2));
        assert_ne!(p, tunnel_prefix("abd"));
    }

    #[test]
    fn public_keys_parse_from_base64_only() {
        let text = key_text(&[5; 32]);
        assert_eq!(parse_public_key(&text), Ok([5; 32]));
        assert!(parse_public_key("abc").unwrap_err().contains("base64 of 32 bytes"));
    }
}
