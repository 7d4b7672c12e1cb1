//! This node's side of the overlay networks: what the kernel should hold
//! for the node's assignments ([`wanted`], pure), kept in line
//! incrementally ([`Overlays::apply`]: only the differences are written),
//! and each task's port on each of its networks ([`Overlays::attach`]).
//!
//! A plain network's VXLAN device encapsulates from the node's data-path
//! address; an encrypted one's from the node's tunnel address, so its
//! traffic is routed into the WireGuard tunnel ([`super::tunnel`]), which
//! is set up before such a network and removed after the last one.
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

use super::{
    netns::NetNs,
    tunnel::{Tunnel, VXLAN6_OVERHEAD, WIREGUARD_OVERHEAD},
};
use crate::{
    control::{
        api::Assignments,
        overlay::{Encryption, TaskNetwork},
        tunnel::TunnelAssignment,
    },
    dataplane::{
        netlink::{Mac, Netlink, NetlinkError},
        vxlan::{self, OverlayState, TaskPort},
        wireguard::Key,
    },
};

/// VXLAN's overhead on IPv4: outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

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
/// tunnel addresses when encrypted).
pub fn network_mtu(fixed: Option<u32>, encryption: Encryption, underlay: u32) -> u32 {
    let overhead = match encryption {
        Encryption::WireGuard => WIREGUARD_OVERHEAD + VXLAN6_OVERHEAD,
        Encryption::None | Encryption::Ipsec => VXLAN_OVERHEAD,
    };
    fixed.unwrap_or_else(|| underlay.saturating_sub(overhead).max(MIN_MTU))
}

/// The host end of task `task`'s veth on its `position`-th overlay
/// (1-based): `m`, one hex digit, 12 of the task ID; the node bridge's
/// `mv...` never collides since `v` is no hex digit.
pub fn host_link_name(task: u64, position: usize) -> String {
    format!("m{position:x}{:012x}", task & 0xffff_ffff_ffff)
}

/// Where network traffic of `encryption` is encapsulated from on this
/// node, if it can be: the data-path address, or the tunnel address.
fn local_address(encryption: Encryption, vtep: Option<Ipv4Addr>, tunnel: Option<Ipv6Addr>) -> Option<IpAddr> {
    match encryption {
        Encryption::None => vtep.map(IpAddr::V4),
        Encryption::WireGuard => tunnel.map(IpAddr::V6),
        // Not done yet: its tasks are refused, and nothing is made.
        Encryption::Ipsec => None,
    }
}

/// What the kernel should hold for `assignments`: each network a task here
/// is on, with an FDB and a neighbour entry for every endpoint on another
/// node. An encrypted network's entries point at the other nodes' tunnel
/// addresses; an endpoint whose node has no tunnel peer (no key reported
/// yet) gets no entry, so nothing of it is ever sent in clear.
pub fn wanted(assignments: &Assignments, underlay_mtu: u32) -> BTreeMap<u32, OverlayState> {
    let vtep = assignments.vtep.parse::<Ipv4Addr>().ok();
    let tunnel = assignments.tunnel.as_ref();
    let tunnel_of: BTreeMap<IpAddr, Ipv6Addr> = tunnel
        .map(|t| t.peers.iter().map(|p| (p.endpoint.ip(), p.address)).collect())
        .unwrap_or_default();
    let mut out: BTreeMap<u32, OverlayState> = BTreeMap::new();
    let mut encrypted = BTreeSet::new();
    for n in assignments.tasks.iter().flat_map(|t| &t.spec.networks) {
        let state = out.entry(n.vni).or_default();
        state.mtu = network_mtu(n.mtu, n.encryption, underlay_mtu);
        state.local = local_address(n.encryption, vtep, tunnel.map(|t| t.address));
        if n.encryption != Encryption::None {
            encrypted.insert(n.vni);
        }
    }
    for network in &assignments.networks {
        let Some(state) = out.get_mut(&network.vni) else {
            continue;
        };
        for peer in network.peers.iter().filter(|p| p.vtep != assignments.vtep) {
            let Ok(node) = peer.vtep.parse::<IpAddr>() else {
                continue;
            };
            let dst = if encrypted.contains(&network.vni) {
                match tunnel_of.get(&node) {
                    Some(a) => IpAddr::V6(*a),
                    None => continue,
                }
            } else {
                node
            };
            let mac = task_mac(peer.address);
            state.fdb.insert(mac, dst);
            state.neighbours.insert(peer.address, mac);
        }
    }
    out
}

/// Why a task cannot be put on its overlays (the number of networks is
/// checked when the service is created or updated).
pub fn check_task_networks(networks: &[TaskNetwork]) -> Result<(), String> {
    if let Some(n) = networks.iter().find(|n| n.encryption == Encryption::Ipsec) {
        return Err(format!(
            "network {} is encrypted with IPsec, which this agent cannot do yet; the task is not started rather than sent in clear (use --opt encrypted=wireguard)",
            n.name
        ));
    }
    Ok(())
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
    /// Everything was removed (the node leaves): a late assignment must
    /// not make it again.
    closed: bool,
}

