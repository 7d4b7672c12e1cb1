//! The routing mesh as a node is told it: which published ports it
//! answers and which tasks stand behind them. Every node answers a port
//! published in ingress mode; a port published in host mode only by the
//! nodes running one of its tasks, by those tasks.

use serde::{Deserialize, Serialize};

use crate::api::encoded::Encoded;

use crate::api::{
    objects::NodeId,
    service::{LbOptions, PortPublish, PublishMode},
};

/// The routing-mesh tunnel's UDP port: the data-path port + 3 (+1 is the
/// IPsec overlays', and 4791 = 4789 + 2 is RoCEv2's).
pub fn tunnel_port(data_path_port: u16) -> u16 {
    data_path_port.wrapping_add(3)
}

/// A task that takes connections: running, wanted running, and (if the
/// service has a health check) healthy, since a task only reaches Running
/// after its first passing check and leaves it on its last failing one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeshBackend {
    /// The task's ID (the Maglev tables are built over these, so every
    /// node builds the same table from the same tasks).
    pub task: u64,
    /// The data-path address of the node it runs on.
    pub node_addr: String,
    /// Whether it runs on the node this assignment is for.
    pub local: bool,
}

/// One service's published ports, as one node serves them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MeshService {
    /// The service's ID.
    pub service: u64,
    /// Its name (for logs and metrics).
    pub name: String,
    /// Its published ports that this node answers.
    pub ports: Vec<PortPublish>,
    /// How connections are spread.
    pub lb: LbOptions,
    /// Its tasks that take connections, by task ID.
    pub backends: Vec<MeshBackend>,
    /// Whether one of them runs on this node.
    #[serde(default)]
    pub runs_here: bool,
    /// A hash of everything above, so a node tells a changed service from
    /// an unchanged one without comparing them field by field.
    #[serde(default)]
    pub digest: u64,
}

impl MeshService {
    /// The hash [`MeshService::digest`] holds.
    pub fn content_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (self.service, &self.name, &self.ports, &self.backends).hash(&mut h);
        (
            self.lb.algorithm as u8,
            self.lb.client_affinity,
            self.lb.affinity_timeout_s,
        )
            .hash(&mut h);
        h.finish()
    }
}

/// What one node's routing mesh holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshAssignment {
    /// Services with ports this node answers, by service ID.
    pub services: Vec<MeshService>,
    /// The data-path addresses of the other nodes (tunnelled connections
    /// are only accepted from them).
    pub peers: Vec<String>,
}

/// What the managers send every node alike for the routing mesh: each
/// service that publishes a port, with all its ports and its tasks that
/// take connections, and every node's data-path address. Made once per
/// state; the dispatcher encodes it once and shares it between all the
/// nodes' answers, and each node draws its own [`MeshAssignment`] from it
/// ([`MeshFleet::assignment_for`]). Drawn per node on the leader, that was
/// its top cost at 5,000 nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshFleet {
    /// The publishing services, by service ID.
    pub services: Vec<FleetService>,
    /// Every node with a data-path address: (node, address), by address,
    /// so each node's peer list is a filter, not a sort.
    pub nodes: Vec<(NodeId, String)>,
}

/// One publishing service as every node gets it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FleetService {
    /// The service's ID.
    pub service: u64,
    /// Its name (for logs and metrics).
    pub name: String,
    /// All its published ports (host-mode ones too).
    pub ports: Vec<PortPublish>,
    /// How connections are spread.
    pub lb: LbOptions,
    /// Its tasks that take connections: (task, its node, the node's
    /// data-path address), by task ID.
    pub running: Vec<(u64, NodeId, String)>,
}

impl MeshFleet {
    /// Node `node`'s routing mesh; `None` when it answers no published port.
    pub fn assignment_for(&self, node: NodeId) -> Option<MeshAssignment> {
        let mut services = Vec::new();
        for service in &self.services {
            let backends: Vec<MeshBackend> = service
                .running
                .iter()
                .map(|(task, on, addr)| MeshBackend {
                    task: *task,
                    node_addr: addr.clone(),
                    local: *on == node,
                })
                .collect();
            let runs_here = backends.iter().any(|b| b.local);
            let ports: Vec<PortPublish> = service
                .ports
                .iter()
                .filter(|p| p.mode == PublishMode::Ingress || runs_here)
                .copied()
                .collect();
            if ports.is_empty() {
                continue;
            }
            let mut entry = MeshService {
                service: service.service,
                name: service.name.clone(),
                ports,
                lb: service.lb,
                backends,
                runs_here,
                digest: 0,
            };
            entry.digest = entry.content_digest();
            services.push(entry);
        }
        if services.is_empty() {
            return None;
        }
        let mut peers: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, _)| *id != node)
            .map(|(_, addr)| addr.clone())
            .collect();
        peers.dedup();
        Some(MeshAssignment { services, peers })
    }
}

/// The routing mesh in one node's assignments: the fleet's, shared by
/// every node's answer, and whom this answer is for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeMesh {
    /// What every node gets alike.
    pub fleet: Encoded<MeshFleet>,
    /// The node the answer is for.
    pub node: NodeId,
}

impl NodeMesh {
    /// What this node's routing mesh holds; `None` when it answers no
    /// published port.
    pub fn assignment(&self) -> Option<MeshAssignment> {
        self.fleet.assignment_for(self.node)
    }
}
