//! The messages of the control plane: what `meshctl` asks its local agent
//! (over the Unix socket) and what nodes ask each other (over mutual TLS).
//!
//! Plain data only; the handlers live in `manager` and `node`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{raft_types::TypeConfig, secret_text::SecretText};

use crate::api::objects::{Availability, Node, NodeId, NodeUpdate, Role};

use super::error::ErrorKind;
use super::error::{ApiError, ApiResult};

/// `meshctl swarm init` options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InitRequest {
    /// Address other nodes use to reach this one (IP or IP:PORT).
    pub advertise_addr: Option<String>,
    /// Where the cluster port listens (ADDR:PORT).
    pub listen_addr: String,
    /// Address for overlay traffic; defaults to the advertise address' IP.
    pub data_path_addr: Option<String>,
    /// Pools for overlay subnets.
    pub default_addr_pool: Vec<String>,
    /// Prefix length carved from the pools.
    pub default_addr_pool_mask_len: u8,
    /// Lock managers' keys with an unlock key.
    pub autolock: bool,
    /// Node certificate lifetime in seconds.
    pub cert_expiry_secs: u64,
    /// Heartbeat period in milliseconds.
    pub heartbeat_period_ms: u64,
    /// Ended tasks kept per service slot.
    pub task_history_limit: u32,
    /// UDP port of the overlays' VXLAN traffic.
    #[serde(default = "crate::api::objects::default_data_path_port")]
    pub data_path_port: u16,
}

/// `meshctl swarm join` options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
    /// A manager's address (HOST:PORT).
    pub remote_addr: String,
    /// Address others use to reach this node.
    pub advertise_addr: Option<String>,
    /// Where this node's cluster port listens.
    pub listen_addr: String,
    /// Address for overlay traffic.
    pub data_path_addr: Option<String>,
}

/// What the local agent says about itself (`meshctl info` / `swarm` state).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SwarmInfo {
    /// inactive | locked | active
    pub state: String,
    /// This node's ID, when part of a swarm.
    pub node_id: Option<NodeId>,
    /// The cluster's ID.
    pub cluster_id: Option<String>,
    /// The role its certificate carries.
    pub role: Option<Role>,
    /// Managers it knows (id, address).
    pub managers: Vec<(NodeId, String)>,
    /// The current Raft leader, if this node is a manager and knows it.
    pub leader: Option<NodeId>,
    /// This manager's Raft store, as it stands here.
    pub raft: Option<RaftInfo>,
    /// Agent version.
    pub agent_version: String,
}

/// One manager's view of its Raft store (`meshctl info`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RaftInfo {
    /// Current term.
    pub term: u64,
    /// Index of the last entry in the local log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the local state.
    pub last_applied: Option<u64>,
    /// Index the local snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Entries up to this index were purged from the log (compaction).
    pub purged_index: Option<u64>,
    /// The voters.
    pub voters: Vec<NodeId>,
    /// Size in bytes of the local snapshot (0 before the first).
    #[serde(default)]
    pub snapshot_bytes: u64,
}

/// A node as `node ls` / `node inspect` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The stored record.
    pub node: Node,
    /// Leader | Reachable | Unreachable, for managers.
    pub manager_status: Option<String>,
}

/// A service as `service ls` / `inspect` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    /// The stored service.
    pub service: crate::api::service::Service,
    /// Tasks running now.
    pub running: u32,
    /// Tasks wanted.
    pub desired: u32,
}

/// A secret or config as `secret|config ls|inspect` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlobView {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    /// Bytes.
    pub size: usize,
    /// A config's content (UTF-8, lossy); never set for a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Services using it.
    pub services: Vec<String>,
}

/// An overlay network as `network ls`/`inspect` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetworkView {
    /// The stored network.
    pub network: crate::api::network::Network,
    /// Services attached to it.
    pub services: Vec<String>,
    /// Nodes with a task on it: hostname and data-path address (the VTEPs).
    pub peers: Vec<(String, String)>,
    /// Tasks on it that have not ended.
    pub endpoints: Vec<Endpoint>,
    /// For an encrypted network: the epoch of the overlay key its pair
    /// keys derive from (it rises at each rotation).
    #[serde(default)]
    pub key_epoch: Option<u64>,
}

/// One task's place on a network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Task ID (text).
    pub task: String,
    /// `SERVICE.SLOT` or `SERVICE.NODE`.
    pub name: String,
    /// Its node's hostname.
    pub node: Option<String>,
    /// Its address.
    pub address: std::net::Ipv4Addr,
}

