//! This node's side of the overlay networks: what the kernel should hold
//! for the node's assignments ([`wanted`], pure), kept in line
//! incrementally ([`Overlays::apply`]: only the differences are written),
//! and each task's port on each of its networks ([`Overlays::attach`]).
//!
//! A plain network's VXLAN device encapsulates from the node's data-path
//! address; a WireGuard-encrypted one's from the node's tunnel address, so
//! its traffic is routed into the WireGuard tunnel ([`crate::agent::net::tunnel`]); an
//! IPsec one's from the data-path address to the IPsec VXLAN port, which
//! the kernel wraps in ESP ([`crate::agent::net::ipsec`]). The tunnel and the IPsec
//! policies are set up before the first network that needs them and
//! removed after the last.
//!
//! On start the first apply reads what the kernel has (an earlier agent's
//! networks are adopted, stale ones removed); after that the state last
//! written is the reference, and any failure makes the next apply read the
//! kernel again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::agent::net::{
    error::NetError,
    ipsec::{Ipsec, ESP_OVERHEAD},
    netns::NetNs,
    tunnel::{Tunnel, VXLAN6_OVERHEAD, WIREGUARD_OVERHEAD},
};
use crate::{
    api::{
        assignment::{ipsec::IpsecAssignment, tunnel::TunnelAssignment},
        messages::Assignments,
        network::{Encryption, TaskNetwork},
    },
    dataplane::{
        netlink::{Mac, Netlink, NetlinkError},
        vxlan::{self, OverlayState, TaskPort},
        wireguard::Key,
    },
};

/// VXLAN's overhead on IPv4: outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14.
pub(crate) const VXLAN_OVERHEAD: u32 = 50;

