//! Where service tasks run: placement and reconciliation as pure functions
//! over plain data (the orchestrator feeds it from the Raft state).
//!
//! Placement spreads a service's tasks over eligible nodes the way Swarm
//! does: first evenly over the values of each `--placement-pref
//! spread=node.labels.K`, then onto the node with the fewest tasks of this
//! service, then the fewest tasks overall; ties go to the lowest node ID so
//! the same inputs always give the same plan.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::objects::{node_id_text, Availability, NodeId, NodeStatus, Role};
use crate::api::resources::NodeResources;

use crate::api::service::{Constraint, ConstraintKey};

/// Whether a scheduler node satisfies a placement constraint.
pub(crate) trait Matches {
    /// Whether `node` satisfies it (a missing label never equals anything).
    fn matches(&self, node: &SchedNode) -> bool;
}

impl Matches for Constraint {
    fn matches(&self, node: &SchedNode) -> bool {
        let actual = match &self.key {
            ConstraintKey::NodeId => Some(node_id_text(node.id)),
            ConstraintKey::Hostname => Some(node.hostname.clone()),
            ConstraintKey::Role => Some(match node.role {
                Role::Manager => "manager".to_string(),
                Role::Worker => "worker".to_string(),
            }),
            ConstraintKey::Label(k) => node.labels.get(k).cloned(),
        };
        (actual.as_deref() == Some(self.value.as_str())) == self.equal
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchedNode {
    /// Its ID.
    pub(crate) id: NodeId,
    /// Its hostname.
    pub(crate) hostname: String,
    /// Its role.
    pub(crate) role: Role,
    /// Liveness.
    pub(crate) status: NodeStatus,
    /// Whether it takes tasks.
    pub(crate) availability: Availability,
    /// Labels.
    pub(crate) labels: BTreeMap<String, String>,
    /// Its CPUs and memory not kept for the tasks it already has.
    pub(crate) free: NodeResources,
}

/// Placement rules of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Placement {
    /// All must hold.
    pub(crate) constraints: Vec<Constraint>,
    /// Label keys to spread over, in order.
    pub(crate) spread_over: Vec<String>,
    /// At most this many of the service's tasks per node (0: no limit).
    pub(crate) max_per_node: u32,
    /// What each task keeps on its node (`--reserve-*`).
    pub(crate) reservation: NodeResources,
}

impl Placement {
    /// Whether new tasks may go to `node`: up, active, and within the
    /// constraints (room for their reservation is [`Placement::fits`]).
    pub(crate) fn admits(&self, node: &SchedNode) -> bool {
        node.status == NodeStatus::Ready
            && node.availability == Availability::Active
            && self.constraints.iter().all(|c| c.matches(node))
    }

    /// What the nodes with `frees` lack for one more task, counted per
    /// resource ("insufficient memory on 3 nodes"); `None` if none lacks any.
    pub(crate) fn shortage(&self, frees: impl Iterator<Item = NodeResources>) -> Option<String> {
        let mut short: BTreeMap<&str, usize> = BTreeMap::new();
        for what in frees.filter_map(|free| self.lacks(free)) {
            *short.entry(what).or_default() += 1;
        }
        let parts: Vec<String> = short
            .iter()
            .map(|(what, n)| format!("insufficient {what} on {n} node{}", if *n == 1 { "" } else { "s" }))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// What a node with `free` lacks for one more task: "memory", "CPU", or
    /// nothing.
    pub(crate) fn lacks(&self, free: NodeResources) -> Option<&'static str> {
        if self.reservation.memory_bytes > free.memory_bytes {
            Some("memory")
        } else if self.reservation.nano_cpus > free.nano_cpus {
            Some("CPU")
        } else {
            None
        }
    }

    /// Whether a task already on `node` may stay there: anything but a
    /// drained node or one that no longer meets the constraints (a paused
    /// node keeps its tasks; a Down node is handled by the grace period).
    pub(crate) fn keeps(&self, node: &SchedNode) -> bool {
        node.availability != Availability::Drain && self.constraints.iter().all(|c| c.matches(node))
    }
}

/// Why tasks could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unplaced {
    /// How many tasks are left without a node.
    pub(crate) count: usize,
    /// Why, for `service ps`' ERROR column.
    pub(crate) reason: String,
}

