//! The routing mesh on IPVS (`mesh-agent run --lb-backend ipvs`), the
//! Swarm-compatible backend for kernels or operators that want it. It
//! serves the same assignment as the eBPF programs, with IPVS virtual
//! services selected by firewall mark:
//!
//! - nftables marks a published port's packets to this node's address
//!   (dataplane/nftables/marks.rs): connections from clients get the
//!   port's *cluster* mark, connections another node passes on its
//!   *local* mark;
//! - the cluster service spreads over this node's tasks (the task address
//!   and target port) and the other nodes running tasks (their address
//!   and the published port, weighted by their task count); the local
//!   service over this node's tasks only, so a connection crosses at most
//!   one node;
//! - what goes on to another node leaves with this node's address (SNAT,
//!   with IPVS's conntrack on), so its reply comes back through here. The
//!   task then sees the entry node's address, not the client's, as in
//!   Swarm; connections served on their entry node keep the client's.
//!
//! A real server that leaves drains at weight 0 and goes once idle or
//! after [`DRAIN_TIMEOUT`]; a local task that is gone goes at once.
//! Service VIPs stay with the socket programs (`agent::mesh::kernel`), which
//! need no IPVS.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::agent::tasks::supervisor::task_dir_name;
use crate::{
    api::{
        assignment::mesh::MeshAssignment,
        service::{LbAlgorithm, LbOptions, Protocol, PublishMode},
    },
    dataplane::{
        genl::GenlError,
        ipvs::{plan, Change, Dest, DestId, Ipvs, IpvsState, Schedule, Service, ServiceId, Stats, SCHED_MH_PORT},
        nftables::{
            self,
            marks::{ipvs_marks_batch, remove_ipvs_marks_batch, IpvsMarks, MarkedPort},
            NftError,
        },
    },
    metrics::{BackendFacts, PortFacts},
};

/// The agent's firewall marks: `0x6d` ('m') in the top byte, then the
/// local bit, the UDP bit and the port.
const MARK_BASE: u32 = 0x6d00_0000;
const MARK_OWNER_MASK: u32 = 0xff00_0000;
const MARK_LOCAL: u32 = 1 << 17;
const MARK_UDP: u32 = 1 << 16;

/// How long a real server that left may keep its connections.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// IPVS settings the mesh relies on, as libnetwork sets them: conntrack
/// on (the SNAT rule and the node's masquerading see IPVS connections),
/// a packet for a deleted real server drops its connection (the client
/// gets a reset on its next try instead of hanging), and a persistence
/// template for a real server at weight 0 expires.
const SYSCTLS: [(&str, &str); 3] = [
    ("/proc/sys/net/ipv4/vs/conntrack", "1"),
    ("/proc/sys/net/ipv4/vs/expire_nodest_conn", "1"),
    ("/proc/sys/net/ipv4/vs/expire_quiescent_template", "1"),
];

/// The mark of a published port's connections.
pub(crate) fn mark(protocol: Protocol, port: u16, local: bool) -> u32 {
    let udp = if protocol == Protocol::Udp { MARK_UDP } else { 0 };
    let local = if local { MARK_LOCAL } else { 0 };
    MARK_BASE | local | udp | u32::from(port)
}

/// Whether a virtual service is the agent's.
pub fn owned(id: &ServiceId) -> bool {
    matches!(id, ServiceId::Mark(m) if m & MARK_OWNER_MASK == MARK_BASE)
}

/// The IPVS scheduler for a service's options. Maglev is `mh` over the
/// client's address and port (per connection, as the eBPF tables hash).
/// IPVS has no random scheduler: `random` is served round-robin, which
/// spreads the same. Client-IP affinity is `mh` over the client's address
/// alone, whatever the algorithm: a client always hashes to the same task
/// (and never times out). IPVS persistence cannot serve it: a persistent
/// fwmark service sends connections to the real server on the client's
/// destination port, not the real server's (ip_vs_sched_persist), and the
/// tasks listen on their target port.
pub(crate) fn schedule(lb: &LbOptions) -> Schedule {
    let (scheduler, scheduler_flags) = match lb.algorithm {
        _ if lb.client_affinity => ("mh", 0),
        LbAlgorithm::Maglev => ("mh", SCHED_MH_PORT),
        LbAlgorithm::Random | LbAlgorithm::RoundRobin => ("rr", 0),
    };
    Schedule {
        scheduler: scheduler.into(),
        scheduler_flags,
        persistence_s: 0,
    }
}

