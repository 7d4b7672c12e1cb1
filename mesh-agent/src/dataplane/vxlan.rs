//! Overlay networks in the kernel (VXLAN): per network a bridge `mbr-VNI`
//! and a VXLAN device `mvx-VNI` enslaved to it, in the node's namespace.
//! The bridge has no address, so the node itself never routes into an
//! overlay. The VXLAN device neither learns nor floods: a static FDB entry
//! per remote task says which node (VTEP) a MAC lives behind, and a
//! permanent neighbour entry per remote task lets the device answer ARP
//! itself (`proxy`).
//!
//! [`plan`] is the pure diff from what is in the kernel to what is wanted;
//! [`observe`] reads the kernel and [`apply_all`] carries out the changes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::BorrowedFd,
};

use super::netlink::{Mac, Netlink, NetlinkError, VxlanLink};

/// The bridge of network `vni`.
pub fn bridge_name(vni: u32) -> String {
    format!("mbr-{vni}")
}

/// The VXLAN device of network `vni`.
pub(crate) fn vxlan_name(vni: u32) -> String {
    format!("mvx-{vni}")
}

fn parse_vxlan_name(name: &str) -> Option<u32> {
    name.strip_prefix("mvx-")?.parse().ok()
}

/// One overlay network on this node, as wanted or as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayState {
    /// Where the VXLAN device encapsulates from: the node's data-path
    /// address, or its tunnel address for a network that travels inside
    /// the WireGuard tunnels.
    pub local: Option<IpAddr>,
    /// The UDP port it sends to and listens on: the swarm's VXLAN port, or
    /// the IPsec networks' own.
    pub port: u16,
    /// The MTU of the VXLAN device (and so of the bridge).
    pub mtu: u32,
    /// Remote task MAC -> the VTEP of its node.
    pub fdb: BTreeMap<Mac, IpAddr>,
    /// Remote task address -> its MAC.
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
}

/// One change to the kernel's overlay state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Create the bridge and VXLAN device of a network.
    Create {
        vni: u32,
        mtu: u32,
        local: IpAddr,
        port: u16,
    },
    /// Make a network's VXLAN device again, encapsulating from another
    /// address or to another port (its bridge and the task ports on it
    /// stay).
    Relocate {
        vni: u32,
        mtu: u32,
        local: IpAddr,
        port: u16,
    },
    /// Change a network's MTU.
    SetMtu { vni: u32, mtu: u32 },
    /// Point a MAC at a node.
    SetFdb { vni: u32, mac: Mac, vtep: IpAddr },
    /// Forget where a MAC is.
    DeleteFdb { vni: u32, mac: Mac, vtep: IpAddr },
    /// Answer ARP for a remote address.
    SetNeighbour { vni: u32, address: Ipv4Addr, mac: Mac },
    /// Stop answering ARP for an address.
    DeleteNeighbour { vni: u32, address: Ipv4Addr },
    /// Remove a network's bridge and VXLAN device.
    Remove { vni: u32 },
}

/// The changes that turn `current` into `wanted`: networks created first,
/// then per network the stale entries removed before the new ones are
/// set, and networks no longer wanted removed last. Nothing already right
/// is touched. A wanted network without a local address is left alone.
pub(crate) fn plan(wanted: &BTreeMap<u32, OverlayState>, current: &BTreeMap<u32, OverlayState>) -> Vec<Change> {
    let empty = OverlayState::default();
    let mut changes = Vec::new();
    for (&vni, want) in wanted {
        let Some(local) = want.local else {
            continue;
        };
        let have = match current.get(&vni) {
            Some(have) if have.local == want.local && have.port == want.port => {
                if have.mtu != want.mtu {
                    changes.push(Change::SetMtu { vni, mtu: want.mtu });
                }
                have
            }
            Some(_) => {
                // A new device starts with no entries.
                changes.push(Change::Relocate {
                    vni,
                    mtu: want.mtu,
                    local,
                    port: want.port,
                });
                &empty
            }
            None => {
                changes.push(Change::Create {
                    vni,
                    mtu: want.mtu,
                    local,
                    port: want.port,
                });
                &empty
            }
        };
        for (&mac, &vtep) in &have.fdb {
            if want.fdb.get(&mac) != Some(&vtep) {
                changes.push(Change::DeleteFdb { vni, mac, vtep });
            }
        }
        for (&address, mac) in &have.neighbours {
            if want.neighbours.get(&address) != Some(mac) {
                changes.push(Change::DeleteNeighbour { vni, address });
            }
        }
        for (&mac, &vtep) in &want.fdb {
            if have.fdb.get(&mac) != Some(&vtep) {
                changes.push(Change::SetFdb { vni, mac, vtep });
            }
        }
        for (&address, &mac) in &want.neighbours {
            if have.neighbours.get(&address) != Some(&mac) {
                changes.push(Change::SetNeighbour { vni, address, mac });
            }
        }
    }
    for &vni in current.keys().filter(|vni| !wanted.contains_key(vni)) {
        changes.push(Change::Remove { vni });
    }
    changes
}