/// Chooses nodes for `n` new tasks of a service.
///
/// `service_counts` and `total_counts` hold the tasks each node already
/// runs (of this service / of all services). Returns the chosen nodes in
/// order, and what could not be placed.
pub(crate) fn place(
    placement: &Placement,
    nodes: &[SchedNode],
    service_counts: &BTreeMap<NodeId, u32>,
    total_counts: &BTreeMap<NodeId, u32>,
    n: usize,
) -> (Vec<NodeId>, Option<Unplaced>) {
    if n == 0 {
        // A converged service, the common case: no walk over the nodes.
        return (Vec::new(), None);
    }
    let eligible: Vec<&SchedNode> = nodes.iter().filter(|node| placement.admits(node)).collect();
    let mut free: BTreeMap<NodeId, NodeResources> = eligible.iter().map(|n| (n.id, n.free)).collect();
    let mut mine = service_counts.clone();
    let mut total = total_counts.clone();
    let mut chosen = Vec::with_capacity(n);
    for placed in 0..n {
        // Tasks of this service per spread-group value, for each preference.
        let group_counts: Vec<BTreeMap<Option<&String>, u32>> = placement
            .spread_over
            .iter()
            .map(|key| {
                let mut counts: BTreeMap<Option<&String>, u32> = BTreeMap::new();
                for node in &eligible {
                    *counts.entry(node.labels.get(key)).or_default() += mine.get(&node.id).copied().unwrap_or(0);
                }
                counts
            })
            .collect();
        let best = eligible
            .iter()
            .filter(|node| {
                placement.max_per_node == 0 || mine.get(&node.id).copied().unwrap_or(0) < placement.max_per_node
            })
            .filter(|node| placement.lacks(free[&node.id]).is_none())
            .min_by_key(|node| {
                let groups: Vec<u32> = placement
                    .spread_over
                    .iter()
                    .zip(&group_counts)
                    .map(|(key, counts)| counts.get(&node.labels.get(key)).copied().unwrap_or(0))
                    .collect();
                (
                    groups,
                    mine.get(&node.id).copied().unwrap_or(0),
                    total.get(&node.id).copied().unwrap_or(0),
                    node.id,
                )
            });
        let Some(node) = best else {
            let reason = if eligible.is_empty() {
                "no suitable node (no node is ready, active and meets the constraints)".to_string()
            } else if let Some(short) = placement.shortage(eligible.iter().map(|n| free[&n.id])) {
                format!("no suitable node ({short})")
            } else {
                format!(
                    "no suitable node (max replicas per node {} reached on every eligible node)",
                    placement.max_per_node
                )
            };
            return (
                chosen,
                Some(Unplaced {
                    count: n - placed,
                    reason,
                }),
            );
        };
        *mine.entry(node.id).or_default() += 1;
        *total.entry(node.id).or_default() += 1;
        if let Some(f) = free.get_mut(&node.id) {
            *f = f.less(placement.reservation);
        }
        chosen.push(node.id);
    }
    (chosen, None)
}

/// One running (or starting) task of a service, as reconciliation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchedTask {
    /// Task ID.
    pub(crate) id: u64,
    /// Replica slot (replicated services) or 0 (global).
    pub(crate) slot: u32,
    /// Where it runs.
    pub(crate) node: NodeId,
}

/// What to do to bring a service to its desired count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// New tasks: (slot, node). For global services the slot is 0.
    pub(crate) create: Vec<(u32, NodeId)>,
    /// Tasks to shut down, with why.
    pub(crate) shutdown: Vec<(u64, String)>,
    /// Tasks that could not be placed.
    pub(crate) unplaced: Option<Unplaced>,
}

/// How long a Down node's tasks are left alone before they are replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grace {
    /// Nodes Down longer than this lose their tasks.
    pub(crate) down_for_longer_than: u64,
}

