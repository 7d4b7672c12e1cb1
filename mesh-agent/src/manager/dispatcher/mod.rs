//! The leader's dispatcher: node liveness from heartbeats, and what each
//! node is told to run.
//!
//! Heartbeats are not written to Raft (that would make every heartbeat a
//! replicated write); the leader keeps the time it last heard from each node
//! in memory and proposes only *changes* of status. A new leader starts by
//! giving every node a full grace period, so a leader change alone never
//! marks nodes Down.

pub(crate) mod discovery;
pub(crate) mod mesh;
pub(crate) mod propagation;

use crate::api::secret::{task_files, BlobRef, Kind};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::api::{encoded::Encoded, messages::PartRef};

use crate::api::{
    messages::Assignments,
    service::{Assignment, Task, TaskSpec},
};

use crate::manager::allocator::{ipsec::ipsec_assignment, tunnel::tunnel_assignment};

use crate::api::{
    network::{NetworkPeers, Peer, TaskNetwork},
    objects::{node_id_text, NodeId, NodeStatus},
    store::ClusterState,
};

/// When the leader last heard from each node.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    last_seen: HashMap<NodeId, Instant>,
}

impl Liveness {
    /// A node heartbeated at `now`.
    pub(crate) fn seen(&mut self, id: NodeId, now: Instant) {
        self.last_seen.insert(id, now);
    }

    /// Starts over: every node counts as seen at `now` (on gaining leadership).
    pub(crate) fn reset(&mut self, ids: impl IntoIterator<Item = NodeId>, now: Instant) {
        self.last_seen = ids.into_iter().map(|id| (id, now)).collect();
    }

    /// Whether `id` was heard from within `timeout` of `now`.
    pub(crate) fn is_alive(&self, id: NodeId, now: Instant, timeout: Duration) -> bool {
        self.last_seen
            .get(&id)
            .is_some_and(|seen| now.saturating_duration_since(*seen) <= timeout)
    }

    /// Nodes recorded as Ready (or Unknown) that have been silent for longer
    /// than `timeout`: they should be marked Down.
    pub(crate) fn overdue(&self, state: &ClusterState, now: Instant, timeout: Duration) -> Vec<NodeId> {
        state
            .nodes
            .values()
            .filter(|n| n.status != NodeStatus::Down)
            .filter(|n| !self.is_alive(n.id, now, timeout))
            .map(|n| n.id)
            .collect()
    }

    /// Forgets a removed node.
    pub(crate) fn forget(&mut self, id: NodeId) {
        self.last_seen.remove(&id);
    }
}

/// How often a node's heartbeats may rewrite its own facts in the store
/// (WireGuard key, agent version): they change on an upgrade or a new key,
/// not on every beat, and each change is a Raft write.
pub(crate) const NODE_FACTS_EVERY: Duration = Duration::from_secs(10);

/// When each node's facts were last written from its heartbeats.
#[derive(Debug, Default)]
pub(crate) struct FactWrites {
    last: HashMap<NodeId, Instant>,
}

impl FactWrites {
    /// Whether `id`'s facts may be written at `now` (and if so, counts it).
    pub(crate) fn allow(&mut self, id: NodeId, now: Instant) -> bool {
        match self.last.get(&id) {
            Some(at) if now.saturating_duration_since(*at) < NODE_FACTS_EVERY => false,
            _ => {
                self.last.insert(id, now);
                true
            }
        }
    }

    /// Forgets a removed node.
    pub(crate) fn forget(&mut self, id: NodeId) {
        self.last.remove(&id);
    }
}

/// How long a node may stay silent before it is Down.
pub(crate) fn down_after(state: &ClusterState) -> Duration {
    let (period, misses) = state
        .cluster
        .as_ref()
        .map(|c| (c.heartbeat_period_ms, c.heartbeat_misses_down))
        .unwrap_or((1000, 3));
    Duration::from_millis(period.saturating_mul(u64::from(misses.max(1))))
}

