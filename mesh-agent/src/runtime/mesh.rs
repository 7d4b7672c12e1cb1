//! The node's routing mesh: its published ports answered by the eBPF
//! programs (mesh-ebpf's `lb` module) and its tasks' VIPs by the socket
//! programs (`sock`), with the maps kept in step with the assignments and
//! with the local tasks' addresses.
//!
//! Kernel objects:
//! - while the node answers a published port: `tc_ingress` on the underlay
//!   link (the one holding the data-path address), `tc_reply` on the task
//!   bridge, `tc_tunnel` on [`TUNNEL_DEVICE`], a metadata-mode VXLAN device
//!   on the routing-mesh port ([`crate::control::mesh::tunnel_port`]) for nodes off the link,
//!   and `tc_from_task` on the host end of each local task's veth, whose
//!   index is in the task-links map: requests go straight into a task's
//!   namespace and its replies skip the bridge;
//! - while its tasks' networks have VIPs: the socket programs on the
//!   tasks' cgroup;
//! - once it answers a published port: the `host_*` socket programs on the
//!   cgroup2 root (the tasks' cgroup's parent), so the node's own
//!   connections to its published ports (its address or 127.0.0.1) reach
//!   a task too; they act on this node's network namespace only;
//! - the maps and TC links pinned on the agent's bpffs, so they outlive
//!   the agent and the next one takes them over ([`MeshTables::adopting`]).

use crate::locks::Locked;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use mesh_common::lb::{
    Algorithm, Backend, NodeConfig, ServiceKey, ServiceValue, LOCAL_TABLE, MAX_SERVICES, NODE_ON_LINK, NODE_TUNNEL,
    PINNED_MAPS, TABLE_SIZE,
};

use super::{
    mesh_ipvs::IpvsMesh,
    network::{Attachment, LocalNetwork, BRIDGE},
    supervisor::task_dir_name,
};
use crate::metrics::{BackendFacts, PortFacts};
use crate::{
    control::{
        api::Assignments,
        discovery::{NetworkServices, ServiceRecord},
        mesh::{MeshAssignment, MeshService},
        service::{LbAlgorithm, LbOptions, Protocol},
        state::node_id_text,
    },
    dataplane::{
        ebpf::{preferred_tc_api, EbpfDataplane, TcApi},
        lb::{plan, Change, LbMaps, LbState},
        maglev,
        netlink::{Netlink, NetlinkError},
    },
};

/// The routing-mesh tunnel device.
pub const TUNNEL_DEVICE: &str = "mesh-lb";

/// How often the IPVS backend looks whether a draining real server can go.
const DRAIN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How packets reach other nodes (`mesh-agent run --mesh-routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MeshRouting {
    /// As they are, to the node's MAC address, when it is on the same
    /// link; through the tunnel otherwise.
    #[default]
    Auto,
    /// Always through the tunnel (an underlay that drops frames whose
    /// addresses are not the sender's, or to compare).
    Tunnel,
}

/// What serves published ports (`mesh-agent run --lb-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbBackend {
    /// The eBPF programs (TC on the underlay link).
    #[default]
    Ebpf,
    /// IPVS virtual services selected by firewall mark, as Swarm does
    /// (runtime/mesh_ipvs.rs); tasks on other nodes see the entry node's
    /// address instead of the client's.
    Ipvs,
}

/// Stable small IDs: service ports get the lowest free one (they index
/// the per-CPU stats array), backends a fresh one each (so a connection
/// tracked to a backend that left never lands on another task).
#[derive(Debug, Default)]
struct Ids {
    services: BTreeMap<PortKey, u32>,
    free_services: BTreeSet<u32>,
    next_service: u32,
    backends: BTreeMap<BackendKey, u32>,
    next_backend: u32,
    /// IDs an earlier agent's maps use: never handed out.
    reserved: BTreeSet<u32>,
}

/// A service port: (service, published port, protocol, 0), or a VIP:
/// (service, 0, 0, network).
pub type PortKey = (u64, u16, u8, u64);
/// A task behind a published port (task, 0) or behind a VIP on a network
/// (task, network): each has its own address, so its own backend entry.
pub type BackendKey = (u64, u64);

/// One published port's (or VIP's) counters on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortCounters {
    /// (service, published port, protocol, 0), or (service, 0, 0, network) for a VIP.
    pub port: PortKey,
    pub stats: mesh_common::lb::ServiceStats,
    /// Connections tracked now.
    pub conntrack: u64,
}

/// One task's counters on its node (traffic the routing mesh brought it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCounters {
    pub service: u64,
    /// (task, 0) behind a published port, (task, network) behind a VIP.
    pub task: BackendKey,
    pub stats: mesh_common::lb::ServiceStats,
}

impl Ids {
    fn service(&mut self, key: PortKey) -> Option<u32> {
        if let Some(id) = self.services.get(&key) {
            return Some(*id);
        }
        let id = loop {
            let id = match self.free_services.pop_first() {
                Some(id) => id,
                None if self.next_service + 1 < MAX_SERVICES => {
                    self.next_service += 1;
                    self.next_service
                }
                None => return None,
            };
            if !self.reserved.contains(&id) {
                break id;
            }
        };
        self.services.insert(key, id);
        Some(id)
    }

    fn backend(&mut self, task: BackendKey) -> u32 {
        let next = &mut self.next_backend;
        *self.backends.entry(task).or_insert_with(|| {
            *next = next.wrapping_add(1).max(1);
            *next
        })
    }

    fn release(&mut self, keys: impl Iterator<Item = PortKey>, tasks: impl Iterator<Item = BackendKey>) {
        for k in keys {
            if let Some(id) = self.services.remove(&k) {
                self.free_services.insert(id);
            }
        }
        for t in tasks {
            self.backends.remove(&t);
        }
    }
}

fn wire_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn algorithm(a: LbAlgorithm) -> Algorithm {
    match a {
        LbAlgorithm::Maglev => Algorithm::Maglev,
        LbAlgorithm::Random => Algorithm::Random,
        LbAlgorithm::RoundRobin => Algorithm::RoundRobin,
    }
}

/// A service's local tasks and their addresses here (`None`: not attached
/// here yet, or any more).
type LocalAddresses = Vec<(u64, Option<Ipv4Addr>)>;

/// What one service contributes to the maps, and what it was made from.
#[derive(Debug)]
struct ServiceEntry {
    /// The service's digest as assigned, and the local addresses of its
    /// local tasks.
    input: (u64, LocalAddresses),
    state: LbState,
    keys: BTreeSet<PortKey>,
    tasks: BTreeSet<BackendKey>,
}

/// The routing mesh's maps as last planned, per service, so one changed
/// service costs the same at 10 services as at 10,000: only services
/// whose tasks, ports or options changed are rebuilt and rewritten.
#[derive(Debug, Default)]
pub struct MeshTables {
    ids: Ids,
    services: BTreeMap<u64, ServiceEntry>,
    nodes: BTreeMap<u32, u32>,
    /// Service VIPs by (service, network).
    vips: BTreeMap<(u64, u64), ServiceEntry>,
    /// Local task addresses -> their veth's host-end index.
    task_links: BTreeMap<u32, u32>,
    /// The last update's services in its order, (ID, digest), and the
    /// local addresses it was made with: while neither the IDs nor the
    /// local tasks move, the changed services are found in one pass over
    /// plain pairs (a backend change at 10,000 services costs about what
    /// it costs at 10).
    last: Vec<(u64, u64)>,
    last_local: BTreeMap<u64, Ipv4Addr>,
    /// What an earlier agent's maps held, until the first update replaced it.
    leftover: Option<LbState>,
}

