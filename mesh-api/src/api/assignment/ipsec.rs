//! IPsec for overlays created with `--opt encrypted=ipsec`, as a node is
//! told it: the associations it sends and receives with.

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::api::objects::NodeId;

/// The UDP port IPsec networks' VXLAN uses: the one after the swarm's
/// data-path port (the one before, for 65535), so the kernel's policies
/// can tell it from plain VXLAN. Only ESP crosses the wire.
pub fn ipsec_vxlan_port(data_path_port: u16) -> u16 {
    data_path_port.checked_add(1).unwrap_or(data_path_port - 1)
}

/// An AES-GCM key and its salt (never printed).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct EspKey(pub [u8; 20]);

impl fmt::Debug for EspKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EspKey(..)")
    }
}

/// One direction's security association.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EspSa {
    /// Its SPI.
    pub spi: u32,
    /// Its key.
    pub key: EspKey,
}

/// The associations with one peer under one overlay key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EspEpoch {
    /// The overlay key's epoch.
    pub epoch: u64,
    /// What this node sends to the peer with.
    pub outbound: EspSa,
    /// What the peer sends to this node with.
    pub inbound: EspSa,
}

/// Another node as this node's IPsec needs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EspPeer {
    /// Its node ID.
    pub node: NodeId,
    /// Its data-path address.
    pub address: Ipv4Addr,
    /// The current key's associations first, then the previous key's.
    pub epochs: Vec<EspEpoch>,
}

/// What a node running tasks on IPsec networks is told.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IpsecAssignment {
    /// The UDP port its IPsec networks' VXLAN uses.
    pub port: u16,
    /// The current overlay key's epoch.
    pub key_epoch: u64,
    /// The nodes its IPsec networks have endpoints on.
    pub peers: Vec<EspPeer>,
}