/// What IPVS and the firewall hold for `mesh` on the node at `node`, with
/// these local task addresses (a local task without one is left out).
pub(crate) fn wanted(mesh: &MeshAssignment, local: &BTreeMap<u64, Ipv4Addr>, node: Ipv4Addr) -> (IpvsState, IpvsMarks) {
    let mut services = IpvsState::new();
    let mut ports = Vec::new();
    for service in &mesh.services {
        let schedule = schedule(&service.lb);
        let mut peers: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        let mut tasks = Vec::new();
        for b in &service.backends {
            if b.local {
                tasks.extend(local.get(&b.task).copied());
            } else if let Ok(addr) = b.node_addr.parse::<Ipv4Addr>() {
                *peers.entry(addr).or_default() += 1;
            }
        }
        for port in &service.ports {
            let to_tasks = tasks.iter().map(|addr| {
                (
                    DestId {
                        addr: *addr,
                        port: port.target,
                    },
                    weight(1),
                )
            });
            let local_mark = mark(port.protocol, port.published, true);
            services.insert(
                ServiceId::Mark(local_mark),
                Service {
                    schedule: schedule.clone(),
                    dests: to_tasks.clone().collect(),
                    ..Service::default()
                },
            );
            let clients = (port.mode == PublishMode::Ingress).then(|| {
                let cluster = mark(port.protocol, port.published, false);
                let to_peers = peers.iter().map(|(addr, n)| {
                    (
                        DestId {
                            addr: *addr,
                            port: port.published,
                        },
                        weight(*n),
                    )
                });
                services.insert(
                    ServiceId::Mark(cluster),
                    Service {
                        schedule: schedule.clone(),
                        dests: to_tasks.chain(to_peers).collect(),
                        ..Service::default()
                    },
                );
                cluster
            });
            ports.push(MarkedPort {
                protocol: port.protocol.number(),
                port: port.published,
                clients,
                local: local_mark,
            });
        }
    }
    let marks = IpvsMarks {
        node,
        peers: mesh.peers.iter().filter_map(|p| p.parse().ok()).collect(),
        ports,
        snat_mask: MARK_OWNER_MASK | MARK_LOCAL,
        snat_bits: MARK_BASE,
    };
    (services, marks)
}

fn weight(weight: u32) -> Dest {
    Dest {
        weight,
        ..Dest::default()
    }
}