impl MeshTables {
    /// The map writes that take the kernel from the last update to `mesh`
    /// with these local task addresses (a task the cluster calls running
    /// but that has no address here yet, or any more, is left out).
    /// `on_link` says which nodes are reached as they are (by MAC address)
    /// rather than through the tunnel.
    pub fn update(
        &mut self,
        mesh: &MeshAssignment,
        local: &BTreeMap<u64, Ipv4Addr>,
        on_link: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Vec<Change> {
        let nodes: BTreeMap<u32, u32> = mesh
            .peers
            .iter()
            .filter_map(|n| n.parse::<Ipv4Addr>().ok())
            .map(|a| (wire_addr(a), if on_link(a) { NODE_ON_LINK } else { NODE_TUNNEL }))
            .collect();
        let mut changes = plan_nodes(&self.nodes, &nodes, true);
        let locals_of = |service: &MeshService| -> LocalAddresses {
            service
                .backends
                .iter()
                .filter(|b| b.local)
                .map(|b| (b.task, local.get(&b.task).copied()))
                .collect()
        };
        let digest_of = |service: &MeshService| {
            if service.digest == 0 {
                service.content_digest()
            } else {
                service.digest
            }
        };
        let sorted;
        let (services, changed, gone) = match self.changed_in_place(mesh, local) {
            Some(changed) => (&mesh.services, changed, Vec::new()),
            None => {
                // The managers list services by ID; walk them beside ours, so
                // an unchanged service costs one digest comparison and no lookup.
                let services = if mesh.services.is_sorted_by_key(|s| s.service) {
                    &mesh.services
                } else {
                    sorted = {
                        let mut v = mesh.services.clone();
                        v.sort_by_key(|s| s.service);
                        v
                    };
                    &sorted
                };
                let (changed, gone) = self.walk(services, &digest_of, &locals_of);
                self.last = mesh.services.iter().map(|s| (s.service, digest_of(s))).collect();
                self.last_local = local.clone();
                (services, changed, gone)
            }
        };
        for i in changed {
            let service = &services[i];
            let input = (digest_of(service), locals_of(service));
            let built = service_state(service, local, on_link, &mut self.ids);
            changes.extend(replace_entry(
                &mut self.services,
                &mut self.ids,
                service.service,
                input,
                built,
            ));
        }
        for id in gone {
            changes.extend(remove_entry(&mut self.services, &mut self.ids, &id));
        }
        changes.extend(plan_nodes(&self.nodes, &nodes, false));
        self.nodes = nodes;
        changes
    }

    /// The positions in `services` (sorted by ID) of the services that
    /// changed since their entry was built, and the IDs of the entries
    /// whose service is gone.
    fn walk(
        &self,
        services: &[MeshService],
        digest_of: &dyn Fn(&MeshService) -> u64,
        locals_of: &dyn Fn(&MeshService) -> LocalAddresses,
    ) -> (Vec<usize>, Vec<u64>) {
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        let mut ours = self.services.iter().peekable();
        for (i, service) in services.iter().enumerate() {
            while let Some((id, _)) = ours.next_if(|(id, _)| **id < service.service) {
                gone.push(*id);
            }
            let same = match ours.next_if(|(id, _)| **id == service.service) {
                Some((_, entry)) => {
                    entry.input.0 == digest_of(service)
                        && if service.runs_here {
                            entry.input.1 == locals_of(service)
                        } else {
                            entry.input.1.is_empty()
                        }
                }
                None => false,
            };
            if !same {
                changed.push(i);
            }
        }
        gone.extend(ours.map(|(id, _)| *id));
        (changed, gone)
    }

    /// The positions of the services whose digest changed since the last
    /// update, with `last` brought up to date, when the services are the
    /// same IDs in the same order and the local tasks' addresses are the
    /// same; `None` otherwise (the whole walk decides then).
    fn changed_in_place(&mut self, mesh: &MeshAssignment, local: &BTreeMap<u64, Ipv4Addr>) -> Option<Vec<usize>> {
        if mesh.services.len() != self.last.len() || self.last.is_empty() || *local != self.last_local {
            return None;
        }
        let mut changed = Vec::new();
        for (i, (service, last)) in mesh.services.iter().zip(&self.last).enumerate() {
            // A manager always sets the digest; one without is compared whole.
            if service.service != last.0 || service.digest == 0 {
                return None;
            }
            if service.digest != last.1 {
                changed.push(i);
            }
        }
        for &i in &changed {
            self.last[i].1 = mesh.services[i].digest;
        }
        Some(changed)
    }
}

impl MeshTables {
    /// Tables that take over maps an earlier agent filled (`found`): new
    /// IDs avoid the ones in use there, so nothing is overwritten but the
    /// service entries, each switched to its new table in one update, and
    /// [`MeshTables::leftovers`] then removes what is left of the old.
    pub fn adopting(found: LbState) -> MeshTables {
        let mut tables = MeshTables::default();
        for v in found.services.values().chain(found.vips.values()) {
            tables.ids.reserved.insert(v.id);
        }
        for id in found.tables.keys() {
            tables.ids.reserved.insert(id & !LOCAL_TABLE);
        }
        tables.ids.next_backend = found.backends.keys().max().copied().unwrap_or(0);
        tables.leftover = Some(found);
        tables
    }