/// The overlay networks in this namespace's kernel: every `mvx-*` device
/// with its MTU, static FDB entries and permanent neighbours.
pub async fn observe(nl: &Netlink) -> Result<BTreeMap<u32, OverlayState>, NetlinkError> {
    let mut out = BTreeMap::new();
    for link in nl.links().await? {
        let Some(vni) = parse_vxlan_name(&link.name) else {
            continue;
        };
        let state = OverlayState {
            local: link.vxlan_local,
            port: link.vxlan_port.unwrap_or(0),
            mtu: link.mtu,
            fdb: nl.fdb_entries(link.index).await?.into_iter().collect(),
            neighbours: nl.neighbours(link.index).await?.into_iter().collect(),
        };
        out.insert(vni, state);
    }
    Ok(out)
}

/// Carries out `changes` in order, looking up each VXLAN device's index
/// once.
pub(crate) async fn apply_all(nl: &Netlink, changes: &[Change]) -> Result<(), NetlinkError> {
    let mut indexes = BTreeMap::new();
    for change in changes {
        log::debug!("overlay: {change:?}");
        match *change {
            Change::Create { vni, mtu, local, port } => {
                indexes.remove(&vni);
                create(nl, local, port, vni, mtu).await?;
            }
            Change::Relocate { vni, mtu, local, port } => {
                indexes.remove(&vni);
                add_vxlan(nl, local, port, vni, mtu).await?;
            }
            Change::SetMtu { vni, mtu } => nl.set_mtu(&vxlan_name(vni), mtu).await?,
            Change::SetFdb { vni, mac, vtep } => {
                nl.set_fdb(device_index(nl, &mut indexes, vni).await?, mac, vtep)
                    .await?
            }
            Change::DeleteFdb { vni, mac, vtep } => {
                nl.delete_fdb(device_index(nl, &mut indexes, vni).await?, mac, vtep)
                    .await?
            }
            Change::SetNeighbour { vni, address, mac } => {
                nl.set_neighbour(device_index(nl, &mut indexes, vni).await?, address, mac)
                    .await?
            }
            Change::DeleteNeighbour { vni, address } => {
                nl.delete_neighbour(device_index(nl, &mut indexes, vni).await?, address)
                    .await?
            }
            Change::Remove { vni } => {
                indexes.remove(&vni);
                // The VXLAN device goes last: it is what `observe` sees, so
                // a network it no longer reports has no bridge left either.
                for name in [bridge_name(vni), vxlan_name(vni)] {
                    match nl.delete_link(&name).await {
                        Ok(()) | Err(NetlinkError::NoSuchLink(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Network `vni`'s VXLAN device index, looked up on first use.
async fn device_index(nl: &Netlink, indexes: &mut BTreeMap<u32, u32>, vni: u32) -> Result<u32, NetlinkError> {
    if let Some(&index) = indexes.get(&vni) {
        return Ok(index);
    }
    let index = nl.link_index(&vxlan_name(vni)).await?;
    indexes.insert(vni, index);
    Ok(index)
}

/// Creates network `vni`'s bridge and VXLAN device, replacing a bridge a
/// failed earlier attempt may have left.
async fn create(nl: &Netlink, local: IpAddr, port: u16, vni: u32, mtu: u32) -> Result<(), NetlinkError> {
    let bridge = bridge_name(vni);
    match nl.delete_link(&bridge).await {
        Ok(()) | Err(NetlinkError::NoSuchLink(_)) => {}
        Err(e) => return Err(e),
    }
    nl.add_bridge(&bridge).await?;
    add_vxlan(nl, local, port, vni, mtu).await?;
    nl.set_up(&bridge).await
}

/// (Re)makes network `vni`'s VXLAN device on its existing bridge.
async fn add_vxlan(nl: &Netlink, local: IpAddr, port: u16, vni: u32, mtu: u32) -> Result<(), NetlinkError> {
    let (bridge, vxlan) = (bridge_name(vni), vxlan_name(vni));
    match nl.delete_link(&vxlan).await {
        Ok(()) | Err(NetlinkError::NoSuchLink(_)) => {}
        Err(e) => return Err(e),
    }
    nl.add_vxlan(&VxlanLink {
        name: vxlan.clone(),
        vni,
        local,
        port,
        mtu,
    })
    .await?;
    nl.set_controller(&vxlan, &bridge).await?;
    nl.set_up(&vxlan).await
}

/// The MTU of the link that holds `local` (the underlay), if any.
pub(crate) async fn underlay_mtu(nl: &Netlink, local: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
    let Some(index) = nl.link_with_address(IpAddr::V4(local)).await? else {
        return Ok(None);
    };
    Ok(nl.links().await?.into_iter().find(|l| l.index == index).map(|l| l.mtu))
}

/// A task's port on an overlay: the host end `host_link` on the network's
/// bridge, the task's end `inside` with the task's MAC, address and MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TaskPort {
    /// The network's VNI.
    pub(crate) vni: u32,
    /// The host-side veth.
    pub(crate) host_link: String,
    /// The interface inside the task (`eth1`, ...).
    pub(crate) inside: String,
    /// The task's MAC (derived from its address).
    pub(crate) mac: Mac,
    /// The task's address and prefix length.
    pub(crate) address: Ipv4Addr,
    /// Prefix length of the network.
    pub(crate) prefix: u8,
    /// The network's MTU.
    pub(crate) mtu: u32,
}

/// Creates the veth of `port` with its inside end in the task's
/// namespace `netns`, and puts the host end on the bridge. The inside
/// end's address is set by [`configure_inside`], run in the task's
/// namespace.
pub(crate) async fn plug(nl: &Netlink, port: &TaskPort, netns: BorrowedFd<'_>) -> Result<(), NetlinkError> {
    match nl.delete_link(&port.host_link).await {
        Ok(()) | Err(NetlinkError::NoSuchLink(_)) => {}
        Err(e) => return Err(e),
    }
    nl.add_veth(
        &port.host_link,
        &port.inside,
        Some(netns),
        Some(port.mtu),
        Some(port.mac),
    )
    .await?;
    nl.set_controller(&port.host_link, &bridge_name(port.vni)).await?;
    nl.set_up(&port.host_link).await
}

/// Addresses the task's end of `port` and brings it up (in the task's
/// namespace). The subnet's route comes with the address; the default
/// route stays on the node bridge, as Swarm's does.
pub(crate) async fn configure_inside(nl: &Netlink, port: &TaskPort) -> Result<(), NetlinkError> {
    nl.add_address(&port.inside, IpAddr::V4(port.address), port.prefix)
        .await?;
    nl.set_up(&port.inside).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(mtu: u32, fdb: &[(u8, [u8; 4])], neighbours: &[(u8, u8)]) -> OverlayState {
        OverlayState {
            local: Some(IpAddr::from([192, 168, 0, 1])),
            port: 4789,
            mtu,
            fdb: fdb
                .iter()
                .map(|(m, v)| ([2, 0x42, 10, 0, 0, *m], IpAddr::from(*v)))
                .collect(),
            neighbours: neighbours
                .iter()
                .map(|(a, m)| (Ipv4Addr::new(10, 0, 0, *a), [2, 0x42, 10, 0, 0, *m]))
                .collect(),
        }
    }

    #[test]
    fn nothing_changes_when_the_kernel_is_right() {
        let s: BTreeMap<u32, OverlayState> = [(4096, state(1450, &[(3, [192, 168, 0, 2])], &[(3, 3)]))].into();
        assert!(plan(&s, &s).is_empty());
    }

    #[test]
    fn only_the_differences_are_sent_and_removals_come_first() {
        let current: BTreeMap<u32, OverlayState> = [
            (
                4096,
                state(1450, &[(3, [192, 168, 0, 2]), (4, [192, 168, 0, 3])], &[(3, 3), (4, 4)]),
            ),
            (4097, state(1450, &[], &[])),
        ]
        .into();
        let wanted: BTreeMap<u32, OverlayState> = [
            // Task .4 left; task .5 arrived; task .3 moved node.
            (
                4096,
                state(1400, &[(3, [192, 168, 0, 9]), (5, [192, 168, 0, 3])], &[(3, 3), (5, 5)]),
            ),
            (4098, state(1450, &[(7, [192, 168, 0, 2])], &[(7, 7)])),
        ]
        .into();
        let mac = |m| [2, 0x42, 10, 0, 0, m];
        let ip = |a| Ipv4Addr::new(10, 0, 0, a);
        let vtep = |b| IpAddr::from([192, 168, 0, b]);
        assert_eq!(
            plan(&wanted, &current),
            vec![
                Change::SetMtu { vni: 4096, mtu: 1400 },
                Change::DeleteFdb {
                    vni: 4096,
                    mac: mac(3),
                    vtep: vtep(2)
                },
                Change::DeleteFdb {
                    vni: 4096,
                    mac: mac(4),
                    vtep: vtep(3)
                },
                Change::DeleteNeighbour {
                    vni: 4096,
                    address: ip(4)
                },
                Change::SetFdb {
                    vni: 4096,
                    mac: mac(3),
                    vtep: vtep(9)
                },
                Change::SetFdb {
                    vni: 4096,
                    mac: mac(5),
                    vtep: vtep(3)
                },
                Change::SetNeighbour {
                    vni: 4096,
                    address: ip(5),
                    mac: mac(5)
                },
                Change::Create {
                    vni: 4098,
                    mtu: 1450,
                    local: vtep(1),
                    port: 4789,
                },
                Change::SetFdb {
                    vni: 4098,
                    mac: mac(7),
                    vtep: vtep(2)
                },
                Change::SetNeighbour {
                    vni: 4098,
                    address: ip(7),
                    mac: mac(7)
                },
                Change::Remove { vni: 4097 },
            ]
        );
    }

    #[test]
    fn a_network_whose_local_address_changed_gets_a_new_device_and_all_its_entries() {
        let current: BTreeMap<u32, OverlayState> = [(4096, state(1450, &[(3, [192, 168, 0, 2])], &[(3, 3)]))].into();
        let mut wanted = current.clone();
        let tunnel: IpAddr = "fd00::1".parse().unwrap();
        wanted.get_mut(&4096).unwrap().local = Some(tunnel);
        let changes = plan(&wanted, &current);
        assert_eq!(
            changes[0],
            Change::Relocate {
                vni: 4096,
                mtu: 1450,
                local: tunnel,
                port: 4789,
            }
        );
        assert_eq!(changes.len(), 3, "the FDB and neighbour entries are written again");
        let mut moved = current.clone();
        moved.get_mut(&4096).unwrap().port = 4790;
        assert!(
            matches!(plan(&moved, &current)[0], Change::Relocate { port: 4790, .. }),
            "a new port: a new device"
        );
        wanted.get_mut(&4096).unwrap().local = None;
        assert!(plan(&wanted, &current).is_empty(), "no local address yet: left alone");
    }

    #[test]
    fn names_fit_an_interface_name_and_read_back() {
        let vni = 0xff_ffff;
        assert!(vxlan_name(vni).len() <= 15 && bridge_name(vni).len() <= 15);
        assert_eq!(parse_vxlan_name(&vxlan_name(4096)), Some(4096));
        assert_eq!(parse_vxlan_name("mbr-4096"), None);
        assert_eq!(parse_vxlan_name("mvx-x"), None);
    }
}
