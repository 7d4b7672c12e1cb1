//! The leader's orchestrator: turns services and nodes into task decisions
//! (one `ApplyPlan` command per pass), using the pure scheduler.
//!
//! Pure as well: the caller supplies the time and the ID generator and
//! proposes the command it returns. A pass that has nothing to change
//! returns `None`, so a converged cluster writes nothing to Raft.

pub(crate) mod update;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::manager::{
    allocator,
    scheduler::{self, Grace, Placement, SchedNode, SchedTask},
};

use crate::api::{
    network::NetworkAttachment,
    objects::{NodeId, NodeStatus},
    resources::NodeResources,
    store::{ClusterState, Command},
};

use crate::api::service::{place_of, should_restart, DesiredState, Place, Service, ServiceMode, Task, TaskState};

/// How long a Down node keeps its tasks before they are replaced elsewhere.
pub(crate) const DOWN_GRACE_SECS: u64 = 5;

/// A task whose node has been Down this long (or was removed) is Orphaned:
/// nobody can say how it ended (swarmkit's 24 h).
pub(crate) const ORPHAN_AFTER_SECS: u64 = 24 * 3600;

/// Unended tasks whose node is gone or Down for longer than
/// [`ORPHAN_AFTER_SECS`].
pub(crate) fn orphans(state: &ClusterState, now: u64) -> Vec<u64> {
    let lost = |node: NodeId| match state.nodes.get(&node) {
        None => true,
        Some(n) => n.status == NodeStatus::Down && now.saturating_sub(n.updated_at) > ORPHAN_AFTER_SECS,
    };
    state
        .tasks
        .values()
        .filter(|t| !t.state.is_terminal() && t.node.is_some_and(lost))
        .map(|t| t.id)
        .collect()
}

/// A task the orchestrator still counts: wanted, and not finished.
fn live(task: &Task) -> bool {
    task.desired == DesiredState::Running && !task.state.is_terminal()
}

/// The restart policy's verdict for one service's places whose last task
/// ended on its own (exited, failed, rejected).
#[derive(Debug, Default, PartialEq)]
struct Restarts {
    /// Places kept empty: the delay has not passed, or the policy says no more.
    resting: BTreeSet<Place>,
    /// Places refilled now, with the attempt number their new task carries.
    attempts: BTreeMap<Place, u32>,
    /// Ended tasks to mark desired Shutdown (replaced, or their place is gone).
    retire: Vec<u64>,
}

fn restarts(service: &Service, tasks: &[&Task], now_ms: u64) -> Restarts {
    let policy = service.spec.restart;
    let occupied: BTreeSet<Place> = tasks.iter().filter(|t| live(t)).filter_map(|t| place_of(t)).collect();
    let mut latest: BTreeMap<Place, &Task> = BTreeMap::new();
    let mut out = Restarts::default();
    for t in tasks
        .iter()
        .filter(|t| t.desired == DesiredState::Running && t.state.is_terminal())
    {
        let Some(place) = place_of(t) else { continue };
        let out_of_range = match (place, service.spec.mode) {
            (Place::Slot(slot), ServiceMode::Replicated { replicas }) => slot > replicas,
            (Place::Slot(_), ServiceMode::Global) | (Place::Node(_), ServiceMode::Replicated { .. }) => true,
            (Place::Node(_), ServiceMode::Global) => false,
        };
        if occupied.contains(&place) || out_of_range {
            out.retire.push(t.id);
            continue;
        }
        match latest.get(&place) {
            Some(l) if (l.ended_at_ms, l.id) >= (t.ended_at_ms, t.id) => out.retire.push(t.id),
            Some(l) => {
                out.retire.push(l.id);
                latest.insert(place, t);
            }
            None => {
                latest.insert(place, t);
            }
        }
    }
    for (place, t) in latest {
        if !should_restart(policy.condition, t.state, t.restarts, policy.max_attempts)
            || now_ms < t.ended_at_ms.saturating_add(policy.delay_ms)
        {
            out.resting.insert(place);
        } else {
            out.attempts.insert(place, t.restarts + 1);
            out.retire.push(t.id);
        }
    }
    out
}

