//! How far a new task's endpoint has spread: which nodes on its networks
//! have applied an answer that lists it. A task's process starts only once
//! they all have (within a bounded wait on the node), so the task it
//! connects to at start can answer it: a node that does not know the
//! endpoint yet has no FDB entry or neighbour for it and drops the reply.
//!
//! The leader learns what a node has applied from its long poll: the
//! agent names the digest of its last answer (`known`) only once that
//! answer's networks and routing mesh are in its kernel, and clears it when
//! applying failed. Each answer comes from one dispatch view, numbered in
//! the order the leader made them; a task's endpoint is in every view from
//! the first that listed it while the task lives. So a node knows the
//! endpoint once it has applied an answer from that view or a later one.
//! All of this is the leader's memory, not the store's: a new leader starts
//! knowing nothing and learns it from the nodes' next polls.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::manager::dispatcher::DispatchIndex;

use crate::api::{
    objects::{NodeId, NodeStatus},
    store::ClusterState,
};

use crate::api::service::{DesiredState, Task, TaskState};

/// How long a network's tally of its nodes' progress is reused: waiting
/// nodes ask again every few tens of milliseconds, and a tally costs one
/// look-up per node on the network.
const TALLY_REUSE: Duration = Duration::from_millis(20);

/// The leader's record of what each node has applied (see the module's
/// comment). Pure: time comes in as an argument.
#[derive(Debug, Default)]
pub(crate) struct Propagation {
    /// The last answer sent to each node: its digest and the view it came from.
    sent: HashMap<NodeId, (String, u64)>,
    /// The view of the last answer each node has applied.
    applied: HashMap<NodeId, u64>,
    /// Each task that should run and does not yet: the first view that
    /// listed its endpoints.
    since: HashMap<u64, u64>,
    /// Per network, the views its nodes have applied (sorted; Down nodes
    /// left out), the view it was tallied in, and when.
    tallies: HashMap<u64, (u64, Instant, Vec<u64>)>,
}

/// Whether `task` is one whose start may wait for its peers: it should
/// run, has a node and addresses, and has not started yet.
fn is_starting(task: &Task) -> bool {
    task.desired == DesiredState::Running
        && task.node.is_some()
        && !task.attachments.is_empty()
        && matches!(
            task.state,
            TaskState::New | TaskState::Pending | TaskState::Assigned | TaskState::Preparing | TaskState::Starting
        )
}

impl Propagation {
    /// The answer `digest`, from view `view`, went to `node`.
    pub(crate) fn answered(&mut self, node: NodeId, digest: &str, view: u64) {
        self.sent.insert(node, (digest.to_string(), view));
    }

    /// `node` polled naming `known`, the digest of the answer it applied
    /// ("" when it has none, or applying failed).
    pub(crate) fn polled(&mut self, node: NodeId, known: &str) {
        match self.sent.get(&node) {
            Some((digest, view)) if !known.is_empty() && digest == known => {
                self.applied.insert(node, *view);
            }
            // Nothing applied that this leader sent: it knows nothing of
            // the node until it answers it again.
            _ => {
                self.applied.remove(&node);
            }
        }
    }

    /// Whether an answer of this leader reached `node` (if not, its next
    /// poll is answered at once, so its progress is known).
    pub(crate) fn has_answered(&self, node: NodeId) -> bool {
        self.sent.contains_key(&node)
    }

    /// A removed node.
    pub(crate) fn forget(&mut self, node: NodeId) {
        self.sent.remove(&node);
        self.applied.remove(&node);
    }

    /// View `view` of `state` was made: tasks that start from now on are
    /// listed from it; tasks that started or ended are forgotten.
    pub(crate) fn view_made(&mut self, state: &ClusterState, view: u64) {
        self.since.retain(|id, _| state.tasks.get(id).is_some_and(is_starting));
        for task in state.tasks.values().filter(|t| is_starting(t)) {
            self.since.entry(task.id).or_insert(view);
        }
    }

    /// How many nodes on `task`'s networks (the most on any one of them),
    /// its own left out, have not applied an answer that lists its endpoint, as of view
    /// `view` made of `state` with `index`. 0 for a task not starting.
    pub(crate) fn pending(
        &mut self,
        task: &Task,
        state: &ClusterState,
        index: &DispatchIndex,
        view: u64,
        now: Instant,
    ) -> u32 {
        if !is_starting(task) {
            return 0;
        }
        // A task the views have not listed yet is listed by the next one.
        let since = self.since.get(&task.id).copied().unwrap_or(view.saturating_add(1));
        // The task's own node is not waited for: its agent applies an
        // answer's networks and VIPs before it starts the answer's tasks.
        let own = task.node.filter(|id| {
            state.nodes.get(id).is_some_and(|n| n.status != NodeStatus::Down)
                && self.applied.get(id).copied().unwrap_or(0) < since
        });
        let mut most = 0;
        for a in &task.attachments {
            let tally = self.tally(a.network, state, index, view, now);
            let mut behind = tally.partition_point(|applied| *applied < since);
            if own.is_some_and(|id| index.nodes_on(a.network).binary_search(&id).is_ok()) {
                behind -= 1;
            }
            most = most.max(behind as u32);
        }
        most
    }