/// The underlay MTU assumed when the data-path address is on no link here.
const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The smallest overlay MTU (IPv4's minimum datagram every host takes).
const MIN_MTU: u32 = 576;

/// A task's MAC on an overlay, derived from its address as Docker does
/// (02:42 and the four address bytes): unique on the network, and every
/// node computes it without asking.
pub fn task_mac(address: Ipv4Addr) -> Mac {
    let [a, b, c, d] = address.octets();
    [0x02, 0x42, a, b, c, d]
}

/// A network's MTU: the one it was created with, or the underlay's minus
/// the overhead of how it travels (VXLAN; WireGuard and VXLAN over the
/// tunnel addresses, or ESP and VXLAN, when encrypted).
pub(crate) fn network_mtu(fixed: Option<u32>, encryption: Encryption, underlay: u32) -> u32 {
    let overhead = match encryption {
        Encryption::WireGuard => WIREGUARD_OVERHEAD + VXLAN6_OVERHEAD,
        Encryption::Ipsec => ESP_OVERHEAD + VXLAN_OVERHEAD,
        Encryption::None => VXLAN_OVERHEAD,
    };
    fixed.unwrap_or_else(|| underlay.saturating_sub(overhead).max(MIN_MTU))
}

/// The host end of task `task`'s veth on its `position`-th overlay
/// (1-based): `m`, one hex digit, 12 of the task ID; the node bridge's
/// `mv...` never collides since `v` is no hex digit.
pub(crate) fn host_link_name(task: u64, position: usize) -> String {
    format!("m{position:x}{:012x}", task & 0xffff_ffff_ffff)
}

/// How this node can carry an encrypted network's traffic right now.
#[derive(Clone, Copy, Debug, Default)]
struct Carriers {
    /// The node's tunnel address, while the WireGuard tunnel is wanted.
    tunnel: Option<Ipv6Addr>,
    /// The IPsec VXLAN port, while the IPsec policies are in place.
    ipsec_port: Option<u16>,
}

/// Where network traffic of `encryption` is encapsulated from on this
/// node, and to which port, if it can be: the data-path address, or the
/// tunnel address. `None` for an encrypted network whose carrier is not
/// up: nothing of it is made, so nothing is sent in clear.
fn local_address(
    encryption: Encryption,
    vtep: Option<Ipv4Addr>,
    port: u16,
    carriers: Carriers,
) -> Option<(IpAddr, u16)> {
    match encryption {
        Encryption::None => Some((IpAddr::V4(vtep?), port)),
        Encryption::WireGuard => Some((IpAddr::V6(carriers.tunnel?), port)),
        Encryption::Ipsec => Some((IpAddr::V4(vtep?), carriers.ipsec_port?)),
    }
}

/// What the kernel should hold for `assignments`: each network a task here
/// is on, with an FDB and a neighbour entry for every endpoint on another
/// node. A WireGuard network's entries point at the other nodes' tunnel
/// addresses, an IPsec network's at their data-path addresses; an endpoint
/// whose node has no tunnel peer or no associations yet gets no entry, so
/// nothing of it is ever sent in clear. `ipsec_up`: the IPsec policies
/// are in place (without them, IPsec networks are not made).
pub fn wanted(assignments: &Assignments, underlay_mtu: u32, ipsec_up: bool) -> BTreeMap<u32, OverlayState> {
    let vtep = assignments.vtep.parse::<Ipv4Addr>().ok();
    let tunnel = assignments.tunnel.as_ref();
    let carriers = Carriers {
        tunnel: tunnel.map(|t| t.address),
        ipsec_port: assignments.ipsec.as_ref().filter(|_| ipsec_up).map(|i| i.port),
    };
    let tunnel_of: BTreeMap<IpAddr, Ipv6Addr> = tunnel
        .map(|t| t.peers.iter().map(|p| (p.endpoint.ip(), p.address)).collect())
        .unwrap_or_default();
    let keyed: BTreeSet<IpAddr> = assignments
        .ipsec
        .iter()
        .flat_map(|i| &i.peers)
        .filter(|p| !p.epochs.is_empty())
        .map(|p| IpAddr::V4(p.address))
        .collect();
    let mut out: BTreeMap<u32, OverlayState> = BTreeMap::new();
    let mut encryption_of = BTreeMap::new();
    for n in assignments.tasks.iter().flat_map(|t| &t.spec.networks) {
        let state = out.entry(n.vni).or_default();
        state.mtu = network_mtu(n.mtu, n.encryption, underlay_mtu);
        let local = local_address(n.encryption, vtep, assignments.data_path_port, carriers);
        state.local = local.map(|(a, _)| a);
        state.port = local.map_or(0, |(_, p)| p);
        encryption_of.insert(n.vni, n.encryption);
    }
    for network in &assignments.networks {
        let Some(state) = out.get_mut(&network.vni) else {
            continue;
        };
        for peer in network.peers.iter().filter(|p| p.vtep != assignments.vtep) {
            let Ok(node) = peer.vtep.parse::<IpAddr>() else {
                continue;
            };
            let dst = match encryption_of.get(&network.vni) {
                Some(Encryption::WireGuard) => match tunnel_of.get(&node) {
                    Some(a) => IpAddr::V6(*a),
                    None => continue,
                },
                Some(Encryption::Ipsec) if !keyed.contains(&node) => continue,
                _ => node,
            };
            let mac = task_mac(peer.address);
            state.fdb.insert(mac, dst);
            state.neighbours.insert(peer.address, mac);
        }
    }
    out
}

struct Inner {
    /// This node's data-path address, from the assignments.
    vtep: Option<Ipv4Addr>,
    /// The swarm's VXLAN port.
    port: u16,
    /// The underlay's MTU, read once the data-path address is known.
    underlay_mtu: Option<u32>,
    /// What the kernel holds, as last written or read (`None`: read it).
    known: Option<BTreeMap<u32, OverlayState>>,
    /// The host-side links of each task's ports.
    ports: BTreeMap<u64, Vec<String>>,
    /// The WireGuard tunnel (taken out while a blocking thread works on it).
    tunnel: Option<Tunnel>,
    /// Its address, while it is up.
    tunnel_address: Option<Ipv6Addr>,
    /// The IPsec policies and associations (taken out while a blocking
    /// thread works on them).
    ipsec: Option<Ipsec>,
    /// The IPsec VXLAN port, while the policies are in place.
    ipsec_port: Option<u16>,
    /// Everything was removed (the node leaves): a late assignment must
    /// not make it again.
    closed: bool,
}

/// The node's overlay networks.
pub(crate) struct Overlays {
    inner: tokio::sync::Mutex<Inner>,
    public_key: Key,
}

impl Overlays {
    /// Nothing known yet; nothing is touched before the first apply.
    /// `tunnel` is the node's WireGuard tunnel, used by encrypted networks.
    pub(crate) fn new(tunnel: Tunnel) -> Overlays {
        Overlays {
            public_key: tunnel.public_key(),
            inner: tokio::sync::Mutex::new(Inner {
                vtep: None,
                port: 0,
                underlay_mtu: None,
                known: None,
                ports: BTreeMap::new(),
                tunnel: Some(tunnel),
                tunnel_address: None,
                ipsec: Some(Ipsec::new()),
                ipsec_port: None,
                closed: false,
            }),
        }
    }

    /// The node's WireGuard public key.
    pub(crate) fn public_key(&self) -> Key {
        self.public_key
    }

    /// The WireGuard tunnel's per-peer statistics (empty while it is down,
    /// or busy being reconfigured).
    pub(crate) async fn tunnel_stats(&self) -> Vec<crate::dataplane::wireguard::PeerStats> {
        let inner = self.inner.lock().await;
        inner.tunnel.as_ref().map(Tunnel::peer_stats).unwrap_or_default()
    }

    /// Brings the kernel in line with `assignments`, writing only what
    /// differs. Logs and returns the first failure (the next call reads
    /// the kernel again).
    pub(crate) async fn apply(&self, assignments: &Assignments) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        if inner.closed {
            return Ok(());
        }
        let Ok(local) = assignments.vtep.parse::<Ipv4Addr>() else {
            // No IPv4 data-path address (an older manager, or IPv6): no
            // overlays are possible, and tasks on one are refused at attach.
            return Ok(());
        };
        if inner.vtep != Some(local) || inner.port != assignments.data_path_port {
            // Devices made for another address or port.
            inner.known = None;
            inner.underlay_mtu = None;
            inner.vtep = Some(local);
            inner.port = assignments.data_path_port;
        }
        let underlay = match inner.underlay_mtu {
            Some(m) => m,
            None => {
                let m = blocking("reading the underlay MTU", move |nl| async move {
                    vxlan::underlay_mtu(&nl, local).await
                })
                .await?
                .unwrap_or(DEFAULT_UNDERLAY_MTU);
                inner.underlay_mtu = Some(m);
                m
            }
        };
        // The tunnel and IPsec are up before the networks that use them,
        // and go after.
        if assignments.tunnel.is_some() {
            apply_tunnel(&mut inner, assignments.tunnel.clone(), underlay).await?;
        }
        // IPsec that cannot be set up keeps its networks unmade (their
        // tasks are refused) but must not hold up the other networks.
        let mut ipsec_failed = None;
        if assignments.ipsec.is_some() {
            ipsec_failed = apply_ipsec(&mut inner, assignments.ipsec.clone(), local).await.err();
        }
        let wanted = wanted(assignments, underlay, inner.ipsec_port.is_some());
        sync(&mut inner, move |_| wanted).await?;
        if assignments.tunnel.is_none() {
            apply_tunnel(&mut inner, None, underlay).await?;
        }
        if assignments.ipsec.is_none() {
            apply_ipsec(&mut inner, None, local).await?;
        }
        ipsec_failed.map_or(Ok(()), Err)
    }

    /// Puts task `task` (namespace at `netns`) on each of `networks`:
    /// interface `eth1`, `eth2`, ... in order, with its address and the
    /// network's MTU. Creates a network's devices if the task is the
    /// first here to need them.
    pub(crate) async fn attach(&self, task: u64, netns: &Path, networks: &[TaskNetwork]) -> Result<(), NetError> {
        if networks.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.lock().await;
        if inner.closed {
            return Err(NetError::Leaving);
        }
        let (Some(vtep), Some(underlay)) = (inner.vtep, inner.underlay_mtu) else {
            return Err(NetError::NoDataPathAddress);
        };
        let carriers = Carriers {
            tunnel: inner.tunnel_address,
            ipsec_port: inner.ipsec_port,
        };
        let mut needed = Vec::new();
        for n in networks {
            let Some(local) = local_address(n.encryption, Some(vtep), inner.port, carriers) else {
                return Err(carrier_missing(&mut inner, n).await);
            };
            needed.push((n.vni, network_mtu(n.mtu, n.encryption, underlay), local));
        }
        let ports: Vec<TaskPort> = networks
            .iter()
            .zip(&needed)
            .enumerate()
            .map(|(i, (n, (_, mtu, _)))| TaskPort {
                vni: n.vni,
                host_link: host_link_name(task, i + 1),
                inside: format!("eth{}", i + 1),
                mac: task_mac(n.address),
                address: n.address,
                prefix: n.subnet.prefix,
                mtu: *mtu,
            })
            .collect();
        // Networks this task is the first to need; the others as they are.
        sync(&mut inner, move |current| {
            let mut wanted = current.clone();
            for (vni, mtu, (local, port)) in needed {
                wanted.entry(vni).or_insert_with(|| OverlayState {
                    local: Some(local),
                    port,
                    mtu,
                    ..OverlayState::default()
                });
            }
            wanted
        })
        .await?;
        inner
            .ports
            .insert(task, ports.iter().map(|p| p.host_link.clone()).collect());
        let netns = netns.to_path_buf();
        let attaching = "attaching the task to its overlay networks";
        let plugged = tokio::task::spawn_blocking(move || -> Result<(), NetError> {
            let ns = NetNs::open_at(&netns, "task").map_err(NetError::kernel(attaching))?;
            let host_side = &ports;
            Netlink::run(|nl| async move {
                for p in host_side {
                    vxlan::plug(&nl, p, ns.fd()).await?;
                }
                Ok(())
            })
            .map_err(NetError::kernel(attaching))?;
            let ns = NetNs::open_at(&netns, "task").map_err(NetError::kernel(attaching))?;
            ns.run(move || {
                Netlink::run(|nl| async move {
                    for p in &ports {
                        vxlan::configure_inside(&nl, p).await?;
                    }
                    Ok(())
                })
            })
            .map_err(NetError::kernel(attaching))?
            .map_err(NetError::kernel(attaching))
        })
        .await
        .map_err(|source| NetError::Worker {
            what: "overlay",
            source,
        })?;
        plugged
    }

    /// Takes over the ports a previous agent made for task `task` on its
    /// `networks` overlays (their names follow from the task and position).
    pub(crate) async fn adopt(&self, task: u64, networks: usize) {
        if networks > 0 {
            let links = (1..=networks).map(|i| host_link_name(task, i)).collect();
            self.inner.lock().await.ports.insert(task, links);
        }
    }

    /// Removes task `task`'s ports (its namespace may be gone already,
    /// taking them with it).
    pub(crate) async fn detach(&self, task: u64) {
        let Some(links) = self.inner.lock().await.ports.remove(&task) else {
            return;
        };
        let removed = blocking("removing the task's overlay ports", move |nl| async move {
            for name in &links {
                match nl.delete_link(name).await {
                    Ok(()) | Err(NetlinkError::NoSuchLink(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = removed {
            log::warn!("detaching task {task}: {e}");
        }
    }

    /// Removes every overlay network of this node, and its tunnel (it
    /// leaves the swarm).
    pub(crate) async fn remove_all(&self) {
        let mut inner = self.inner.lock().await;
        inner.closed = true;
        inner.known = None;
        if let Err(e) = sync(&mut inner, |_| BTreeMap::new()).await {
            log::warn!("removing the overlay networks: {e}");
        }
        inner.ports.clear();
        let underlay = inner.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
        if let Err(e) = apply_tunnel(&mut inner, None, underlay).await {
            log::warn!("removing the WireGuard tunnel: {e}");
        }
        if let Some(local) = inner.vtep {
            if let Err(e) = apply_ipsec(&mut inner, None, local).await {
                log::warn!("removing IPsec: {e}");
            }
        }
    }
}

/// Why task traffic of network `n` cannot be carried here: its carrier
/// (the WireGuard tunnel, or IPsec) is not up, and why.
async fn carrier_missing(inner: &mut Inner, n: &TaskNetwork) -> NetError {
    if n.encryption != Encryption::Ipsec {
        return NetError::CarrierMissing(format!(
            "network {} is encrypted and this node's WireGuard tunnel is not up",
            n.name
        ));
    }
    let why = match on_blocking(&mut inner.ipsec, "IPsec", Ipsec::supported).await {
        Ok(Err(e)) => format!(
            "network {} is encrypted with IPsec and this node's kernel cannot do it ({e}); the task is not started rather than sent in clear (load xfrm_user and esp4, or use --opt encrypted=wireguard)",
            n.name
        ),
        _ => format!("network {} is encrypted with IPsec and this node's IPsec policies are not in place yet", n.name),
    };
    NetError::CarrierMissing(why)
}

/// Runs `work` on the carrier in `slot` on a blocking thread, taking it
/// out meanwhile and putting it back after.
async fn on_blocking<T, R>(
    slot: &mut Option<T>,
    what: &'static str,
    work: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Result<R, NetError>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let Some(mut carrier) = slot.take() else {
        return Err(NetError::Busy(what));
    };
    let (carrier, result) = tokio::task::spawn_blocking(move || {
        let result = work(&mut carrier);
        (carrier, result)
    })
    .await
    .map_err(|source| NetError::Worker { what, source })?;
    *slot = Some(carrier);
    Ok(result)
}

/// Brings IPsec in line with `want` on a blocking thread.
async fn apply_ipsec(inner: &mut Inner, want: Option<IpsecAssignment>, local: Ipv4Addr) -> Result<(), NetError> {
    let result = on_blocking(&mut inner.ipsec, "IPsec", move |i| i.apply(want.as_ref(), local)).await?;
    inner.ipsec_port = inner.ipsec.as_ref().and_then(Ipsec::port);
    if let Err(e) = &result {
        log::warn!("{e}");
    }
    result
}

/// Brings the tunnel in line with `want` on a blocking thread.
async fn apply_tunnel(inner: &mut Inner, want: Option<TunnelAssignment>, underlay: u32) -> Result<(), NetError> {
    let result = on_blocking(&mut inner.tunnel, "the WireGuard tunnel", move |t| {
        t.apply(want.as_ref(), underlay)
    })
    .await?;
    inner.tunnel_address = inner.tunnel.as_ref().and_then(Tunnel::address);
    if let Err(e) = &result {
        log::warn!("{e}");
    }
    result
}

/// Writes the changes from what the kernel holds (as last written, or
/// read afresh) to what `wanted` makes of it.
async fn sync<W>(inner: &mut Inner, wanted: W) -> Result<(), NetError>
where
    W: FnOnce(&BTreeMap<u32, OverlayState>) -> BTreeMap<u32, OverlayState> + Send + 'static,
{
    let known = inner.known.take();
    let result = blocking("programming the overlay networks", move |nl| async move {
        let current = match known {
            Some(k) => k,
            None => vxlan::observe(&nl).await?,
        };
        let target = wanted(&current);
        vxlan::apply_all(&nl, &vxlan::plan(&target, &current)).await?;
        Ok(target)
    })
    .await;
    match result {
        Ok(target) => {
            inner.known = Some(target);
            Ok(())
        }
        Err(e) => {
            log::warn!("{e}");
            Err(e)
        }
    }
}

/// Runs netlink work on a blocking thread (it has its own runtime); a
/// failure says it happened while `doing`.
async fn blocking<T, F, Fut>(doing: &'static str, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetlinkError>>,
{
    tokio::task::spawn_blocking(move || Netlink::run(work))
        .await
        .map_err(|source| NetError::Worker {
            what: "overlay",
            source,
        })?
        .map_err(NetError::kernel(doing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::subnet::Subnet;
    use crate::api::{
        network::{NetworkPeers, Peer},
        service::{Assignment, DesiredState, TaskState},
    };

    fn on(network: u64, vni: u32, address: [u8; 4], mtu: Option<u32>) -> TaskNetwork {
        TaskNetwork {
            network,
            name: format!("n{network}"),
            vni,
            subnet: Subnet::parse("10.0.0.0/24").unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            address: address.into(),
            mtu,
            encryption: Encryption::None,
        }
    }

    fn peer(address: [u8; 4], vtep: &str) -> Peer {
        Peer {
            address: address.into(),
            vtep: vtep.into(),
        }
    }

    #[test]
    fn a_node_wants_the_remote_endpoints_of_its_own_networks_only() {
        let spec = crate::api::service::TaskSpec {
            networks: vec![on(1, 4096, [10, 0, 0, 2], None), on(2, 4097, [10, 0, 1, 2], Some(1400))],
            ..Default::default()
        };
        let assignments = Assignments {
            digest: String::new(),
            tasks: vec![Assignment {
                endpoints_pending: 0,
                task: 1,
                service: 1,
                desired: DesiredState::Running,
                state: TaskState::Running,
                spec,
            }],
            retained: vec![],
            networks: vec![
                NetworkPeers {
                    network: 1,
                    vni: 4096,
                    peers: vec![
                        peer([10, 0, 0, 2], "192.168.0.1"),
                        peer([10, 0, 0, 3], "192.168.0.1"),
                        peer([10, 0, 0, 4], "192.168.0.2"),
                    ]
                    .into(),
                },
                NetworkPeers {
                    network: 2,
                    vni: 4097,
                    peers: vec![peer([10, 0, 1, 2], "192.168.0.1")].into(),
                },
            ],
            vtep: "192.168.0.1".into(),
            data_path_port: 4789,
            tunnel: None,
            ipsec: None,
            mesh: None,
            services: vec![],
            ..Default::default()
        };
        let w = wanted(&assignments, 9000, false);
        assert_eq!(w.len(), 2);
        assert_eq!(w[&4096].mtu, 8950, "the underlay's MTU minus VXLAN's 50");
        assert_eq!(w[&4097].mtu, 1400, "a fixed MTU wins");
        let remote: Ipv4Addr = [10, 0, 0, 4].into();
        assert_eq!(
            w[&4096].fdb,
            [(task_mac(remote), "192.168.0.2".parse().unwrap())].into(),
            "local endpoints need no entry"
        );
        assert_eq!(w[&4096].neighbours, [(remote, task_mac(remote))].into());
        assert!(w[&4097].fdb.is_empty());
    }

    #[test]
    fn macs_names_and_mtus() {
        assert_eq!(task_mac([10, 0, 0, 2].into()), [2, 0x42, 10, 0, 0, 2]);
        assert_eq!(host_link_name(0xabc, 1), "m1000000000abc");
        assert!(host_link_name(u64::MAX, crate::api::network::MAX_TASK_NETWORKS).len() <= 15);
        assert_ne!(host_link_name(7, 1), crate::agent::net::bridge::host_link_name(7));
        assert_eq!(network_mtu(None, Encryption::None, 1500), 1450);
        assert_eq!(
            network_mtu(None, Encryption::WireGuard, 1500),
            1370,
            "WireGuard's 60 and VXLAN over IPv6's 70"
        );
        assert_eq!(network_mtu(None, Encryption::None, 100), MIN_MTU);
    }

    /// Node 192.168.0.1 runs one task on network `n` (VNI 4096), which
    /// has an endpoint on each of .1, .2 and .3.
    fn on_three_nodes(n: TaskNetwork) -> Assignments {
        Assignments {
            tasks: vec![Assignment {
                endpoints_pending: 0,
                task: 1,
                service: 1,
                desired: DesiredState::Running,
                state: TaskState::Running,
                spec: crate::api::service::TaskSpec {
                    networks: vec![n],
                    ..Default::default()
                },
            }],
            networks: vec![NetworkPeers {
                network: 1,
                vni: 4096,
                peers: vec![
                    peer([10, 0, 0, 2], "192.168.0.1"),
                    peer([10, 0, 0, 3], "192.168.0.2"),
                    peer([10, 0, 0, 4], "192.168.0.3"),
                ]
                .into(),
            }],
            vtep: "192.168.0.1".into(),
            data_path_port: 4789,
            ..Default::default()
        }
    }

    #[test]
    fn an_encrypted_network_points_at_tunnel_addresses_and_skips_nodes_without_a_peer() {
        use crate::api::assignment::tunnel::{PairKey, TunnelAssignment, TunnelPeerInfo};
        let mut n = on(1, 4096, [10, 0, 0, 2], None);
        n.encryption = Encryption::WireGuard;
        let tunnel_of = |last: u16| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last);
        let mut assignments = on_three_nodes(n);
        let w = wanted(&assignments, 1500, false);
        assert_eq!(w[&4096].local, None, "no tunnel yet: the network is not made");
        assert!(w[&4096].fdb.is_empty(), "and nothing is sent in clear");
        assignments.tunnel = Some(TunnelAssignment {
            address: tunnel_of(1),
            prefix: tunnel_of(0),
            prefix_len: 48,
            port: 51820,
            vxlan_port: 4789,
            key_epoch: 1,
            // Node .3 has reported no key: it is no peer.
            peers: vec![TunnelPeerInfo {
                node: 2,
                public_key: String::new(),
                endpoint: "192.168.0.2:51820".parse().unwrap(),
                address: tunnel_of(2),
                psk: PairKey([0; 32]),
            }],
        });
        let w = wanted(&assignments, 1500, false);
        let remote: Ipv4Addr = [10, 0, 0, 3].into();
        assert_eq!(w[&4096].local, Some(IpAddr::V6(tunnel_of(1))));
        assert_eq!(w[&4096].mtu, 1370);
        assert_eq!(w[&4096].fdb, [(task_mac(remote), IpAddr::V6(tunnel_of(2)))].into());
        assert_eq!(w[&4096].neighbours.len(), 1);
    }

    #[test]
    fn an_ipsec_network_waits_for_its_policies_and_skips_nodes_without_keys() {
        use crate::api::assignment::ipsec::{EspEpoch, EspKey, EspPeer, EspSa, IpsecAssignment};
        let mut n = on(1, 4096, [10, 0, 0, 2], None);
        n.encryption = Encryption::Ipsec;
        let sa = EspSa {
            spi: 0x100,
            key: EspKey([0; 20]),
        };
        let keyed = |address: [u8; 4], epochs: usize| EspPeer {
            node: 2,
            address: address.into(),
            epochs: (0..epochs)
                .map(|_| EspEpoch {
                    epoch: 1,
                    outbound: sa.clone(),
                    inbound: sa.clone(),
                })
                .collect(),
        };
        let mut assignments = on_three_nodes(n);
        assignments.ipsec = Some(IpsecAssignment {
            port: 4790,
            key_epoch: 1,
            // No overlay key yet for node .3: no associations.
            peers: vec![keyed([192, 168, 0, 2], 1), keyed([192, 168, 0, 3], 0)],
        });
        let w = wanted(&assignments, 1500, false);
        assert_eq!(w[&4096].local, None, "no policies yet: the network is not made");
        let w = wanted(&assignments, 1500, true);
        assert_eq!(w[&4096].local, Some(IpAddr::from([192, 168, 0, 1])));
        assert_eq!(w[&4096].port, 4790, "its own port, which ESP covers");
        assert_eq!(w[&4096].mtu, 1413, "VXLAN's 50 and ESP's 37");
        let remote: Ipv4Addr = [10, 0, 0, 3].into();
        assert_eq!(
            w[&4096].fdb,
            [(task_mac(remote), IpAddr::from([192, 168, 0, 2]))].into(),
            "a node without associations gets nothing"
        );
    }

    #[test]
    fn at_most_15_networks_per_service() {
        let mut spec = crate::api::service::ServiceSpec::new("web", vec!["true".into()]);
        spec.networks = (0..16).map(|i| format!("n{i}")).collect();
        assert!(spec.validate().unwrap_err().contains("at most 15"));
    }
}
