//! The swarm's objects as the store holds them: nodes, their roles and
//! state, the cluster's settings and its CA.

use serde::{Deserialize, Serialize};

use super::cert_records::NodeCerts;
use super::secret_text::SecretText;
use std::collections::BTreeMap;
/// How often the overlay key rotates unless the swarm says otherwise
/// (Swarm rotates its overlay keys every 12 hours).
pub const DEFAULT_KEY_ROTATION_SECS: u64 = 12 * 3600;

/// Finished tasks kept per service slot, for `service ps`.
pub const TASK_HISTORY: u32 = 5;

/// A node's identity: its Raft id, and (printed in base 36) its node ID.
pub type NodeId = u64;

/// What a node does in the cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Runs tasks; never votes.
    Worker,
    /// Holds the Raft store and serves the cluster API.
    Manager,
}

/// Whether the scheduler may place tasks on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Availability {
    /// Takes new tasks.
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Its tasks move elsewhere.
    Drain,
}

/// A node's liveness as the dispatcher sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeStatus {
    /// Joined but not yet heard from.
    Unknown,
    /// Heartbeating.
    Ready,
    /// Missed its heartbeats for the configured period.
    Down,
}

/// One node, as stored in Raft.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Raft id and node ID.
    pub id: NodeId,
    /// The host's name, as it reported it at join.
    pub hostname: String,
    /// The role the operator wants it to have.
    pub role: Role,
    /// Whether it takes tasks.
    pub availability: Availability,
    /// Operator labels (`node update --label-add`).
    pub labels: BTreeMap<String, String>,
    /// Where managers and peers reach its cluster port (host:port).
    pub addr: String,
    /// Address used for overlay (data path) traffic.
    pub data_path_addr: String,
    /// Liveness.
    pub status: NodeStatus,
    /// Why it is in that status (empty when Ready).
    pub status_message: String,
    /// The agent version it last reported.
    pub agent_version: String,
    /// Its WireGuard public key (base64), as it last reported it; empty
    /// until it does.
    #[serde(default)]
    pub wireguard_key: String,
    /// The certificates issued to it: only these are honoured as its own.
    #[serde(default)]
    pub certs: NodeCerts,
    /// Its CPUs and memory, as it last reported them.
    #[serde(default)]
    pub resources: crate::api::resources::NodeResources,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last change to this record.
    pub updated_at: u64,
}

/// Cluster-wide settings chosen at `swarm init`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Random cluster ID (base 36).
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Pools overlay subnets are carved from (`--default-addr-pool`).
    pub default_addr_pool: Vec<String>,
    /// Prefix length of each carved subnet (`--default-addr-pool-mask-length`).
    pub default_addr_pool_mask_len: u8,
    /// Whether managers start locked (`--autolock`).
    pub autolock: bool,
    /// How often nodes heartbeat, in milliseconds.
    pub heartbeat_period_ms: u64,
    /// Missed heartbeat periods after which a node is marked Down.
    pub heartbeat_misses_down: u32,
    /// Lifetime of issued node certificates, in seconds.
    pub cert_expiry_secs: u64,
    /// Ended tasks kept per service slot (`--task-history-limit`, as Swarm's).
    #[serde(default = "default_task_history")]
    pub task_history_limit: u32,
    /// The UDP port of the overlays' VXLAN traffic (`--data-path-port`).
    #[serde(default = "default_data_path_port")]
    pub data_path_port: u16,
    /// How often the overlay key rotates, in seconds.
    #[serde(default = "default_key_rotation_secs")]
    pub overlay_key_rotation_secs: u64,
}

fn default_key_rotation_secs() -> u64 {
    DEFAULT_KEY_ROTATION_SECS
}

/// VXLAN's IANA port, Swarm's default data-path port.
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;

/// Serde's default for stores written before the data-path port existed.
pub(crate) fn default_data_path_port() -> u16 {
    DEFAULT_DATA_PATH_PORT
}

fn default_task_history() -> u32 {
    TASK_HISTORY
}

/// The cluster's certificate authority. The key is secret; it lives only in
/// the encrypted store.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct CaState {
    /// Current root certificate (PEM).
    pub root_cert_pem: String,
    /// Current root key (PEM, PKCS#8).
    pub root_key_pem: SecretText,
    /// Roots still trusted while a rotation settles (PEM).
    pub previous_roots_pem: Vec<String>,
    /// Unix seconds after which the previous roots are dropped even if
    /// some node or operator still holds a certificate from them (0: no
    /// deadline).
    #[serde(default)]
    pub previous_until: u64,
    /// While previous roots are trusted: the current root's key certified
    /// by the previous root (PEM), sent after every certificate issued, so
    /// a node that still trusts only the previous root can verify them.
    #[serde(default)]
    pub cross_signed_pem: String,
}

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState")
            .field("root_key_pem", &"<redacted>")
            .field("previous_roots", &self.previous_roots_pem.len())
            .finish_non_exhaustive()
    }
}

/// The two join tokens (secret).
#[derive(Serialize, Deserialize, Clone, Default, PartialEq, Eq)]
pub struct JoinTokens {
    /// Joins as a worker.
    pub worker: String,
    /// Joins as a manager.
    pub manager: String,
}

impl std::fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinTokens(<redacted>)")
    }
}

/// A change to a node's spec; `None` leaves that field alone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeUpdate {
    /// New desired role (promote/demote).
    pub role: Option<Role>,
    /// New availability.
    pub availability: Option<Availability>,
    /// Labels to set.
    pub label_add: BTreeMap<String, String>,
    /// Labels to remove.
    pub label_rm: Vec<String>,
}

/// The status message of a node that left with `swarm leave`: it stays
/// down until it is removed (the host joins again as a new node).
pub const LEFT_THE_SWARM: &str = "left the swarm";

/// Node IDs are printed in base 36, 13 characters, like Swarm's short IDs.
pub fn node_id_text(id: NodeId) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 13];
    let mut v = id;
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8(out.to_vec()).expect("reason: ASCII digits")
}

/// Parses a full 13-character node ID printed by [`node_id_text`], and
/// only that spelling (`from_str_radix` alone also takes upper case and a
/// `+`, which would give one ID several names).
pub fn parse_node_id(text: &str) -> Option<NodeId> {
    if text.len() != 13 || !text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    u64::from_str_radix(text, 36).ok()
}
