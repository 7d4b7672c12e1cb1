//! Service discovery as a node is told it: for each overlay network its
//! tasks are on, the services on that network with their virtual IP there
//! and their running tasks' addresses there.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::api::service::LbOptions;

/// One service as seen from one network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service's ID.
    pub service: u64,
    /// Its name (what tasks resolve).
    pub name: String,
    /// Its virtual IP on this network (none in endpoint mode dnsrr).
    pub vip: Option<Ipv4Addr>,
    /// Its running tasks on this network: (task ID, address), by task ID.
    pub tasks: Vec<(u64, Ipv4Addr)>,
    /// How connections to the VIP are spread.
    pub lb: LbOptions,
}

/// The services on one network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetworkServices {
    /// The network's ID.
    pub network: u64,
    /// Its services, by service ID (shared, as `NetworkPeers::peers`).
    pub services: crate::api::encoded::Encoded<Vec<ServiceRecord>>,
}
