//! The cluster state that Raft replicates, and the commands that change it.
//!
//! [`ClusterState::apply`] is the state machine: a pure function of the state
//! and one committed command. A command is either applied whole or refused
//! with a reason and leaves the state as it was, so every manager that applies
//! the same log ends up with the same state.

mod blobs;
mod cluster;
mod networks;
mod nodes;
mod services;
mod tasks;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::cert_records::{Issued, NodeCerts};
use super::overlay::{Network, NetworkAttachment};
use super::secret_text::SecretText;
use super::service::{
    DesiredState, EndpointMode, Service, ServiceSpec, Task, TaskReport, TaskState, UpdateState, UpdateStatus,
};

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
    super::tunnel::DEFAULT_KEY_ROTATION_SECS
}

/// VXLAN's IANA port, Swarm's default data-path port.
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;

/// Serde's default for stores written before the data-path port existed.
pub fn default_data_path_port() -> u16 {
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

/// A committed change to the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `swarm init`: the whole initial state in one entry.
    Init {
        /// Settings.
        cluster: ClusterSpec,
        /// The new root CA.
        ca: CaState,
        /// Both join tokens.
        tokens: JoinTokens,
        /// The unlock key text when autolocked.
        unlock_key: Option<SecretText>,
        /// The first manager.
        first: Box<Node>,
    },
    /// A node joined.
    AddNode(Node),
    /// A node reported a new WireGuard public key.
    SetNodeWireguardKey {
        /// Which node.
        id: NodeId,
        /// Base64.
        key: String,
    },
    /// The leader rotated the overlay key (on schedule or after a node
    /// was removed). Refused unless it follows the current one.
    RotateOverlayKey(super::tunnel::OverlayKey),
    /// `node update`, `node promote`, `node demote`.
    UpdateNode {
        /// Which node.
        id: NodeId,
        /// What changes.
        update: NodeUpdate,
        /// Unix seconds.
        at: u64,
    },
    /// The dispatcher saw a node come or go, or a node reported new facts.
    SetNodeStatus {
        /// Which node.
        id: NodeId,
        /// New status.
        status: NodeStatus,
        /// Why.
        message: String,
        /// Agent version it reports.
        agent_version: String,
        /// Unix seconds.
        at: u64,
    },
    /// `node rm` or `swarm leave`: the node is gone and its certificate revoked.
    RemoveNode {
        /// Which node.
        id: NodeId,
    },
    /// `swarm join-token --rotate`.
    RotateToken {
        /// Which token.
        role: Role,
        /// The new token.
        token: String,
    },
    /// `swarm update --autolock` or `swarm unlock-key --rotate`.
    SetUnlockKey {
        /// The unlock key text, or `None` to turn autolock off.
        unlock_key: Option<SecretText>,
    },
    /// `mesh-agent run --force-new-cluster`: the first entry of a new store,
    /// carrying the state recovered from the old one.
    Restore {
        /// The recovered state (other managers already demoted).
        state: Box<ClusterState>,
    },
    /// `service create`.
    CreateService(Box<Service>),
    /// `service update` / `service scale`: a new spec, version bumped.
    UpdateService {
        /// Which service.
        id: u64,
        /// The new spec.
        spec: Box<ServiceSpec>,
        /// Replace every task even if the task template is unchanged.
        #[serde(default)]
        force: bool,
        /// Unix seconds.
        at: u64,
    },
    /// `service rollback`: back to the previous spec, rolled out as an update.
    RollbackService {
        /// Which service.
        id: u64,
        /// Unix milliseconds.
        at_ms: u64,
    },
    /// `service rm`: the service goes, its tasks are told to shut down.
    RemoveService {
        /// Which service.
        id: u64,
        /// Unix seconds.
        at: u64,
    },
    /// The orchestrator's decisions for one service: new tasks, tasks to stop.
    ApplyPlan {
        /// New tasks.
        create: Vec<Task>,
        /// Tasks to shut down, with why.
        shutdown: Vec<(u64, String)>,
        /// Rolling updates' new progress, per service.
        #[serde(default)]
        updates: Vec<(u64, UpdateStatus)>,
        /// Services whose failed update rolls back (failure action rollback).
        #[serde(default)]
        rollbacks: Vec<u64>,
        /// Tasks whose node is lost for good: they end as Orphaned.
        #[serde(default)]
        orphaned: Vec<u64>,
        /// Unix seconds.
        at: u64,
    },
    /// A node reports a task's progress.
    SetTaskState {
        /// Which task.
        id: u64,
        /// Its new state.
        state: TaskState,
        /// Why (errors).
        message: String,
        /// Unix seconds.
        at: u64,
    },
    /// A node reports on its tasks. Reports on tasks that are gone, not
    /// the node's, or not a legal move are skipped: a late report must not
    /// fail the others.
    ReportTasks {
        /// The reporting node.
        node: NodeId,
        /// What it reports.
        reports: Vec<TaskReport>,
        /// Unix milliseconds.
        at_ms: u64,
    },
    /// `swarm ca --rotate`: a new root; the old one stays trusted for a while.
    RotateCa {
        /// The new CA (its `previous_roots_pem` holds the old root).
        ca: CaState,
        /// Tokens carry the CA digest, so they change with it.
        tokens: JoinTokens,
    },
    /// `swarm ca`: the previous roots are no longer trusted (every node and
    /// live operator has a certificate from the current root, or their
    /// deadline passed).
    DropPreviousRoots,
    /// The CA issued a node a certificate (join or renewal): only it, and
    /// for `grace_secs` the one it replaces, are honoured as the node's.
    RecordNodeCert {
        /// Which node.
        id: NodeId,
        /// The new certificate.
        issued: Issued,
        /// How long the replaced certificate stays honoured.
        grace_secs: u64,
    },
    /// `swarm operator-cert --name`: an operator certificate is honoured
    /// while this record is (expired records of other names go with it).
    RecordOperatorCert {
        /// The operator's name (the certificate's CN).
        name: String,
        /// The certificate.
        issued: Issued,
    },
    /// `swarm operator-cert rm`: the name's certificate is refused from now.
    RevokeOperatorCert {
        /// The operator's name.
        name: String,
    },
    /// `swarm update --task-history-limit`; history beyond it goes at the
    /// next prune.
    SetTaskHistoryLimit {
        /// Ended tasks kept per slot.
        limit: u32,
    },
    /// `network create`: allocated by the leader, checked again here.
    CreateNetwork(Box<Network>),
    /// `network rm`.
    RemoveNetwork {
        /// Which network.
        id: u64,
    },
    /// `secret create` / `config create`.
    CreateBlob {
        kind: super::secret::Kind,
        blob: Box<super::secret::Blob>,
    },
    /// `secret rm` / `config rm`.
    RemoveBlob {
        kind: super::secret::Kind,
        /// Which one.
        id: u64,
    },
}

