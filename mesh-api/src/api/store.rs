//! Everything Raft replicates ([`ClusterState`]), and the commands that
//! change it. Applying a command is the manager's (`manager::state`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::cert_records::Issued;
use super::objects::*;
use super::secret_text::SecretText;
use super::service::{Service, ServiceSpec, Task, TaskReport};
use super::{
    network::Network,
    service::{TaskState, UpdateStatus},
};
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
    /// A node reported other CPUs or memory.
    SetNodeResources {
        /// Which node.
        id: NodeId,
        /// What it has.
        resources: crate::api::resources::NodeResources,
    },
    /// A node reported a new WireGuard public key.
    SetNodeWireguardKey {
        /// Which node.
        id: NodeId,
        /// Base64.
        key: String,
    },
    /// The leader rotated the overlay key (on schedule or after a node
    /// was removed). Refused unless it follows the current one.
    RotateOverlayKey(crate::api::overlay_key::OverlayKey),
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
        kind: crate::api::secret::Kind,
        blob: Box<crate::api::secret::Blob>,
    },
    /// `secret rm` / `config rm`.
    RemoveBlob {
        kind: crate::api::secret::Kind,
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
    pub overlay_key: Option<crate::api::overlay_key::OverlayKey>,
    /// The key before it: IPsec keeps accepting it while every node moves
    /// its outbound traffic to the new one.
    #[serde(default)]
    pub previous_overlay_key: Option<crate::api::overlay_key::OverlayKey>,
    /// Secrets by ID (sealed at rest with the rest of the store).
    #[serde(default)]
    pub secrets: BTreeMap<u64, crate::api::secret::Blob>,
    /// Configs by ID.
    #[serde(default)]
    pub configs: BTreeMap<u64, crate::api::secret::Blob>,
    /// Operator certificates by name: honoured only while recorded here.
    #[serde(default)]
    pub operators: BTreeMap<String, Issued>,
}

/// Why a command was refused: the state stays as it was, and the reason
/// goes to the operator (as [`CommandResponse::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// A [`Refusal`] from a `format!` message.
#[macro_export]
macro_rules! refusal {
    ($($message:tt)*) => {
        $crate::api::store::Refusal(format!($($message)*))
    };
}

super::error::text_reason!(Refusal);

impl From<super::error::Invalid> for Refusal {
    fn from(invalid: super::error::Invalid) -> Refusal {
        Refusal(invalid.0)
    }
}

/// What the cluster API and the dispatcher read from a state.
impl ClusterState {
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

    /// The secrets or the configs.
    pub fn blobs(&self, kind: super::secret::Kind) -> &BTreeMap<u64, super::secret::Blob> {
        match kind {
            super::secret::Kind::Secret => &self.secrets,
            super::secret::Kind::Config => &self.configs,
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
    pub fn check_blob_unused(&self, kind: super::secret::Kind, name: &str) -> Result<(), Refusal> {
        let user = self
            .services
            .values()
            .find(|s| s.spec.refs(kind).iter().any(|r| r.source == name));
        match user {
            Some(s) => Err(refusal!(
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
    pub fn check_network_unused(&self, network: &Network) -> Result<(), Refusal> {
        match self.network_users(network).first() {
            Some(user) => Err(refusal!(
                "network {} is in use by service {user}: remove the service, or detach it with `meshctl service update --network-rm {} {user}`",
                network.name, network.name
            )),
            None => Ok(()),
        }
    }

    /// Services that name `network`, and services of unended tasks that
    /// still hold an address on it.
    pub(crate) fn network_users(&self, network: &Network) -> Vec<String> {
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

    /// Ids of the nodes whose desired role is manager.
    pub fn managers(&self) -> BTreeSet<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Manager)
            .map(|n| n.id)
            .collect()
    }

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