/// A task as `service ps` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskView {
    /// The stored task.
    pub task: crate::api::service::Task,
    /// Its service's name.
    pub service_name: String,
    /// Its node's hostname.
    pub node_hostname: Option<String>,
}

/// Requests that need the cluster store; served by the leader (a follower
/// forwards them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ClusterRequest {
    /// `node ls`.
    NodeList,
    /// `node inspect`, `node promote` etc. resolve names through this.
    NodeInspect {
        /// ID, unique ID prefix or hostname.
        node: String,
    },
    /// `node update`, `node promote`, `node demote`.
    NodeUpdate {
        /// ID, unique ID prefix or hostname.
        node: String,
        /// What changes.
        update: NodeUpdate,
    },
    /// `node rm`.
    NodeRemove {
        /// ID, unique ID prefix or hostname.
        node: String,
        /// Remove even if it is still up.
        force: bool,
    },
    /// `swarm join-token`.
    JoinToken {
        /// Which token.
        role: Role,
        /// Replace it first.
        rotate: bool,
    },
    /// `swarm unlock-key`.
    UnlockKey {
        /// Replace it first.
        rotate: bool,
    },
    /// `swarm update --autolock`.
    SetAutolock {
        /// On or off.
        enabled: bool,
    },
    /// `swarm update --task-history-limit`.
    SetTaskHistoryLimit {
        /// Ended tasks kept per slot.
        limit: u32,
    },
    /// `swarm ca --rotate`.
    CaRotate {
        /// How long the previous root stays trusted at most, in seconds,
        /// if some node or operator has not moved to the new one sooner.
        previous_root_ttl_secs: u64,
    },
    /// `swarm ca`: which roots are trusted and why.
    CaInspect,
    /// `swarm operator-cert ls`.
    OperatorCertList,
    /// `swarm operator-cert rm`: the certificate is refused from now on.
    OperatorCertRemove {
        /// The operator's name.
        name: String,
    },
    /// `network create`.
    NetworkCreate {
        /// What the operator asked for.
        spec: Box<crate::api::network::NetworkSpec>,
    },
    /// `network ls`.
    NetworkList,
    /// `network inspect`.
    NetworkInspect {
        /// Name, ID or unique ID prefix.
        network: String,
    },
    /// `network rm`.
    NetworkRemove {
        /// Name, ID or unique ID prefix.
        network: String,
    },
    /// `secret create` / `config create`.
    BlobCreate {
        kind: crate::api::secret::Kind,
        name: String,
        labels: BTreeMap<String, String>,
        #[serde(with = "crate::api::wire_bytes")]
        data: Vec<u8>,
    },
    /// `secret ls` / `config ls`.
    BlobList { kind: crate::api::secret::Kind },
    /// `secret inspect` / `config inspect`.
    BlobInspect {
        kind: crate::api::secret::Kind,
        /// Name, ID or unique ID prefix.
        name: String,
    },
    /// `secret rm` / `config rm`.
    BlobRemove {
        kind: crate::api::secret::Kind,
        /// Name, ID or unique ID prefix.
        name: String,
    },
    /// `service create`.
    ServiceCreate {
        /// The spec.
        spec: Box<crate::api::service::ServiceSpec>,
    },
    /// `service ls`.
    ServiceList,
    /// `service inspect`.
    ServiceInspect {
        /// Name, ID or unique ID prefix.
        service: String,
    },
    /// `service update`.
    ServiceUpdate {
        /// Name, ID or unique ID prefix.
        service: String,
        /// What changes.
        update: Box<crate::api::service::ServiceUpdate>,
    },
    /// `service rollback`.
    ServiceRollback {
        /// Name, ID or unique ID prefix.
        service: String,
    },
    /// `service rm`.
    ServiceRemove {
        /// Name, ID or unique ID prefix.
        service: String,
    },
    /// `service scale S=N`.
    ServiceScale {
        /// Name, ID or unique ID prefix.
        service: String,
        /// New replica count.
        replicas: u32,
    },
    /// `service ps`.
    TaskList {
        /// Name, ID or unique ID prefix.
        service: String,
    },
    /// `swarm operator-cert`: a client certificate for `meshctl --host`.
    IssueOperatorCert {
        /// Who it is for (the certificate's CN).
        name: String,
        /// PEM CSR of a key the operator keeps.
        csr_pem: String,
        /// Lifetime in seconds.
        validity_secs: u64,
    },
}