    /// The removals of what an adopted earlier state held and the current
    /// one does not (after the first update; nothing later).
    pub fn leftovers(&mut self) -> Vec<Change> {
        let Some(found) = self.leftover.take() else {
            return Vec::new();
        };
        let mut current = LbState {
            nodes: self.nodes.clone(),
            task_links: self.task_links.clone(),
            ..LbState::default()
        };
        for entry in self.services.values().chain(self.vips.values()) {
            current
                .services
                .extend(entry.state.services.iter().map(|(k, v)| (*k, *v)));
            current.vips.extend(entry.state.vips.iter().map(|(k, v)| (*k, *v)));
            current
                .tables
                .extend(entry.state.tables.keys().map(|k| (*k, (0, Vec::new()))));
            current
                .backends
                .extend(entry.state.backends.iter().map(|(k, v)| (*k, *v)));
        }
        plan(&found, &current)
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Change::RemoveService(_)
                        | Change::RemoveVip(_)
                        | Change::RemoveTable(_)
                        | Change::RemoveBackend(_)
                        | Change::RemoveNode(_)
                        | Change::RemoveTaskLink(_)
                )
            })
            .collect()
    }

    /// The map writes that take the task links from the last call to
    /// `links` (local task address -> its veth's host-end index; a task
    /// whose index is unknown is left out and served through the bridge).
    pub fn update_task_links(&mut self, links: &BTreeMap<u64, Attachment>) -> Vec<Change> {
        let to = LbState {
            task_links: links
                .values()
                .filter(|a| a.host_index != 0)
                .map(|a| (wire_addr(a.address), a.host_index))
                .collect(),
            ..LbState::default()
        };
        let from = LbState {
            task_links: std::mem::take(&mut self.task_links),
            ..LbState::default()
        };
        let changes = plan(&from, &to);
        self.task_links = to.task_links;
        changes
    }

    /// The map writes that take the VIPs from the last call to `services`
    /// (the services on this node's tasks' networks). A VIP leads to the
    /// service's running tasks' addresses on that network, any port.
    pub fn update_vips(&mut self, services: &[NetworkServices]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen = BTreeSet::new();
        for network in services {
            for record in network.services.iter() {
                let Some(vip) = record.vip else { continue };
                let key = (record.service, network.network);
                seen.insert(key);
                let digest = record_digest(record, vip);
                if self.vips.get(&key).is_some_and(|e| e.input.0 == digest) {
                    continue;
                }
                let built = vip_state(record, vip, network.network, &mut self.ids);
                changes.extend(replace_entry(
                    &mut self.vips,
                    &mut self.ids,
                    key,
                    (digest, Vec::new()),
                    built,
                ));
            }
        }
        let gone: Vec<(u64, u64)> = self.vips.keys().filter(|k| !seen.contains(k)).copied().collect();
        for key in gone {
            changes.extend(remove_entry(&mut self.vips, &mut self.ids, &key));
        }
        changes
    }

    /// What each ID stands for: service ports and VIPs by their table ID,
    /// backends by theirs (with their service).
    pub fn labels(&self) -> (BTreeMap<u32, PortKey>, BTreeMap<u32, (u64, BackendKey)>) {
        let ports = self.ids.services.iter().map(|(k, id)| (*id, *k)).collect();
        let mut backends = BTreeMap::new();
        for entry in self.services.values().chain(self.vips.values()) {
            let Some(service) = entry.keys.iter().next().map(|k| k.0) else {
                continue;
            };
            for task in &entry.tasks {
                if let Some(id) = self.ids.backends.get(task) {
                    backends.insert(*id, (service, *task));
                }
            }
        }
        (ports, backends)
    }
}

/// What one service (or VIP) was built into: its map contents, its port
/// keys and its backend keys.
type Built = (LbState, BTreeSet<PortKey>, BTreeSet<BackendKey>);

/// Puts `built` in place of `key`'s entry: the map writes from the old
/// contents to the new, and the IDs the new one no longer uses released.
fn replace_entry<K: Ord>(
    entries: &mut BTreeMap<K, ServiceEntry>,
    ids: &mut Ids,
    key: K,
    input: (u64, LocalAddresses),
    (state, keys, tasks): Built,
) -> Vec<Change> {
    let old = entries.remove(&key);
    let changes = plan(old.as_ref().map_or(&LbState::default(), |e| &e.state), &state);
    if let Some(old) = old {
        ids.release(
            old.keys.difference(&keys).copied(),
            old.tasks.difference(&tasks).copied(),
        );
    }
    entries.insert(
        key,
        ServiceEntry {
            input,
            state,
            keys,
            tasks,
        },
    );
    changes
}

/// Removes `key`'s entry: the map writes that clear it, its IDs released.
fn remove_entry<K: Ord>(entries: &mut BTreeMap<K, ServiceEntry>, ids: &mut Ids, key: &K) -> Vec<Change> {
    let Some(old) = entries.remove(key) else {
        return Vec::new();
    };
    ids.release(old.keys.into_iter(), old.tasks.into_iter());
    plan(&old.state, &LbState::default())
}

/// Adds table `table_id` over `set` (task ID order, the order Maglev
/// hashes) to `state`, with the backends it names (`network` 0 for a
/// published port's).
fn add_table(
    (state, tasks): (&mut LbState, &mut BTreeSet<BackendKey>),
    ids: &mut Ids,
    table_id: u32,
    set: &[(u64, Backend)],
    network: u64,
    algorithm: LbAlgorithm,
) {
    let names: Vec<u64> = set.iter().map(|(t, _)| *t).collect();
    let indices = match algorithm {
        LbAlgorithm::Maglev => maglev::table(&names, TABLE_SIZE),
        _ => maglev::spread(names.len(), TABLE_SIZE),
    };
    let slots = indices
        .iter()
        .map(|i| ids.backend((set[*i as usize].0, network)))
        .collect();
    for (task, backend) in set {
        tasks.insert((*task, network));
        state.backends.insert(ids.backend((*task, network)), *backend);
    }
    state.tables.insert(table_id, (set.len() as u32, slots));
}

/// A service port's (or VIP's) entry over the backends in `state`.
fn service_value(id: u32, target_port: u16, lb: &LbOptions, state: &LbState) -> ServiceValue {
    ServiceValue {
        id,
        target_port,
        algorithm: algorithm(lb.algorithm) as u8,
        affinity: u8::from(lb.client_affinity),
        affinity_timeout_s: lb.affinity_timeout_s,
        generation: generation(&state.backends),
    }
}

fn record_digest(record: &ServiceRecord, vip: Ipv4Addr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (record.service, vip, &record.tasks).hash(&mut h);
    (
        record.lb.algorithm as u8,
        record.lb.client_affinity,
        record.lb.affinity_timeout_s,
    )
        .hash(&mut h);
    h.finish()
}

/// What one VIP puts in the maps: its entry, its table over the tasks'
/// addresses on the network.
fn vip_state(record: &ServiceRecord, vip: Ipv4Addr, network: u64, ids: &mut Ids) -> Built {
    let mut state = LbState::default();
    let mut keys = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    let key = (record.service, 0, 0, network);
    let Some(id) = ids.service(key) else {
        log::warn!(
            "the routing mesh holds {MAX_SERVICES} service ports already; {}'s VIP is not served",
            record.name
        );
        return (state, keys, tasks);
    };
    keys.insert(key);
    let set: Vec<(u64, Backend)> = record
        .tasks
        .iter()
        .map(|(task, address)| {
            let backend = Backend {
                node: 0,
                local: wire_addr(*address),
                route: NODE_TUNNEL,
            };
            (*task, backend)
        })
        .collect();
    add_table((&mut state, &mut tasks), ids, id, &set, network, record.lb.algorithm);
    state
        .vips
        .insert(wire_addr(vip), service_value(id, 0, &record.lb, &state));
    (state, keys, tasks)
}

/// A service's backend generation: changes with its set of backends.
fn generation(backends: &BTreeMap<u32, Backend>) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for (id, b) in backends {
        (id, b.node, b.local, b.route).hash(&mut h);
    }
    h.finish() as u32
}

/// Node additions (`add`) or removals between two sets.
fn plan_nodes(from: &BTreeMap<u32, u32>, to: &BTreeMap<u32, u32>, add: bool) -> Vec<Change> {
    if add {
        to.iter()
            .filter(|(n, f)| from.get(n) != Some(f))
            .map(|(n, f)| Change::Node(*n, *f))
            .collect()
    } else {
        from.keys()
            .filter(|n| !to.contains_key(n))
            .map(|n| Change::RemoveNode(*n))
            .collect()
    }
}

