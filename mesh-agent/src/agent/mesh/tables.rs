//! The routing mesh's tables as this node programs them (pure): each
//! published port's and VIP's service entry, Maglev table and backends,
//! with stable small IDs, built from the assignment and the local tasks'
//! addresses; what changed since the last build, as map writes
//! ([`Change`]s); and the take-over of maps an earlier agent left. The
//! kernel side that writes them is `agent::mesh::kernel`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use mesh_common::lb::{
    Algorithm, Backend, ServiceKey, ServiceValue, LOCAL_TABLE, MAX_SERVICES, NODE_ON_LINK, NODE_TUNNEL, TABLE_SIZE,
};

use crate::agent::net::bridge::Attachment;
use crate::{
    api::{
        assignment::{
            discovery::{NetworkServices, ServiceRecord},
            mesh::{MeshAssignment, MeshService},
        },
        service::{LbAlgorithm, LbOptions},
    },
    dataplane::{
        lb::{plan, Change, LbState},
        maglev,
    },
};

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
    pub(crate) port: PortKey,
    pub(crate) stats: mesh_common::lb::ServiceStats,
    /// Connections tracked now.
    pub(crate) conntrack: u64,
}

/// One task's counters on its node (traffic the routing mesh brought it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCounters {
    pub(crate) service: u64,
    /// (task, 0) behind a published port, (task, network) behind a VIP.
    pub(crate) task: BackendKey,
    pub(crate) stats: mesh_common::lb::ServiceStats,
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

pub(super) fn wire_addr(a: Ipv4Addr) -> u32 {
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
    pub(crate) fn adopting(found: LbState) -> MeshTables {
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
    pub(crate) fn leftovers(&mut self) -> Vec<Change> {
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
    pub(crate) fn update_task_links(&mut self, links: &BTreeMap<u64, Attachment>) -> Vec<Change> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        assignment::mesh::MeshBackend,
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
            host_link: crate::agent::net::bridge::host_link_name(task),
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