/// Nodes by ID. The orchestrator's nodes come in ID order, so a binary
/// search finds them; a map, built per service, cost nodes x services on
/// every pass (5 million inserts at 1,000 services on 5,000 nodes).
enum NodeIndex<'a> {
    Sorted(&'a [SchedNode]),
    Map(BTreeMap<NodeId, &'a SchedNode>),
}

impl<'a> NodeIndex<'a> {
    fn new(nodes: &'a [SchedNode]) -> NodeIndex<'a> {
        if nodes.windows(2).all(|w| w[0].id < w[1].id) {
            NodeIndex::Sorted(nodes)
        } else {
            NodeIndex::Map(nodes.iter().map(|n| (n.id, n)).collect())
        }
    }

    fn get(&self, id: NodeId) -> Option<&'a SchedNode> {
        match self {
            NodeIndex::Sorted(nodes) => nodes.binary_search_by_key(&id, |n| n.id).ok().map(|i| &nodes[i]),
            NodeIndex::Map(map) => map.get(&id).copied(),
        }
    }
}

fn node_is_lost(node: Option<&SchedNode>, down_since: &BTreeMap<NodeId, u64>, now: u64, grace: Grace) -> bool {
    match node {
        None => true,
        Some(n) if n.status == NodeStatus::Down => down_since
            .get(&n.id)
            .is_none_or(|since| now.saturating_sub(*since) > grace.down_for_longer_than),
        Some(_) => false,
    }
}

/// Reconciles a replicated service of `replicas` slots.
///
/// `tasks` are the service's tasks whose desired state is running;
/// `down_since` holds when each Down node went down (unix seconds).
#[allow(clippy::too_many_arguments, reason = "plain inputs of one pure decision")]
///
/// `resting` slots are left empty on purpose (the restart policy waits or
/// gave up), so they are neither filled nor counted missing.
pub(crate) fn reconcile_replicated(
    replicas: u32,
    placement: &Placement,
    tasks: &[SchedTask],
    resting: &BTreeSet<u32>,
    nodes: &[SchedNode],
    total_counts: &BTreeMap<NodeId, u32>,
    down_since: &BTreeMap<NodeId, u64>,
    now: u64,
    grace: Grace,
) -> Plan {
    let by_id = NodeIndex::new(nodes);
    let mut plan = Plan::default();
    let mut kept: BTreeMap<u32, &SchedTask> = BTreeMap::new();
    let mut sorted: Vec<&SchedTask> = tasks.iter().collect();
    sorted.sort_by_key(|t| (t.slot, t.id));
    for task in sorted {
        let node = by_id.get(task.node);
        let reason = if task.slot == 0 || task.slot > replicas {
            Some("scaled down".to_string())
        } else if kept.contains_key(&task.slot) {
            Some("duplicate of its slot".to_string())
        } else if node_is_lost(node, down_since, now, grace) {
            Some("its node is down".to_string())
        } else if !node.is_some_and(|n| placement.keeps(n)) {
            Some("its node is drained or no longer meets the constraints".to_string())
        } else {
            None
        };
        match reason {
            Some(r) => plan.shutdown.push((task.id, r)),
            None => {
                kept.insert(task.slot, task);
            }
        }
    }
    let mut service_counts: BTreeMap<NodeId, u32> = BTreeMap::new();
    for task in kept.values() {
        *service_counts.entry(task.node).or_default() += 1;
    }
    let missing: Vec<u32> = (1..=replicas)
        .filter(|slot| !kept.contains_key(slot) && !resting.contains(slot))
        .collect();
    let (chosen, unplaced) = place(placement, nodes, &service_counts, total_counts, missing.len());
    plan.create = missing.into_iter().zip(chosen).collect();
    plan.unplaced = unplaced;
    plan
}

/// Reconciles a global service: one task on every eligible node.
///
/// `resting` nodes get no new task now (the restart policy waits or gave up).
pub(crate) fn reconcile_global(
    placement: &Placement,
    tasks: &[SchedTask],
    resting: &BTreeSet<NodeId>,
    nodes: &[SchedNode],
    down_since: &BTreeMap<NodeId, u64>,
    now: u64,
    grace: Grace,
) -> Plan {
    let by_id = NodeIndex::new(nodes);
    let mut plan = Plan::default();
    let mut covered: BTreeSet<NodeId> = BTreeSet::new();
    for task in tasks {
        let node = by_id.get(task.node);
        if covered.contains(&task.node) {
            plan.shutdown.push((task.id, "duplicate on its node".into()));
        } else if node_is_lost(node, down_since, now, grace) {
            plan.shutdown.push((task.id, "its node is down".into()));
        } else if !node.is_some_and(|n| placement.keeps(n)) {
            plan.shutdown
                .push((task.id, "its node is drained or no longer meets the constraints".into()));
        } else {
            covered.insert(task.node);
        }
    }
    let wanted = nodes
        .iter()
        .filter(|n| placement.admits(n) && !covered.contains(&n.id) && !resting.contains(&n.id));
    let (fit, short): (Vec<&SchedNode>, Vec<&SchedNode>) = wanted.partition(|n| placement.lacks(n.free).is_none());
    plan.create = fit.iter().map(|n| (0, n.id)).collect();
    if let Some(reason) = placement.shortage(short.iter().map(|n| n.free)) {
        plan.unplaced = Some(Unplaced {
            count: short.len(),
            reason: format!("no suitable node ({reason})"),
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, labels: &[(&str, &str)]) -> SchedNode {
        SchedNode {
            id,
            hostname: format!("h{id}"),
            role: Role::Worker,
            status: NodeStatus::Ready,
            free: NodeResources {
                nano_cpus: 4_000_000_000,
                memory_bytes: 8 << 30,
            },
            availability: Availability::Active,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn nodes_are_found_by_id_in_any_order() {
        let sorted: Vec<SchedNode> = [2, 5, 9].iter().map(|id| node(*id, &[])).collect();
        let shuffled: Vec<SchedNode> = [9, 2, 5].iter().map(|id| node(*id, &[])).collect();
        for nodes in [&sorted, &shuffled] {
            let index = NodeIndex::new(nodes);
            for id in [2, 5, 9] {
                assert_eq!(index.get(id).map(|n| n.id), Some(id));
            }
            assert!(index.get(3).is_none() && index.get(10).is_none());
        }
        assert!(matches!(NodeIndex::new(&sorted), NodeIndex::Sorted(_)));
        assert!(matches!(NodeIndex::new(&shuffled), NodeIndex::Map(_)));
    }

    fn counts(plan: &[NodeId]) -> BTreeMap<NodeId, u32> {
        let mut c = BTreeMap::new();
        for n in plan {
            *c.entry(*n).or_default() += 1;
        }
        c
    }

    #[test]
    fn constraints_parse_and_match() {
        let n = SchedNode {
            role: Role::Manager,
            ..node(1, &[("zone", "a")])
        };
        assert!(Constraint::parse("node.labels.zone==a").unwrap().matches(&n));
        assert!(!Constraint::parse("node.labels.zone!=a").unwrap().matches(&n));
        assert!(
            Constraint::parse("node.labels.disk!=ssd").unwrap().matches(&n),
            "a missing label is never equal"
        );
        assert!(Constraint::parse("node.role==manager").unwrap().matches(&n));
        assert!(Constraint::parse("node.hostname==h1").unwrap().matches(&n));
        assert!(Constraint::parse(&format!("node.id=={}", node_id_text(1)))
            .unwrap()
            .matches(&n));
        assert!(Constraint::parse("node.labels.zone=a")
            .unwrap_err()
            .contains("KEY==VALUE"));
        assert!(Constraint::parse("engine.labels.x==1")
            .unwrap_err()
            .contains("invalid constraint key"));
        assert!(Constraint::parse("node.role==boss").is_err());
        assert!(Constraint::parse("node.labels.==x").is_err());
        assert!(Constraint::parse("node.hostname==").is_err());
    }

    #[test]
    fn six_replicas_spread_two_per_node() {
        let nodes = [node(1, &[]), node(2, &[]), node(3, &[])];
        let (chosen, unplaced) = place(&Placement::default(), &nodes, &BTreeMap::new(), &BTreeMap::new(), 6);
        assert_eq!(unplaced, None);
        assert_eq!(counts(&chosen), [(1, 2), (2, 2), (3, 2)].into());
    }

    #[test]
    fn fewest_of_this_service_first_then_fewest_overall() {
        let nodes = [node(1, &[]), node(2, &[]), node(3, &[])];
        let mine = [(1, 1)].into();
        let total = [(2, 5), (3, 1)].into();
        let (chosen, _) = place(&Placement::default(), &nodes, &mine, &total, 2);
        assert_eq!(chosen, vec![3, 2]);
    }

    #[test]
    fn availability_status_constraints_and_max_per_node() {
        let mut nodes = vec![
            node(1, &[("zone", "a")]),
            node(2, &[("zone", "b")]),
            node(3, &[("zone", "a")]),
            node(4, &[("zone", "a")]),
        ];
        nodes[2].availability = Availability::Pause;
        nodes[3].status = NodeStatus::Down;
        let placement = Placement {
            constraints: vec![Constraint::parse("node.labels.zone==a").unwrap()],
            spread_over: vec![],
            max_per_node: 2,
            reservation: NodeResources::default(),
        };
        let (chosen, unplaced) = place(&placement, &nodes, &BTreeMap::new(), &BTreeMap::new(), 3);
        assert_eq!(chosen, vec![1, 1]);
        let unplaced = unplaced.unwrap();
        assert_eq!(unplaced.count, 1);
        assert!(
            unplaced.reason.contains("max replicas per node 2"),
            "{}",
            unplaced.reason
        );
        let none = Placement {
            constraints: vec![Constraint::parse("node.labels.zone==c").unwrap()],
            ..Placement::default()
        };
        assert!(place(&none, &nodes, &BTreeMap::new(), &BTreeMap::new(), 1)
            .1
            .unwrap()
            .reason
            .contains("no suitable node"));
    }

    #[test]
    fn a_reservation_goes_only_where_it_fits_and_says_why_not() {
        let mut nodes = [node(1, &[]), node(2, &[]), node(3, &[])];
        // 8 GiB and 4 CPUs each; node 3 has only 1 GiB left.
        nodes[2].free.memory_bytes = 1 << 30;
        let placement = Placement {
            reservation: NodeResources {
                nano_cpus: 1_000_000_000,
                memory_bytes: 3 << 30,
            },
            ..Placement::default()
        };
        // Two 3 GiB tasks fit on each of nodes 1 and 2, none on 3.
        let (chosen, unplaced) = place(&placement, &nodes, &BTreeMap::new(), &BTreeMap::new(), 5);
        let mut sorted = chosen.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 1, 2, 2]);
        let unplaced = unplaced.expect("the fifth does not fit");
        assert_eq!(unplaced.count, 1);
        assert_eq!(
            unplaced.reason, "no suitable node (insufficient memory on 3 nodes)",
            "every node is short once four are placed"
        );
        // Freed capacity places it.
        nodes[2].free.memory_bytes = 8 << 30;
        let (chosen, unplaced) = place(&placement, &nodes, &BTreeMap::new(), &BTreeMap::new(), 5);
        assert_eq!((chosen.len(), unplaced), (5, None));
    }

    #[test]
    fn placement_preferences_spread_over_label_values_first() {
        // Zone a has three nodes, zone b one: spreading over zones puts half the tasks on b's node.
        let nodes = [
            node(1, &[("zone", "a")]),
            node(2, &[("zone", "a")]),
            node(3, &[("zone", "a")]),
            node(4, &[("zone", "b")]),
        ];
        let placement = Placement {
            spread_over: vec!["zone".into()],
            ..Placement::default()
        };
        let (chosen, _) = place(&placement, &nodes, &BTreeMap::new(), &BTreeMap::new(), 4);
        assert_eq!(counts(&chosen).get(&4), Some(&2));
    }

    #[test]
    fn replicated_reconciliation_scales_drains_and_replaces_lost_tasks() {
        let grace = Grace {
            down_for_longer_than: 10,
        };
        let mut nodes = vec![node(1, &[]), node(2, &[]), node(3, &[])];
        let tasks: Vec<SchedTask> = (1..=6)
            .map(|slot| SchedTask {
                id: 100 + u64::from(slot),
                slot,
                node: u64::from((slot - 1) % 3 + 1),
            })
            .collect();
        // Converged: nothing to do.
        let plan = reconcile_replicated(
            6,
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
            grace,
        );
        assert_eq!(plan, Plan::default());
        // Scale to 1: slots 2..6 go.
        let plan = reconcile_replicated(
            1,
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
            grace,
        );
        assert_eq!(plan.shutdown.len(), 5);
        assert!(plan.create.is_empty());
        // Drain node 3: its two tasks move to nodes 1 and 2.
        nodes[2].availability = Availability::Drain;
        let plan = reconcile_replicated(
            6,
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
            grace,
        );
        assert_eq!(plan.shutdown.iter().map(|s| s.0).collect::<Vec<_>>(), vec![103, 106]);
        assert_eq!(plan.create.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);
        assert!(plan.create.iter().all(|c| c.1 != 3));
        // A Down node keeps its tasks during the grace period, loses them after.
        nodes[2].availability = Availability::Active;
        nodes[2].status = NodeStatus::Down;
        let down = [(3, 100)].into();
        let plan = reconcile_replicated(
            6,
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            &down,
            105,
            grace,
        );
        assert!(plan.shutdown.is_empty() && plan.create.is_empty());
        let plan = reconcile_replicated(
            6,
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            &down,
            111,
            grace,
        );
        assert_eq!(plan.shutdown.len(), 2);
        assert_eq!(plan.create.len(), 2);
    }

    #[test]
    fn global_services_follow_the_eligible_nodes() {
        let grace = Grace {
            down_for_longer_than: 10,
        };
        let mut nodes = vec![node(1, &[]), node(2, &[])];
        let tasks = vec![SchedTask {
            id: 1,
            slot: 0,
            node: 1,
        }];
        let plan = reconcile_global(
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            0,
            grace,
        );
        assert_eq!(plan.create, vec![(0, 2)]);
        // A node joins later: it gets one too; a paused node keeps its task but gets no new one.
        nodes.push(node(3, &[]));
        nodes[0].availability = Availability::Pause;
        let plan = reconcile_global(
            &Placement::default(),
            &tasks,
            &BTreeSet::new(),
            &nodes,
            &BTreeMap::new(),
            0,
            grace,
        );
        assert_eq!(plan.create, vec![(0, 2), (0, 3)]);
        assert!(plan.shutdown.is_empty());
    }
}
