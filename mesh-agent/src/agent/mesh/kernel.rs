//! The node's routing mesh: its published ports answered by the eBPF
//! programs (mesh-ebpf's `lb` module) and its tasks' VIPs by the socket
//! programs (`sock`), with the maps kept in step with the assignments and
//! with the local tasks' addresses.
//!
//! Kernel objects:
//! - while the node answers a published port: `tc_ingress` on the underlay
//!   link (the one holding the data-path address), `tc_reply` on the task
//!   bridge, `tc_tunnel` on [`TUNNEL_DEVICE`], a metadata-mode VXLAN device
//!   on the routing-mesh port ([`crate::api::assignment::mesh::tunnel_port`]) for nodes off the link,
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

use mesh_common::lb::{NodeConfig, PINNED_MAPS};

use crate::agent::mesh::tables::wire_addr;
pub use crate::agent::mesh::tables::{BackendKey, MeshTables, PortCounters, PortKey, TaskCounters};
use crate::agent::{
    mesh::ipvs::IpvsMesh,
    net::bridge::{Attachment, LocalNetwork, BRIDGE},
    tasks::supervisor::task_dir_name,
};
use crate::metrics::{BackendFacts, PortFacts};
use crate::{
    api::{
        assignment::{discovery::NetworkServices, mesh::MeshAssignment},
        messages::Assignments,
        objects::node_id_text,
        service::Protocol,
    },
    dataplane::{
        ebpf::{preferred_tc_api, EbpfDataplane, TcApi},
        lb::{LbMaps, LbState},
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
    /// (`agent::mesh::ipvs`); tasks on other nodes see the entry node's
    /// address instead of the client's.
    Ipvs,
}

/// Errors setting the routing mesh up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MeshError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Ebpf(#[from] crate::dataplane::ebpf::EbpfError),
    #[error(transparent)]
    Network(#[from] crate::agent::net::bridge::NetworkError),
    #[error("the data-path address {0} is on no link of this node")]
    NoUnderlay(Ipv4Addr),
    #[error("the data-path address {0:?} is not an IPv4 address (the routing mesh is IPv4 for now)")]
    NotIpv4(String),
    #[error(transparent)]
    Ipvs(#[from] crate::agent::mesh::ipvs::IpvsMeshError),
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
    link: Option<crate::api::subnet::Subnet>,
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
pub(crate) struct RoutingMesh {
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
    /// `agent::mesh::bpffs`); nothing is made before it is needed. Follows the
    /// local tasks' addresses.
    pub(crate) fn new(
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
    pub(crate) async fn apply(&self, assignments: &Assignments) -> Result<(), MeshError> {
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
    pub(crate) fn counters(&self) -> Result<(Vec<PortCounters>, Vec<TaskCounters>), MeshError> {
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
    pub(crate) fn metrics(&self) -> (Vec<PortFacts>, Vec<BackendFacts>) {
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
                let (p, b) = crate::agent::mesh::ipvs::facts(&c, &mesh, &self.network.addresses());
                ports.extend(p);
                backends.extend(b);
            }
            Some(Err(e)) => log::warn!("metrics: reading IPVS statistics: {e}"),
            None => {}
        }
        (ports, backends)
    }

    /// Removes everything (the node leaves the swarm).
    pub(crate) async fn remove_all(&self) {
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
        .map_err(|e| MeshError::Network(crate::agent::net::bridge::NetworkError::Worker(e.to_string())))?
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
            Some((mesh.clone(), vtep, crate::api::assignment::mesh::tunnel_port(*port)))
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
            if let Err(e) = crate::agent::mesh::ipvs::remove_leftovers() {
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
        crate::api::subnet::Subnet::parse(&format!("{}/{p}", Ipv4Addr::from(u32::from(vtep) & mask))).ok()
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
pub(crate) const PROGRAM_FROM_TASK: &str = "tc_from_task";
