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
    net::{IpAddr, SocketAddr},
};

use crate::api::assignment::tunnel::{
    tunnel_address, tunnel_prefix, PairKey, TunnelAssignment, TunnelPeerInfo, TUNNEL_PREFIX_LEN, WIREGUARD_PORT,
};
use crate::api::{assignment::tunnel::parse_public_key, service::Assignment};
use crate::api::{
    network::{Encryption, NetworkPeers},
    objects::NodeId,
    store::ClusterState,
};

/// The other nodes with an endpoint on the networks encrypted with
/// `encryption` that `tasks` are on; `None` if no task is on one.
pub(crate) fn encrypted_peers(
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
pub(crate) fn tunnel_assignment(
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
    use crate::api::assignment::tunnel::key_text;
    use crate::api::overlay_key::{key_rotation_due, OverlayKey};

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
