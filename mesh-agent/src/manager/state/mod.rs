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

use blobs::*;
use cluster::*;
use networks::*;
use nodes::*;
use services::*;
use tasks::*;

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
use crate::api::store::Refusal;
use crate::refusal;

/// The state machine: a committed command applied to the state.
pub trait Apply {
    /// Applies one committed command, whole or not at all.
    fn apply(&mut self, command: &Command) -> CommandResponse;
}

impl Apply for ClusterState {
    fn apply(&mut self, command: &Command) -> CommandResponse {
        match try_apply(self, command) {
            Ok(()) => CommandResponse::Applied,
            Err(Refusal(reason)) => CommandResponse::Refused(reason),
        }
    }
}

fn try_apply(state: &mut ClusterState, command: &Command) -> Result<(), Refusal> {
    if !matches!(command, Command::Init { .. } | Command::Restore { .. }) && state.cluster.is_none() {
        return Err("the cluster is not initialised".into());
    }
    match command {
        Command::Init {
            cluster,
            ca,
            tokens,
            unlock_key,
            first,
        } => apply_init(state, cluster, ca, tokens, unlock_key, first),
        Command::Restore { state: restored } => apply_restore(state, restored),
        Command::AddNode(node) => apply_add_node(state, node),
        Command::UpdateNode { id, update, at } => apply_update_node(state, *id, update, *at),
        Command::SetNodeStatus {
            id,
            status,
            message,
            agent_version,
            at,
        } => apply_set_node_status(state, *id, *status, message, agent_version, *at),
        Command::RemoveNode { id } => apply_remove_node(state, *id),
        Command::SetNodeWireguardKey { id, key } => apply_set_node_wireguard_key(state, *id, key),
        Command::SetNodeResources { id, resources } => apply_set_node_resources(state, *id, *resources),
        Command::RotateOverlayKey(key) => apply_rotate_overlay_key(state, key),
        Command::RotateToken { role, token } => apply_rotate_token(state, *role, token),
        Command::SetUnlockKey { unlock_key } => apply_set_unlock_key(state, unlock_key),
        Command::CreateNetwork(network) => apply_create_network(state, network),
        Command::RemoveNetwork { id } => apply_remove_network(state, *id),
        Command::CreateBlob { kind, blob } => apply_create_blob(state, *kind, blob),
        Command::RemoveBlob { kind, id } => apply_remove_blob(state, *kind, *id),
        Command::SetTaskHistoryLimit { limit } => apply_set_task_history_limit(state, *limit),
        Command::RotateCa { ca, tokens } => apply_rotate_ca(state, ca, tokens),
        Command::DropPreviousRoots => apply_drop_previous_roots(state),
        Command::RecordNodeCert { id, issued, grace_secs } => apply_record_node_cert(state, *id, issued, *grace_secs),
        Command::RecordOperatorCert { name, issued } => apply_record_operator_cert(state, name, issued),
        Command::RevokeOperatorCert { name } => apply_revoke_operator_cert(state, name),
        Command::CreateService(service) => apply_create_service(state, service),
        Command::UpdateService { id, spec, force, at } => apply_update_service(state, *id, spec, *force, *at),
        Command::RollbackService { id, at_ms } => apply_rollback_service(state, *id, *at_ms),
        Command::RemoveService { id, at } => apply_remove_service(state, *id, *at),
        Command::ApplyPlan {
            create,
            shutdown,
            updates,
            rollbacks,
            orphaned,
            at,
        } => apply_plan(state, create, shutdown, updates, rollbacks, orphaned, *at),
        Command::ReportTasks { node, reports, at_ms } => apply_report_tasks(state, *node, reports, *at_ms),
        Command::SetTaskState {
            id,
            state: to,
            message,
            at,
        } => apply_set_task_state(state, *id, *to, message, *at),
    }
}

/// Swaps a service back to its previous spec and rolls that out.
fn roll_back(state: &mut ClusterState, id: u64, at_ms: u64) -> Result<(), Refusal> {
    let service = state
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

fn create_network(state: &mut ClusterState, network: &Network) -> Result<(), Refusal> {
    for other in state.networks.values() {
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
    state.networks.insert(network.id, network.clone());
    Ok(())
}

fn blobs_mut(state: &mut ClusterState, kind: crate::api::secret::Kind) -> &mut BTreeMap<u64, crate::api::secret::Blob> {
    match kind {
        crate::api::secret::Kind::Secret => &mut state.secrets,
        crate::api::secret::Kind::Config => &mut state.configs,
    }
}

/// The virtual IPs `service` should have: the ones it has on networks it
/// is still on, and a free address on each new one (none in endpoint
/// mode dnsrr). Allocated here, in the state machine, so every replica
/// picks the same address.
fn virtual_ips(state: &ClusterState, service: &Service) -> Result<Vec<NetworkAttachment>, Refusal> {
    if service.spec.endpoint_mode == EndpointMode::Dnsrr {
        return Ok(Vec::new());
    }
    let mut used = state.addresses_in_use();
    let mut vips = Vec::new();
    for name in &service.spec.networks {
        let Some(network) = state.networks.values().find(|n| &n.name == name) else {
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
fn settle_addresses(state: &ClusterState, create: &[Task]) -> Result<Vec<Task>, Refusal> {
    let mut used = state.addresses_in_use();
    let mut out = create.to_vec();
    for t in &mut out {
        for a in &mut t.attachments {
            let network = state
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
fn prune_task_history(state: &mut ClusterState, touched: Option<&BTreeSet<HistoryPlace>>) {
    if touched.is_some_and(|t| t.is_empty()) {
        return;
    }
    let keep = state.cluster.as_ref().map_or(TASK_HISTORY, |c| c.task_history_limit) as usize;
    let mut finished: BTreeMap<HistoryPlace, Vec<(u64, u64)>> = BTreeMap::new();
    for t in state.tasks.values().filter(|t| t.is_finished()) {
        let place = t.history_place();
        if touched.is_none_or(|touched| touched.contains(&place)) {
            finished.entry(place).or_default().push((t.updated_at, t.id));
        }
    }
    for ((service, _, _), mut history) in finished {
        let keep = if state.services.contains_key(&service) { keep } else { 0 };
        history.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in history.into_iter().skip(keep) {
            state.tasks.remove(&id);
        }
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
            resources: Default::default(),
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

    /// The messages' nesting bound (`api::msgpack`) holds a whole state.
    #[test]
    fn a_whole_cluster_state_fits_the_nesting_bound() {
        use crate::api::{msgpack::from_msgpack, store::Command};
        let mut state = initialised();
        let service = crate::manager::orchestrator::tests_support::service(7);
        state.services.insert(7, service);
        let command = Command::Restore { state: Box::new(state) };
        let bytes = rmp_serde::to_vec(&(1u64, &command)).unwrap();
        let (_, back): (u64, Command) = from_msgpack(&bytes).expect("within the bound");
        assert_eq!(back, command);
    }
}