/// Replies to [`ClusterRequest`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ClusterResponse {
    /// Nodes.
    Nodes(Vec<NodeView>),
    /// One node.
    Node(Box<NodeView>),
    /// Done, nothing to show.
    Done,
    /// A token or key text.
    Secret(SecretText),
    /// `swarm ca --rotate`: the new CA's digest.
    CaDigest(String),
    /// `swarm ca`.
    Ca(Box<CaView>),
    /// `swarm operator-cert ls`: the recorded operator certificates.
    OperatorCerts(Vec<OperatorCertView>),
    /// Services with their running/desired counts.
    Services(Vec<ServiceView>),
    /// A service was created.
    ServiceCreated {
        /// Its ID.
        id: u64,
    },
    /// Tasks of a service.
    Tasks(Vec<TaskView>),
    /// Overlay networks.
    Networks(Vec<NetworkView>),
    /// Secrets or configs (a secret's content never leaves the managers
    /// this way).
    Blobs(Vec<BlobView>),
    /// A secret or config was created.
    BlobCreated { id: u64 },
    /// A network was created.
    NetworkCreated {
        /// Its ID.
        id: u64,
    },
    /// An issued certificate (PEM) and the roots to trust (PEM).
    Certificate {
        /// The certificate.
        cert_pem: String,
        /// The swarm's roots.
        ca_pems: Vec<String>,
    },
}

/// The swarm's trusted roots, for `swarm ca`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CaView {
    /// SHA-256 (hex) of the current root.
    pub current: String,
    /// SHA-256 (hex) of each previous root still trusted.
    pub previous: Vec<String>,
    /// Unix seconds when the previous roots are dropped at the latest
    /// (0 when there are none).
    pub previous_until: u64,
    /// Nodes (hostnames) whose certificate is not yet from the current root.
    pub nodes_pending: Vec<String>,
    /// Operators whose live certificate is not from the current root.
    pub operators_pending: Vec<String>,
}

/// One recorded operator certificate, for `swarm operator-cert ls`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OperatorCertView {
    /// The operator's name.
    pub name: String,
    /// The certificate's record.
    pub issued: crate::api::cert_records::Issued,
}

/// `meshctl` -> local agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum LocalRequest {
    /// `swarm init`.
    Init(InitRequest),
    /// `swarm join`.
    Join(JoinRequest),
    /// `swarm leave`.
    Leave {
        /// Leave even as a manager.
        force: bool,
    },
    /// `swarm unlock`.
    Unlock {
        /// The unlock key text.
        key: SecretText,
    },
    /// State of this node.
    Info,
    /// Anything that needs the cluster store.
    Cluster(ClusterRequest),
    /// `service logs`: the service's task logs, read from their nodes.
    ServiceLogs {
        /// Name, ID or unique ID prefix.
        service: String,
        /// Where to read on from, per task (empty at first).
        cursors: Vec<(u64, u64)>,
        /// Lines per task at first (`None`: all).
        tail: Option<usize>,
    },
}

/// local agent -> `meshctl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum LocalResponse {
    /// `swarm init` done.
    Initialized {
        /// The new node's ID.
        node_id: NodeId,
        /// The command a worker runs to join.
        worker_join_command: String,
        /// The unlock key, when autolocked.
        unlock_key: Option<SecretText>,
    },
    /// `swarm join` done.
    Joined {
        /// This node's ID.
        node_id: NodeId,
        /// Role it joined as.
        role: Role,
    },
    /// Done, nothing to show.
    Done,
    /// Node state.
    Info(SwarmInfo),
    /// Reply of a cluster request.
    Cluster(ClusterResponse),
    /// `service logs`: log text per task, labelled `NAME.SLOT.ID@HOST`.
    Logs(Vec<(String, LogChunk)>),
}

/// What a joining node sends with its token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinCall {
    /// The join token text.
    pub token: String,
    /// PEM CSR for the node's key.
    pub csr_pem: String,
    /// Its hostname.
    pub hostname: String,
    /// Its advertise address, if it chose one; else the manager uses the
    /// address the call came from and `listen_port`.
    pub advertise_addr: Option<String>,
    /// Port of its cluster listener.
    pub listen_port: u16,
    /// Its data path address, if chosen.
    pub data_path_addr: Option<String>,
    /// Its agent version.
    pub agent_version: String,
}