/// What one service puts in the maps: per published port, its table over
/// all of its running tasks and its table over the ones running here.
fn service_state(
    service: &MeshService,
    local: &BTreeMap<u64, Ipv4Addr>,
    on_link: &dyn Fn(Ipv4Addr) -> bool,
    ids: &mut Ids,
) -> Built {
    let mut state = LbState::default();
    let mut keys = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    // (task ID, backend) in task ID order, the order Maglev hashes.
    let mut all = Vec::new();
    for b in &service.backends {
        let Ok(node) = b.node_addr.parse::<Ipv4Addr>() else {
            continue;
        };
        let local_addr = match (b.local, local.get(&b.task)) {
            (true, Some(a)) => wire_addr(*a),
            (true, None) => continue,
            (false, _) => 0,
        };
        all.push((
            b.task,
            Backend {
                node: wire_addr(node),
                local: local_addr,
                route: if on_link(node) { NODE_ON_LINK } else { NODE_TUNNEL },
            },
        ));
    }
    let here: Vec<(u64, Backend)> = all.iter().copied().filter(|(_, b)| b.local != 0).collect();
    for port in &service.ports {
        let key = (service.service, port.published, port.protocol.number(), 0);
        let Some(id) = ids.service(key) else {
            log::warn!(
                "the routing mesh holds {MAX_SERVICES} service ports already; {}:{} is not served",
                service.name,
                port.published
            );
            continue;
        };
        keys.insert(key);
        for (set, table_id) in [(&all, id), (&here, id | LOCAL_TABLE)] {
            add_table((&mut state, &mut tasks), ids, table_id, set, 0, service.lb.algorithm);
        }
        let value = service_value(id, port.target.to_be(), &service.lb, &state);
        let key = ServiceKey {
            addr: 0,
            port: port.published.to_be(),
            proto: port.protocol.number(),
            pad: 0,
        };
        state.services.insert(key, value);
    }
    (state, keys, tasks)
}

/// Errors setting the routing mesh up.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Ebpf(#[from] crate::dataplane::ebpf::EbpfError),
    #[error(transparent)]
    Network(#[from] super::network::NetworkError),
    #[error("the data-path address {0} is on no link of this node")]
    NoUnderlay(Ipv4Addr),
    #[error("the data-path address {0:?} is not an IPv4 address (the routing mesh is IPv4 for now)")]
    NotIpv4(String),
    #[error(transparent)]
    Ipvs(#[from] super::mesh_ipvs::IpvsMeshError),
    #[error("reading the node's network namespace cookie: {0}")]
    Cookie(std::io::Error),
}

/// The programs and maps while the node serves published ports or VIPs.
struct Active {
    dataplane: EbpfDataplane,
    maps: LbMaps,
    /// The published-port half: the tunnel device and the TC programs.
    tc: Option<TcPart>,
    /// Whether the socket programs are on the tasks' cgroup.
    sockets: bool,
    /// Whether the `host_*` socket programs are on the cgroup2 root.
    host_sockets: bool,
}

struct TcPart {
    /// (program, link) as attached.
    attachments: Vec<(&'static str, String)>,
    /// The task veths (host ends) `tc_from_task` was attached to.
    task_veths: BTreeSet<String>,
    /// Whether the `tc_from_task` pins an earlier agent left for veths
    /// that are gone have been removed.
    swept: bool,
    api: TcApi,
    vtep: Ipv4Addr,
    port: u16,
    /// The underlay subnet: nodes in it are on this node's link.
    link: Option<crate::subnet::Subnet>,
}

#[derive(Default)]
struct Inner {
    active: Option<Active>,
    /// What the active maps hold, per service.
    tables: MeshTables,
    /// The latest assignment, with its data-path address and port.
    assignment: Option<(MeshAssignment, String, u16)>,
    /// The services on this node's tasks' networks (their VIPs).
    services: Vec<NetworkServices>,
    /// Whether any assignment has come yet: until then, what an earlier
    /// agent left pinned keeps forwarding untouched.
    assigned: bool,
    /// The IPVS backend, while it serves published ports.
    ipvs: Option<IpvsMesh>,
    /// Whether an IPVS real server is draining (a later sync deletes it).
    draining: bool,
    /// Whether what the other backend may have left has been removed.
    switched: bool,
}

/// The node's routing mesh: published ports, and the VIPs its tasks use.
pub struct RoutingMesh {
    network: Arc<LocalNetwork>,
    cgroup: Option<PathBuf>,
    /// Where maps and links are pinned (the agent's bpffs).
    pins: PathBuf,
    /// Whether nodes on the same link get packets as they are (else
    /// everything goes through the tunnel).
    direct: bool,
    /// What serves published ports.
    backend: LbBackend,
    inner: Arc<Mutex<Inner>>,
}

impl RoutingMesh {
    /// A mesh over the node's task bridge and its tasks' cgroup (without
    /// one, VIPs are not served), pinning in `pins` (a bpffs; see
    /// runtime/bpffs.rs); nothing is made before it is needed. Follows the
    /// local tasks' addresses.
    pub fn new(
        network: Arc<LocalNetwork>,
        cgroup: Option<PathBuf>,
        pins: PathBuf,
        direct: bool,
        backend: LbBackend,
    ) -> Arc<RoutingMesh> {
        let mesh = Arc::new(RoutingMesh {
            network: network.clone(),
            cgroup,
            pins,
            direct,
            backend,
            inner: Arc::default(),
        });
        let weak = Arc::downgrade(&mesh);
        let mut changes = network.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(mesh) = weak.upgrade() else { return };
                if let Err(e) = mesh.sync().await {
                    log::warn!("routing mesh: {e}");
                }
            }
        });
        if backend == LbBackend::Ipvs {
            // Draining real servers are deleted by a later pass.
            let weak = Arc::downgrade(&mesh);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(DRAIN_CHECK);
                loop {
                    tick.tick().await;
                    let Some(mesh) = weak.upgrade() else { return };
                    let draining = mesh.inner.locked().draining;
                    if draining {
                        if let Err(e) = mesh.sync().await {
                            log::warn!("routing mesh: {e}");
                        }
                    }
                }
            });
        }
        mesh
    }

    /// Follows new assignments.
    pub async fn apply(&self, assignments: &Assignments) -> Result<(), MeshError> {
        {
            let mut inner = self.inner.locked();
            inner.assignment = assignments
                .mesh
                .as_ref()
                .and_then(|m| m.assignment())
                .map(|m| (m, assignments.vtep.clone(), assignments.data_path_port));
            inner.services = assignments.services.clone();
            inner.assigned = true;
        }
        self.sync().await
    }

    /// The counters of every published port, VIP and local task, from the
    /// per-CPU maps (for the agent's metrics); empty while nothing is served.
    pub fn counters(&self) -> Result<(Vec<PortCounters>, Vec<TaskCounters>), MeshError> {
        let inner = self.inner.locked();
        let Some(active) = &inner.active else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (ports, backends) = inner.tables.labels();
        let counters = active.maps.counters(ports.keys().copied())?;
        let ports = ports
            .iter()
            .map(|(id, port)| PortCounters {
                port: *port,
                stats: counters.services.get(id).copied().unwrap_or_default(),
                conntrack: counters.conntrack.get(id).copied().unwrap_or(0),
            })
            .collect();
        let tasks = counters
            .backends
            .iter()
            .filter_map(|(id, stats)| {
                let (service, task) = backends.get(id)?;
                Some(TaskCounters {
                    service: *service,
                    task: *task,
                    stats: *stats,
                })
            })
            .collect();
        Ok((ports, tasks))
    }

    /// The counters as metrics, labelled with service names: the eBPF
    /// maps' (published ports and VIPs), and IPVS's statistics for the
    /// published ports on the IPVS backend. Empty while nothing is served;
    /// a read that fails is logged and left out.
    pub fn metrics(&self) -> (Vec<PortFacts>, Vec<BackendFacts>) {
        let (names, mesh, ipvs) = {
            let mut inner = self.inner.locked();
            let mesh = inner.assignment.as_ref().map(|(m, _, _)| m.clone()).unwrap_or_default();
            let names: BTreeMap<u64, String> = inner
                .services
                .iter()
                .flat_map(|n| n.services.iter().map(|s| (s.service, s.name.clone())))
                .chain(mesh.services.iter().map(|s| (s.service, s.name.clone())))
                .collect();
            let ipvs = inner.ipvs.as_mut().map(IpvsMesh::counters);
            (names, mesh, ipvs)
        };
        let name = |id: u64| names.get(&id).cloned().unwrap_or_else(|| node_id_text(id));
        let (mut ports, mut backends) = match self.counters() {
            Ok((ports, tasks)) => ebpf_facts(ports, tasks, &name),
            Err(e) => {
                log::warn!("metrics: reading the routing mesh's counters: {e}");
                Default::default()
            }
        };
        match ipvs {
            Some(Ok(c)) => {
                let (p, b) = super::mesh_ipvs::facts(&c, &mesh, &self.network.addresses());
                ports.extend(p);
                backends.extend(b);
            }
            Some(Err(e)) => log::warn!("metrics: reading IPVS statistics: {e}"),
            None => {}
        }
        (ports, backends)
    }

    /// Removes everything (the node leaves the swarm).
    pub async fn remove_all(&self) {
        {
            let mut inner = self.inner.locked();
            inner.assignment = None;
            inner.services.clear();
            inner.assigned = true;
        }
        if let Err(e) = self.sync().await {
            log::warn!("removing the routing mesh: {e}");
        }
    }

    /// Brings the kernel in line with the latest assignment and the local
    /// tasks' addresses.
    async fn sync(&self) -> Result<(), MeshError> {
        let wants_tc = self.inner.locked().assignment.is_some();
        if wants_tc {
            self.network.ensure_bridge().await?;
        }
        let local = self.network.attachments();
        let inner = self.inner.clone();
        let cgroup = self.cgroup.clone();
        let pins = self.pins.clone();
        let direct = self.direct;
        let backend = self.backend;
        tokio::task::spawn_blocking(move || {
            let mut inner = inner.locked();
            sync_blocking(&mut inner, &local, cgroup.as_deref(), &pins, direct, backend)
        })
        .await
        .map_err(|e| MeshError::Network(super::network::NetworkError::Worker(e.to_string())))?
    }
}