/// What applying a command did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CommandResponse {
    /// Applied.
    Applied,
    /// Refused, state unchanged; the reason is for the operator.
    Refused(String),
}

/// Everything Raft replicates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Set by `Init`; `None` before.
    pub cluster: Option<ClusterSpec>,
    /// The root CA.
    pub ca: Option<CaState>,
    /// Join tokens.
    pub tokens: JoinTokens,
    /// The unlock key text when autolocked.
    pub unlock_key: Option<SecretText>,
    /// Nodes by id (persistent, as `tasks`).
    pub nodes: imbl::OrdMap<NodeId, Node>,
    /// Ids of removed nodes: their certificates are no longer honoured.
    pub removed: BTreeSet<NodeId>,
    /// Services by ID (persistent, as `tasks`).
    #[serde(default)]
    pub services: imbl::OrdMap<u64, Service>,
    /// Tasks by ID (current and recent history). A persistent map: the
    /// dispatcher's view and Raft snapshots share the state, and an apply
    /// must not copy tens of thousands of tasks to change one.
    #[serde(default)]
    pub tasks: imbl::OrdMap<u64, Task>,
    /// Overlay networks by ID.
    #[serde(default)]
    pub networks: BTreeMap<u64, Network>,
    /// The key encrypted overlays' preshared keys derive from.
    #[serde(default)]
    pub overlay_key: Option<super::tunnel::OverlayKey>,
    /// The key before it: IPsec keeps accepting it while every node moves
    /// its outbound traffic to the new one.
    #[serde(default)]
    pub previous_overlay_key: Option<super::tunnel::OverlayKey>,
    /// Secrets by ID (sealed at rest with the rest of the store).
    #[serde(default)]
    pub secrets: BTreeMap<u64, super::secret::Blob>,
    /// Configs by ID.
    #[serde(default)]
    pub configs: BTreeMap<u64, super::secret::Blob>,
    /// Operator certificates by name: honoured only while recorded here.
    #[serde(default)]
    pub operators: BTreeMap<String, Issued>,
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match self.try_apply(command) {
            Ok(()) => CommandResponse::Applied,
            Err(reason) => CommandResponse::Refused(reason),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<(), String> {
        if !matches!(command, Command::Init { .. } | Command::Restore { .. }) && self.cluster.is_none() {
            return Err("the cluster is not initialised".into());
        }
        match command {
            Command::Init {
                cluster,
                ca,
                tokens,
                unlock_key,
                first,
            } => self.apply_init(cluster, ca, tokens, unlock_key, first),
            Command::Restore { state } => self.apply_restore(state),
            Command::AddNode(node) => self.apply_add_node(node),
            Command::UpdateNode { id, update, at } => self.apply_update_node(*id, update, *at),
            Command::SetNodeStatus {
                id,
                status,
                message,
                agent_version,
                at,
            } => self.apply_set_node_status(*id, *status, message, agent_version, *at),
            Command::RemoveNode { id } => self.apply_remove_node(*id),
            Command::SetNodeWireguardKey { id, key } => self.apply_set_node_wireguard_key(*id, key),
            Command::RotateOverlayKey(key) => self.apply_rotate_overlay_key(key),
            Command::RotateToken { role, token } => self.apply_rotate_token(*role, token),
            Command::SetUnlockKey { unlock_key } => self.apply_set_unlock_key(unlock_key),
            Command::CreateNetwork(network) => self.apply_create_network(network),
            Command::RemoveNetwork { id } => self.apply_remove_network(*id),
            Command::CreateBlob { kind, blob } => self.apply_create_blob(*kind, blob),
            Command::RemoveBlob { kind, id } => self.apply_remove_blob(*kind, *id),
            Command::SetTaskHistoryLimit { limit } => self.apply_set_task_history_limit(*limit),
            Command::RotateCa { ca, tokens } => self.apply_rotate_ca(ca, tokens),
            Command::DropPreviousRoots => self.apply_drop_previous_roots(),
            Command::RecordNodeCert { id, issued, grace_secs } => self.apply_record_node_cert(*id, issued, *grace_secs),
            Command::RecordOperatorCert { name, issued } => self.apply_record_operator_cert(name, issued),
            Command::RevokeOperatorCert { name } => self.apply_revoke_operator_cert(name),
            Command::CreateService(service) => self.apply_create_service(service),
            Command::UpdateService { id, spec, force, at } => self.apply_update_service(*id, spec, *force, *at),
            Command::RollbackService { id, at_ms } => self.apply_rollback_service(*id, *at_ms),
            Command::RemoveService { id, at } => self.apply_remove_service(*id, *at),
            Command::ApplyPlan {
                create,
                shutdown,
                updates,
                rollbacks,
                orphaned,
                at,
            } => self.apply_plan(create, shutdown, updates, rollbacks, orphaned, *at),
            Command::ReportTasks { node, reports, at_ms } => self.apply_report_tasks(*node, reports, *at_ms),
            Command::SetTaskState { id, state, message, at } => self.apply_set_task_state(*id, *state, message, *at),
        }
    }

    /// Swaps a service back to its previous spec and rolls that out.
    fn roll_back(&mut self, id: u64, at_ms: u64) -> Result<(), String> {
        let service = self
            .services
            .get_mut(&id)
            .ok_or_else(|| format!("service {id} not found"))?;
        let previous = service
            .previous_spec
            .take()
            .ok_or_else(|| format!("service {} has no previous spec to roll back to", service.spec.name))?;
        service.previous_spec = Some(std::mem::replace(&mut service.spec, previous));
        service.version += 1;
        service.updated_at = at_ms / 1000;
        service.update_status = Some(UpdateStatus::start(UpdateState::RollingBack, at_ms));
        Ok(())
    }

    /// The state for a new single-manager store: every other manager becomes
    /// a worker, marked Down until it checks in (it then drops its old store
    /// and can be promoted again).
    pub fn forced_to_single_manager(&self, keep: NodeId, at: u64) -> ClusterState {
        let mut state = self.clone();
        let demoted: Vec<NodeId> = state
            .nodes
            .values()
            .filter(|n| n.id != keep && n.role == Role::Manager)
            .map(|n| n.id)
            .collect();
        for id in demoted {
            if let Some(node) = state.nodes.get_mut(&id) {
                node.role = Role::Worker;
                node.status = NodeStatus::Down;
                node.status_message = "demoted by --force-new-cluster".into();
                node.updated_at = at;
            }
        }
        state
    }

    fn create_network(&mut self, network: &Network) -> Result<(), String> {
        for other in self.networks.values() {
            let clash = if other.id == network.id {
                "ID"
            } else if other.name == network.name {
                "name"
            } else if other.subnet.overlaps(network.subnet) {
                "subnet"
            } else if other.vni == network.vni {
                "VNI"
            } else {
                continue;
            };
            return Err(format!(
                "network {}: its {clash} is taken by network {}",
                network.name, other.name
            ));
        }
        self.networks.insert(network.id, network.clone());
        Ok(())
    }

    /// The secrets or the configs.
    pub fn blobs(&self, kind: super::secret::Kind) -> &BTreeMap<u64, super::secret::Blob> {
        match kind {
            super::secret::Kind::Secret => &self.secrets,
            super::secret::Kind::Config => &self.configs,
        }
    }

    fn blobs_mut(&mut self, kind: super::secret::Kind) -> &mut BTreeMap<u64, super::secret::Blob> {
        match kind {
            super::secret::Kind::Secret => &mut self.secrets,
            super::secret::Kind::Config => &mut self.configs,
        }
    }

    /// The content of the secret or config named `name`.
    pub fn blob_data(&self, kind: super::secret::Kind, name: &str) -> Option<Vec<u8>> {
        self.blobs(kind)
            .values()
            .find(|b| b.name == name)
            .map(|b| b.data.clone())
    }

    /// Refuses while a service refers to the secret or config `name`.
    pub fn check_blob_unused(&self, kind: super::secret::Kind, name: &str) -> Result<(), String> {
        let user = self
            .services
            .values()
            .find(|s| s.spec.refs(kind).iter().any(|r| r.source == name));
        match user {
            Some(s) => Err(format!(
                "{} {name} is in use by service {}: remove it there first (`meshctl service update --{}-rm {name} {}`)",
                kind.name(),
                s.spec.name,
                kind.name(),
                s.spec.name
            )),
            None => Ok(()),
        }
    }

    /// Refuses while a service or an unended task uses `network`.
    pub fn check_network_unused(&self, network: &Network) -> Result<(), String> {
        match self.network_users(network).first() {
            Some(user) => Err(format!(
                "network {} is in use by service {user}: remove the service, or detach it with `meshctl service update --network-rm {} {user}`",
                network.name, network.name
            )),
            None => Ok(()),
        }
    }

    /// Services that name `network`, and services of unended tasks that
    /// still hold an address on it.
    pub fn network_users(&self, network: &Network) -> Vec<String> {
        let mut users: BTreeSet<String> = self
            .services
            .values()
            .filter(|s| s.spec.networks.contains(&network.name))
            .map(|s| s.spec.name.clone())
            .collect();
        for t in self.tasks.values().filter(|t| !t.state.is_terminal()) {
            if t.attachments.iter().any(|a| a.network == network.id) {
                users.insert(
                    self.services
                        .get(&t.service)
                        .map_or(format!("(removed) task {}", t.id), |s| s.spec.name.clone()),
                );
            }
        }
        users.into_iter().collect()
    }

    /// Addresses held on each network by tasks that have not ended.
    pub fn addresses_in_use(&self) -> BTreeMap<u64, BTreeSet<std::net::Ipv4Addr>> {
        let mut used: BTreeMap<u64, BTreeSet<std::net::Ipv4Addr>> = BTreeMap::new();
        for s in self.services.values() {
            for v in &s.vips {
                used.entry(v.network).or_default().insert(v.address);
            }
        }
        for t in self.tasks.values().filter(|t| !t.state.is_terminal()) {
            for a in &t.attachments {
                used.entry(a.network).or_default().insert(a.address);
            }
        }
        used
    }

    /// The virtual IPs `service` should have: the ones it has on networks it
    /// is still on, and a free address on each new one (none in endpoint
    /// mode dnsrr). Allocated here, in the state machine, so every replica
    /// picks the same address.
    fn virtual_ips(&self, service: &Service) -> Result<Vec<NetworkAttachment>, String> {
        if service.spec.endpoint_mode == EndpointMode::Dnsrr {
            return Ok(Vec::new());
        }
        let mut used = self.addresses_in_use();
        let mut vips = Vec::new();
        for name in &service.spec.networks {
            let Some(network) = self.networks.values().find(|n| &n.name == name) else {
                continue;
            };
            if let Some(kept) = service.vips.iter().find(|v| v.network == network.id) {
                vips.push(*kept);
                continue;
            }
            let taken = used.entry(network.id).or_default();
            let address = super::overlay::task_address(network, taken).ok_or_else(|| {
                format!(
                    "network {} has no free address for the service's virtual IP ({}): use a larger --subnet or --ip-range, or --endpoint-mode dnsrr",
                    network.name, network.ip_range
                )
            })?;
            taken.insert(address);
            vips.push(NetworkAttachment {
                network: network.id,
                address,
            });
        }
        Ok(vips)
    }

    /// New tasks with addresses that exist on their networks and are free.
    /// The orchestrator chose them on the state it planned from; an address
    /// taken since (a service's virtual IP, allocated when its create was
    /// applied) is replaced by the first free one, the same on every
    /// manager, rather than refusing the whole plan: with operators
    /// creating services at once, refused plans would starve placement.
    fn settle_addresses(&self, create: &[Task]) -> Result<Vec<Task>, String> {
        let mut used = self.addresses_in_use();
        let mut out = create.to_vec();
        for t in &mut out {
            for a in &mut t.attachments {
                let network = self
                    .networks
                    .get(&a.network)
                    .ok_or_else(|| format!("task {}: network {} not found", t.id, a.network))?;
                if !network.subnet.contains(a.address) || a.address == network.gateway {
                    return Err(format!(
                        "task {}: {} is not a task address of {}",
                        t.id, a.address, network.name
                    ));
                }
                let taken = used.entry(a.network).or_default();
                if taken.contains(&a.address) {
                    a.address = super::overlay::task_address(network, taken).ok_or_else(|| {
                        format!(
                            "task {}: {} is taken on {} and no other address is free",
                            t.id, a.address, network.name
                        )
                    })?;
                }
                taken.insert(a.address);
            }
        }
        Ok(out)
    }

    /// Forgets finished tasks (told to shut down, and either ended or never
    /// placed) beyond the newest `keep` per service slot; all of them for
    /// services that are gone. Only the slots in `touched` (every slot when
    /// `None`): a slot's history only grows when one of its tasks finishes,
    /// and walking every task of the swarm on every apply was the leader's
    /// main cost at 50,000 tasks.
    fn prune_task_history(&mut self, touched: Option<&BTreeSet<HistoryPlace>>) {
        if touched.is_some_and(|t| t.is_empty()) {
            return;
        }
        let keep = self.cluster.as_ref().map_or(TASK_HISTORY, |c| c.task_history_limit) as usize;
        let mut finished: BTreeMap<HistoryPlace, Vec<(u64, u64)>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_finished()) {
            let place = t.history_place();
            if touched.is_none_or(|touched| touched.contains(&place)) {
                finished.entry(place).or_default().push((t.updated_at, t.id));
            }
        }
        for ((service, _, _), mut history) in finished {
            let keep = if self.services.contains_key(&service) { keep } else { 0 };
            history.sort_unstable_by(|a, b| b.cmp(a));
            for (_, id) in history.into_iter().skip(keep) {
                self.tasks.remove(&id);
            }
        }
    }

    /// Ids of the nodes whose desired role is manager.
    pub fn managers(&self) -> BTreeSet<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Manager)
            .map(|n| n.id)
            .collect()
    }
}