/// The nodes as the scheduler sees them: what each has left is what it
/// reported less the reservations of the tasks it is to run.
pub(crate) fn sched_nodes(state: &ClusterState) -> Vec<SchedNode> {
    let mut kept: BTreeMap<NodeId, NodeResources> = BTreeMap::new();
    // Most swarms reserve nothing: no walk over every task then.
    let reserving = state
        .services
        .values()
        .any(|s| s.spec.resources.reserved() != NodeResources::default());
    for task in state.tasks.values().filter(|t| reserving && live(t)) {
        let (Some(node), Some(service)) = (task.node, state.services.get(&task.service)) else {
            continue;
        };
        let reserved = service.spec.resources.reserved();
        if reserved != NodeResources::default() {
            let entry = kept.entry(node).or_default();
            *entry = entry.plus(reserved);
        }
    }
    state
        .nodes
        .values()
        .map(|n| SchedNode {
            id: n.id,
            hostname: n.hostname.clone(),
            role: n.role,
            status: n.status,
            availability: n.availability,
            labels: n.labels.clone(),
            free: n.resources.less(kept.get(&n.id).copied().unwrap_or_default()),
        })
        .collect()
}

/// A service's placement rules (its constraints were checked on create).
pub(crate) fn placement_of(service: &Service) -> Placement {
    Placement {
        constraints: service
            .spec
            .constraints
            .iter()
            .filter_map(|c| crate::api::service::Constraint::parse(c).ok())
            .collect(),
        spread_over: service.spec.spread_over.clone(),
        max_per_node: service.spec.max_per_node,
        reservation: service.spec.resources.reserved(),
    }
}

/// How many tasks a plan places on a node, and how many it creates
/// Pending because no node fits (for the scheduler's metrics, which the
/// caller records: planning touches no global state).
pub(crate) fn decisions(plan: &Command) -> (u64, u64) {
    let Command::ApplyPlan { create, .. } = plan else {
        return (0, 0);
    };
    let placed = create.iter().filter(|t| t.node.is_some()).count() as u64;
    let unplaceable = create
        .iter()
        .filter(|t| t.node.is_none() && t.state == TaskState::Pending)
        .count() as u64;
    (placed, unplaceable)
}