/// The manager's answer to a join.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinReply {
    /// The ID assigned to the node.
    pub node_id: NodeId,
    /// The role from the token.
    pub role: Role,
    /// The cluster's ID.
    pub cluster_id: String,
    /// The signed node certificate (PEM).
    pub cert_pem: String,
    /// Trusted roots (PEM), current first.
    pub ca_pems: Vec<String>,
    /// Managers to talk to.
    pub managers: Vec<(NodeId, String)>,
    /// Heartbeat period in milliseconds.
    pub heartbeat_period_ms: u64,
}

/// A node's periodic check-in with the managers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Its agent version.
    pub agent_version: String,
    /// Whether a Raft store is running on it (managers wait for this before
    /// adding a promoted node as a voter).
    pub raft_ready: bool,
    /// Unix seconds of its certificate's expiry.
    pub cert_not_after: u64,
    /// Unix seconds of its certificate's start.
    pub cert_not_before: u64,
    /// Role in its certificate.
    pub cert_role: Role,
    /// Digest (hex) of the CA that signed its certificate.
    pub cert_ca_digest: String,
    /// Its WireGuard public key (base64).
    #[serde(default)]
    pub wireguard_key: String,
    /// Its CPUs and memory.
    #[serde(default)]
    pub resources: crate::api::resources::NodeResources,
}

/// The managers' reply to a heartbeat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Send the next heartbeat within this many milliseconds.
    pub period_ms: u64,
    /// Current managers (id, address).
    pub managers: Vec<(NodeId, String)>,
    /// The current leader.
    pub leader: Option<NodeId>,
    /// The role the node should have.
    pub desired_role: Role,
    /// The node should renew its certificate (expiry near, role or CA changed).
    pub renew_certificate: bool,
    /// Trusted roots (PEM), current first.
    pub ca_pems: Vec<String>,
    /// The unlock key when the cluster is autolocked (sent only to managers).
    pub unlock_key: Option<SecretText>,
    /// The node's availability, as the operator set it.
    pub availability: Availability,
}

/// Node -> node over mutual TLS.
#[derive(Serialize, Deserialize, Debug)]
pub enum PeerRequest {
    /// Raft replication (manager callers only).
    AppendEntries(openraft::raft::AppendEntriesRequest<TypeConfig>),
    /// Raft election (manager callers only).
    Vote(openraft::raft::VoteRequest<NodeId>),
    /// Raft snapshot chunk (manager callers only).
    InstallSnapshot(openraft::raft::InstallSnapshotRequest<TypeConfig>),
    /// Join with a token (callers without a certificate allowed).
    Join(JoinCall),
    /// Check-in (any member).
    Heartbeat(Heartbeat),
    /// New certificate for the caller's key (any member).
    RenewCertificate {
        /// PEM CSR.
        csr_pem: String,
    },
    /// A cluster request forwarded by a manager to the leader (managers only).
    Cluster(ClusterRequest),
    /// The caller's tasks (any member): answered at once when they differ
    /// from the digest the caller has, else when they change or after a
    /// few seconds (a long poll).
    Assignments {
        /// Digest of the assignments the caller has ("" at first).
        known: String,
        /// The shared parts the caller has (`parts::holds` of its last
        /// answer): the answer names those by digest instead of sending them.
        #[serde(default)]
        holds: Vec<PartDigest>,
    },
    /// The caller reports on its tasks (any member).
    ReportTasks(Vec<crate::api::service::TaskReport>),
    /// The caller leaves the swarm (`swarm leave`): it is marked down at
    /// once, so the host may join again with the same addresses.
    Leave,
    /// Log text of tasks running on the called node (managers only, for
    /// `service logs`).
    ReadLogs(LogQuery),
    /// A request a manager received and passes on to the leader, with the
    /// identity it verified of the original caller (managers only).
    Forwarded {
        /// Who really asked.
        origin: Origin,
        /// What they asked.
        request: Box<PeerRequest>,
    },
}

/// The verified caller of a request, carried along when a follower forwards
/// it to the leader.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Node ID and role from the caller's certificate, if it presented one.
    pub identity: Option<(NodeId, Role)>,
    /// The operator name, when the caller presented an operator certificate.
    #[serde(default)]
    pub operator: Option<String>,
    /// The serial (hex) of the certificate the caller presented.
    #[serde(default)]
    pub serial: String,
    /// The caller's IP address as the first manager saw it.
    pub ip: std::net::IpAddr,
}