impl ClusterState {
    /// Of `node`'s `reports`, those that move a task of it, one per task
    /// (the furthest along its life): what a write of them carries. Empty
    /// when nothing would change, so a node that repeats itself (or speaks
    /// of tasks not its own) writes nothing.
    pub fn reports_that_change(&self, node: NodeId, reports: Vec<TaskReport>) -> Vec<TaskReport> {
        let mut furthest: BTreeMap<u64, TaskReport> = BTreeMap::new();
        for r in reports {
            if !self.tasks.get(&r.task).is_some_and(|t| t.takes_report(node, &r)) {
                continue;
            }
            match furthest.get(&r.task) {
                Some(kept) if kept.state > r.state => {}
                _ => {
                    furthest.insert(r.task, r);
                }
            }
        }
        furthest.into_values().collect()
    }
}

/// Where a finished task's history is kept: its service slot, and for a
/// global task (all in slot 0) its node.
pub type HistoryPlace = (u64, u32, Option<NodeId>);

impl Task {
    /// Whether `node`'s report `report` moves this task: it runs there, and
    /// the report is a new state it may go to.
    pub fn takes_report(&self, node: NodeId, report: &TaskReport) -> bool {
        self.node == Some(node) && self.state != report.state && self.state.may_become(report.state)
    }

