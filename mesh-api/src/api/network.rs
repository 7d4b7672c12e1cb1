//! Overlay networks as the swarm stores them: their specs, what the
//! allocator gave them, and a task's place on them.

use crate::api::error::Invalid;
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::api::subnet::Subnet;

/// The first VNI handed out (as Swarm's; lower ones are left to the host).
pub const FIRST_VNI: u32 = 4096;
/// The largest VNI VXLAN can carry (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// `--opt mtu` bounds: IPv4's minimum datagram every host accepts, up to
/// jumbo frames.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9216;

/// The most overlays one service can be on (a node names each task's port
/// by its network's position, one hex digit, in a 15-byte interface name).
pub const MAX_TASK_NETWORKS: usize = 15;

/// `--opt encrypted[=wireguard|ipsec]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Plain VXLAN.
    #[default]
    None,
    /// VXLAN inside the node-to-node WireGuard tunnels.
    WireGuard,
    /// VXLAN inside ESP (AES-GCM) security associations.
    Ipsec,
}

/// `network create`: what the operator asked for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Unique name.
    pub name: String,
    /// `--subnet` (else carved from the default address pools).
    pub subnet: Option<Subnet>,
    /// `--gateway` (else the subnet's first address).
    pub gateway: Option<Ipv4Addr>,
    /// `--ip-range`: task addresses come from here (else the whole subnet).
    pub ip_range: Option<Subnet>,
    /// `--attachable`: one-off `meshctl run --network` tasks may join.
    pub attachable: bool,
    /// `--opt encrypted`.
    pub encryption: Encryption,
    /// `--opt mtu` (else derived from the underlay on each node).
    pub mtu: Option<u32>,
    /// `--label`.
    pub labels: BTreeMap<String, String>,
}

/// An overlay network as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// ID.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Its subnet.
    pub subnet: Subnet,
    /// The gateway address (kept free of tasks).
    pub gateway: Ipv4Addr,
    /// Where task addresses come from.
    pub ip_range: Subnet,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// Whether one-off tasks may attach.
    pub attachable: bool,
    /// How traffic between nodes is protected.
    pub encryption: Encryption,
    /// Fixed MTU, if the operator set one.
    pub mtu: Option<u32>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: u64,
}

/// A task's place on one network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkAttachment {
    /// The network's ID.
    pub network: u64,
    /// The task's address there.
    pub address: Ipv4Addr,
}

/// What a node needs to attach one task to one network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskNetwork {
    /// The network's ID.
    pub network: u64,
    /// Its name (for errors and DNS).
    pub name: String,
    /// Its VXLAN network identifier.
    pub vni: u32,
    /// Its subnet.
    pub subnet: Subnet,
    /// Its gateway.
    pub gateway: Ipv4Addr,
    /// The task's address.
    pub address: Ipv4Addr,
    /// Fixed MTU, if set.
    pub mtu: Option<u32>,
    /// How traffic between nodes is protected.
    pub encryption: Encryption,
}

/// The other end of a network, as a node programs it: a task address and
/// the data-path address of the node it runs on (its VTEP).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// The task's address on the network.
    pub address: Ipv4Addr,
    /// Its node's data-path address.
    pub vtep: String,
}

/// Every endpoint of one network that a node has tasks on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetworkPeers {
    /// The network's ID.
    pub network: u64,
    /// Its VNI.
    pub vni: u32,
    /// Endpoints on every node, this one included (shared by every node
    /// on the network until sent: the dispatcher makes it once per view).
    pub peers: crate::api::encoded::Encoded<Vec<Peer>>,
}

/// Checks a network name (the rules of service names, which Swarm shares).
pub fn check_network_name(name: &str) -> Result<(), Invalid> {
    crate::api::service::check_service_name(name).map_err(|_| {
        crate::invalid!("invalid network name {name:?}: use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit")
    })
}