/// The eBPF maps' counters as metrics (`name` labels a service ID).
fn ebpf_facts(
    ports: Vec<PortCounters>,
    tasks: Vec<TaskCounters>,
    name: &dyn Fn(u64) -> String,
) -> (Vec<PortFacts>, Vec<BackendFacts>) {
    let ports = ports
        .into_iter()
        .map(|c| {
            let (service, port, protocol, _network) = c.port;
            PortFacts {
                service: name(service),
                kind: if port == 0 { "vip" } else { "published" },
                port,
                protocol: Protocol::from_number(protocol).map_or("", Protocol::name),
                packets: c.stats.packets,
                bytes: c.stats.bytes,
                connections: c.stats.connections,
                conntrack: c.conntrack,
            }
        })
        .collect();
    let backends = tasks
        .into_iter()
        .map(|t| BackendFacts {
            service: name(t.service),
            task: task_dir_name(t.task.0),
            packets: t.stats.packets,
            bytes: t.stats.bytes,
            connections: t.stats.connections,
        })
        .collect();
    (ports, backends)
}

fn sync_blocking(
    inner: &mut Inner,
    attachments: &BTreeMap<u64, Attachment>,
    cgroup: Option<&Path>,
    pins: &Path,
    direct: bool,
    backend: LbBackend,
) -> Result<(), MeshError> {
    if !inner.assigned {
        return Ok(());
    }
    let local: BTreeMap<u64, Ipv4Addr> = attachments.iter().map(|(t, a)| (*t, a.address)).collect();
    let local = &local;
    if !inner.switched {
        remove_other_backend(backend, pins);
        inner.switched = true;
    }
    let published = match &inner.assignment {
        Some((mesh, vtep, port)) => {
            let vtep: Ipv4Addr = vtep.parse().map_err(|_| MeshError::NotIpv4(vtep.clone()))?;
            Some((mesh.clone(), vtep, crate::control::mesh::tunnel_port(*port)))
        }
        None => None,
    };
    let published = match backend {
        LbBackend::Ebpf => published,
        LbBackend::Ipvs => {
            sync_ipvs(inner, published.as_ref().map(|(mesh, vtep, _)| (mesh, *vtep)), local)?;
            None
        }
    };
    let has_vips = inner
        .services
        .iter()
        .any(|n| n.services.iter().any(|s| s.vip.is_some()));
    let wants_sockets = has_vips && cgroup.is_some();
    if published.is_none() && !wants_sockets {
        if let Some(active) = inner.active.take() {
            teardown(active, pins);
        }
        inner.tables = MeshTables::default();
        return Ok(());
    }
    if inner.active.is_none() {
        let mut dataplane = EbpfDataplane::load_pinned(Some(pins), &PINNED_MAPS)?;
        let maps = LbMaps::take(&mut dataplane)?;
        let found = maps.observe()?;
        inner.tables = if found == LbState::default() {
            MeshTables::default()
        } else {
            log::info!(
                "routing mesh: taking over {} service ports and {} backends an earlier agent left",
                found.services.len() + found.vips.len(),
                found.backends.len()
            );
            MeshTables::adopting(found)
        };
        inner.active = Some(Active {
            dataplane,
            maps,
            tc: None,
            sockets: false,
            host_sockets: false,
        });
    }
    let active = inner.active.as_mut().expect("reason: set up above");
    let moved = match (&active.tc, &published) {
        (Some(tc), Some((_, vtep, port))) => tc.vtep != *vtep || tc.port != *port,
        (Some(_), None) => true,
        _ => false,
    };
    if moved {
        if let Some(tc) = active.tc.take() {
            teardown_tc(tc, pins);
        }
    }
    if let (None, Some((_, vtep, port))) = (&active.tc, &published) {
        active.tc = Some(setup_tc(&mut active.dataplane, &mut active.maps, *vtep, *port, pins)?);
    }
    if let (Some(_), false, Some(root)) = (&active.tc, active.host_sockets, cgroup.and_then(Path::parent)) {
        // Attempted once: without them only the node's own connections to
        // its published ports go unserved.
        active.host_sockets = true;
        if let Err(e) = attach_host_sockets(active, root) {
            log::warn!("routing mesh: the node's own connections to published ports will not be served: {e}");
        }
    }
    if wants_sockets && !active.sockets {
        let dir = cgroup.expect("reason: wants_sockets needs one");
        for program in SOCKET_PROGRAMS {
            active.dataplane.attach_cgroup(program, dir)?;
        }
        active.sockets = true;
        log::info!("routing mesh: serving service VIPs to the tasks in {}", dir.display());
    }
    // Task links only while the TC programs that use them are attached.
    let no_links = BTreeMap::new();
    let task_links = match &mut active.tc {
        Some(tc) => {
            sync_task_veths(&mut active.dataplane, tc, attachments, pins);
            attachments
        }
        None => &no_links,
    };
    let mesh = published.map(|(m, _, _)| m).unwrap_or_default();
    let link = inner.active.as_ref().and_then(|a| a.tc.as_ref()).and_then(|tc| tc.link);
    let on_link = |a: Ipv4Addr| direct && link.is_some_and(|l| l.contains(a));
    let mut changes = inner.tables.update(&mesh, local, &on_link);
    changes.extend(inner.tables.update_vips(&inner.services));
    changes.extend(inner.tables.update_task_links(task_links));
    changes.extend(inner.tables.leftovers());
    let active = inner.active.as_mut().expect("reason: set up above");
    if let Err(e) = active.maps.apply(&changes) {
        // What the maps hold is unknown now: take them over as they are
        // (as after a restart), so the next sync rewrites them whole while
        // the programs go on forwarding.
        let found = active.maps.observe()?;
        inner.tables = MeshTables::adopting(found);
        return Err(e.into());
    }
    Ok(())
}

