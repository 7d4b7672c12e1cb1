//! The routing mesh's maps in the kernel (the layout is `mesh_common::lb`):
//! what they should hold as plain data ([`LbState`]), the changes from one
//! state to the next in the order that keeps every service whole
//! ([`plan`], pure), and writing them through aya ([`LbMaps`]).

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use mesh_common::lb::{
    Backend, Conntrack, FlowKey, NodeConfig, ServiceKey, ServiceStats, ServiceValue, Table, BACKENDS_MAP,
    BACKEND_STATS_MAP, CONFIG_MAP, CONNTRACK_MAP, HOST_MAP, LOCAL_TABLE, NODES_MAP, SERVICES_MAP, STATS_MAP,
    TABLES_MAP, TASK_LINKS_MAP, VIPS_MAP,
};

use super::ebpf::{EbpfDataplane, EbpfError};

/// Everything the maps hold for this node (conntrack, affinity and reverse
/// NAT are the programs' own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LbState {
    /// Service ports.
    pub(crate) services: BTreeMap<ServiceKey, ServiceValue>,
    /// Tables by ID: the backend count and `TABLE_SIZE` slots.
    pub(crate) tables: BTreeMap<u32, (u32, Vec<u32>)>,
    /// Backends by ID.
    pub(crate) backends: BTreeMap<u32, Backend>,
    /// Other nodes' underlay addresses (as on the wire), with how they are
    /// reached (`NODE_ON_LINK` or `NODE_TUNNEL`).
    pub(crate) nodes: BTreeMap<u32, u32>,
    /// Service VIPs (as on the wire) for the tasks' sockets.
    pub(crate) vips: BTreeMap<u32, ServiceValue>,
    /// Local task addresses (as on the wire) -> their veth's host-end index.
    pub(crate) task_links: BTreeMap<u32, u32>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Backend(u32, Backend),
    Table(u32, u32, Vec<u32>),
    Service(ServiceKey, ServiceValue),
    Vip(u32, ServiceValue),
    Node(u32, u32),
    TaskLink(u32, u32),
    RemoveService(ServiceKey),
    RemoveVip(u32),
    RemoveTable(u32),
    RemoveBackend(u32),
    RemoveNode(u32),
    RemoveTaskLink(u32),
}

/// The writes that take the maps from `from` to `to`, in an order that
/// keeps every lookup whole: new backends, then whole tables (each swapped
/// in one update); services that go; backends that go; then the service
/// entries (their new generation tells tracked connections to check their
/// backend, which is gone by then if it left); then unused tables, nodes
/// and task links. (A task link only makes delivery to a task faster: its
/// order does not matter.)
pub(crate) fn plan(from: &LbState, to: &LbState) -> Vec<Change> {
    let mut out = Vec::new();
    for (n, flags) in &to.nodes {
        if from.nodes.get(n) != Some(flags) {
            out.push(Change::Node(*n, *flags));
        }
    }
    for (a, link) in &to.task_links {
        if from.task_links.get(a) != Some(link) {
            out.push(Change::TaskLink(*a, *link));
        }
    }
    for (id, b) in &to.backends {
        if from.backends.get(id) != Some(b) {
            out.push(Change::Backend(*id, *b));
        }
    }
    for (id, t) in &to.tables {
        if from.tables.get(id) != Some(t) {
            out.push(Change::Table(*id, t.0, t.1.clone()));
        }
    }
    out.extend(
        from.services
            .keys()
            .filter(|k| !to.services.contains_key(k))
            .map(|k| Change::RemoveService(*k)),
    );
    out.extend(
        from.vips
            .keys()
            .filter(|k| !to.vips.contains_key(k))
            .map(|k| Change::RemoveVip(*k)),
    );
    // Backends go before the service entries carrying the new generation,
    // so a connection that checks its backend then finds it gone.
    out.extend(
        from.backends
            .keys()
            .filter(|k| !to.backends.contains_key(k))
            .map(|k| Change::RemoveBackend(*k)),
    );
    for (k, v) in &to.services {
        if from.services.get(k) != Some(v) {
            out.push(Change::Service(*k, *v));
        }
    }
    for (k, v) in &to.vips {
        if from.vips.get(k) != Some(v) {
            out.push(Change::Vip(*k, *v));
        }
    }
    out.extend(
        from.tables
            .keys()
            .filter(|k| !to.tables.contains_key(k))
            .map(|k| Change::RemoveTable(*k)),
    );
    out.extend(
        from.nodes
            .keys()
            .filter(|n| !to.nodes.contains_key(n))
            .map(|n| Change::RemoveNode(*n)),
    );
    out.extend(
        from.task_links
            .keys()
            .filter(|a| !to.task_links.contains_key(a))
            .map(|a| Change::RemoveTaskLink(*a)),
    );
    out
}

fn map_error(name: &'static str, e: impl std::fmt::Display) -> EbpfError {
    EbpfError::Map {
        name,
        reason: e.to_string(),
    }
}

fn take(dataplane: &mut EbpfDataplane, name: &'static str) -> Result<Map, EbpfError> {
    dataplane
        .take_map(name)
        .ok_or_else(|| map_error(name, "not in the mesh-ebpf object"))
}