    /// The views the nodes on `network` have applied, sorted.
    fn tally(&mut self, network: u64, state: &ClusterState, index: &DispatchIndex, view: u64, now: Instant) -> &[u64] {
        let fresh = self
            .tallies
            .get(&network)
            .is_some_and(|(at_view, at, _)| *at_view == view && now.saturating_duration_since(*at) < TALLY_REUSE);
        if !fresh {
            let mut views: Vec<u64> = index
                .nodes_on(network)
                .iter()
                .filter(|id| state.nodes.get(*id).is_some_and(|n| n.status != NodeStatus::Down))
                .map(|id| self.applied.get(id).copied().unwrap_or(0))
                .collect();
            views.sort_unstable();
            self.tallies.insert(network, (view, now, views));
        }
        &self.tallies[&network].2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{network::NetworkAttachment, objects::Role},
        manager::{
            orchestrator::tests_support,
            state::tests::{initialised, node},
        },
    };
    use std::net::Ipv4Addr;

    /// Nodes 5, 6 and 7; service 9 with a running task on 6 and 7 and a
    /// new one (10) on 5, all on network 1.
    fn swarm() -> ClusterState {
        let mut s = initialised();
        for id in [5, 6, 7] {
            let mut n = node(id, Role::Worker);
            n.status = NodeStatus::Ready;
            n.data_path_addr = format!("192.0.2.{id}");
            s.nodes.insert(id, n);
        }
        s.services.insert(9, tests_support::service(9));
        for (id, on, state) in [
            (1, 6, TaskState::Running),
            (2, 7, TaskState::Running),
            (10, 5, TaskState::Assigned),
        ] {
            let mut t = tests_support::task(id, 9, id as u32, Some(on), state);
            t.attachments = vec![NetworkAttachment {
                network: 1,
                address: Ipv4Addr::new(10, 0, 0, id as u8 + 2),
            }];
            s.tasks.insert(id, t);
        }
        s
    }

    /// Every node `nodes` polls naming the answer from `view` it was sent.
    fn applied(p: &mut Propagation, nodes: &[NodeId], view: u64) {
        for &n in nodes {
            p.answered(n, &format!("d{n}@{view}"), view);
            p.polled(n, &format!("d{n}@{view}"));
        }
    }

    #[test]
    fn a_new_task_waits_until_every_node_on_its_network_applied_a_view_listing_it() {
        let s = swarm();
        let index = DispatchIndex::new(&s);
        let now = Instant::now();
        let mut p = Propagation::default();
        applied(&mut p, &[5, 6, 7], 1);
        p.view_made(&s, 2);
        let task = &s.tasks[&10];
        assert_eq!(
            p.pending(task, &s, &index, 2, now),
            2,
            "nobody has view 2 yet (the task's own node is not waited for)"
        );
        applied(&mut p, &[6], 2);
        let later = now + TALLY_REUSE;
        assert_eq!(p.pending(task, &s, &index, 2, later), 1, "node 7 has not");
        applied(&mut p, &[7], 3);
        p.view_made(&s, 3);
        assert_eq!(p.pending(task, &s, &index, 3, later), 0, "a later view lists it too");
        assert_eq!(
            p.pending(&s.tasks[&1], &s, &index, 3, later),
            0,
            "a running task waits for nobody"
        );
    }

    #[test]
    fn an_answer_sent_but_not_applied_or_from_before_the_task_does_not_count() {
        let mut s = swarm();
        let now = Instant::now();
        let mut p = Propagation::default();
        applied(&mut p, &[5, 6, 7], 1);
        p.view_made(&s, 2);
        // Node 6 was sent view 2 but names nothing: applying it failed.
        p.answered(6, "d6@2", 2);
        p.polled(6, "");
        // Node 7 names an older answer than the one it was sent.
        p.answered(7, "d7@2", 2);
        p.polled(7, "d7@1");
        let index = DispatchIndex::new(&s);
        assert_eq!(p.pending(&s.tasks[&10], &s, &index, 2, now), 2);
        // A Down node is not waited for.
        s.nodes.get_mut(&7).unwrap().status = NodeStatus::Down;
        let index = DispatchIndex::new(&s);
        assert_eq!(p.pending(&s.tasks[&10], &s, &index, 3, now), 1);
        // Nor a removed one.
        p.forget(6);
        s.nodes.remove(&6);
        s.tasks.remove(&1);
        let index = DispatchIndex::new(&s);
        assert_eq!(p.pending(&s.tasks[&10], &s, &index, 4, now), 0);
    }

    #[test]
    fn tasks_are_listed_from_the_first_view_that_had_them_until_they_start() {
        let mut s = swarm();
        let mut p = Propagation::default();
        p.view_made(&s, 4);
        p.view_made(&s, 5);
        assert_eq!(p.since.get(&10), Some(&4), "the first view is kept");
        assert_eq!(p.since.len(), 1, "running tasks are not listed");
        s.tasks.get_mut(&10).unwrap().state = TaskState::Running;
        p.view_made(&s, 6);
        assert!(p.since.is_empty(), "a started task is forgotten");
        // One the views never listed counts from the next view.
        let mut fresh = s.tasks[&10].clone();
        fresh.id = 11;
        fresh.state = TaskState::Assigned;
        let index = DispatchIndex::new(&s);
        applied(&mut p, &[5, 6, 7], 6);
        assert_eq!(p.pending(&fresh, &s, &index, 6, Instant::now()), 2);
    }
}