/// The node's overlay networks.
pub struct Overlays {
    inner: tokio::sync::Mutex<Inner>,
    public_key: Key,
}

impl Overlays {
    /// Nothing known yet; nothing is touched before the first apply.
    /// `tunnel` is the node's WireGuard tunnel, used by encrypted networks.
    pub fn new(tunnel: Tunnel) -> Overlays {
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
                closed: false,
            }),
        }
    }

    /// The node's WireGuard public key.
    pub fn public_key(&self) -> Key {
        self.public_key
    }

    /// Brings the kernel in line with `assignments`, writing only what
    /// differs. Logs and returns the first failure (the next call reads
    /// the kernel again).
    pub async fn apply(&self, assignments: &Assignments) -> Result<(), String> {
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
                let m = blocking(move |nl| async move { vxlan::underlay_mtu(&nl, local).await })
                    .await?
                    .unwrap_or(DEFAULT_UNDERLAY_MTU);
                inner.underlay_mtu = Some(m);
                m
            }
        };
        // The tunnel is up before the networks that use it, and goes after.
        if assignments.tunnel.is_some() {
            apply_tunnel(&mut inner, assignments.tunnel.clone(), underlay).await?;
        }
        let wanted = wanted(assignments, underlay);
        sync(&mut inner, move |_| wanted).await?;
        if assignments.tunnel.is_none() {
            apply_tunnel(&mut inner, None, underlay).await?;
        }
        Ok(())
    }

    /// Puts task `task` (namespace at `netns`) on each of `networks`:
    /// interface `eth1`, `eth2`, ... in order, with its address and the
    /// network's MTU. Creates a network's devices if the task is the
    /// first here to need them.
    pub async fn attach(&self, task: u64, netns: &Path, networks: &[TaskNetwork]) -> Result<(), String> {
        if networks.is_empty() {
            return Ok(());
        }
        check_task_networks(networks)?;
        let mut inner = self.inner.lock().await;
        if inner.closed {
            return Err("this node is leaving the swarm".into());
        }
        let (Some(vtep), Some(underlay)) = (inner.vtep, inner.underlay_mtu) else {
            return Err("this node has no IPv4 data-path address, so it cannot join overlay networks".into());
        };
        let mut needed = Vec::new();
        for n in networks {
            let Some(local) = local_address(n.encryption, Some(vtep), inner.tunnel_address) else {
                return Err(format!(
                    "network {} is encrypted and this node's WireGuard tunnel is not up",
                    n.name
                ));
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
            for (vni, mtu, local) in needed {
                wanted.entry(vni).or_insert_with(|| OverlayState {
                    local: Some(local),
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
        let plugged = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let ns = NetNs::open_at(&netns, "task").map_err(|e| e.to_string())?;
            let host_side = &ports;
            Netlink::run(|nl| async move {
                for p in host_side {
                    vxlan::plug(&nl, p, ns.fd()).await?;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
            let ns = NetNs::open_at(&netns, "task").map_err(|e| e.to_string())?;
            ns.run(move || {
                Netlink::run(|nl| async move {
                    for p in &ports {
                        vxlan::configure_inside(&nl, p).await?;
                    }
                    Ok(())
                })
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("overlay worker: {e}"))?;
        plugged.map_err(|e| format!("attaching the task to its overlay networks: {e}"))
    }

    /// Takes over the ports a previous agent made for task `task` on its
    /// `networks` overlays (their names follow from the task and position).
    pub async fn adopt(&self, task: u64, networks: usize) {
        if networks > 0 {
            let links = (1..=networks).map(|i| host_link_name(task, i)).collect();
            self.inner.lock().await.ports.insert(task, links);
        }
    }

    /// Removes task `task`'s ports (its namespace may be gone already,
    /// taking them with it).
    pub async fn detach(&self, task: u64) {
        let Some(links) = self.inner.lock().await.ports.remove(&task) else {
            return;
        };
        let removed = blocking(move |nl| async move {
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
            log::warn!("detaching task {task} from its overlays: {e}");
        }
    }

    /// Removes every overlay network of this node, and its tunnel (it
    /// leaves the swarm).
    pub async fn remove_all(&self) {
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
    }
}

/// Brings the tunnel in line with `want` on a blocking thread.
async fn apply_tunnel(inner: &mut Inner, want: Option<TunnelAssignment>, underlay: u32) -> Result<(), String> {
    let Some(mut tunnel) = inner.tunnel.take() else {
        return Err("the WireGuard tunnel is busy".into());
    };
    let (tunnel, result) = tokio::task::spawn_blocking(move || {
        let result = tunnel.apply(want.as_ref(), underlay);
        (tunnel, result)
    })
    .await
    .map_err(|e| format!("tunnel worker: {e}"))?;
    inner.tunnel_address = tunnel.address();
    inner.tunnel = Some(tunnel);
    if let Err(e) = &result {
        log::warn!("{e}");
    }
    result
}

/// Writes the changes from what the kernel holds (as last written, or
/// read afresh) to what `wanted` makes of it.
async fn sync<W>(inner: &mut Inner, wanted: W) -> Result<(), String>
where
    W: FnOnce(&BTreeMap<u32, OverlayState>) -> BTreeMap<u32, OverlayState> + Send + 'static,
{
    let known = inner.known.take();
    let port = inner.port;
    let result = blocking(move |nl| async move {
        let current = match known {
            Some(k) => k,
            None => vxlan::observe(&nl).await?,
        };
        let target = wanted(&current);
        vxlan::apply_all(&nl, port, &vxlan::plan(&target, &current)).await?;
        Ok(target)
    })
    .await;
    match result {
        Ok(target) => {
            inner.known = Some(target);
            Ok(())
        }
        Err(e) => {
            let message = format!("programming the overlay networks: {e}");
            log::warn!("{message}");
            Err(message)
        }
    }
}

/// Runs netlink work on a blocking thread (it has its own runtime).
async fn blocking<T, F, Fut>(work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetlinkError>>,
{
    tokio::task::spawn_blocking(move || Netlink::run(work))
        .await
        .map_err(|e| format!("overlay worker: {e}"))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        overlay::{NetworkPeers, Peer},
        service::{Assignment, DesiredState, TaskState},
    };
    use crate::subnet::Subnet;

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
        let spec = crate::control::service::TaskSpec {
            networks: vec![on(1, 4096, [10, 0, 0, 2], None), on(2, 4097, [10, 0, 1, 2], Some(1400))],
            ..Default::default()
        };
        let assignments = Assignments {
            digest: String::new(),
            tasks: vec![Assignment {
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
                    ],
                },
                NetworkPeers {
                    network: 2,
                    vni: 4097,
                    peers: vec![peer([10, 0, 1, 2], "192.168.0.1")],
                },
            ],
            vtep: "192.168.0.1".into(),
            data_path_port: 4789,
            tunnel: None,
            ipsec: None,
        };
        let w = wanted(&assignments, 9000);
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
        assert!(host_link_name(u64::MAX, crate::control::overlay::MAX_TASK_NETWORKS).len() <= 15);
        assert_ne!(host_link_name(7, 1), super::super::network::host_link_name(7));
        assert_eq!(network_mtu(None, Encryption::None, 1500), 1450);
        assert_eq!(
            network_mtu(None, Encryption::WireGuard, 1500),
            1370,
            "WireGuard's 60 and VXLAN over IPv6's 70"
        );
        assert_eq!(network_mtu(None, Encryption::None, 100), MIN_MTU);
    }

    #[test]
    fn an_encrypted_network_points_at_tunnel_addresses_and_skips_nodes_without_a_peer() {
        use crate::control::tunnel::{PairKey, TunnelAssignment, TunnelPeerInfo};
        let mut n = on(1, 4096, [10, 0, 0, 2], None);
        n.encryption = Encryption::WireGuard;
        let tunnel_of = |last: u16| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last);
        let mut assignments = Assignments {
            tasks: vec![Assignment {
                task: 1,
                service: 1,
                desired: DesiredState::Running,
                state: TaskState::Running,
                spec: crate::control::service::TaskSpec {
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
                ],
            }],
            vtep: "192.168.0.1".into(),
            data_path_port: 4789,
            ..Default::default()
        };
        let w = wanted(&assignments, 1500);
        assert_eq!(w[&4096].local, None, "no tunnel yet: the network is not made");
        assert!(w[&4096].fdb.is_empty(), "and nothing is sent in clear");
        assignments.tunnel = Some(TunnelAssignment {
            address: tunnel_of(1),
            prefix: tunnel_of(0),
            prefix_len: 48,
            port: 51820,
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
        let w = wanted(&assignments, 1500);
        let remote: Ipv4Addr = [10, 0, 0, 3].into();
        assert_eq!(w[&4096].local, Some(IpAddr::V6(tunnel_of(1))));
        assert_eq!(w[&4096].mtu, 1370);
        assert_eq!(w[&4096].fdb, [(task_mac(remote), IpAddr::V6(tunnel_of(2)))].into());
        assert_eq!(w[&4096].neighbours.len(), 1);
    }

    #[test]
    fn ipsec_networks_and_too_many_networks_are_refused() {
        let mut n = on(1, 4096, [10, 0, 0, 2], None);
        assert!(check_task_networks(std::slice::from_ref(&n)).is_ok());
        n.encryption = Encryption::WireGuard;
        assert!(check_task_networks(std::slice::from_ref(&n)).is_ok());
        n.encryption = Encryption::Ipsec;
        assert!(check_task_networks(&[n]).unwrap_err().contains("IPsec"));
        let mut spec = crate::control::service::ServiceSpec::new("web", vec!["true".into()]);
        spec.networks = (0..16).map(|i| format!("n{i}")).collect();
        assert!(spec.validate().unwrap_err().contains("at most 15"));
    }
}
