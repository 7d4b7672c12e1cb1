//! The leader's orchestrator: turns services and nodes into task decisions
//! (one `ApplyPlan` command per pass), using the pure scheduler.
//!
//! Pure as well: the caller supplies the time and the ID generator and
//! proposes the command it returns. A pass that has nothing to change
//! returns `None`, so a converged cluster writes nothing to Raft.

use std::collections::BTreeMap;

use super::{
    scheduler::{self, Grace, Placement, SchedNode, SchedTask},
    service::{DesiredState, Service, ServiceMode, Task, TaskState},
    state::{ClusterState, Command, NodeId, NodeStatus},
};

/// How long a Down node keeps its tasks before they are replaced elsewhere.
pub const DOWN_GRACE_SECS: u64 = 5;

/// A task the orchestrator still counts: wanted, and not finished.
fn live(task: &Task) -> bool {
    task.desired == DesiredState::Running && !task.state.is_terminal()
}

/// Decides new and retired tasks for every service.
pub fn plan(state: &ClusterState, now: u64, new_id: &mut dyn FnMut() -> u64) -> Option<Command> {
    let nodes: Vec<SchedNode> = state
        .nodes
        .values()
        .map(|n| SchedNode {
            id: n.id,
            hostname: n.hostname.clone(),
            role: n.role,
            status: n.status,
            availability: n.availability,
            labels: n.labels.clone(),
        })
        .collect();
    let down_since: BTreeMap<NodeId, u64> = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Down)
        .map(|n| (n.id, n.updated_at))
        .collect();
    let mut total: BTreeMap<NodeId, u32> = BTreeMap::new();
    for task in state.tasks.values().filter(|t| live(t)) {
        if let Some(node) = task.node {
            *total.entry(node).or_default() += 1;
        }
    }
    let grace = Grace {
        down_for_longer_than: DOWN_GRACE_SECS,
    };
    let mut create = Vec::new();
    let mut shutdown = Vec::new();
    for service in state.services.values() {
        let placement = Placement {
            constraints: service
                .spec
                .constraints
                .iter()
                .filter_map(|c| scheduler::Constraint::parse(c).ok())
                .collect(),
            spread_over: service.spec.spread_over.clone(),
            max_per_node: service.spec.max_per_node,
        };
        let mine: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.service == service.id && live(t))
            .collect();
        let assigned: Vec<SchedTask> = mine
            .iter()
            .filter_map(|t| {
                t.node.map(|node| SchedTask {
                    id: t.id,
                    slot: t.slot,
                    node,
                })
            })
            .collect();
        let pending: BTreeMap<u32, &Task> = mine.iter().filter(|t| t.node.is_none()).map(|t| (t.slot, *t)).collect();
        let decided = match service.spec.mode {
            ServiceMode::Replicated { replicas } => scheduler::reconcile_replicated(
                replicas,
                &placement,
                &assigned,
                &nodes,
                &total,
                &down_since,
                now,
                grace,
            ),
            ServiceMode::Global => scheduler::reconcile_global(&placement, &assigned, &nodes, &down_since, now, grace),
        };
        shutdown.extend(decided.shutdown);
        for (slot, node) in &decided.create {
            if let Some(waiting) = pending.get(slot) {
                shutdown.push((waiting.id, "placed on a node".into()));
            }
            *total.entry(*node).or_default() += 1;
            create.push(new_task(
                service,
                *slot,
                Some(*node),
                TaskState::Assigned,
                String::new(),
                now,
                new_id,
            ));
        }
        // Slots still without a node: one Pending task each, saying why.
        if let (ServiceMode::Replicated { replicas }, Some(unplaced)) = (service.spec.mode, &decided.unplaced) {
            let placed: Vec<u32> = decided.create.iter().map(|c| c.0).collect();
            let holding: Vec<u32> = assigned.iter().map(|t| t.slot).collect();
            for slot in (1..=replicas).filter(|s| !placed.contains(s) && !holding.contains(s)) {
                if let Some(t) = pending.get(&slot) {
                    if t.message == unplaced.reason {
                        continue;
                    }
                    shutdown.push((t.id, "reason changed".into()));
                }
                let reason = unplaced.reason.clone();
                create.push(new_task(service, slot, None, TaskState::Pending, reason, now, new_id));
            }
        }
        // Pending tasks of slots that no longer exist (scaled down).
        if let ServiceMode::Replicated { replicas } = service.spec.mode {
            shutdown.extend(
                pending
                    .values()
                    .filter(|t| t.slot > replicas)
                    .map(|t| (t.id, "scaled down".to_string())),
            );
        }
    }
    if create.is_empty() && shutdown.is_empty() {
        return None;
    }
    Some(Command::ApplyPlan {
        create,
        shutdown,
        at: now,
    })
}

