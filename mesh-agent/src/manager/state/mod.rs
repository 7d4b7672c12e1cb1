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

use crate::api::objects::*;
use crate::api::store::*;

use crate::api::cert_records::Issued;
use crate::api::network::{Network, NetworkAttachment};
use crate::api::secret_text::SecretText;
use crate::api::service::HistoryPlace;
use crate::api::service::{
    DesiredState, EndpointMode, Service, ServiceSpec, Task, TaskReport, TaskState, UpdateState, UpdateStatus,
};

/// Why a command was refused: the state stays as it was, and the reason
/// goes to the operator (as [`CommandResponse::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// A [`Refusal`] from a `format!` message.
macro_rules! refusal {
    ($($message:tt)*) => {
        $crate::manager::state::Refusal(format!($($message)*))
    };
}
use refusal;

impl From<&str> for Refusal {
    fn from(reason: &str) -> Refusal {
        Refusal(reason.to_string())
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal(reason)
    }
}

impl From<crate::api::error::Invalid> for Refusal {
    fn from(invalid: crate::api::error::Invalid) -> Refusal {
        Refusal(invalid.0)
    }
}

impl From<Refusal> for String {
    fn from(refusal: Refusal) -> String {
        refusal.0
    }
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match self.try_apply(command) {
            Ok(()) => CommandResponse::Applied,
            Err(Refusal(reason)) => CommandResponse::Refused(reason),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<(), Refusal> {
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
    fn roll_back(&mut self, id: u64, at_ms: u64) -> Result<(), Refusal> {
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

    fn create_network(&mut self, network: &Network) -> Result<(), Refusal> {
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
            return Err(refusal!(
                "network {}: its {clash} is taken by network {}",
                network.name,
                other.name
            ));
        }
        self.networks.insert(network.id, network.clone());
        Ok(())
    }

    /// The secrets or the configs.
    pub fn blobs(&self, kind: crate::api::secret::Kind) -> &BTreeMap<u64, crate::api::secret::Blob> {
        match kind {
            crate::api::secret::Kind::Secret => &self.secrets,
            crate::api::secret::Kind::Config => &self.configs,
        }
    }

    fn blobs_mut(&mut self, kind: crate::api::secret::Kind) -> &mut BTreeMap<u64, crate::api::secret::Blob> {
        match kind {
            crate::api::secret::Kind::Secret => &mut self.secrets,
            crate::api::secret::Kind::Config => &mut self.configs,
        }
    }

    /// The content of the secret or config named `name`.
    pub fn blob_data(&self, kind: crate::api::secret::Kind, name: &str) -> Option<Vec<u8>> {
        self.blobs(kind)
            .values()
            .find(|b| b.name == name)
            .map(|b| b.data.clone())
    }

    /// Refuses while a service refers to the secret or config `name`.
    pub fn check_blob_unused(&self, kind: crate::api::secret::Kind, name: &str) -> Result<(), Refusal> {
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
    fn virtual_ips(&self, service: &Service) -> Result<Vec<NetworkAttachment>, Refusal> {
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
            let address = crate::manager::allocator::network::task_address(network, taken).ok_or_else(|| {
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
    fn settle_addresses(&self, create: &[Task]) -> Result<Vec<Task>, Refusal> {
        let mut used = self.addresses_in_use();
        let mut out = create.to_vec();
        for t in &mut out {
            for a in &mut t.attachments {
                let network = self
                    .networks
                    .get(&a.network)
                    .ok_or_else(|| format!("task {}: network {} not found", t.id, a.network))?;
                if !network.subnet.contains(a.address) || a.address == network.gateway {
                    return Err(refusal!(
                        "task {}: {} is not a task address of {}",
                        t.id,
                        a.address,
                        network.name
                    ));
                }
                let taken = used.entry(a.network).or_default();
                if taken.contains(&a.address) {
                    a.address = crate::manager::allocator::network::task_address(network, taken).ok_or_else(|| {
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

fn no_such_node(id: NodeId) -> Refusal {
    refusal!("node {} not found", node_id_text(id))
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
                overlay_key_rotation_secs: crate::api::objects::DEFAULT_KEY_ROTATION_SECS,
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
        let reply = crate::api::messages::HeartbeatReply {
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
                crate::api::messages::LocalRequest::Unlock {
                    key: "MESHKEY-1-UNLOCKSECRET".into()
                }
            ),
            format!(
                "{:?}",
                crate::api::messages::ClusterResponse::Secret("MESHTKN-1-x-WORKERSECRET".into())
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
        use crate::api::service::{Task, TaskState};
        let mut s = initialised();
        let task = |id: u64, at: u64| Task {
            desired: DesiredState::Shutdown,
            created_at: at,
            updated_at: at,
            ..crate::manager::orchestrator::tests_support::task(id, 7, 1, None, TaskState::Pending)
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
            .insert(7, crate::manager::orchestrator::tests_support::service(7));
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
        use crate::{api::service::TaskReport, manager::orchestrator::tests_support::task};
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