/// What every node's assignments draw on, made in one pass per state and
/// shared by all the nodes' long polls: without it each node's answer
/// walked every task of the swarm, so one change cost nodes x tasks.
#[derive(Debug, Default)]
pub(crate) struct DispatchIndex {
    /// Each node's tasks (ended ones included), in task ID order.
    tasks_by_node: HashMap<NodeId, Vec<u64>>,
    /// Each network's endpoints: its unended tasks that have a node.
    endpoints: BTreeMap<u64, Shared<Vec<Peer>>>,
    /// The nodes with an unended task on each network (sorted).
    network_nodes: BTreeMap<u64, Vec<NodeId>>,
    /// Each network's services (DNS and VIPs).
    services: BTreeMap<u64, Shared<Vec<crate::api::assignment::discovery::ServiceRecord>>>,
    /// What every node's routing mesh draws on (`None`: no port is
    /// published).
    mesh: Option<Shared<crate::api::assignment::mesh::MeshFleet>>,
}

impl DispatchIndex {
    /// The index of `state`.
    pub(crate) fn new(state: &ClusterState) -> DispatchIndex {
        let mut tasks_by_node: HashMap<NodeId, Vec<u64>> = HashMap::new();
        let mut endpoints: BTreeMap<u64, BTreeSet<Peer>> = BTreeMap::new();
        let mut network_nodes: BTreeMap<u64, BTreeSet<NodeId>> = BTreeMap::new();
        for t in state.tasks.values() {
            let Some(node) = t.node else { continue };
            tasks_by_node.entry(node).or_default().push(t.id);
            if t.state.is_terminal() {
                continue;
            }
            let Some(host) = state.nodes.get(&node) else { continue };
            for a in &t.attachments {
                network_nodes.entry(a.network).or_default().insert(node);
                endpoints.entry(a.network).or_default().insert(Peer {
                    address: a.address,
                    vtep: host.data_path_addr.clone(),
                });
            }
        }
        let networks: BTreeSet<u64> = state.networks.keys().copied().collect();
        DispatchIndex {
            tasks_by_node,
            endpoints: endpoints
                .into_iter()
                .map(|(id, peers)| (id, Shared::new(peers.into_iter().collect())))
                .collect(),
            network_nodes: network_nodes
                .into_iter()
                .map(|(id, nodes)| (id, nodes.into_iter().collect()))
                .collect(),
            services: crate::manager::dispatcher::discovery::by_network(state, &networks)
                .into_iter()
                .map(|(id, services)| (id, Shared::new(services)))
                .collect(),
            mesh: mesh::fleet_of(state).map(Shared::new),
        }
    }
}

impl DispatchIndex {
    /// The nodes with an unended task on `network`.
    pub(crate) fn nodes_on(&self, network: u64) -> &[NodeId] {
        self.network_nodes.get(&network).map_or(&[], Vec::as_slice)
    }
}

/// A part of the assignments that many nodes receive alike (a network's
/// endpoints or services, the routing mesh): made, encoded and hashed once
/// per view, and shared by the nodes' answers instead of copied and encoded
/// into each, which at thousands of nodes was most of the dispatcher's work.
#[derive(Debug)]
struct Shared<T> {
    value: Encoded<T>,
    digest: [u8; 32],
}

impl<T: serde::Serialize> Shared<T> {
    fn new(value: T) -> Shared<T> {
        let value = Encoded::new(value);
        let digest = Sha256::digest(value.bytes()).into();
        Shared { value, digest }
    }
}

impl<T: serde::Serialize + Default> Default for Shared<T> {
    fn default() -> Self {
        Shared::new(T::default())
    }
}

/// How long the dispatcher gathers applied changes before it answers the
/// long polls again: a burst of writes costs one index and one answer per
/// node, not one per write (swarmkit's dispatcher batches the same way). A
/// change after a quiet spell is answered at once.
pub(crate) const ASSIGNMENTS_BATCH: Duration = Duration::from_millis(100);

/// A state and its dispatch index, as every long poll of one batch sees it.
#[derive(Debug)]
pub(crate) struct DispatchView {
    /// The state (a persistent map underneath, so holding it is cheap for
    /// the applies that follow).
    pub(crate) state: Arc<ClusterState>,
    /// Its index.
    pub(crate) index: DispatchIndex,
    /// The last applied log index when the state was read (the state may
    /// hold a little more).
    pub(crate) applied: u64,
    /// Its number among the views this manager made (they are made in
    /// order, each of a state holding at least the previous one's).
    pub(crate) seq: u64,
    /// When it was made.
    pub(crate) made: Instant,
}