/// Replies to [`PeerRequest`].
#[derive(Serialize, Deserialize, Debug)]
pub enum PeerResponse {
    /// Raft append reply.
    AppendEntries(Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// Raft vote reply.
    Vote(Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// Raft snapshot reply.
    InstallSnapshot(
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    ),
    /// Join accepted or refused.
    Join(ApiResult<JoinReply>),
    /// Heartbeat reply.
    Heartbeat(ApiResult<HeartbeatReply>),
    /// New certificate (PEM) and roots.
    Certificate(ApiResult<(String, Vec<String>)>),
    /// Cluster reply.
    Cluster(ApiResult<ClusterResponse>),
    /// The caller's tasks.
    Assignments(ApiResult<Assignments>),
    /// Reports stored.
    Reported(ApiResult<()>),
    /// Log text, per task.
    Logs(ApiResult<Vec<LogChunk>>),
    /// Refused before dispatch (e.g. a worker calling a manager API).
    Refused(ApiError),
}

/// What a node is told about its tasks.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignments {
    /// Identifies this set (the long poll's "what I have").
    pub digest: String,
    /// Its tasks that are not ended, with what to do about them.
    pub tasks: Vec<crate::api::service::Assignment>,
    /// The shared parts below (networks' endpoints, then their services,
    /// then the routing mesh), each with its digest and whether it was
    /// held back because the node has it (`api::parts`). Third, so a
    /// reader of the first fields alone (the simulator) finds it.
    #[serde(default)]
    pub parts: Vec<PartRef>,
    /// Its ended tasks the store still lists (their logs are kept).
    pub retained: Vec<u64>,
    /// The endpoints of every network its tasks are on (only those: a
    /// node's overlay state grows with what it runs, not with the swarm).
    #[serde(default)]
    pub networks: Vec<crate::api::network::NetworkPeers>,
    /// This node's data-path address (its VTEP).
    #[serde(default)]
    pub vtep: String,
    /// The swarm's VXLAN UDP port.
    #[serde(default = "crate::api::objects::default_data_path_port")]
    pub data_path_port: u16,
    /// Its WireGuard tunnel, when it runs tasks on encrypted networks.
    #[serde(default)]
    pub tunnel: Option<crate::api::assignment::tunnel::TunnelAssignment>,
    /// Its IPsec associations, when it runs tasks on IPsec networks.
    #[serde(default)]
    pub ipsec: Option<crate::api::assignment::ipsec::IpsecAssignment>,
    /// The published ports it answers and the tasks behind them (drawn
    /// from what every node gets alike: [`crate::api::assignment::mesh::NodeMesh::assignment`]).
    #[serde(default)]
    pub mesh: Option<crate::api::assignment::mesh::NodeMesh>,
    /// The services on the networks its tasks are on (DNS and VIPs).
    #[serde(default)]
    pub services: Vec<crate::api::assignment::discovery::NetworkServices>,
}

/// Which log text to read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LogQuery {
    /// Tasks, each with the byte offset to read from (`None`: start with
    /// the last `tail` lines).
    pub tasks: Vec<(u64, Option<u64>)>,
    /// Lines per task when starting (`None`: all).
    pub tail: Option<usize>,
}

/// Log text of one task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// The task.
    pub task: u64,
    /// Whole lines.
    pub text: String,
    /// Offset to read on from.
    pub next: u64,
}

impl PeerResponse {
    /// The error of a reply that another manager might answer better: a
    /// refusal, a failed heartbeat, or an unavailable leader.
    pub fn retry_elsewhere(&self) -> Option<ApiError> {
        match self {
            PeerResponse::Refused(e) | PeerResponse::Heartbeat(Err(e)) => Some(e.clone()),
            PeerResponse::Assignments(Err(e)) | PeerResponse::Reported(Err(e)) if e.kind == ErrorKind::Unavailable => {
                Some(e.clone())
            }
            _ => None,
        }
    }
}

/// Labels given on the command line as `k=v`.
pub fn parse_labels(items: &[String]) -> ApiResult<BTreeMap<String, String>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ApiError::invalid(format!("invalid label {item:?}: expected KEY=VALUE"))),
        })
        .collect()
}

/// A part's identity: the SHA-256 of its encoding.
pub type PartDigest = [u8; 32];

/// One shared part of an answer, in the order `parts` walks them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartRef {
    /// The part's digest.
    pub digest: PartDigest,
    /// Not sent: the node said it holds it. Its place in the answer holds
    /// an empty value until `parts::restore` puts the node's copy back.
    pub held: bool,
}