/// The maps the agent writes.
pub struct LbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vips: HashMap<MapData, u32, ServiceValue>,
    tables: HashMap<MapData, u32, Table>,
    backends: HashMap<MapData, u32, Backend>,
    nodes: HashMap<MapData, u32, u32>,
    task_links: HashMap<MapData, u32, u32>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    conntrack: HashMap<MapData, FlowKey, Conntrack>,
    host: Array<MapData, u64>,
}

/// What the counters say, by service-port ID and by backend ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Per service port (and VIP): packets and bytes toward tasks,
    /// connections this node picked a task for.
    pub services: BTreeMap<u32, ServiceStats>,
    /// Per backend running here: packets, bytes and connections toward it.
    pub backends: BTreeMap<u32, ServiceStats>,
    /// Tracked connections per service-port ID.
    pub conntrack: BTreeMap<u32, u64>,
}

fn sum(per_cpu: &[ServiceStats]) -> ServiceStats {
    per_cpu.iter().fold(ServiceStats::default(), |mut total, s| {
        total.packets += s.packets;
        total.bytes += s.bytes;
        total.connections += s.connections;
        total
    })
}

impl LbMaps {
    /// Takes the routing mesh's maps out of the loaded object.
    pub fn take(dataplane: &mut EbpfDataplane) -> Result<LbMaps, EbpfError> {
        Ok(LbMaps {
            services: HashMap::try_from(take(dataplane, SERVICES_MAP)?).map_err(|e| map_error(SERVICES_MAP, e))?,
            vips: HashMap::try_from(take(dataplane, VIPS_MAP)?).map_err(|e| map_error(VIPS_MAP, e))?,
            tables: HashMap::try_from(take(dataplane, TABLES_MAP)?).map_err(|e| map_error(TABLES_MAP, e))?,
            backends: HashMap::try_from(take(dataplane, BACKENDS_MAP)?).map_err(|e| map_error(BACKENDS_MAP, e))?,
            nodes: HashMap::try_from(take(dataplane, NODES_MAP)?).map_err(|e| map_error(NODES_MAP, e))?,
            task_links: HashMap::try_from(take(dataplane, TASK_LINKS_MAP)?)
                .map_err(|e| map_error(TASK_LINKS_MAP, e))?,
            config: Array::try_from(take(dataplane, CONFIG_MAP)?).map_err(|e| map_error(CONFIG_MAP, e))?,
            stats: PerCpuArray::try_from(take(dataplane, STATS_MAP)?).map_err(|e| map_error(STATS_MAP, e))?,
            backend_stats: PerCpuHashMap::try_from(take(dataplane, BACKEND_STATS_MAP)?)
                .map_err(|e| map_error(BACKEND_STATS_MAP, e))?,
            conntrack: HashMap::try_from(take(dataplane, CONNTRACK_MAP)?).map_err(|e| map_error(CONNTRACK_MAP, e))?,
            host: Array::try_from(take(dataplane, HOST_MAP)?).map_err(|e| map_error(HOST_MAP, e))?,
        })
    }

    /// Writes this node's addresses and links.
    pub fn set_config(&mut self, config: NodeConfig) -> Result<(), EbpfError> {
        self.config.set(0, config, 0).map_err(|e| map_error(CONFIG_MAP, e))
    }

    /// Writes the node's network namespace cookie: the `host_*` socket
    /// programs act on that namespace's sockets only (0: on none).
    pub(crate) fn set_host(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        self.host.set(0, netns_cookie, 0).map_err(|e| map_error(HOST_MAP, e))
    }