/// Node-local access to published ports: the `host_*` programs on the
/// cgroup2 root (`root`), acting on sockets in this node's network
/// namespace only. They stay until the dataplane goes.
fn attach_host_sockets(active: &mut Active, root: &Path) -> Result<(), MeshError> {
    active.maps.set_host(netns_cookie()?)?;
    for program in HOST_SOCKET_PROGRAMS {
        active.dataplane.attach_cgroup(program, root)?;
    }
    log::info!("routing mesh: serving the node's own connections to its published ports");
    Ok(())
}

/// The calling thread's network namespace cookie (SO_NETNS_COOKIE, kernel >= 5.14).
fn netns_cookie() -> Result<u64, MeshError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0)).map_err(MeshError::Cookie)?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the value and its length are locals that outlive the call.
    let got = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(MeshError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Serves `published` (the assignment and this node's address) with IPVS,
/// or removes the IPVS backend's objects when there is none.
fn sync_ipvs(
    inner: &mut Inner,
    published: Option<(&MeshAssignment, Ipv4Addr)>,
    local: &BTreeMap<u64, Ipv4Addr>,
) -> Result<(), MeshError> {
    let Some((mesh, node)) = published else {
        if let Some(mut ipvs) = inner.ipvs.take() {
            ipvs.remove_all()?;
            log::info!("routing mesh: no published port left; IPVS services and marks removed");
        }
        inner.draining = false;
        return Ok(());
    };
    if inner.ipvs.is_none() {
        inner.ipvs = Some(IpvsMesh::open()?);
        log::info!("routing mesh: serving published ports on {node} with IPVS");
    }
    let ipvs = inner.ipvs.as_mut().expect("reason: opened above");
    inner.draining = ipvs.sync(mesh, local, node)?;
    Ok(())
}

/// Removes what an agent on the other backend left: the eBPF backend's
/// TC links and tunnel device, or the IPVS backend's services and marks
/// (switching backend is a restart away). The maps stay: VIPs use them
/// on either backend.
fn remove_other_backend(backend: LbBackend, pins: &Path) {
    match backend {
        LbBackend::Ipvs => {
            for program in [PROGRAM_INGRESS, PROGRAM_TUNNEL, PROGRAM_REPLY, PROGRAM_FROM_TASK] {
                drop_stale_pins(pins, program, "");
            }
            if let Err(e) = delete_tunnel() {
                log::warn!("routing mesh: removing {TUNNEL_DEVICE}: {e}");
            }
        }
        LbBackend::Ebpf => {
            if let Err(e) = super::mesh_ipvs::remove_leftovers() {
                log::warn!("routing mesh: removing what the IPVS backend left: {e}");
            }
        }
    }
}

/// Makes the tunnel device and attaches the TC programs.
fn setup_tc(
    dataplane: &mut EbpfDataplane,
    maps: &mut LbMaps,
    vtep: Ipv4Addr,
    port: u16,
    pins: &Path,
) -> Result<TcPart, MeshError> {
    let (underlay, underlay_index, tunnel_index, bridge_index, prefix) = Netlink::run(|nl| async move {
        let underlay_index = nl
            .link_with_address(vtep.into())
            .await?
            .ok_or(NetlinkError::NoSuchLink(vtep.to_string()))?;
        let underlay = nl
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == underlay_index)
            .map(|l| l.name)
            .ok_or(NetlinkError::NoSuchLink(vtep.to_string()))?;
        // A device a previous agent left is kept when it has our port (it
        // carries connections right now), made anew otherwise.
        let kept = match nl.links().await?.into_iter().find(|l| l.name == TUNNEL_DEVICE) {
            Some(l) if l.vxlan_port == Some(port) => true,
            Some(_) => {
                nl.delete_link(TUNNEL_DEVICE).await?;
                false
            }
            None => false,
        };
        if !kept {
            nl.add_vxlan_external(TUNNEL_DEVICE, port).await?;
        }
        nl.set_up(TUNNEL_DEVICE).await?;
        let tunnel_index = nl.link_index(TUNNEL_DEVICE).await?;
        let bridge_index = nl.link_index(BRIDGE).await?;
        let prefix = nl.address_prefix(vtep.into()).await?;
        Ok((underlay, underlay_index, tunnel_index, bridge_index, prefix))
    })
    .map_err(|e| match e {
        NetlinkError::NoSuchLink(_) => MeshError::NoUnderlay(vtep),
        other => MeshError::Netlink(other),
    })?;
    maps.set_config(NodeConfig {
        addr: wire_addr(vtep),
        ifindex: underlay_index,
        tunnel_ifindex: tunnel_index,
        bridge_ifindex: bridge_index,
    })?;
    let api = preferred_tc_api();
    let mut attachments = Vec::new();
    for (program, link) in [
        (PROGRAM_INGRESS, underlay.as_str()),
        (PROGRAM_TUNNEL, TUNNEL_DEVICE),
        (PROGRAM_REPLY, BRIDGE),
    ] {
        drop_stale_pins(pins, program, link);
        match dataplane.attach_tc_pinned(program, link, api, &link_pin(pins, program, link)) {
            Ok(()) => attachments.push((program, link.to_string())),
            Err(e) => {
                for (p, l) in attachments {
                    EbpfDataplane::detach_tc_pinned(p, &l, api, &link_pin(pins, p, &l));
                }
                let _ = delete_tunnel();
                return Err(e.into());
            }
        }
    }
    log::info!("routing mesh: serving published ports on {underlay} ({vtep}), tunnel {TUNNEL_DEVICE} on port {port}");
    let link = prefix.filter(|p| *p <= 32).and_then(|p| {
        let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
        crate::subnet::Subnet::parse(&format!("{}/{p}", Ipv4Addr::from(u32::from(vtep) & mask))).ok()
    });
    Ok(TcPart {
        attachments,
        task_veths: BTreeSet::new(),
        swept: false,
        api,
        vtep,
        port,
        link,
    })
}

/// Where program `program`'s TC link on device `link` is pinned.
fn link_pin(pins: &Path, program: &str, link: &str) -> PathBuf {
    pins.join(format!("link-{program}@{link}"))
}

/// Unpins (and so detaches) `program`'s links on other devices than `link`
/// that an earlier agent left (its underlay was another link).
fn drop_stale_pins(pins: &Path, program: &str, link: &str) {
    let prefix = format!("link-{program}@");
    let keep = link_pin(pins, program, link);
    for entry in std::fs::read_dir(pins).into_iter().flatten().flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(&prefix) && entry.path() != keep;
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Keeps `tc_from_task` on the host end of every local task's veth (and
/// its pins off the veths that are gone), so a task's replies skip the
/// bridge. A veth it cannot be attached to is tried once and logged: the
/// bridge's `tc_reply` serves that task's replies.
fn sync_task_veths(
    dataplane: &mut EbpfDataplane,
    tc: &mut TcPart,
    attachments: &BTreeMap<u64, Attachment>,
    pins: &Path,
) {
    let wanted: BTreeSet<&str> = attachments.values().map(|a| a.host_link.as_str()).collect();
    if !tc.swept {
        tc.swept = true;
        let prefix = format!("link-{PROGRAM_FROM_TASK}@");
        for entry in std::fs::read_dir(pins).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix(&prefix).is_some_and(|veth| !wanted.contains(veth)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let api = tc.api;
    tc.task_veths.retain(|veth| {
        let kept = wanted.contains(veth.as_str());
        if !kept {
            EbpfDataplane::detach_tc_pinned(PROGRAM_FROM_TASK, veth, api, &link_pin(pins, PROGRAM_FROM_TASK, veth));
        }
        kept
    });
    for veth in wanted {
        if !tc.task_veths.insert(veth.to_string()) {
            continue;
        }
        let pin = link_pin(pins, PROGRAM_FROM_TASK, veth);
        if let Err(e) = dataplane.attach_tc_pinned(PROGRAM_FROM_TASK, veth, tc.api, &pin) {
            log::warn!("routing mesh: replies from the task on {veth} go through the bridge: {e}");
        }
    }
}

fn delete_tunnel() -> Result<(), NetlinkError> {
    Netlink::run(|nl| async move {
        match nl.delete_link(TUNNEL_DEVICE).await {
            Ok(()) | Err(NetlinkError::NoSuchLink(_)) => Ok(()),
            Err(e) => Err(e),
        }
    })
}

fn teardown_tc(tc: TcPart, pins: &Path) {
    for (program, link) in &tc.attachments {
        EbpfDataplane::detach_tc_pinned(program, link, tc.api, &link_pin(pins, program, link));
    }
    for veth in &tc.task_veths {
        let pin = link_pin(pins, PROGRAM_FROM_TASK, veth);
        EbpfDataplane::detach_tc_pinned(PROGRAM_FROM_TASK, veth, tc.api, &pin);
    }
    if let Err(e) = delete_tunnel() {
        log::warn!("routing mesh: removing {TUNNEL_DEVICE}: {e}");
    }
    log::info!("routing mesh: no published port left; TC programs detached");
}

/// Detaches everything and unpins the maps; the socket programs' links
/// and the maps go with the dataplane.
fn teardown(mut active: Active, pins: &Path) {
    if let Some(tc) = active.tc.take() {
        teardown_tc(tc, pins);
    }
    for name in PINNED_MAPS {
        let _ = std::fs::remove_file(pins.join(name));
    }
}

/// The socket programs on the tasks' cgroup: IPv4 sockets, and IPv6
/// sockets that use IPv4-mapped addresses (dual-stack runtimes).
const SOCKET_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];
/// The socket programs on the cgroup2 root, for the node's own sockets.
const HOST_SOCKET_PROGRAMS: [&str; 8] = [
    "host_connect4",
    "host_sendmsg4",
    "host_recvmsg4",
    "host_getpeername4",
    "host_connect6",
    "host_sendmsg6",
    "host_recvmsg6",
    "host_getpeername6",
];

/// Program names in the mesh-ebpf object.
pub const PROGRAM_INGRESS: &str = "tc_ingress";
pub const PROGRAM_TUNNEL: &str = "tc_tunnel";
pub const PROGRAM_REPLY: &str = "tc_reply";
pub const PROGRAM_FROM_TASK: &str = "tc_from_task";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        mesh::MeshBackend,
        service::{LbOptions, PortPublish},
    };

    fn backend(task: u64, node: &str, local: bool) -> MeshBackend {
        MeshBackend {
            task,
            node_addr: node.into(),
            local,
        }
    }

    fn assignment(backends: Vec<MeshBackend>) -> MeshAssignment {
        MeshAssignment {
            services: vec![MeshService {
                service: 7,
                name: "web".into(),
                ports: vec![PortPublish::parse("8080:80").unwrap()],
                lb: LbOptions::default(),
                runs_here: backends.iter().any(|b| b.local),
                backends,
                digest: 0,
            }],
            peers: vec!["10.0.0.2".into()],
        }
    }

    /// The maps after applying `changes` to `state`.
    fn applied(mut state: LbState, changes: &[Change]) -> LbState {
        for c in changes {
            match c {
                Change::Backend(id, b) => {
                    state.backends.insert(*id, *b);
                }
                Change::Table(id, n, slots) => {
                    state.tables.insert(*id, (*n, slots.clone()));
                }
                Change::Service(k, v) => {
                    state.services.insert(*k, *v);
                }
                Change::Node(n, f) => {
                    state.nodes.insert(*n, *f);
                }
                Change::RemoveService(k) => {
                    state.services.remove(k);
                }
                Change::RemoveTable(id) => {
                    state.tables.remove(id);
                }
                Change::RemoveBackend(id) => {
                    state.backends.remove(id);
                }
                Change::RemoveNode(n) => {
                    state.nodes.remove(n);
                }
                Change::TaskLink(a, link) => {
                    state.task_links.insert(*a, *link);
                }
                Change::RemoveTaskLink(a) => {
                    state.task_links.remove(a);
                }
                Change::Vip(k, v) => {
                    state.vips.insert(*k, *v);
                }
                Change::RemoveVip(k) => {
                    state.vips.remove(k);
                }
            }
        }
        state
    }

    #[test]
    fn a_published_port_has_a_whole_table_and_a_local_one() {
        let mut tables = MeshTables::default();
        let local = BTreeMap::from([(1, Ipv4Addr::new(172, 18, 0, 2))]);
        let changes = tables.update(
            &assignment(vec![
                backend(1, "10.0.0.1", true),
                backend(2, "10.0.0.2", false),
                // Running by the store, not attached here (yet): left out.
                backend(3, "10.0.0.1", true),
            ]),
            &local,
            &|a| a == Ipv4Addr::new(10, 0, 0, 2),
        );
        let s = applied(LbState::default(), &changes);
        let (key, service) = s.services.iter().next().unwrap();
        assert_eq!((u16::from_be(key.port), u16::from_be(service.target_port)), (8080, 80));
        assert_eq!(s.tables[&service.id].0, 2);
        assert_eq!(s.tables[&(service.id | LOCAL_TABLE)].0, 1);
        let slots = &s.tables[&service.id].1;
        assert_eq!(slots.len(), TABLE_SIZE as usize);
        let locals: Vec<&Backend> = s.backends.values().filter(|b| b.local != 0).collect();
        assert_eq!(locals.len(), 1);
        assert_eq!(locals[0].local, wire_addr(Ipv4Addr::new(172, 18, 0, 2)));
        assert_eq!(
            s.nodes.values().collect::<Vec<_>>(),
            vec![&NODE_ON_LINK],
            "the peer is on the link"
        );
    }

    #[test]
    fn only_what_changed_is_written_and_ids_are_not_reused_for_other_tasks() {
        let mut tables = MeshTables::default();
        let none = BTreeMap::new();
        let first = tables.update(&assignment(vec![backend(2, "10.0.0.2", false)]), &none, &|_| false);
        let one = applied(LbState::default(), &first);
        assert!(tables
            .update(&assignment(vec![backend(2, "10.0.0.2", false)]), &none, &|_| false)
            .is_empty());
        let next = tables.update(&assignment(vec![backend(4, "10.0.0.2", false)]), &none, &|_| false);
        let other = applied(one.clone(), &next);
        assert!(other.backends.keys().all(|id| !one.backends.contains_key(id)));
        assert_eq!(other.backends.len(), 1, "the old backend was removed");
        let empty = applied(other, &tables.update(&assignment(vec![]), &none, &|_| false));
        let id = empty.services.values().next().unwrap().id;
        assert_eq!(
            empty.tables[&id].0, 0,
            "no task: an empty table, so the port is refused"
        );
        let gone = applied(empty, &tables.update(&MeshAssignment::default(), &none, &|_| false));
        assert_eq!(gone, LbState::default());
    }

    #[test]
    fn a_change_found_in_one_pass_writes_what_the_whole_walk_would() {
        let service = |id: u64, tasks: std::ops::RangeInclusive<u64>| {
            let mut s = MeshService {
                service: id,
                name: format!("s{id}"),
                ports: vec![PortPublish::parse(&format!("{}:80", 10_000 + id)).unwrap()],
                lb: LbOptions::default(),
                backends: tasks
                    .map(|t| backend(t, if t % 2 == 0 { "10.0.0.1" } else { "10.0.0.2" }, t % 2 == 0))
                    .collect(),
                runs_here: true,
                digest: 0,
            };
            s.digest = s.content_digest();
            s
        };
        let mut mesh = MeshAssignment {
            services: (1..=20).map(|id| service(id, id * 10..=id * 10 + 3)).collect(),
            peers: vec!["10.0.0.2".into()],
        };
        let addresses = |tasks: &[u64]| -> BTreeMap<u64, Ipv4Addr> {
            tasks
                .iter()
                .map(|t| (*t, Ipv4Addr::new(172, 18, 0, *t as u8)))
                .collect()
        };
        let mut local = addresses(&[10, 12, 50, 52]);
        let (mut quick, mut whole) = (MeshTables::default(), MeshTables::default());
        let on_link = |_| true;
        let mut step = |mesh: &MeshAssignment, local: &BTreeMap<u64, Ipv4Addr>, what: &str| {
            whole.last.clear();
            let expected = whole.update(mesh, local, &on_link);
            assert_eq!(quick.update(mesh, local, &on_link), expected, "{what}");
            expected.len()
        };
        assert!(step(&mesh, &local, "the first update") > 0);
        // Task 50 (local) leaves, 55 (on the other node) comes.
        mesh.services[4] = service(5, 51..=55);
        assert!(step(&mesh, &local, "one service's backends") > 0);
        assert_eq!(step(&mesh, &local, "nothing"), 0);
        local = addresses(&[10, 12, 50, 52, 54]);
        assert!(step(&mesh, &local, "a local task's address") > 0);
        mesh.services.remove(7);
        assert!(step(&mesh, &local, "a service gone") > 0);
        mesh.services[2].digest = 0;
        mesh.services[2].backends.pop();
        assert!(step(&mesh, &local, "a service without a digest") > 0);
    }

    fn attached(task: u64, address: [u8; 4], host_index: u32) -> (u64, Attachment) {
        let attachment = Attachment {
            host_link: super::super::network::host_link_name(task),
            host_index,
            address: Ipv4Addr::from(address),
        };
        (task, attachment)
    }

    #[test]
    fn task_links_follow_the_local_tasks_veths_and_an_earlier_agents_are_removed() {
        let a = wire_addr(Ipv4Addr::new(172, 18, 0, 2));
        let b = wire_addr(Ipv4Addr::new(172, 18, 0, 3));
        // An earlier agent listed a task that is gone since.
        let earlier = LbState {
            task_links: BTreeMap::from([(b, 40)]),
            ..LbState::default()
        };
        let mut tables = MeshTables::adopting(earlier.clone());
        let local = BTreeMap::from([
            attached(1, [172, 18, 0, 2], 17),
            // Adopted without its veth: served through the bridge.
            attached(2, [172, 18, 0, 4], 0),
        ]);
        let mut changes = tables.update_task_links(&local);
        changes.extend(tables.leftovers());
        let now = applied(earlier, &changes);
        assert_eq!(now.task_links, BTreeMap::from([(a, 17)]));
        assert!(tables.update_task_links(&local).is_empty(), "nothing changed");
        // The task restarted with a new veth, then left.
        let moved = BTreeMap::from([attached(1, [172, 18, 0, 2], 23)]);
        let now = applied(now, &tables.update_task_links(&moved));
        assert_eq!(now.task_links, BTreeMap::from([(a, 23)]));
        let now = applied(now, &tables.update_task_links(&BTreeMap::new()));
        assert!(now.task_links.is_empty());
    }

    #[test]
    fn taking_over_an_earlier_agents_maps_avoids_its_ids_and_then_removes_its_leftovers() {
        let none = BTreeMap::new();
        let mut first = MeshTables::default();
        let mut two = assignment(vec![backend(2, "10.0.0.2", false)]);
        two.services.push(MeshService {
            service: 8,
            ports: vec![PortPublish::parse("9090:90").unwrap()],
            ..two.services[0].clone()
        });
        let earlier = applied(LbState::default(), &first.update(&two, &none, &|_| false));
        // The new agent: service 8 is gone meanwhile.
        let mut tables = MeshTables::adopting(earlier.clone());
        let mut changes = tables.update(&assignment(vec![backend(2, "10.0.0.2", false)]), &none, &|_| false);
        changes.extend(tables.leftovers());
        let now = applied(earlier.clone(), &changes);
        assert_eq!(now.services.len(), 1, "9090 removed, 8080 kept");
        let old_ids: BTreeSet<u32> = earlier.services.values().map(|v| v.id).collect();
        let new_id = now.services.values().next().unwrap().id;
        assert!(!old_ids.contains(&new_id), "a fresh table ID, switched to in one write");
        assert!(
            now.backends.keys().all(|b| !earlier.backends.contains_key(b)),
            "fresh backend IDs"
        );
        assert_eq!(now.tables.len(), 2, "the old tables are gone");
        assert!(tables.leftovers().is_empty(), "only once");
    }
}
