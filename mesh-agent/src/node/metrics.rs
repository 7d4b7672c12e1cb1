//! The agent's side of `/metrics`: a [`Snapshot`] of what this node knows
//! right now (crate::metrics renders it).

use super::{Agent, Member, Phase};
use crate::locks::Locked;
use crate::{
    agent::mesh::kernel::LbBackend,
    api::{messages::Assignments, objects::node_id_text},
    metrics::{label, ClusterFacts, RaftFacts, Snapshot, TunnelPeerFacts},
};

/// What an assignment says of this node's overlays: (networks, distinct
/// other nodes they reach, WireGuard peers).
pub(super) fn overlay_facts(a: &Assignments) -> (u64, u64, u64) {
    let peers: std::collections::BTreeSet<&str> = a
        .networks
        .iter()
        .flat_map(|n| n.peers.iter().map(|p| p.vtep.as_str()))
        .filter(|vtep| *vtep != a.vtep)
        .collect();
    let wireguard = a.tunnel.as_ref().map_or(0, |t| t.peers.len());
    (a.networks.len() as u64, peers.len() as u64, wireguard as u64)
}

impl Member {
    fn snapshot(&self, snapshot: &mut Snapshot) {
        snapshot.node = Some(node_id_text(self.id));
        if let Some(manager) = self.manager() {
            let info = manager.raft_info();
            snapshot.raft = Some(RaftFacts {
                term: info.term,
                is_leader: manager.is_leader(),
                last_log_index: info.last_log_index.unwrap_or(0),
                applied_index: info.last_applied.unwrap_or(0),
                snapshot_index: info.snapshot_index.unwrap_or(0),
                snapshot_bytes: info.snapshot_bytes,
                voters: info.voters.len() as u64,
            });
            let state = manager.state();
            snapshot.cluster = Some(ClusterFacts {
                nodes: state
                    .nodes
                    .values()
                    .map(|n| (label(&n.role), label(&n.status), label(&n.availability)))
                    .collect(),
                services: state.services.len() as u64,
                tasks: state
                    .tasks
                    .values()
                    .map(|t| (label(&t.state), label(&t.desired)))
                    .collect(),
            });
        }
        let (running, ended) = self.tasks.counts();
        snapshot.local_tasks = vec![("running".into(), running as u64), ("ended".into(), ended as u64)];
        let (networks, peers, wireguard) = *self.overlay_facts.locked();
        snapshot.overlay_networks = networks;
        snapshot.overlay_peers = peers;
        snapshot.wireguard_peers = wireguard;
        let (ports, backends) = self.mesh.metrics();
        snapshot.ports = ports;
        snapshot.backends = backends;
    }
}

impl Agent {
    /// The swarm as the visualizer draws it, as JSON (`None` unless this
    /// node is an active manager).
    pub async fn visualizer_json(&self) -> Option<String> {
        let member = match &*self.phase.lock().await {
            Phase::Active(m) => m.clone(),
            _ => return None,
        };
        let state = member.manager()?.state();
        serde_json::to_string(&crate::manager::visualizer::view(&state)).ok()
    }

    /// The metrics text (`GET /metrics`).
    pub async fn metrics(&self) -> String {
        let mut snapshot = Snapshot {
            state: "inactive".into(),
            lb_backend: match self.opts.lb_backend {
                LbBackend::Ebpf => "ebpf",
                LbBackend::Ipvs => "ipvs",
            },
            ..Snapshot::default()
        };
        let member = match &*self.phase.lock().await {
            Phase::Inactive => None,
            Phase::Locked(config) => {
                snapshot.state = "locked".into();
                snapshot.node = Some(node_id_text(config.node_id));
                None
            }
            Phase::Active(m) => Some(m.clone()),
        };
        if let Some(m) = member {
            snapshot.state = "active".into();
            snapshot.wireguard = m
                .overlays
                .tunnel_stats()
                .await
                .into_iter()
                .map(|p| TunnelPeerFacts {
                    tunnel: p.tunnel,
                    handshake_age_s: p.handshake_age_s,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect();
            // Map reads and netlink dumps block: off the runtime's threads.
            snapshot = tokio::task::spawn_blocking(move || {
                m.snapshot(&mut snapshot);
                snapshot
            })
            .await
            .unwrap_or_default();
        }
        crate::metrics::render(&snapshot)
    }
}
