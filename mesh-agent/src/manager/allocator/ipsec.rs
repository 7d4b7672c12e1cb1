//! IPsec for overlays created with `--opt encrypted=ipsec`, as the
//! managers decide it (pure functions over the cluster state).
//!
//! Such a network's VXLAN travels between the nodes' data-path addresses
//! to its own UDP port ([`ipsec_vxlan_port`]), and the kernel wraps every
//! datagram to that port in ESP (transport mode, AES-GCM, extended
//! sequence numbers). Each ordered pair of nodes has its own security
//! association, derived from the swarm's overlay key: a node gets only the
//! associations it sends and receives with, and only while it runs a task
//! on an IPsec network. When the overlay key rotates, a node keeps
//! accepting the previous key's associations, so a peer still sending
//! with them loses nothing.

use crate::api::overlay_key::OverlayKey;

use crate::api::{
    network::{Encryption, NetworkPeers},
    objects::NodeId,
    store::ClusterState,
};

use crate::api::assignment::ipsec::{ipsec_vxlan_port, EspEpoch, EspKey, EspPeer, EspSa, IpsecAssignment};
use crate::api::service::Assignment;
use crate::manager::allocator::tunnel::encrypted_peers;

fn epoch_with(key: &OverlayKey, node: NodeId, peer: NodeId) -> EspEpoch {
    let (out_spi, out_key) = key.esp_sa(node, peer);
    let (in_spi, in_key) = key.esp_sa(peer, node);
    EspEpoch {
        epoch: key.epoch,
        outbound: EspSa {
            spi: out_spi,
            key: EspKey(out_key),
        },
        inbound: EspSa {
            spi: in_spi,
            key: EspKey(in_key),
        },
    }
}

/// Node `node`'s IPsec: `None` unless one of `tasks` is on an IPsec
/// network. Its peers are the other nodes with an endpoint on those
/// networks and an IPv4 data-path address; with no overlay key yet, they
/// have no associations (and the node sends them nothing).
pub(crate) fn ipsec_assignment(
    state: &ClusterState,
    node: NodeId,
    tasks: &[Assignment],
    networks: &[NetworkPeers],
    data_path_port: u16,
) -> Option<IpsecAssignment> {
    let remote = encrypted_peers(state, node, tasks, networks, Encryption::Ipsec)?;
    let keys: Vec<&OverlayKey> = state
        .overlay_key
        .iter()
        .chain(state.previous_overlay_key.iter())
        .collect();
    let peers = remote
        .into_iter()
        .filter_map(|id| {
            let address = state.nodes.get(&id)?.data_path_addr.parse().ok()?;
            Some(EspPeer {
                node: id,
                address,
                epochs: keys.iter().map(|k| epoch_with(k, node, id)).collect(),
            })
        })
        .collect();
    Some(IpsecAssignment {
        port: ipsec_vxlan_port(data_path_port),
        key_epoch: state.overlay_key.as_ref().map_or(0, |k| k.epoch),
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipsec_port_follows_the_data_path_port() {
        assert_eq!(ipsec_vxlan_port(4789), 4790);
        assert_eq!(ipsec_vxlan_port(65535), 65534);
    }

    #[test]
    fn each_direction_has_its_own_sa_and_the_pair_agrees_on_it() {
        let key = OverlayKey::next(None, [9; 32], 0);
        let a = epoch_with(&key, 1, 2);
        let b = epoch_with(&key, 2, 1);
        assert_eq!(a.outbound, b.inbound, "what 1 sends with, 2 receives with");
        assert_eq!(a.inbound, b.outbound);
        assert_ne!(a.outbound.spi, a.inbound.spi);
        assert_ne!(a.outbound.key, a.inbound.key);
        assert!(a.outbound.spi >= 0x100, "SPIs below 256 are reserved");
        let next = OverlayKey::next(Some(&key), [9; 32], 1);
        let rotated = epoch_with(&next, 1, 2);
        assert_ne!(rotated.outbound.spi, a.outbound.spi, "a new key, a new SPI");
        assert_ne!(rotated.outbound.spi >> 31, a.outbound.spi >> 31);
        assert_eq!(format!("{:?}", a.outbound.key), "EspKey(..)", "keys are never printed");
    }
}