/// Decides new and retired tasks for every service.
pub fn plan(state: &ClusterState, now_ms: u64, new_id: &mut dyn FnMut() -> u64) -> Option<Command> {
    let now = now_ms / 1000;
    let mut nodes = sched_nodes(state);
    let down_since: BTreeMap<NodeId, u64> = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Down)
        .map(|n| (n.id, n.updated_at))
        .collect();
    let mut total: BTreeMap<NodeId, u32> = BTreeMap::new();
    // Each service's tasks, from one pass: walking every task per service
    // cost services x tasks (50 million steps at 1,000 services and 50,000
    // tasks) on every pass, every 200 ms.
    let mut by_service: HashMap<u64, Vec<&Task>> = HashMap::new();
    for task in state.tasks.values() {
        by_service.entry(task.service).or_default().push(task);
        if let (true, Some(node)) = (live(task), task.node) {
            *total.entry(node).or_default() += 1;
        }
    }
    let grace = Grace {
        down_for_longer_than: DOWN_GRACE_SECS,
    };
    let node_ready = |id: NodeId| state.nodes.get(&id).is_some_and(|n| n.status == NodeStatus::Ready);
    let mut create = Vec::new();
    let mut shutdown = Vec::new();
    let mut updates = Vec::new();
    let mut rollbacks = Vec::new();
    let mut addresses = AddressBook::new(state);
    for service in state.services.values() {
        let placement = placement_of(service);
        let all: Vec<&Task> = by_service.remove(&service.id).unwrap_or_default();
        let update = update::step(service, &all, &node_ready, now_ms);
        if update.rollback {
            rollbacks.push(service.id);
            continue;
        }
        if let Some(status) = update.status {
            updates.push((service.id, status));
        }
        let restarts = restarts(service, &all, now_ms);
        shutdown.extend(restarts.retire.iter().map(|id| (*id, "replaced".to_string())));
        // Tasks the update stops or hides are not the scheduler's to count.
        let leaving: BTreeSet<u64> = update
            .shutdown
            .iter()
            .map(|s| s.0)
            .chain(update.hidden.iter().copied())
            .collect();
        shutdown.extend(update.shutdown);
        let mine: Vec<&Task> = all
            .iter()
            .copied()
            .filter(|t| live(t) && !leaving.contains(&t.id))
            .collect();
        let resting: BTreeSet<Place> = restarts.resting.union(&update.resting).copied().collect();
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
        let resting_slots: BTreeSet<u32> = resting
            .iter()
            .filter_map(|p| match p {
                Place::Slot(s) => Some(*s),
                Place::Node(_) => None,
            })
            .collect();
        let resting_nodes: BTreeSet<NodeId> = resting
            .iter()
            .filter_map(|p| match p {
                Place::Node(n) => Some(*n),
                Place::Slot(_) => None,
            })
            .collect();
        let pending: BTreeMap<u32, &Task> = mine.iter().filter(|t| t.node.is_none()).map(|t| (t.slot, *t)).collect();
        let decided = match service.spec.mode {
            ServiceMode::Replicated { replicas } => scheduler::reconcile_replicated(
                replicas,
                &placement,
                &assigned,
                &resting_slots,
                &nodes,
                &total,
                &down_since,
                now,
                grace,
            ),
            ServiceMode::Global => {
                scheduler::reconcile_global(&placement, &assigned, &resting_nodes, &nodes, &down_since, now, grace)
            }
        };
        shutdown.extend(decided.shutdown);
        for (slot, node) in &decided.create {
            let attachments = match addresses.attach(service) {
                Ok(a) => a,
                Err(reason) => {
                    // Waits Pending, saying why, until an address frees up.
                    if pending.get(slot).is_none_or(|t| t.message != reason) {
                        create.push(new_task(service, *slot, None, TaskState::Pending, reason, now, new_id));
                    }
                    continue;
                }
            };
            if let Some(waiting) = pending.get(slot) {
                shutdown.push((waiting.id, "placed on a node".into()));
            }
            *total.entry(*node).or_default() += 1;
            // What this task keeps is not there for the next services.
            if placement.reservation != NodeResources::default() {
                if let Ok(at) = nodes.binary_search_by_key(node, |n| n.id) {
                    nodes[at].free = nodes[at].free.less(placement.reservation);
                }
            }
            let mut task = new_task(
                service,
                *slot,
                Some(*node),
                TaskState::Assigned,
                String::new(),
                now,
                new_id,
            );
            task.attachments = attachments;
            let place = if *slot == 0 {
                Place::Node(*node)
            } else {
                Place::Slot(*slot)
            };
            task.restarts = restarts.attempts.get(&place).copied().unwrap_or(0);
            create.push(task);
        }
        // Slots still without a node: one Pending task each, saying why.
        if let (ServiceMode::Replicated { replicas }, Some(unplaced)) = (service.spec.mode, &decided.unplaced) {
            let placed: Vec<u32> = decided.create.iter().map(|c| c.0).collect();
            let holding: Vec<u32> = assigned.iter().map(|t| t.slot).collect();
            for slot in
                (1..=replicas).filter(|s| !placed.contains(s) && !holding.contains(s) && !resting_slots.contains(s))
            {
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
    let orphaned = orphans(state, now);
    if create.is_empty() && shutdown.is_empty() && updates.is_empty() && rollbacks.is_empty() && orphaned.is_empty() {
        return None;
    }
    Some(Command::ApplyPlan {
        create,
        shutdown,
        updates,
        rollbacks,
        orphaned,
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
        restarts: 0,
        ended_at_ms: 0,
        attachments: vec![],
    }
}

/// Addresses on the overlay networks, handed to tasks as they are placed.
struct AddressBook<'a> {
    state: &'a ClusterState,
    used: BTreeMap<u64, BTreeSet<std::net::Ipv4Addr>>,
}

impl<'a> AddressBook<'a> {
    fn new(state: &'a ClusterState) -> AddressBook<'a> {
        AddressBook {
            state,
            used: state.addresses_in_use(),
        }
    }

    /// One address per network of `service`, or why not (nothing is taken then).
    fn attach(&mut self, service: &Service) -> Result<Vec<NetworkAttachment>, String> {
        let mut out: Vec<NetworkAttachment> = Vec::new();
        for name in &service.spec.networks {
            let network = self
                .state
                .networks
                .values()
                .find(|n| &n.name == name)
                .ok_or_else(|| format!("network {name} not found"))?;
            let used = self.used.entry(network.id).or_default();
            let Some(address) = allocator::network::task_address(network, used) else {
                for a in &out {
                    self.used.entry(a.network).or_default().remove(&a.address);
                }
                return Err(format!("no free address on network {name} ({})", network.ip_range));
            };
            used.insert(address);
            out.push(NetworkAttachment {
                network: network.id,
                address,
            });
        }
        Ok(out)
    }
}

/// Fixtures shared with other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::api::{
        objects::NodeId,
        service::{DesiredState, Service, Task, TaskState},
    };

    /// A replicated service of 1 running `sleep 1000`.
    pub(crate) fn service(id: u64) -> Service {
        Service::example(id)
    }

    /// A task of version 1 that should run, created at time 0.
    pub(crate) fn task(id: u64, service: u64, slot: u32, node: Option<NodeId>, state: TaskState) -> Task {
        Task {
            id,
            service,
            slot,
            node,
            desired: DesiredState::Running,
            state,
            message: String::new(),
            service_version: 1,
            created_at: 0,
            updated_at: 0,
            restarts: 0,
            ended_at_ms: 0,
            attachments: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::state::Apply;
    use crate::{
        api::objects::{Availability, Role},
        manager::state::tests::node,
    };

    fn cluster(nodes: usize) -> ClusterState {
        let mut s = crate::manager::state::tests::initialised();
        s.nodes.clear();
        for id in 1..=nodes as u64 {
            s.nodes.insert(
                id,
                crate::api::objects::Node {
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
        match plan(state, now * 1000, &mut ids) {
            Some(cmd) => {
                assert_eq!(state.apply(&cmd), crate::api::store::CommandResponse::Applied);
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
    fn a_plan_counts_what_it_placed_and_what_found_no_node() {
        let mut ids = 1000..;
        let mut next = || ids.next().unwrap();
        let mut s = cluster(2);
        s.services
            .insert(1, service(1, ServiceMode::Replicated { replicas: 3 }));
        let placed = plan(&s, 1000, &mut next).expect("tasks to create");
        assert_eq!(decisions(&placed), (3, 0));
        let mut none = cluster(0);
        none.services
            .insert(1, service(1, ServiceMode::Replicated { replicas: 2 }));
        let pending = plan(&none, 1000, &mut next).expect("pending tasks");
        assert_eq!(decisions(&pending), (0, 2));
    }

    #[test]
    fn reservations_count_across_services_and_a_freed_node_takes_the_waiting_one() {
        let mut s = cluster(1);
        s.nodes.get_mut(&1).unwrap().resources = NodeResources {
            nano_cpus: 2_000_000_000,
            memory_bytes: 10 << 30,
        };
        for id in [1, 2] {
            let mut svc = service(id, ServiceMode::Replicated { replicas: 1 });
            svc.spec.name = format!("s{id}");
            svc.spec.resources.memory_reservation = Some(6 << 30);
            s.services.insert(id, svc);
        }
        assert!(run(&mut s, 0));
        let placed: Vec<(u64, Option<NodeId>)> = s.tasks.values().map(|t| (t.service, t.node)).collect();
        assert_eq!(
            placed,
            vec![(1, Some(1)), (2, None)],
            "only one 6 GiB task fits in 10 GiB"
        );
        let waiting = s.tasks.values().find(|t| t.service == 2).unwrap();
        assert!(
            waiting.message.contains("insufficient memory on 1 node"),
            "{}",
            waiting.message
        );
        assert!(!run(&mut s, 1), "nothing changes while it does not fit");
        s.services.remove(&1);
        s.tasks = s
            .tasks
            .iter()
            .filter(|(_, t)| t.service != 1)
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        assert!(run(&mut s, 2));
        assert_eq!(running_per_node(&s), [(1, 1)].into());
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
        // A day later nobody knows how the lost task ended: Orphaned, once.
        let on_3 = |s: &ClusterState| {
            s.tasks
                .values()
                .filter(|t| t.node == Some(3))
                .map(|t| t.state)
                .collect::<Vec<_>>()
        };
        assert!(!run(&mut s, 100 + ORPHAN_AFTER_SECS));
        assert_eq!(on_3(&s), vec![TaskState::Assigned]);
        assert!(run(&mut s, 101 + ORPHAN_AFTER_SECS));
        assert_eq!(on_3(&s), vec![TaskState::Orphaned]);
        assert!(!run(&mut s, 102 + ORPHAN_AFTER_SECS));
        s.apply(&Command::RemoveService { id: 1, at: 200 });
        assert!(s.tasks.values().all(|t| t.desired == DesiredState::Shutdown));
        assert!(!run(&mut s, 201));
    }

    #[test]
    fn tasks_get_one_free_address_per_network_or_wait_pending_for_one() {
        let mut s = cluster(3);
        let spec = crate::api::network::NetworkSpec {
            name: "app".into(),
            subnet: Some(crate::api::subnet::Subnet::parse("10.9.0.0/24").unwrap()),
            ip_range: Some(crate::api::subnet::Subnet::parse("10.9.0.0/29").unwrap()),
            ..Default::default()
        };
        let pools = allocator::network::Pools {
            pools: vec![crate::api::subnet::Subnet::parse("10.0.0.0/8").unwrap()],
            mask_len: 24,
        };
        let net = allocator::network::allocate_network(&spec, &[], &pools, 77, 0).unwrap();
        assert_eq!(
            s.apply(&Command::CreateNetwork(Box::new(net.clone()))),
            crate::api::store::CommandResponse::Applied
        );
        let mut svc = service(1, ServiceMode::Replicated { replicas: 7 });
        svc.spec.networks = vec!["app".into()];
        s.services.insert(1, svc);
        run(&mut s, 0);
        let mut addresses: Vec<_> = s
            .tasks
            .values()
            .filter(|t| t.node.is_some())
            .map(|t| t.attachments[0].address.to_string())
            .collect();
        addresses.sort();
        // The range .0-.7 lies inside the /24, so .7 is a host address too;
        // .0 is the subnet's own address and .1 its gateway: 6 tasks fit.
        let want: Vec<String> = (2..=7).map(|i| format!("10.9.0.{i}")).collect();
        assert_eq!(addresses, want);
        let waiting: Vec<_> = s.tasks.values().filter(|t| t.node.is_none()).collect();
        assert_eq!(waiting.len(), 1);
        assert!(
            waiting[0].message.contains("no free address on network app"),
            "{}",
            waiting[0].message
        );
        assert!(!run(&mut s, 1), "the waiting task is not recreated every pass");
        // The network cannot go while tasks hold addresses on it.
        assert!(matches!(
            s.apply(&Command::RemoveNetwork { id: 77 }),
            crate::api::store::CommandResponse::Refused(_)
        ));
        // Nor may two tasks share an address: with the range full, a plan
        // whose address was taken meanwhile is refused.
        let mut dup = s.tasks.values().find(|t| t.node.is_some()).unwrap().clone();
        dup.id = 5;
        assert!(matches!(
            s.apply(&Command::ApplyPlan {
                create: vec![dup],
                shutdown: vec![],
                updates: vec![],
                rollbacks: vec![],
                orphaned: vec![],
                at: 2,
            }),
            crate::api::store::CommandResponse::Refused(_)
        ));
    }

    #[test]
    fn an_address_taken_since_the_plan_is_replaced_by_a_free_one() {
        let mut s = cluster(3);
        let spec = crate::api::network::NetworkSpec {
            name: "app".into(),
            subnet: Some(crate::api::subnet::Subnet::parse("10.9.0.0/24").unwrap()),
            ..Default::default()
        };
        let pools = allocator::network::Pools {
            pools: vec![crate::api::subnet::Subnet::parse("10.0.0.0/8").unwrap()],
            mask_len: 24,
        };
        let net = allocator::network::allocate_network(&spec, &[], &pools, 77, 0).unwrap();
        s.apply(&Command::CreateNetwork(Box::new(net)));
        let mut svc = service(1, ServiceMode::Replicated { replicas: 2 });
        svc.spec.networks = vec!["app".into()];
        s.services.insert(1, svc);
        run(&mut s, 0);
        // A plan made before a task took 10.9.0.2 (say, before a service's
        // virtual IP was allocated there) still names it.
        let mut late = s.tasks.values().next().unwrap().clone();
        late.id = 99;
        let taken = late.attachments[0].address;
        assert_eq!(
            s.apply(&Command::ApplyPlan {
                create: vec![late],
                shutdown: vec![],
                updates: vec![],
                rollbacks: vec![],
                orphaned: vec![],
                at: 1,
            }),
            crate::api::store::CommandResponse::Applied
        );
        let got = s.tasks[&99].attachments[0].address;
        assert_ne!(got, taken);
        let mut all: Vec<_> = s.tasks.values().map(|t| t.attachments[0].address).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3, "three tasks, three addresses");
    }

    fn end(state: &mut ClusterState, id: u64, how: TaskState, at_ms: u64) {
        let node = state.tasks[&id].node.unwrap();
        for step in [TaskState::Running, how] {
            let report = crate::api::service::TaskReport {
                task: id,
                state: step,
                message: "exit status 1".into(),
            };
            state.apply(&Command::ReportTasks {
                node,
                reports: vec![report],
                at_ms,
            });
        }
    }

    #[test]
    fn restart_policy_waits_its_delay_counts_attempts_and_gives_up() {
        let mut s = cluster(2);
        let mut svc = service(1, ServiceMode::Replicated { replicas: 1 });
        svc.spec.restart = crate::api::service::RestartPolicy {
            condition: crate::api::service::RestartCondition::OnFailure,
            delay_ms: 3000,
            max_attempts: 2,
        };
        s.services.insert(1, svc);
        run(&mut s, 10);
        for attempt in 1..=2u32 {
            let first = *s.tasks.values().find(|t| live(t)).map(|t| &t.id).unwrap();
            let ended = 20_000 * u64::from(attempt);
            end(&mut s, first, TaskState::Failed, ended);
            assert!(!run(&mut s, ended / 1000 + 2), "the delay has not passed");
            assert!(run(&mut s, ended / 1000 + 3));
            let next = s.tasks.values().find(|t| live(t)).unwrap();
            assert_eq!(next.restarts, attempt);
            assert_eq!(
                s.tasks[&first].desired,
                DesiredState::Shutdown,
                "the failed task is retired"
            );
            assert_eq!(s.tasks[&first].message, "exit status 1", "and keeps its error");
        }
        let last = *s.tasks.values().find(|t| live(t)).map(|t| &t.id).unwrap();
        end(&mut s, last, TaskState::Failed, 100_000);
        assert!(!run(&mut s, 200), "max attempts reached: the slot stays empty");
        assert_eq!(s.tasks.values().filter(|t| live(t)).count(), 0);
    }

    #[test]
    fn on_failure_leaves_completed_tasks_alone_and_any_restarts_them() {
        use crate::api::service::RestartCondition;
        let mut s = cluster(1);
        let mut svc = service(1, ServiceMode::Global);
        svc.spec.restart.condition = RestartCondition::OnFailure;
        svc.spec.restart.delay_ms = 0;
        s.services.insert(1, svc);
        run(&mut s, 1);
        let id = *s.tasks.keys().next().unwrap();
        end(&mut s, id, TaskState::Complete, 2000);
        assert!(!run(&mut s, 3), "a task that completed is not restarted on-failure");
        s.services.get_mut(&1).unwrap().spec.restart.condition = RestartCondition::Any;
        assert!(run(&mut s, 4));
        assert_eq!(s.tasks.values().filter(|t| live(t)).count(), 1);
    }

    #[test]
    fn global_services_cover_every_node() {
        let mut s = cluster(2);
        s.services.insert(1, service(1, ServiceMode::Global));
        run(&mut s, 0);
        assert_eq!(running_per_node(&s), [(1, 1), (2, 1)].into());
        s.nodes.insert(
            3,
            crate::api::objects::Node {
                status: NodeStatus::Ready,
                ..node(3, Role::Worker)
            },
        );
        run(&mut s, 1);
        assert_eq!(running_per_node(&s), [(1, 1), (2, 1), (3, 1)].into());
    }
}
