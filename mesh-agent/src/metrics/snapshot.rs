//! What the agent reads at scrape time, as plain data: Raft's position,
//! the cluster's nodes, services and tasks (managers), this node's tasks,
//! overlays, tunnel peers and routing-mesh counters.

/// Raft's position on a manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftFacts {
    pub term: u64,
    pub is_leader: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub snapshot_bytes: u64,
    pub voters: u64,
}

/// The cluster as a manager's store has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// (role, status, availability) of each node.
    pub nodes: Vec<(String, String, String)>,
    pub services: u64,
    /// (state, desired state) of each task.
    pub tasks: Vec<(String, String)>,
}

/// One published port's or VIP's counters on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortFacts {
    /// The service's name (its ID when this node does not know it).
    pub service: String,
    /// `published` or `vip`.
    pub kind: &'static str,
    /// The published port and protocol; 0 and "" for a VIP.
    pub port: u16,
    pub protocol: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub conntrack: u64,
}

/// One local task's counters (what the routing mesh brought it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendFacts {
    pub service: String,
    pub task: String,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// What the agent reads at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The node's ID, when it is in a swarm.
    pub node: Option<String>,
    /// `active`, `locked` or `inactive`.
    pub state: String,
    pub raft: Option<RaftFacts>,
    pub cluster: Option<ClusterFacts>,
    /// This node's tasks by state.
    pub local_tasks: Vec<(String, u64)>,
    pub overlay_networks: u64,
    /// Other nodes this node's overlays reach.
    pub overlay_peers: u64,
    pub wireguard_peers: u64,
    /// `ebpf` or `ipvs`.
    pub lb_backend: &'static str,
    pub ports: Vec<PortFacts>,
    pub backends: Vec<BackendFacts>,
    /// The WireGuard tunnel's peers.
    pub wireguard: Vec<TunnelPeerFacts>,
}

/// One WireGuard peer of the node's tunnel, as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelPeerFacts {
    /// The peer's tunnel address (which node it is).
    pub tunnel: std::net::Ipv6Addr,
    /// Seconds since its last handshake; `None` before the first.
    pub handshake_age_s: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}