/// Errors of the IPVS backend.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IpvsMeshError {
    #[error("IPVS: {0}")]
    Ipvs(#[from] GenlError),
    #[error("the IPVS mark table: {0}")]
    Nft(#[from] NftError),
    #[error("setting {0}: {1}")]
    Sysctl(&'static str, std::io::Error),
}

/// What [`IpvsMesh::counters`] reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IpvsCounters {
    pub(crate) ports: BTreeMap<(u8, u16), (Stats, u64)>,
    pub(crate) dests: BTreeMap<Ipv4Addr, Stats>,
}

fn add(total: &mut Stats, more: &Stats) {
    total.connections += more.connections;
    total.packets_in += more.packets_in;
    total.packets_out += more.packets_out;
    total.bytes_in += more.bytes_in;
    total.bytes_out += more.bytes_out;
}

/// IPVS's counters as metrics: per published port of `mesh` (its
/// services summed), and per local task, found by its address in `local`.
pub(crate) fn facts(
    counters: &IpvsCounters,
    mesh: &MeshAssignment,
    local: &BTreeMap<u64, Ipv4Addr>,
) -> (Vec<PortFacts>, Vec<BackendFacts>) {
    let mut ports = Vec::new();
    let mut backends = Vec::new();
    for s in &mesh.services {
        for p in &s.ports {
            if let Some((stats, tracked)) = counters.ports.get(&(p.protocol.number(), p.published)) {
                ports.push(PortFacts {
                    service: s.name.clone(),
                    kind: "published",
                    port: p.published,
                    protocol: p.protocol.name(),
                    packets: stats.packets(),
                    bytes: stats.bytes(),
                    connections: stats.connections,
                    conntrack: *tracked,
                });
            }
        }
        for b in s.backends.iter().filter(|b| b.local) {
            if let Some(stats) = local.get(&b.task).and_then(|a| counters.dests.get(a)) {
                backends.push(BackendFacts {
                    service: s.name.clone(),
                    task: task_dir_name(b.task),
                    packets: stats.packets(),
                    bytes: stats.bytes(),
                    connections: stats.connections,
                });
            }
        }
    }
    (ports, backends)
}

/// The IPVS routing mesh of this node.
pub(crate) struct IpvsMesh {
    ipvs: Ipvs,
    /// The mark table as last written.
    marks: Option<IpvsMarks>,
    /// Real servers draining, since when.
    draining: BTreeMap<(ServiceId, DestId), Instant>,
}

impl IpvsMesh {
    /// Opens IPVS (the error says when the kernel has none) and sets the
    /// IPVS settings of the node's namespace.
    pub(crate) fn open() -> Result<IpvsMesh, IpvsMeshError> {
        let ipvs = Ipvs::open()?;
        for (path, value) in SYSCTLS {
            std::fs::write(path, value).map_err(|e| IpvsMeshError::Sysctl(path, e))?;
        }
        Ok(IpvsMesh {
            ipvs,
            marks: None,
            draining: BTreeMap::new(),
        })
    }

    /// Brings IPVS and the mark table in line with `mesh`; true while a
    /// real server drains (call again later to delete it).
    pub(crate) fn sync(
        &mut self,
        mesh: &MeshAssignment,
        local: &BTreeMap<u64, Ipv4Addr>,
        node: Ipv4Addr,
    ) -> Result<bool, IpvsMeshError> {
        let (want, marks) = wanted(mesh, local, node);
        let found = self.ipvs.observe(owned)?;
        let now = Instant::now();
        let tasks: BTreeSet<Ipv4Addr> = local.values().copied().collect();
        let nodes: BTreeSet<Ipv4Addr> = marks.peers.iter().copied().collect();
        // Real servers that are not wanted drain, from when first seen so.
        let wanted = |id: &ServiceId, d: &DestId| want.get(id).is_some_and(|s| s.dests.contains_key(d));
        self.draining = found
            .iter()
            .flat_map(|(id, s)| s.dests.keys().map(move |d| (*id, *d)))
            .filter(|(id, d)| !wanted(id, d))
            .map(|k| (k, self.draining.get(&k).copied().unwrap_or(now)))
            .collect();
        let draining = &self.draining;
        let expired = |id: &ServiceId, d: &DestId| {
            // A local task that is gone has nothing left to finish.
            let task_gone = !nodes.contains(&d.addr) && !tasks.contains(&d.addr);
            task_gone
                || draining
                    .get(&(*id, *d))
                    .is_some_and(|since| now - *since >= DRAIN_TIMEOUT)
        };
        let changes = plan(&want, &found, expired);
        // IPVS first, so a new mark never points at a missing service; a
        // mark left a moment for a removed one sends its packets to the
        // node's stack, which refuses them.
        self.ipvs.apply(&changes)?;
        if self.marks.as_ref() != Some(&marks) {
            nftables::send_batch(&ipvs_marks_batch(&marks))?;
            self.marks = Some(marks);
        }
        // Still draining: an unwanted real server this pass did not delete.
        Ok(self
            .draining
            .keys()
            .any(|(id, d)| !changes.contains(&Change::DelDest(*id, *d))))
    }

    /// IPVS's counters: per published port (protocol number, port), its
    /// services' statistics summed and the connections IPVS tracks on
    /// them; per real server address, its statistics (local tasks are
    /// told apart by their address).
    pub(crate) fn counters(&mut self) -> Result<IpvsCounters, IpvsMeshError> {
        let mut out = IpvsCounters::default();
        for (id, service) in self.ipvs.observe(owned)? {
            let ServiceId::Mark(m) = id else { continue };
            let protocol = if m & MARK_UDP != 0 { 17 } else { 6 };
            let (stats, tracked) = out.ports.entry((protocol, m as u16)).or_default();
            add(stats, &service.stats);
            for (dest, d) in &service.dests {
                *tracked += u64::from(d.active) + u64::from(d.inactive);
                add(out.dests.entry(dest.addr).or_default(), &d.stats);
            }
        }
        Ok(out)
    }

    /// Removes the mark table and every agent virtual service at once (the
    /// node leaves the swarm or serves no published port any more).
    pub(crate) fn remove_all(&mut self) -> Result<(), IpvsMeshError> {
        nftables::send_batch(&remove_ipvs_marks_batch())?;
        self.marks = None;
        self.draining.clear();
        let found = self.ipvs.observe(owned)?;
        self.ipvs.apply(&plan(&IpvsState::new(), &found, |_, _| true))?;
        Ok(())
    }
}

/// Removes what an agent on the IPVS backend left (this one runs on
/// eBPF now): its mark table, and its virtual services when the kernel
/// has IPVS at all.
pub(crate) fn remove_leftovers() -> Result<(), IpvsMeshError> {
    nftables::send_batch(&remove_ipvs_marks_batch())?;
    let Ok(mut ipvs) = Ipvs::open() else {
        return Ok(());
    };
    let found = ipvs.observe(owned)?;
    if !found.is_empty() {
        log::info!(
            "routing mesh: removing {} IPVS services an agent on --lb-backend ipvs left",
            found.len()
        );
        ipvs.apply(&plan(&IpvsState::new(), &found, |_, _| true))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        assignment::mesh::{MeshBackend, MeshService},
        service::PortPublish,
    };

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn backend(task: u64, node: &str, local: bool) -> MeshBackend {
        MeshBackend {
            task,
            node_addr: node.into(),
            local,
        }
    }

    fn mesh(mode: PublishMode) -> MeshAssignment {
        MeshAssignment {
            services: vec![MeshService {
                service: 1,
                name: "web".into(),
                ports: vec![PortPublish {
                    published: 8080,
                    target: 80,
                    protocol: Protocol::Tcp,
                    mode,
                }],
                lb: LbOptions::default(),
                backends: vec![
                    backend(10, "192.0.2.1", true),
                    backend(11, "192.0.2.2", false),
                    backend(12, "192.0.2.2", false),
                    backend(13, "192.0.2.3", false),
                    backend(14, "192.0.2.1", true),
                ],
                runs_here: true,
                digest: 0,
            }],
            peers: vec!["192.0.2.2".into(), "192.0.2.3".into()],
        }
    }

    fn dest(addr: [u8; 4], port: u16) -> DestId {
        DestId {
            addr: Ipv4Addr::from(addr),
            port,
        }
    }

    #[test]
    fn clients_spread_over_local_tasks_and_other_nodes_peers_over_local_tasks() {
        // Task 14 has no address here yet: left out.
        let local = BTreeMap::from([(10, Ipv4Addr::new(172, 31, 0, 2))]);
        let (services, marks) = wanted(&mesh(PublishMode::Ingress), &local, NODE);
        let cluster = &services[&ServiceId::Mark(mark(Protocol::Tcp, 8080, false))];
        assert_eq!(cluster.schedule.scheduler, "mh");
        let dests: Vec<(DestId, u32)> = cluster.dests.iter().map(|(d, v)| (*d, v.weight)).collect();
        assert_eq!(
            dests,
            vec![
                (dest([172, 31, 0, 2], 80), 1),
                (dest([192, 0, 2, 2], 8080), 2),
                (dest([192, 0, 2, 3], 8080), 1),
            ],
            "the local task on its target port, other nodes on the published port by task count"
        );
        let local_only = &services[&ServiceId::Mark(mark(Protocol::Tcp, 8080, true))];
        assert_eq!(
            local_only.dests.keys().copied().collect::<Vec<_>>(),
            vec![dest([172, 31, 0, 2], 80)]
        );
        assert_eq!(marks.ports.len(), 1);
        assert_eq!(marks.ports[0].clients, Some(mark(Protocol::Tcp, 8080, false)));
        assert_eq!(marks.peers.len(), 2);
        // Only the cluster mark is SNATed toward peers.
        let snat = |m: u32| m & marks.snat_mask == marks.snat_bits;
        assert!(snat(mark(Protocol::Tcp, 8080, false)) && snat(mark(Protocol::Udp, 53, false)));
        assert!(!snat(mark(Protocol::Tcp, 8080, true)) && !snat(0x1));
        assert!(owned(&ServiceId::Mark(mark(Protocol::Udp, 1, true))));
        assert!(!owned(&ServiceId::Mark(0x1)));
    }

    #[test]
    fn a_host_mode_port_is_only_its_local_tasks() {
        let local = BTreeMap::from([(10, Ipv4Addr::new(172, 31, 0, 2)), (14, Ipv4Addr::new(172, 31, 0, 3))]);
        let (services, marks) = wanted(&mesh(PublishMode::Host), &local, NODE);
        assert_eq!(services.len(), 1);
        assert_eq!(services.values().next().unwrap().dests.len(), 2);
        assert_eq!(marks.ports[0].clients, None);
    }

    #[test]
    fn affinity_hashes_the_client_address_and_random_is_round_robin() {
        let sticky = schedule(&LbOptions {
            algorithm: LbAlgorithm::Random,
            client_affinity: true,
            affinity_timeout_s: 600,
        });
        assert_eq!((sticky.scheduler.as_str(), sticky.scheduler_flags), ("mh", 0));
        let plain = schedule(&LbOptions::default());
        assert_eq!((plain.scheduler.as_str(), plain.scheduler_flags), ("mh", SCHED_MH_PORT));
        let random = schedule(&LbOptions {
            algorithm: LbAlgorithm::Random,
            ..LbOptions::default()
        });
        assert_eq!(random.scheduler, "rr");
    }
}
