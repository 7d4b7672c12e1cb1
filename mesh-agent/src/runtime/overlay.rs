//! This node's side of the overlay networks: what the kernel should hold
//! for the node's assignments ([`wanted`], pure), kept in line
//! incrementally ([`Overlays::apply`]: only the differences are written),
//! and each task's port on each of its networks ([`Overlays::attach`]).
//!
//! On start the first apply reads what the kernel has (an earlier agent's
//! networks are adopted, stale ones removed); after that the state last
//! written is the reference, and any failure makes the next apply read the
//! kernel again.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use super::netns::NetNs;
use crate::{
    control::{
        api::Assignments,
        overlay::{Encryption, TaskNetwork},
    },
    dataplane::{
        netlink::{Mac, Netlink, NetlinkError},
        vxlan::{self, Endpoint, OverlayState, TaskPort},
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
/// VXLAN's overhead.
pub fn network_mtu(fixed: Option<u32>, underlay: u32) -> u32 {
    fixed.unwrap_or_else(|| underlay.saturating_sub(VXLAN_OVERHEAD).max(MIN_MTU))
}

/// The host end of task `task`'s veth on its `position`-th overlay
/// (1-based): `m`, one hex digit, 12 of the task ID; the node bridge's
/// `mv...` never collides since `v` is no hex digit.
pub fn host_link_name(task: u64, position: usize) -> String {
    format!("m{position:x}{:012x}", task & 0xffff_ffff_ffff)
}

/// What the kernel should hold for `assignments`: each network a task here
/// is on, with an FDB and a neighbour entry for every endpoint on another
/// node.
pub fn wanted(assignments: &Assignments, underlay_mtu: u32) -> BTreeMap<u32, OverlayState> {
    let mut out: BTreeMap<u32, OverlayState> = BTreeMap::new();
    for n in assignments.tasks.iter().flat_map(|t| &t.spec.networks) {
        out.entry(n.vni).or_default().mtu = network_mtu(n.mtu, underlay_mtu);
    }
    for network in &assignments.networks {
        let Some(state) = out.get_mut(&network.vni) else {
            continue;
        };
        for peer in network.peers.iter().filter(|p| p.vtep != assignments.vtep) {
            let Ok(vtep) = peer.vtep.parse::<IpAddr>() else {
                continue;
            };
            let mac = task_mac(peer.address);
            state.fdb.insert(mac, vtep);
            state.neighbours.insert(peer.address, mac);
        }
    }
    out
}

/// Why a task cannot be put on its overlays (the number of networks is
/// checked when the service is created or updated).
pub fn check_task_networks(networks: &[TaskNetwork]) -> Result<(), String> {
    if let Some(n) = networks.iter().find(|n| n.encryption != Encryption::None) {
        return Err(format!(
            "network {} is encrypted, which this agent cannot do yet; the task is not started rather than sent in clear",
            n.name
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Inner {
    /// This node's VTEP, from the assignments.
    endpoint: Option<Endpoint>,
    /// The underlay's MTU, read once the endpoint is known.
    underlay_mtu: Option<u32>,
    /// What the kernel holds, as last written or read (`None`: read it).
    known: Option<BTreeMap<u32, OverlayState>>,
    /// The host-side links of each task's ports.
    ports: BTreeMap<u64, Vec<String>>,
}

/// The node's overlay networks.
#[derive(Default)]
pub struct Overlays {
    inner: tokio::sync::Mutex<Inner>,
}

impl Overlays {
    /// Nothing known yet; nothing is touched before the first apply.
    pub fn new() -> Overlays {
        Overlays::default()
    }

    /// Brings the kernel in line with `assignments`, writing only what
    /// differs. Logs and returns the first failure (the next call reads
    /// the kernel again).
    pub async fn apply(&self, assignments: &Assignments) -> Result<(), String> {
        let mut inner = self.inner.lock().await;
        let Ok(local) = assignments.vtep.parse::<Ipv4Addr>() else {
            // No IPv4 data-path address (an older manager, or IPv6): no
            // overlays are possible, and tasks on one are refused at attach.
            return Ok(());
        };
        let endpoint = Endpoint {
            local,
            port: assignments.data_path_port,
        };
        if inner.endpoint != Some(endpoint) {
            // A changed endpoint means devices made for another one.
            inner.known = None;
            inner.underlay_mtu = None;
            inner.endpoint = Some(endpoint);
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
        let wanted = wanted(assignments, underlay);
        sync(&mut inner, endpoint, move |_| wanted).await
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
        let (Some(endpoint), Some(underlay)) = (inner.endpoint, inner.underlay_mtu) else {
            return Err("this node has no IPv4 data-path address, so it cannot join overlay networks".into());
        };
        let ports: Vec<TaskPort> = networks
            .iter()
            .enumerate()
            .map(|(i, n)| TaskPort {
                vni: n.vni,
                host_link: host_link_name(task, i + 1),
                inside: format!("eth{}", i + 1),
                mac: task_mac(n.address),
                address: n.address,
                prefix: n.subnet.prefix,
                mtu: network_mtu(n.mtu, underlay),
            })
            .collect();
        // Networks this task is the first to need; the others as they are.
        let needed: Vec<(u32, u32)> = ports.iter().map(|p| (p.vni, p.mtu)).collect();
        sync(&mut inner, endpoint, move |current| {
            let mut wanted = current.clone();
            for (vni, mtu) in needed {
                wanted.entry(vni).or_insert_with(|| OverlayState {
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

    /// Removes every overlay network of this node (it leaves the swarm).
    pub async fn remove_all(&self) {
        let mut inner = self.inner.lock().await;
        let endpoint = inner.endpoint.unwrap_or(Endpoint {
            local: Ipv4Addr::UNSPECIFIED,
            port: 0,
        });
        inner.known = None;
        if let Err(e) = sync(&mut inner, endpoint, |_| BTreeMap::new()).await {
            log::warn!("removing the overlay networks: {e}");
        }
        inner.ports.clear();
    }
}

/// Writes the changes from what the kernel holds (as last written, or
/// read afresh) to what `wanted` makes of it.
async fn sync<W>(inner: &mut Inner, endpoint: Endpoint, wanted: W) -> Result<(), String>
where
    W: FnOnce(&BTreeMap<u32, OverlayState>) -> BTreeMap<u32, OverlayState> + Send + 'static,
{
    let known = inner.known.take();
    let result = blocking(move |nl| async move {
        let current = match known {
            Some(k) => k,
            None => vxlan::observe(&nl).await?,
        };
        let target = wanted(&current);
        vxlan::apply_all(&nl, endpoint, &vxlan::plan(&target, &current)).await?;
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
        assert_eq!(network_mtu(None, 1500), 1450);
        assert_eq!(network_mtu(None, 100), MIN_MTU);
    }

    #[test]
    fn encrypted_networks_and_too_many_networks_are_refused() {
        let mut n = on(1, 4096, [10, 0, 0, 2], None);
        assert!(check_task_networks(std::slice::from_ref(&n)).is_ok());
        n.encryption = Encryption::WireGuard;
        assert!(check_task_networks(&[n]).unwrap_err().contains("encrypted"));
        let mut spec = crate::control::service::ServiceSpec::new("web", vec!["true".into()]);
        spec.networks = (0..16).map(|i| format!("n{i}")).collect();
        assert!(spec.validate().unwrap_err().contains("at most 15"));
    }
}