impl DispatchView {
    /// View number `seq`, of `state`, applied up to at least `applied`.
    pub(crate) fn new(state: Arc<ClusterState>, applied: u64, seq: u64, now: Instant) -> DispatchView {
        DispatchView {
            index: DispatchIndex::new(&state),
            state,
            applied,
            seq,
            made: now,
        }
    }

    /// When the next view may be made: one batch after this one.
    pub(crate) fn next_at(&self) -> Instant {
        self.made + ASSIGNMENTS_BATCH
    }

    /// Whether a long poll asking at `now`, with `applied` entries applied,
    /// should have a new view made rather than use this one: only when
    /// this one is behind and its batch is over.
    pub(crate) fn is_due_for_renewal(&self, applied: u64, now: Instant) -> bool {
        self.applied < applied && now >= self.next_at()
    }
}

/// What node `node` is told about its tasks: every task placed on it that
/// has not ended, with the spec to run, and the ended ones still listed.
#[cfg(test)]
pub(crate) fn assignments(state: &ClusterState, node: NodeId) -> Assignments {
    assignments_with(state, &DispatchIndex::new(state), node, &mut |_| 0)
}

/// [`assignments`] from an index already made for `state`: the cost is
/// the node's own tasks, its networks and the routing mesh, not the swarm.
/// `pending` tells, for a task about to start, how many nodes on its
/// networks have yet to learn its endpoint (`dispatcher::propagation`).
pub(crate) fn assignments_with(
    state: &ClusterState,
    index: &DispatchIndex,
    node: NodeId,
    pending: &mut dyn FnMut(&Task) -> u32,
) -> Assignments {
    let mut tasks = Vec::new();
    let mut retained = Vec::new();
    let mine = index.tasks_by_node.get(&node).map_or(&[][..], Vec::as_slice);
    for task in mine.iter().filter_map(|id| state.tasks.get(id)) {
        if task.state.is_terminal() {
            retained.push(task.id);
            continue;
        }
        let spec = state
            .services
            .get(&task.service)
            .map(|s| TaskSpec {
                name: if task.slot == 0 {
                    format!("{}.{}", s.spec.name, node_id_text(node))
                } else {
                    format!("{}.{}", s.spec.name, task.slot)
                },
                command: s.spec.command.clone(),
                env: s.spec.env.clone(),
                workdir: s.spec.workdir.clone(),
                user: s.spec.user.clone(),
                security: s.spec.security.clone(),
                resources: s.spec.resources,
                mounts: s.spec.mounts.clone(),
                health: s.spec.health.clone(),
                stop_grace_ms: s.spec.stop_grace_ms,
                networks: task
                    .attachments
                    .iter()
                    .filter_map(|a| {
                        let n = state.networks.get(&a.network)?;
                        Some(TaskNetwork {
                            network: n.id,
                            name: n.name.clone(),
                            vni: n.vni,
                            subnet: n.subnet,
                            gateway: n.gateway,
                            address: a.address,
                            mtu: n.mtu,
                            encryption: n.encryption,
                        })
                    })
                    .collect(),
                files: if task.desired == crate::api::service::DesiredState::Running {
                    let refs: Vec<(Kind, &BlobRef)> = [Kind::Secret, Kind::Config]
                        .into_iter()
                        .flat_map(|k| s.spec.refs(k).iter().map(move |r| (k, r)))
                        .collect();
                    task_files(&refs, &|k, name| state.blob_data(k, name))
                } else {
                    Vec::new()
                },
            })
            .unwrap_or_default();
        tasks.push(Assignment {
            task: task.id,
            service: task.service,
            desired: task.desired,
            state: task.state,
            spec,
            endpoints_pending: pending(task),
        });
    }
    let networks = network_peers(state, index, &tasks);
    let vtep = state
        .nodes
        .get(&node)
        .map(|n| n.data_path_addr.clone())
        .unwrap_or_default();
    let data_path_port = state
        .cluster
        .as_ref()
        .map_or(crate::api::objects::DEFAULT_DATA_PATH_PORT, |c| c.data_path_port);
    let tunnel = tunnel_assignment(state, node, &tasks, &networks);
    let ipsec = ipsec_assignment(state, node, &tasks, &networks, data_path_port);
    let mesh = index.mesh.as_ref().map(|fleet| crate::api::assignment::mesh::NodeMesh {
        fleet: fleet.value.clone(),
        node,
    });
    let no_services = Shared::<Vec<_>>::default();
    let services: Vec<_> = networks
        .iter()
        .map(|n| (n.network, index.services.get(&n.network).unwrap_or(&no_services)))
        .collect();
    // The digest covers the shared parts by their own digests, so a node's
    // costs what is its own, not every endpoint of its networks again.
    let no_peers = Shared::<Vec<Peer>>::default();
    let network_parts: Vec<(u64, u32, &[u8; 32])> = networks
        .iter()
        .map(|n| {
            let peers = index.endpoints.get(&n.network).unwrap_or(&no_peers);
            (n.network, n.vni, &peers.digest)
        })
        .collect();
    let service_parts: Vec<(u64, &[u8; 32])> = services.iter().map(|(id, s)| (*id, &s.digest)).collect();
    // The digest changes when a task stops waiting for its peers, not with
    // each node that catches up: that would answer the node again each time.
    let pending: Vec<u32> = tasks.iter().map(|t| t.endpoints_pending).collect();
    for t in &mut tasks {
        t.endpoints_pending = t.endpoints_pending.min(1);
    }
    let encoded = rmp_serde::to_vec(&(
        &tasks,
        &retained,
        &network_parts,
        &vtep,
        data_path_port,
        &tunnel,
        &ipsec,
        index.mesh.as_ref().map(|fleet| &fleet.digest),
        &service_parts,
    ))
    .unwrap_or_default();
    let digest = hex::encode(&Sha256::digest(&encoded)[..12]);
    for (t, n) in tasks.iter_mut().zip(pending) {
        t.endpoints_pending = n;
    }
    // In the order `parts::slots` walks them.
    let parts = network_parts
        .iter()
        .map(|(_, _, digest)| *digest)
        .chain(service_parts.iter().map(|(_, digest)| *digest))
        .chain(index.mesh.as_ref().map(|fleet| &fleet.digest))
        .map(|digest| PartRef {
            digest: *digest,
            held: false,
        })
        .collect();
    let services = services
        .into_iter()
        .map(|(network, s)| crate::api::assignment::discovery::NetworkServices {
            network,
            services: s.value.clone(),
        })
        .collect();
    Assignments {
        digest,
        tasks,
        parts,
        retained,
        networks,
        vtep,
        data_path_port,
        tunnel,
        ipsec,
        mesh,
        services,
    }
}