    /// Applies `changes` in order; stops at the first failure.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), EbpfError> {
        for change in changes {
            match change {
                Change::Backend(id, b) => self.backends.insert(id, b, 0).map_err(|e| map_error(BACKENDS_MAP, e))?,
                Change::Table(id, count, slots) => {
                    let mut table = Table {
                        count: *count,
                        ..Table::default()
                    };
                    for (slot, value) in table.slots.iter_mut().zip(slots) {
                        *slot = *value;
                    }
                    self.tables.insert(id, table, 0).map_err(|e| map_error(TABLES_MAP, e))?;
                }
                Change::Service(k, v) => self.services.insert(k, v, 0).map_err(|e| map_error(SERVICES_MAP, e))?,
                Change::Node(n, flags) => self.nodes.insert(n, flags, 0).map_err(|e| map_error(NODES_MAP, e))?,
                Change::TaskLink(a, link) => self
                    .task_links
                    .insert(a, link, 0)
                    .map_err(|e| map_error(TASK_LINKS_MAP, e))?,
                Change::Vip(k, v) => self.vips.insert(k, v, 0).map_err(|e| map_error(VIPS_MAP, e))?,
                Change::RemoveVip(k) => ignore_missing(self.vips.remove(k), VIPS_MAP)?,
                Change::RemoveService(k) => ignore_missing(self.services.remove(k), SERVICES_MAP)?,
                Change::RemoveTable(id) => {
                    ignore_missing(self.tables.remove(id), TABLES_MAP)?;
                    if id & LOCAL_TABLE == 0 {
                        // The ID is free again: its next service starts from zero.
                        self.reset_stats(*id)?;
                    }
                }
                Change::RemoveBackend(id) => {
                    ignore_missing(self.backends.remove(id), BACKENDS_MAP)?;
                    ignore_missing(self.backend_stats.remove(id), BACKEND_STATS_MAP)?;
                }
                Change::RemoveNode(n) => ignore_missing(self.nodes.remove(n), NODES_MAP)?,
                Change::RemoveTaskLink(a) => ignore_missing(self.task_links.remove(a), TASK_LINKS_MAP)?,
            }
        }
        Ok(())
    }

    fn reset_stats(&mut self, id: u32) -> Result<(), EbpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| map_error(STATS_MAP, format!("{what}: {e}")))?;
        let zero = PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|e| map_error(STATS_MAP, e))?;
        match self.stats.set(id, zero, 0) {
            // An ID beyond the array (never handed out): nothing to reset.
            Err(aya::maps::MapError::OutOfBounds { .. }) => Ok(()),
            other => other.map_err(|e| map_error(STATS_MAP, e)),
        }
    }

    /// What the maps hold now (table contents are left out: only their
    /// IDs matter to whoever takes the maps over).
    pub(crate) fn observe(&self) -> Result<LbState, EbpfError> {
        let mut state = LbState::default();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(|e| map_error(SERVICES_MAP, e))?;
            state.services.insert(k, v);
        }
        for entry in self.vips.iter() {
            let (k, v) = entry.map_err(|e| map_error(VIPS_MAP, e))?;
            state.vips.insert(k, v);
        }
        for key in self.tables.keys() {
            state
                .tables
                .insert(key.map_err(|e| map_error(TABLES_MAP, e))?, (0, Vec::new()));
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.map_err(|e| map_error(BACKENDS_MAP, e))?;
            state.backends.insert(k, v);
        }
        for entry in self.nodes.iter() {
            let (k, v) = entry.map_err(|e| map_error(NODES_MAP, e))?;
            state.nodes.insert(k, v);
        }
        for entry in self.task_links.iter() {
            let (k, v) = entry.map_err(|e| map_error(TASK_LINKS_MAP, e))?;
            state.task_links.insert(k, v);
        }
        Ok(state)
    }

    /// Every counter, summed over the CPUs, and the tracked connections
    /// per service port (one pass over the conntrack map).
    pub fn counters(&self, service_ids: impl IntoIterator<Item = u32>) -> Result<Counters, EbpfError> {
        let mut out = Counters::default();
        for id in service_ids {
            let per_cpu = self.stats.get(&id, 0).map_err(|e| map_error(STATS_MAP, e))?;
            out.services.insert(id, sum(&per_cpu));
        }
        for entry in self.backend_stats.iter() {
            let (id, per_cpu) = entry.map_err(|e| map_error(BACKEND_STATS_MAP, e))?;
            out.backends.insert(id, sum(&per_cpu));
        }
        for entry in self.conntrack.iter() {
            // An entry may be evicted while the walk goes on: skip it.
            let Ok((_, ct)) = entry else { continue };
            *out.conntrack.entry(ct.service).or_default() += 1;
        }
        Ok(out)
    }
}

/// A removal of a key that is not there is no failure (aya reports it as
/// KeyNotFound for some map types, as the syscall's ENOENT for others).
fn ignore_missing(result: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), EbpfError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_error(name, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(backends: &[u32]) -> LbState {
        let mut s = LbState::default();
        let key = ServiceKey {
            addr: 0,
            port: 8080u16.to_be(),
            proto: 6,
            pad: 0,
        };
        s.services.insert(
            key,
            ServiceValue {
                id: 1,
                target_port: 80u16.to_be(),
                ..Default::default()
            },
        );
        s.tables.insert(1, (backends.len() as u32, backends.to_vec()));
        for b in backends {
            s.backends.insert(
                *b,
                Backend {
                    node: 1,
                    local: 0,
                    route: 0,
                },
            );
        }
        s
    }

    #[test]
    fn backends_come_before_the_table_and_leave_after_it_but_before_the_service_entry() {
        let mut to = state(&[2, 3]);
        to.services.values_mut().for_each(|v| v.generation = 7);
        let changes = plan(&state(&[1, 2]), &to);
        assert_eq!(
            changes[..3],
            [
                Change::Backend(
                    3,
                    Backend {
                        node: 1,
                        local: 0,
                        route: 0
                    }
                ),
                Change::Table(1, 2, vec![2, 3]),
                Change::RemoveBackend(1),
            ]
        );
        assert!(
            matches!(changes[3], Change::Service(_, v) if v.generation == 7),
            "the new generation last: {changes:?}"
        );
        assert!(plan(&state(&[1]), &state(&[1])).is_empty());
        let gone = plan(&state(&[1]), &LbState::default());
        assert!(matches!(gone[0], Change::RemoveService(_)), "{gone:?}");
        assert_eq!(gone[1..], [Change::RemoveBackend(1), Change::RemoveTable(1)]);
    }
}