fn new_task(
    service: &Service,
    slot: u32,
    node: Option<NodeId>,
    state: TaskState,
    message: String,
    now: u64,
    new_id: &mut dyn FnMut() -> u64,
) -> Task {
    Task {
        id: new_id(),
        service: service.id,
        slot,
        node,
        desired: DesiredState::Running,
        state,
        message,
        service_version: service.version,
        created_at: now,
        updated_at: now,
    }
}

/// Fixtures shared with other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::control::service::{RestartPolicy, Service, ServiceMode, ServiceSpec};

    /// A replicated service of 1 running `sleep 1000`.
    pub(crate) fn service(id: u64) -> Service {
        Service {
            id,
            spec: ServiceSpec {
                name: format!("s{id}"),
                command: vec!["sleep".into(), "1000".into()],
                mode: ServiceMode::Replicated { replicas: 1 },
                env: Default::default(),
                workdir: None,
                user: None,
                networks: vec![],
                publish: vec![],
                constraints: vec![],
                spread_over: vec![],
                max_per_node: 0,
                restart: RestartPolicy::default(),
            },
            version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::{tests::node, Availability, Role};

    fn cluster(nodes: usize) -> ClusterState {
        let mut s = crate::control::state::tests::initialised();
        s.nodes.clear();
        for id in 1..=nodes as u64 {
            s.nodes.insert(
                id,
                crate::control::state::Node {
                    status: NodeStatus::Ready,
                    ..node(id, Role::Worker)
                },
            );
        }
        s
    }

    fn service(id: u64, mode: ServiceMode) -> Service {
        let mut s = super::tests_support::service(id);
        s.spec.mode = mode;
        s
    }

    fn run(state: &mut ClusterState, now: u64) -> bool {
        let mut next = 1000 + state.tasks.len() as u64 * 10;
        let mut ids = || {
            next += 1;
            next
        };
        match plan(state, now, &mut ids) {
            Some(cmd) => {
                assert_eq!(state.apply(&cmd), crate::control::state::CommandResponse::Applied);
                true
            }
            None => false,
        }
    }

    fn running_per_node(state: &ClusterState) -> BTreeMap<NodeId, usize> {
        let mut m = BTreeMap::new();
        for t in state.tasks.values().filter(|t| live(t)) {
            if let Some(n) = t.node {
                *m.entry(n).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn converges_then_writes_nothing() {
        let mut s = cluster(3);
        s.services
            .insert(1, service(1, ServiceMode::Replicated { replicas: 6 }));
        assert!(run(&mut s, 0));
        assert_eq!(running_per_node(&s), [(1, 2), (2, 2), (3, 2)].into());
        assert!(!run(&mut s, 1), "a converged cluster proposes nothing");
    }

    #[test]
    fn unplaceable_tasks_wait_pending_once_and_are_placed_later() {
        let mut s = cluster(1);
        s.nodes.get_mut(&1).unwrap().availability = Availability::Drain;
        s.services
            .insert(1, service(1, ServiceMode::Replicated { replicas: 2 }));
        assert!(run(&mut s, 0));
        assert_eq!(
            s.tasks
                .values()
                .filter(|t| t.state == TaskState::Pending && live(t))
                .count(),
            2
        );
        assert!(!run(&mut s, 1), "no churn while nothing changes");
        s.nodes.get_mut(&1).unwrap().availability = Availability::Active;
        assert!(run(&mut s, 2));
        assert_eq!(running_per_node(&s), [(1, 2)].into());
        assert_eq!(s.tasks.values().filter(|t| live(t) && t.node.is_none()).count(), 0);
    }

    #[test]
    fn down_nodes_lose_their_tasks_after_the_grace_and_removed_services_stop() {
        let mut s = cluster(3);
        s.services
            .insert(1, service(1, ServiceMode::Replicated { replicas: 3 }));
        run(&mut s, 0);
        let n3 = s.nodes.get_mut(&3).unwrap();
        n3.status = NodeStatus::Down;
        n3.updated_at = 100;
        assert!(!run(&mut s, 100 + DOWN_GRACE_SECS));
        assert!(run(&mut s, 101 + DOWN_GRACE_SECS));
        assert_eq!(running_per_node(&s).get(&3), None);
        assert_eq!(running_per_node(&s).values().sum::<usize>(), 3);
        s.apply(&Command::RemoveService { id: 1, at: 200 });
        assert!(s.tasks.values().all(|t| t.desired == DesiredState::Shutdown));
        assert!(!run(&mut s, 201));
    }

    #[test]
    fn global_services_cover_every_node() {
        let mut s = cluster(2);
        s.services.insert(1, service(1, ServiceMode::Global));
        run(&mut s, 0);
        assert_eq!(running_per_node(&s), [(1, 1), (2, 1)].into());
        s.nodes.insert(
            3,
            crate::control::state::Node {
                status: NodeStatus::Ready,
                ..node(3, Role::Worker)
            },
        );
        run(&mut s, 1);
        assert_eq!(running_per_node(&s), [(1, 1), (2, 1), (3, 1)].into());
    }
}