/// The endpoints of the networks `tasks` are on: every unended task there
/// with a node, and that node's data-path address.
fn network_peers(state: &ClusterState, index: &DispatchIndex, tasks: &[Assignment]) -> Vec<NetworkPeers> {
    let wanted: BTreeSet<u64> = tasks
        .iter()
        .flat_map(|t| t.spec.networks.iter().map(|n| n.network))
        .collect();
    wanted
        .into_iter()
        .filter_map(|id| {
            Some(NetworkPeers {
                network: id,
                vni: state.networks.get(&id)?.vni,
                peers: index.endpoints.get(&id).map(|p| p.value.clone()).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parts;
    use crate::{
        api::objects::{Node, Role},
        manager::state::tests::node,
    };

    fn with_nodes(statuses: &[(NodeId, NodeStatus)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, status) in statuses {
            s.nodes.insert(
                *id,
                Node {
                    status: *status,
                    ..node(*id, Role::Worker)
                },
            );
        }
        s
    }

    #[test]
    fn a_view_is_renewed_only_when_behind_and_its_batch_is_over() {
        let t0 = Instant::now();
        let view = DispatchView::new(Arc::new(ClusterState::default()), 10, 1, t0);
        // Up to date: kept however old it is.
        assert!(!view.is_due_for_renewal(10, t0 + Duration::from_secs(60)));
        // Behind, within its batch: kept, the change waits for the batch end.
        assert!(!view.is_due_for_renewal(11, t0 + ASSIGNMENTS_BATCH / 2));
        // Behind, batch over: renewed.
        assert!(view.is_due_for_renewal(11, t0 + ASSIGNMENTS_BATCH));
        assert_eq!(view.next_at(), t0 + ASSIGNMENTS_BATCH);
    }

    #[test]
    fn silent_nodes_become_overdue_once() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        let s = with_nodes(&[(1, NodeStatus::Ready), (2, NodeStatus::Ready), (3, NodeStatus::Down)]);
        let mut l = Liveness::default();
        l.reset([1, 2, 3], t0);
        assert!(l.overdue(&s, t0 + Duration::from_secs(2), timeout).is_empty());
        l.seen(1, t0 + Duration::from_secs(2));
        // Node 2 went quiet; node 3 is already Down and is not proposed again.
        assert_eq!(l.overdue(&s, t0 + Duration::from_secs(4), timeout), vec![2]);
        assert!(l.is_alive(1, t0 + Duration::from_secs(4), timeout));
        // A node never heard from by this leader is overdue once the grace is over.
        let s2 = with_nodes(&[(9, NodeStatus::Unknown)]);
        assert_eq!(l.overdue(&s2, t0, timeout), vec![9]);
    }

    #[test]
    fn assignments_list_live_tasks_and_change_digest_with_them() {
        use crate::{
            api::service::{DesiredState, TaskState},
            manager::{orchestrator::tests_support, state::tests::initialised},
        };
        let mut s = initialised();
        s.services
            .insert(7, crate::manager::orchestrator::tests_support::service(7));
        let task = |id: u64, node: NodeId, state: TaskState| tests_support::task(id, 7, 1, Some(node), state);
        s.tasks.insert(1, task(1, 5, TaskState::Assigned));
        s.tasks.insert(2, task(2, 5, TaskState::Failed));
        s.tasks.insert(3, task(3, 6, TaskState::Assigned));
        let a = assignments(&s, 5);
        assert_eq!(a.tasks.iter().map(|t| t.task).collect::<Vec<_>>(), vec![1]);
        assert_eq!(a.tasks[0].spec.name, "s7.1");
        assert_eq!(a.tasks[0].spec.command, vec!["sleep", "1000"]);
        assert_eq!(a.retained, vec![2]);
        assert_eq!(assignments(&s, 5).digest, a.digest, "stable");
        s.tasks.get_mut(&3).unwrap().state = TaskState::Running;
        assert_eq!(assignments(&s, 5).digest, a.digest, "other nodes' tasks do not matter");
        s.tasks.get_mut(&1).unwrap().desired = DesiredState::Shutdown;
        assert_ne!(assignments(&s, 5).digest, a.digest);
    }

    #[test]
    fn the_digest_changes_when_a_task_stops_waiting_for_its_peers_not_as_they_catch_up() {
        use crate::{
            api::service::TaskState,
            manager::{orchestrator::tests_support, state::tests::initialised},
        };
        let mut s = initialised();
        s.services.insert(7, tests_support::service(7));
        s.tasks
            .insert(1, tests_support::task(1, 7, 1, Some(5), TaskState::Assigned));
        let index = DispatchIndex::new(&s);
        let with = |n: u32| assignments_with(&s, &index, 5, &mut |_| n);
        let (three, two, none) = (with(3), with(2), with(0));
        assert_eq!(
            (three.tasks[0].endpoints_pending, two.tasks[0].endpoints_pending),
            (3, 2),
            "the answer carries the count"
        );
        assert_eq!(three.digest, two.digest, "a node catching up answers nobody");
        assert_ne!(two.digest, none.digest, "the task may start: its node hears at once");
    }

    #[test]
    fn every_node_gets_one_shared_mesh_fleet_and_draws_its_own_ports_from_it() {
        use crate::{
            api::{
                objects::Role,
                service::{PortPublish, TaskState},
            },
            manager::{
                orchestrator::tests_support,
                state::tests::{initialised, node},
            },
        };
        let mut s = initialised();
        for id in [5, 6] {
            let mut n = node(id, Role::Worker);
            n.data_path_addr = format!("10.0.0.{id}");
            s.nodes.insert(id, n);
        }
        let mut web = tests_support::service(7);
        web.spec.publish = vec![PortPublish::parse("8080:80").unwrap()];
        s.services.insert(7, web);
        s.tasks
            .insert(1, tests_support::task(1, 7, 1, Some(5), TaskState::Running));
        let index = DispatchIndex::new(&s);
        let (on5, on6) = (
            assignments_with(&s, &index, 5, &mut |_| 0),
            assignments_with(&s, &index, 6, &mut |_| 0),
        );
        let (m5, m6) = (on5.mesh.clone().unwrap(), on6.mesh.clone().unwrap());
        assert_eq!(
            m5.fleet.bytes().as_ptr(),
            m6.fleet.bytes().as_ptr(),
            "one encoding, shared"
        );
        let (a5, a6) = (m5.assignment().unwrap(), m6.assignment().unwrap());
        assert!(a5.services[0].backends[0].local, "node 5 runs the task");
        assert!(!a6.services[0].backends[0].local);
        assert!(a6.peers.contains(&"10.0.0.5".to_string()) && !a6.peers.contains(&"10.0.0.6".to_string()));
        let wire: Assignments = rmp_serde::from_slice(&rmp_serde::to_vec_named(&on6).unwrap()).unwrap();
        assert_eq!(wire.mesh.unwrap().assignment(), Some(a6), "the same after the wire");
        // A backend coming or going is news to every node.
        s.tasks
            .insert(2, tests_support::task(2, 7, 2, Some(6), TaskState::Running));
        let index = DispatchIndex::new(&s);
        assert_ne!(assignments_with(&s, &index, 5, &mut |_| 0).digest, on5.digest);
        let next6 = assignments_with(&s, &index, 6, &mut |_| 0);
        assert_ne!(next6.digest, on6.digest);
        // The fleet is the node's one shared part here: sent again when it
        // changed, held back while the node has it.
        assert_eq!(next6.parts.len(), 1);
        assert_eq!(next6.parts[0].digest, parts::digests_of(&next6)[0]);
        let mut sent = next6.clone();
        parts::hold_back(&mut sent, &parts::holds(&on6));
        assert_eq!(sent, next6, "changed: sent whole");
        parts::hold_back(&mut sent, &parts::holds(&next6));
        assert!(sent.parts[0].held && sent.mesh.as_ref().unwrap().fleet.services.is_empty());
        parts::restore(&mut sent, Some(next6.clone())).unwrap();
        assert_eq!(sent, next6);
    }

    #[test]
    fn a_secret_goes_only_to_the_node_running_a_task_that_uses_it_while_it_runs() {
        use crate::{
            api::{
                secret::{parse_ref, Blob, Kind},
                service::{DesiredState, TaskState},
            },
            manager::{orchestrator::tests_support, state::tests::initialised},
        };
        let mut s = initialised();
        let mut service = tests_support::service(7);
        service.spec.secrets = vec![parse_ref(Kind::Secret, "pw").unwrap()];
        s.services.insert(7, service);
        s.secrets.insert(
            1,
            Blob {
                id: 1,
                name: "pw".into(),
                labels: Default::default(),
                data: b"hunter2".to_vec(),
                created: 0,
                updated: 0,
            },
        );
        s.tasks
            .insert(1, tests_support::task(1, 7, 1, Some(5), TaskState::Running));
        let files = |s: &ClusterState, node| -> Vec<Vec<u8>> {
            assignments(s, node)
                .tasks
                .iter()
                .flat_map(|t| t.spec.files.iter().map(|f| f.data.clone()))
                .collect()
        };
        assert_eq!(files(&s, 5), vec![b"hunter2".to_vec()]);
        assert!(files(&s, 6).is_empty(), "another node never gets it");
        s.tasks.get_mut(&1).unwrap().desired = DesiredState::Shutdown;
        assert!(files(&s, 5).is_empty(), "nor does a task that is to stop");
    }

    #[test]
    fn nodes_learn_the_peers_of_their_networks_only() {
        use crate::{
            api::{
                network::{NetworkAttachment, NetworkSpec},
                objects::Role,
                service::{Task, TaskState},
            },
            manager::{
                allocator::network::{allocate_network, Pools},
                orchestrator::tests_support,
                state::tests::{initialised, node},
            },
        };
        let mut s = initialised();
        for id in [5, 6, 7] {
            s.nodes.insert(id, node(id, Role::Worker));
        }
        let pools = Pools {
            pools: vec![crate::api::subnet::Subnet::parse("10.0.0.0/8").unwrap()],
            mask_len: 24,
        };
        let app = allocate_network(
            &NetworkSpec {
                name: "app".into(),
                ..Default::default()
            },
            &[],
            &pools,
            1,
            0,
        )
        .unwrap();
        let db = allocate_network(
            &NetworkSpec {
                name: "db".into(),
                ..Default::default()
            },
            &[&app],
            &pools,
            2,
            0,
        )
        .unwrap();
        s.networks.insert(1, app);
        s.networks.insert(2, db);
        s.services
            .insert(7, crate::manager::orchestrator::tests_support::service(7));
        let task = |id: u64, node: NodeId, network: u64, last: u8| Task {
            attachments: vec![NetworkAttachment {
                network,
                address: std::net::Ipv4Addr::new(10, 0, network as u8 - 1, last),
            }],
            ..tests_support::task(id, 7, id as u32, Some(node), TaskState::Running)
        };
        s.tasks.insert(1, task(1, 5, 1, 2));
        s.tasks.insert(2, task(2, 6, 1, 3));
        s.tasks.insert(3, task(3, 7, 2, 2));
        let a = assignments(&s, 5);
        assert_eq!(a.tasks[0].spec.networks[0].name, "app");
        assert_eq!(a.tasks[0].spec.networks[0].address.to_string(), "10.0.0.2");
        assert_eq!(a.networks.len(), 1, "node 5 is not on db");
        let peers: Vec<(String, String)> = a.networks[0]
            .peers
            .iter()
            .map(|p| (p.address.to_string(), p.vtep.clone()))
            .collect();
        assert_eq!(
            peers,
            vec![
                ("10.0.0.2".into(), "192.0.2.5".into()),
                ("10.0.0.3".into(), "192.0.2.6".into())
            ]
        );
        // A peer that ends elsewhere changes node 5's digest: it must
        // remove that endpoint.
        s.tasks.get_mut(&2).unwrap().state = TaskState::Failed;
        let b = assignments(&s, 5);
        assert_ne!(b.digest, a.digest);
        assert_eq!(b.networks[0].peers.len(), 1);
        // The parts list names each shared part by its encoding's digest;
        // a node holding `a` gets the changed endpoints again, not the
        // unchanged services (no service here publishes: no fleet).
        assert_eq!(
            a.parts.iter().map(|p| p.digest).collect::<Vec<_>>(),
            parts::digests_of(&a)
        );
        assert_eq!(
            b.parts.iter().map(|p| p.digest).collect::<Vec<_>>(),
            parts::digests_of(&b)
        );
        let mut sent = b.clone();
        parts::hold_back(&mut sent, &parts::holds(&a));
        assert_eq!(sent.parts.iter().map(|p| p.held).collect::<Vec<_>>(), vec![false, true]);
        parts::restore(&mut sent, Some(a.clone())).unwrap();
        assert_eq!(sent, b);
    }

    #[test]
    fn a_nodes_facts_are_written_at_most_once_per_period() {
        let mut writes = FactWrites::default();
        let t0 = Instant::now();
        assert!(writes.allow(5, t0));
        assert!(!writes.allow(5, t0 + Duration::from_secs(1)), "flipping on every beat");
        assert!(writes.allow(6, t0), "another node has its own period");
        assert!(writes.allow(5, t0 + NODE_FACTS_EVERY));
        writes.forget(5);
        assert!(writes.allow(5, t0 + NODE_FACTS_EVERY + Duration::from_secs(1)));
    }
}