    /// Told to shut down, and either ended or never placed: history.
    pub fn is_finished(&self) -> bool {
        self.desired == DesiredState::Shutdown && (self.state.is_terminal() || self.node.is_none())
    }

    /// The history this task belongs to once finished.
    pub fn history_place(&self) -> HistoryPlace {
        let node = if self.slot == 0 { self.node } else { None };
        (self.service, self.slot, node)
    }
}

fn no_such_node(id: NodeId) -> String {
    format!("node {} not found", node_id_text(id))
}

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A node record for tests: hostname `h<id>`, status Unknown.
    pub(crate) fn node(id: NodeId, role: Role) -> Node {
        Node {
            id,
            hostname: format!("h{id}"),
            role,
            availability: Availability::Active,
            labels: BTreeMap::new(),
            addr: format!("192.0.2.{id}:2377"),
            data_path_addr: format!("192.0.2.{id}"),
            status: NodeStatus::Unknown,
            status_message: String::new(),
            agent_version: "0.1.0".into(),
            wireguard_key: String::new(),
            certs: Default::default(),
            created_at: 1,
            updated_at: 1,
        }
    }

    /// An initialised cluster whose only node is manager 1.
    pub(crate) fn initialised() -> ClusterState {
        let mut s = ClusterState::default();
        let cmd = Command::Init {
            cluster: ClusterSpec {
                id: "c1".into(),
                created_at: 1,
                default_addr_pool: vec!["10.0.0.0/8".into()],
                default_addr_pool_mask_len: 24,
                autolock: false,
                heartbeat_period_ms: 1000,
                heartbeat_misses_down: 3,
                cert_expiry_secs: 90 * 86400,
                task_history_limit: 5,
                data_path_port: DEFAULT_DATA_PATH_PORT,
                overlay_key_rotation_secs: crate::control::tunnel::DEFAULT_KEY_ROTATION_SECS,
            },
            ca: CaState {
                root_cert_pem: "C".into(),
                root_key_pem: "K".into(),
                previous_roots_pem: vec![],
                previous_until: 0,
                cross_signed_pem: String::new(),
            },
            tokens: JoinTokens {
                worker: "w".into(),
                manager: "m".into(),
            },
            unlock_key: None,
            first: Box::new(node(1, Role::Manager)),
        };
        assert_eq!(s.apply(&cmd), CommandResponse::Applied);
        assert!(matches!(s.apply(&cmd), CommandResponse::Refused(_)));
        s
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let mut s = initialised();
        let ca = s.ca.as_mut().unwrap();
        ca.root_key_pem = "-----BEGIN PRIVATE KEY-----CAKEY".into();
        s.unlock_key = Some("MESHKEY-1-UNLOCKSECRET".into());
        s.tokens = JoinTokens {
            worker: "MESHTKN-1-x-WORKERSECRET".into(),
            manager: "MESHTKN-1-x-MANAGERSECRET".into(),
        };
        let reply = crate::control::api::HeartbeatReply {
            period_ms: 1000,
            managers: vec![],
            leader: None,
            desired_role: Role::Manager,
            renew_certificate: false,
            ca_pems: vec![],
            unlock_key: s.unlock_key.clone(),
            availability: Availability::Active,
        };
        let printed = [
            format!("{s:?}"),
            format!(
                "{:?}",
                Command::Restore {
                    state: Box::new(s.clone())
                }
            ),
            format!(
                "{:?}",
                Command::SetUnlockKey {
                    unlock_key: s.unlock_key.clone()
                }
            ),
            format!("{reply:?}"),
            format!(
                "{:?}",
                crate::control::api::LocalRequest::Unlock {
                    key: "MESHKEY-1-UNLOCKSECRET".into()
                }
            ),
            format!(
                "{:?}",
                crate::control::api::ClusterResponse::Secret("MESHTKN-1-x-WORKERSECRET".into())
            ),
        ];
        for text in printed {
            for secret in ["CAKEY", "UNLOCKSECRET", "WORKERSECRET", "MANAGERSECRET"] {
                assert!(!text.contains(secret), "{secret} printed: {text}");
            }
        }
    }

    #[test]
    fn a_node_that_left_is_not_brought_back_by_a_late_heartbeat() {
        let mut s = initialised();
        assert_eq!(
            s.apply(&Command::AddNode(node(2, Role::Worker))),
            CommandResponse::Applied
        );
        let status = |status, message: &str| Command::SetNodeStatus {
            id: 2,
            status,
            message: message.into(),
            agent_version: String::new(),
            at: 5,
        };
        assert_eq!(
            s.apply(&status(NodeStatus::Down, LEFT_THE_SWARM)),
            CommandResponse::Applied
        );
        assert!(matches!(
            s.apply(&status(NodeStatus::Ready, "")),
            CommandResponse::Refused(_)
        ));
        assert_eq!(s.nodes[&2].status, NodeStatus::Down);
        // A node that only missed heartbeats comes back as ever.
        assert_eq!(
            s.apply(&Command::AddNode(node(3, Role::Worker))),
            CommandResponse::Applied
        );
        let mut other = status(NodeStatus::Down, "heartbeat failure");
        if let Command::SetNodeStatus { id, .. } = &mut other {
            *id = 3;
        }
        assert_eq!(s.apply(&other), CommandResponse::Applied);
        if let Command::SetNodeStatus { id, status, .. } = &mut other {
            *status = NodeStatus::Ready;
            *id = 3;
        }
        assert_eq!(s.apply(&other), CommandResponse::Applied);
    }

    #[test]
    fn commands_before_init_are_refused() {
        let mut s = ClusterState::default();
        assert!(matches!(
            s.apply(&Command::AddNode(node(2, Role::Worker))),
            CommandResponse::Refused(_)
        ));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn node_lifecycle() {
        let mut s = initialised();
        assert_eq!(
            s.apply(&Command::AddNode(node(2, Role::Worker))),
            CommandResponse::Applied
        );
        assert!(matches!(
            s.apply(&Command::AddNode(node(2, Role::Worker))),
            CommandResponse::Refused(_)
        ));
        let update = NodeUpdate {
            role: Some(Role::Manager),
            availability: Some(Availability::Drain),
            label_add: [("zone".to_string(), "a".to_string())].into(),
            label_rm: vec![],
        };
        assert_eq!(
            s.apply(&Command::UpdateNode { id: 2, update, at: 5 }),
            CommandResponse::Applied
        );
        let n = &s.nodes[&2];
        assert_eq!(
            (n.role, n.availability, n.labels["zone"].as_str(), n.updated_at),
            (Role::Manager, Availability::Drain, "a", 5)
        );
        assert_eq!(s.managers(), [1, 2].into());
        assert_eq!(s.apply(&Command::RemoveNode { id: 2 }), CommandResponse::Applied);
        assert!(s.removed.contains(&2));
        // A removed node cannot come back under its old identity.
        assert!(matches!(
            s.apply(&Command::AddNode(node(2, Role::Worker))),
            CommandResponse::Refused(_)
        ));
        let before = s.clone();
        assert!(matches!(
            s.apply(&Command::RemoveNode { id: 9 }),
            CommandResponse::Refused(_)
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn forcing_a_new_cluster_keeps_everything_but_the_other_managers() {
        let mut s = initialised();
        s.apply(&Command::AddNode(node(2, Role::Manager)));
        s.apply(&Command::AddNode(node(3, Role::Worker)));
        let forced = s.forced_to_single_manager(1, 9);
        assert_eq!(forced.managers(), [1].into());
        assert_eq!(forced.nodes[&2].status, NodeStatus::Down);
        assert_eq!(forced.nodes[&3], s.nodes[&3]);
        assert_eq!(forced.tokens, s.tokens);
        let mut fresh = ClusterState::default();
        assert_eq!(
            fresh.apply(&Command::Restore {
                state: Box::new(forced.clone())
            }),
            CommandResponse::Applied
        );
        assert_eq!(fresh, forced);
        // Only into an empty store.
        assert!(matches!(
            fresh.apply(&Command::Restore {
                state: Box::new(forced)
            }),
            CommandResponse::Refused(_)
        ));
    }

    #[test]
    fn task_history_is_bounded() {
        use crate::control::service::{Task, TaskState};
        let mut s = initialised();
        let task = |id: u64, at: u64| Task {
            desired: DesiredState::Shutdown,
            created_at: at,
            updated_at: at,
            ..crate::control::orchestrator::tests_support::task(id, 7, 1, None, TaskState::Pending)
        };
        let create: Vec<Task> = (1..=20).map(|i| task(i, i)).collect();
        s.apply(&Command::ApplyPlan {
            create,
            shutdown: vec![],
            updates: vec![],
            rollbacks: vec![],
            orphaned: vec![],
            at: 20,
        });
        assert!(s.tasks.is_empty(), "a gone service keeps no history");
        s.services
            .insert(7, crate::control::orchestrator::tests_support::service(7));
        let create: Vec<Task> = (21..=40).map(|i| task(i, i)).collect();
        s.apply(&Command::ApplyPlan {
            create,
            shutdown: vec![],
            updates: vec![],
            rollbacks: vec![],
            orphaned: vec![],
            at: 40,
        });
        assert_eq!(
            s.tasks.keys().copied().collect::<Vec<_>>(),
            (36..=40).collect::<Vec<_>>()
        );
        s.apply(&Command::SetTaskHistoryLimit { limit: 2 });
        assert_eq!(
            s.tasks.keys().copied().collect::<Vec<_>>(),
            vec![39, 40],
            "a lower limit applies at once"
        );
        // Tasks ending through their node's reports are pruned as they end.
        let placed: Vec<Task> = (41..=45)
            .map(|i| Task {
                node: Some(9),
                state: TaskState::Running,
                ..task(i, i)
            })
            .collect();
        s.apply(&Command::ApplyPlan {
            create: placed,
            shutdown: vec![],
            updates: vec![],
            rollbacks: vec![],
            orphaned: vec![],
            at: 45,
        });
        assert_eq!(s.tasks.len(), 7, "running tasks are not history yet");
        let reports = (41..=45)
            .map(|i| TaskReport {
                task: i,
                state: TaskState::Shutdown,
                message: String::new(),
            })
            .collect();
        s.apply(&Command::ReportTasks {
            node: 9,
            reports,
            at_ms: 46_000,
        });
        assert_eq!(s.tasks.keys().copied().collect::<Vec<_>>(), vec![44, 45]);
        // A removed service's history goes with it.
        s.apply(&Command::RemoveService { id: 7, at: 50 });
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn node_ids_print_and_parse() {
        for id in [0, 1, 35, 36, u64::MAX, 0x1234_5678_9abc_def0] {
            let text = node_id_text(id);
            assert_eq!(text.len(), 13);
            assert_eq!(parse_node_id(&text), Some(id));
        }
        assert_eq!(parse_node_id("xyz"), None);
        // Found by the specs fuzz target: other spellings of an ID parsed.
        assert_eq!(parse_node_id("+111111kj111k"), None);
        assert_eq!(parse_node_id("0111111KJ111K"), None);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = initialised();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("root_key_pem: \"K\""));
        assert!(dbg.contains("JoinTokens(<redacted>)"));
    }

    #[test]
    fn only_reports_that_move_the_nodes_own_tasks_are_written_once_per_task() {
        use crate::control::{orchestrator::tests_support::task, service::TaskReport};
        let mut s = initialised();
        s.tasks.insert(1, task(1, 7, 1, Some(5), TaskState::Starting));
        s.tasks.insert(2, task(2, 7, 2, Some(6), TaskState::Starting));
        let report = |task, state| TaskReport {
            task,
            state,
            message: String::new(),
        };
        // The same state again, another node's task, an unknown task, a
        // step back: nothing to write.
        let idle = vec![
            report(1, TaskState::Starting),
            report(2, TaskState::Running),
            report(9, TaskState::Running),
            report(1, TaskState::Preparing),
        ];
        assert!(s.reports_that_change(5, idle).is_empty());
        // Ten thousand reports on one task are one.
        let flood: Vec<TaskReport> = (0..10_000).map(|_| report(1, TaskState::Running)).collect();
        let kept = s.reports_that_change(5, flood);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].state, TaskState::Running);
        // The furthest along wins, whatever the order.
        let kept = s.reports_that_change(5, vec![report(1, TaskState::Failed), report(1, TaskState::Running)]);
        assert_eq!(
            kept.iter().map(|r| r.state).collect::<Vec<_>>(),
            vec![TaskState::Failed]
        );
    }
}
