//! What the agent reads at scrape time, as plain data: Raft's position,
//! the cluster's nodes, services and tasks (managers), this node's tasks,
//! overlays, tunnel peers and routing-mesh counters.

/// Raft's position on a manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RaftFacts {
    pub(crate) term: u64,
    pub(crate) is_leader: bool,
    pub(crate) last_log_index: u64,
    pub(crate) applied_index: u64,
    pub(crate) snapshot_index: u64,
    pub(crate) snapshot_bytes: u64,
    pub(crate) voters: u64,
}

/// The cluster as a manager's store has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClusterFacts {
    /// (role, status, availability) of each node.
    pub(crate) nodes: Vec<(String, String, String)>,
    pub(crate) services: u64,
    /// (state, desired state) of each task.
    pub(crate) tasks: Vec<(String, String)>,
}

/// One published port's or VIP's counters on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortFacts {
    /// The service's name (its ID when this node does not know it).
    pub(crate) service: String,
    /// `published` or `vip`.
    pub(crate) kind: &'static str,
    /// The published port and protocol; 0 and "" for a VIP.
    pub(crate) port: u16,
    pub(crate) protocol: &'static str,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) connections: u64,
    pub(crate) conntrack: u64,
}

/// One local task's counters (what the routing mesh brought it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BackendFacts {
    pub(crate) service: String,
    pub(crate) task: String,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) connections: u64,
}

/// What the agent reads at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// The node's ID, when it is in a swarm.
    pub(crate) node: Option<String>,
    /// `active`, `locked` or `inactive`.
    pub(crate) state: String,
    pub(crate) raft: Option<RaftFacts>,
    pub(crate) cluster: Option<ClusterFacts>,
    /// This node's tasks by state.
    pub(crate) local_tasks: Vec<(String, u64)>,
    pub(crate) overlay_networks: u64,
    /// Other nodes this node's overlays reach.
    pub(crate) overlay_peers: u64,
    pub(crate) wireguard_peers: u64,
    /// `ebpf` or `ipvs`.
    pub(crate) lb_backend: &'static str,
    pub(crate) ports: Vec<PortFacts>,
    pub(crate) backends: Vec<BackendFacts>,
    /// The WireGuard tunnel's peers.
    pub(crate) wireguard: Vec<TunnelPeerFacts>,
}

/// One WireGuard peer of the node's tunnel, as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TunnelPeerFacts {
    /// The peer's tunnel address (which node it is).
    pub(crate) tunnel: std::net::Ipv6Addr,
    /// Seconds since its last handshake; `None` before the first.
    pub(crate) handshake_age_s: Option<f64>,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
}
